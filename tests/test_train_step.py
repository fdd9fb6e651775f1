"""The sharded train step: mesh equivalence (8 simulated CPU devices), accumulation, guards, shrink."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import preset
from glm_jax.data.blank_infilling import BlankInfillingConfig, SpecialIds
from glm_jax.data.sources import BlankInfillingLoader, ExampleMaker, TokenCorpus
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.sharding import make_mesh
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
from glm_jax.training.state import create_state, state_shardings
from glm_jax.training.train_step import StepConfig, global_batch, loss_sums, make_train_step

SEQ = 64
CONFIG = preset("chatglm-tiny").replace(vocab_size=1408)
IDS = SpecialIds(mask=1400, gmask=1401, smask=1402, sop=1404, eop=1405, pad=3, dblock=1407)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    # Documents with structure (repeated phrases) so the loss moves visibly in a few steps.
    phrases = [rng.integers(10, 1300, size=6) for _ in range(20)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 20, size=int(rng.integers(3, 15)))]) for _ in range(200)]
    maker = ExampleMaker(BlankInfillingConfig(bert_prob=0.5), IDS, seq_len=SEQ, seed=1)
    loader = BlankInfillingLoader(TokenCorpus(docs), maker, batch_size=8, shuffle=False)
    out = [next(loader) for _ in range(5)]
    loader.close()
    return out


def _run(batches, mesh, step_config=StepConfig(), model_config=CONFIG, steps=5):
    model = GLMForCausalLM(model_config)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=10))
    state = create_state(model, tx, SEQ, mesh, seed=0)
    step = make_train_step(model, tx, schedule, step_config, mesh, state_shardings(model, tx, SEQ, mesh))
    losses = []
    for batch in batches[:steps]:
        state, metrics = step(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, metrics


@pytest.fixture(scope="module")
def single_device(batches):
    return _run(batches, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 1, 4)], ids=["dp8", "fsdp8", "dp2_tp4"])
def test_meshes_match_one_device(batches, single_device, shape):
    assert len(jax.devices()) >= 8
    reference, _, _ = single_device
    losses, state, _ = _run(batches, make_mesh(*shape))
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    assert reference[-1] < reference[0]  # it trains
    if shape[1] == 8:  # FSDP really shards params and Adam moments
        kernel = state.params["layers"]["mlp"]["up"]["kernel"]
        assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 8


def test_gradient_accumulation_matches_one_big_batch(batches, single_device):
    reference, _, _ = single_device
    losses, _, _ = _run(batches, make_mesh(1, 1, 1, devices=jax.devices()[:1]), StepConfig(grad_accum=4), steps=3)
    np.testing.assert_allclose(losses, reference[:3], rtol=0, atol=1e-5)


def test_non_finite_and_spiking_steps_are_skipped(batches):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = GLMForCausalLM(CONFIG)
    tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=1, decay_steps=10))
    step = make_train_step(model, tx, schedule, StepConfig(spike_factor=1e-3, spike_warmup_steps=2), mesh,
                           state_shardings(model, tx, SEQ, mesh))
    state = create_state(model, tx, SEQ, mesh, seed=0)

    copy = jax.tree.map(jnp.copy, state)  # the step donates its input
    final = copy.params["final_norm"]
    poisoned = copy.replace(params={**copy.params, "final_norm": {**final, "scale": final["scale"].at[0].set(jnp.nan)}})
    before = jax.tree.map(np.asarray, (poisoned.params, poisoned.opt_state, poisoned.loss_ema))
    after, metrics = step(poisoned, global_batch(batches[0], mesh))
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((after.params, after.opt_state, after.loss_ema))):
        np.testing.assert_array_equal(old, np.asarray(new))
    assert int(after.step) == 1 and int(after.skipped) == 1

    skipped = []
    for batch in batches[:4]:
        state, metrics = step(state, global_batch(batch, mesh))
        skipped.append(int(metrics["skipped"]))
    # after 2 accepted steps the loss is far above 0.001 x its running mean: later steps are dropped
    assert skipped == [0, 0, 1, 1] and int(state.skipped) == 2


def test_embedding_gradient_shrink_scales_the_input_path_only(batches):
    config = CONFIG.replace(tie_word_embeddings=False)  # the embedding then has no output-path gradient
    model = GLMForCausalLM(config)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    params = nn.unbox(model.init(jax.random.key(0), batch["input_ids"][:1])["params"])
    grad = jax.jit(lambda p, alpha: jax.grad(lambda q: loss_sums(model, q, batch, alpha)[0])(p), static_argnums=1)
    full, shrunk = grad(params, 1.0), grad(params, 0.1)
    assert np.abs(full["word_embeddings"]["embedding"]).max() > 0.1
    np.testing.assert_allclose(shrunk["word_embeddings"]["embedding"], 0.1 * full["word_embeddings"]["embedding"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shrunk["final_norm"]["scale"], full["final_norm"]["scale"], rtol=1e-4, atol=1e-6)
