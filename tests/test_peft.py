"""Adapters: official P-Tuning v2 export, LoRA merge, PEFT LoRA layout against PEFT's own formula on the
official fused weights, adapter round trips, and which params a fine-tuning step may change."""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from glm_jax import load_pretrained
from glm_jax.config import preset
from glm_jax.hf_io import CheckpointError, load_torch_file, torch_to_numpy
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.quantization import quantize_params
from glm_jax.sharding import make_mesh
from glm_jax.training import peft
from glm_jax.training.finetune import finetune_state
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
from glm_jax.training.train_step import StepConfig, combine_params, global_batch, make_train_step

ALL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@pytest.mark.parametrize("golden", ["golden6b", "golden2"])
@pytest.mark.parametrize("prefix", ["pre4_noproj", "pre4_proj"])
def test_prefix_export_reproduces_the_official_file(request, tmp_path, golden, prefix):
    root = request.getfixturevalue(golden)
    official = root / "ptuning" / prefix
    model, params = load_pretrained(str(root / "checkpoint"), prefix=str(official))
    out = peft.export_prefix(str(tmp_path / "export"), jax.device_get(params), model.config)
    ours = torch.load(f"{out}/pytorch_model.bin", weights_only=True)
    theirs = torch.load(official / "pytorch_model.bin", weights_only=True)
    assert list(ours) == list(theirs)  # same keys, same order
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    expected = json.loads((official / "config.json").read_text())
    assert (hf["pre_seq_len"], hf["prefix_projection"]) == (expected["pre_seq_len"], expected["prefix_projection"])


def _lora_model(name: str, seed: int = 0, **overrides):
    config = preset(name, lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS, **overrides)
    model = GLMForCausalLM(config)
    params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]))
    params = jax.tree.map(np.array, params)  # writable copies
    rng = np.random.default_rng(seed)
    # Random B (the init is zero, which would make every check below trivial).
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "lora_b":
            leaf[...] = rng.normal(0, 0.5, leaf.shape)
    return model, params


def _logits(model, params, ids):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids))


def _ids(config, batch=2, length=10, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 1000, size=(batch, length))
    if config.gmask_token_id is not None:
        ids[:, -2:] = [config.gmask_token_id, config.bos_token_id]
    return ids


def test_merged_and_unmerged_lora_give_the_same_logits():
    # ChatGLM2 layout: grouped KV and a gated MLP whose gate and up share one A (the fused dense_h_to_4h).
    model, params = _lora_model("chatglm2-tiny")
    ids = _ids(model.config)
    unmerged = _logits(model, params, ids)
    merged_params, plain = peft.merge_lora(params, model.config)
    assert not any(peft.is_lora_param(p) for p in traverse_util.flatten_dict(merged_params))
    merged = _logits(GLMForCausalLM(plain), merged_params, ids)
    base = _logits(GLMForCausalLM(plain), peft._without_lora(params), ids)
    assert np.abs(unmerged - base).mean() > 0.1 * np.abs(base).mean()  # the adapter matters
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=0)
    # Unmerging with the same adapter restores the base kernels.
    adapter = peft.adapter_params(params, "lora")
    restored, _ = peft.merge_lora(combine_params(adapter, merged_params), model.config, subtract=True)
    original = traverse_util.flatten_dict(peft._without_lora(params))
    assert traverse_util.flatten_dict(restored).keys() == original.keys()
    for path, leaf in traverse_util.flatten_dict(restored).items():
        np.testing.assert_allclose(leaf, original[path], atol=1e-6, rtol=0)


@pytest.mark.parametrize("golden,name", [("golden6b", "chatglm"), ("golden2", "chatglm2")])
def test_peft_export_follows_peft_formula_on_the_official_fused_weights(request, tmp_path, golden, name):
    """Our unmerged adapter == the official checkpoint with PEFT's `W += alpha/r · B @ A` applied to the
    official (fused) weights named by the exported keys."""
    root = request.getfixturevalue(golden)
    base_model, base_params = load_pretrained(str(root / "checkpoint"))
    config = base_model.config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS)
    model = GLMForCausalLM(config)
    fresh = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(3)
    flat = traverse_util.flatten_dict(jax.device_get(base_params))
    for path, leaf in traverse_util.flatten_dict(fresh).items():
        if peft.is_lora_param(path):
            flat[path] = rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    params = traverse_util.unflatten_dict(flat)
    adapter = peft.export_lora(str(tmp_path / "adapter"), params, config)

    # PEFT semantics, applied with NumPy to the official state dict.
    from safetensors.numpy import load_file

    lora = load_file(f"{adapter}/adapter_model.safetensors")
    peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scale = peft_config["lora_alpha"] / peft_config["r"]
    merged_dir = tmp_path / "merged"
    shutil.copytree(root / "checkpoint", merged_dir)
    for shard in sorted(merged_dir.glob("pytorch_model-*.bin")):
        state = load_torch_file(str(shard))
        state = {k: torch_to_numpy(v).astype(np.float32) for k, v in state.items()}
        for key in list(state):
            module = key[: -len(".weight")]
            a_key = f"base_model.model.{module}.lora_A.weight"
            if a_key in lora:
                state[key] = state[key] + scale * lora[a_key.replace("lora_A", "lora_B")] @ lora[a_key]
                del lora[a_key], lora[a_key.replace("lora_A", "lora_B")]
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, shard)
    assert not lora  # every exported key names an official weight
    official_model, official_params = load_pretrained(str(merged_dir))
    ids = _ids(config, seed=5)
    ours = _logits(model, params, ids)
    np.testing.assert_allclose(ours, _logits(official_model, official_params, ids), atol=2e-4, rtol=1e-4)

    # Import: load_pretrained(lora=...) reproduces the adapter and the logits.
    loaded_model, loaded = load_pretrained(str(root / "checkpoint"), lora=adapter)
    assert loaded_model.config.lora_targets == ALL_TARGETS and loaded_model.config.lora_rank == 4
    for path, leaf in traverse_util.flatten_dict(params).items():
        if peft.is_lora_param(path):
            np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(loaded)[path]), leaf)
    np.testing.assert_allclose(_logits(loaded_model, loaded, ids), ours, atol=1e-6)


def test_lora_import_errors_name_the_problem(golden6b, tmp_path):
    base, params = load_pretrained(str(golden6b / "checkpoint"))
    config = base.config.replace(lora_rank=2, lora_targets=("query_key_value",))
    fresh = nn.unbox(jax.jit(GLMForCausalLM(config).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    adapter = peft.export_lora(str(tmp_path / "a"), jax.device_get(fresh), config)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(f"{adapter}/adapter_model.safetensors")
    missing = "base_model.model.transformer.layers.1.attention.query_key_value.lora_B.weight"
    del tensors[missing]
    save_file(tensors, f"{adapter}/adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing keys \\['{missing}'\\]"):
        load_pretrained(str(golden6b / "checkpoint"), lora=adapter)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": ["word_embeddings"]}))
    with pytest.raises(CheckpointError, match="match no adaptable module"):
        load_pretrained(str(golden6b / "checkpoint"), lora=adapter)


def test_peft_target_module_matching():
    config = preset("chatglm2-tiny")
    assert peft.resolve_lora_targets(["query_key_value"], config) == ("query_key_value",)
    assert peft.resolve_lora_targets(["self_attention.dense", "dense_4h_to_h"], config) == ("dense", "dense_4h_to_h")
    assert peft.resolve_lora_targets(r".*\.(query_key_value|dense_h_to_4h)", config) == (
        "query_key_value", "dense_h_to_4h")
    with pytest.raises(ValueError, match="some layers only"):
        peft.resolve_lora_targets(r".*layers\.0\.self_attention\.query_key_value", config)


def _train(model, params, method, steps=3):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10))
    trainable = peft.trainable_predicate(method)
    state, shardings = finetune_state(model, tx, params, trainable, mesh)
    step = make_train_step(model, tx, schedule, StepConfig(dropout=True), mesh, shardings, trainable)
    ids = _ids(model.config, batch=4, length=12)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": np.ones(ids.shape, np.float32),
             "segment_ids": np.ones(ids.shape, np.int32), "part_a": np.zeros(ids.shape, bool),
             "position_ids": np.broadcast_to(np.arange(12), ids.shape)}
    if model.config.position_scheme == "glm_2d":
        from glm_jax.positions import positions_and_mask

        batch["position_ids"] = np.asarray(positions_and_mask(model.config, ids)[0])
    for _ in range(steps):
        state, metrics = step(state, global_batch(batch, mesh))
        assert int(metrics["skipped"]) == 0
    return state


@pytest.mark.parametrize("method,quantized", [("lora", False), ("ptuning", True)])
def test_only_adapter_params_change_and_only_they_have_adam_state(method, quantized):
    if method == "lora":
        overrides = dict(lora_rank=4, lora_targets=("query_key_value", "dense_4h_to_h"), lora_dropout=0.1)
    else:
        overrides = dict(pre_seq_len=3)
    config = preset("chatglm-tiny", **overrides).replace(num_layers=1)
    model = GLMForCausalLM(config)
    params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    if quantized:  # P-Tuning on an INT4 base: the int8 leaves pass through the step untouched
        params = quantize_params(jax.tree.map(np.asarray, params), 4)
        model = GLMForCausalLM(config.replace(quantization_bit=4))
    before = traverse_util.flatten_dict(jax.tree.map(np.array, params))
    state = _train(model, jax.tree.map(jnp.asarray, params), method)
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    trainable = peft.trainable_predicate(method)
    assert before.keys() == after.keys()
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed == {path for path in before if trainable(path)}
    mu_paths = set(traverse_util.flatten_dict(optax.tree_utils.tree_get(state.opt_state, "mu")))
    assert mu_paths == {path for path in before if trainable(path)}
