"""The per-layer layout (`scan_layers=False`): the same network as the scanned stack (golden logits,
hidden states, greedy tokens, P-Tuning, sharded loading), an exact round trip between layouts, and
the reason it exists: a compiled decode step over per-layer weights writes no weight-sized copy,
where the scanned stack copies every layer's weights."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLMForCausalLM, generate, load_pretrained, preset
from glm_jax.generation import PROGRAMS, generate_with_stats
from glm_jax.modeling.layer_stack import is_unstacked, model_for_params, stack_layers, unstack_layers
from glm_jax.sharding import make_mesh
from hlo_helpers import materialised_float_buffers

ATOL, RTOL = 5e-4, 1e-4  # golden tolerances (golden README)


@pytest.fixture(scope="module")
def per_layer6b(golden6b):
    return load_pretrained(str(golden6b / "checkpoint"), scan_layers=False)


def test_load_gives_per_layer_blocks(per_layer6b):
    model, params = per_layer6b
    assert not model.config.scan_layers and is_unstacked(params) and "layers" not in params
    assert sorted(k for k in params if k.startswith("layers_")) == [f"layers_{i}" for i in range(model.config.num_layers)]


def test_per_layer_logits_and_hidden_states_match_golden(per_layer6b, chatglm6b, cases6b):
    model, params = per_layer6b
    ids = cases6b["a_gmask_single/input_ids"]
    logits, hidden = model.apply({"params": params}, ids, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(logits), cases6b["a_gmask_single/logits"], atol=ATOL, rtol=RTOL)
    scanned_model, scanned_params = chatglm6b
    scanned_logits, scanned_hidden = scanned_model.apply({"params": scanned_params}, ids, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(scanned_logits), atol=5e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(scanned_hidden), atol=5e-5, rtol=0)


def test_per_layer_chatglm2_matches_golden(golden2, cases2):
    model, params = load_pretrained(str(golden2 / "checkpoint"), scan_layers=False)
    logits = model.apply({"params": params}, cases2["a_single/input_ids"])
    np.testing.assert_allclose(np.asarray(logits), cases2["a_single/logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "c_batch_leftpad"])
def test_per_layer_greedy_matches_official(per_layer6b, cases6b, case):
    model, params = per_layer6b
    ids, pad = cases6b[f"{case}/input_ids"], model.config.pad_token_id
    prompts = [[int(t) for t in row if t != pad] for row in ids]
    expected = cases6b[f"{case}/gen_sequences"][:, ids.shape[1]:].tolist()
    assert generate(model, params, prompts, max_new_tokens=len(expected[0])) == expected


def test_float16_params_decode_like_their_float32_copy(golden6b, per_layer6b, cases6b):
    """The fp16 checkpoint kept in float16 with float32 compute (the CPU decode path reads it through the
    native kernel): the official greedy tokens, and the logits of every step as the float32 params give."""
    model16, params16 = load_pretrained(str(golden6b / "checkpoint"), param_dtype="float16", scan_layers=False)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float16)}
    model, params = per_layer6b
    ids, pad = cases6b["c_batch_leftpad/input_ids"], model.config.pad_token_id
    prompts = [[int(t) for t in row if t != pad] for row in ids]
    expected = cases6b["c_batch_leftpad/gen_sequences"][:, ids.shape[1]:].tolist()
    out16 = generate_with_stats(model16, params16, prompts, max_new_tokens=len(expected[0]), keep_logits=True)
    out32 = generate_with_stats(model, params, prompts, max_new_tokens=len(expected[0]), keep_logits=True)
    assert out16.sequences == expected
    for a, b in zip(out16.logits, out32.logits):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)  # float32 summation order only


def test_float16_weight_dot_gradients_match_xla():
    """The float16-weight kernel's custom backward pass against JAX's own on the same values."""
    from glm_jax.modeling.accumulating_dot import accumulating_dot

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 1, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float16)
    g = jnp.asarray(rng.standard_normal((2, 1, 24)), jnp.float32)

    def loss(dot, x, w):
        return jnp.sum(dot(x, w) * g)

    def native_dot(x, w):
        return accumulating_dot(x, w, ((2,), (1,)), jnp.float32)

    assert "glm_jax_half_rows_matmul" in jax.jit(native_dot).lower(x, w).as_text()
    native = jax.grad(functools.partial(loss, native_dot), (0, 1))
    plain = jax.grad(functools.partial(loss, lambda x, w: jnp.einsum("blk,nk->bln", x, w.astype(jnp.float32))), (0, 1))
    for got, want in zip(native(x, w), plain(x, w)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-3, atol=2e-3)


def test_per_layer_ptuning_prefix_matches_official(golden6b, cases6b):
    model, params = load_pretrained(str(golden6b / "checkpoint"), prefix=str(golden6b / "ptuning" / "pre4_proj"),
                                    scan_layers=False)
    assert is_unstacked(params)
    ids = cases6b["e2_ptuning_proj/input_ids"]
    expected = cases6b["e2_ptuning_proj/gen_sequences"][:, ids.shape[1]:].tolist()
    assert generate(model, params, ids.tolist(), max_new_tokens=len(expected[0])) == expected


def test_sharded_per_layer_load_equals_unsharded(golden6b, per_layer6b, cases6b):
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    model, params = load_pretrained(str(golden6b / "checkpoint"), scan_layers=False, mesh=mesh)
    query = params["layers_0"]["attention"]["query"]["kernel"]
    assert not query.sharding.is_fully_replicated  # heads really are split
    ids = cases6b["a_gmask_single/input_ids"]
    expected = per_layer6b[0].apply({"params": per_layer6b[1]}, ids)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), np.asarray(expected), atol=5e-5, rtol=1e-5)


def test_round_trip_between_layouts_is_exact():
    config = preset("chatglm-tiny")
    stacked = nn.unbox(GLMForCausalLM(config).init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"])
    host = jax.tree.map(np.asarray, stacked)
    per_layer = unstack_layers(dict(host))
    # Float Linear kernels become output-major: [in, out] -> [out, in]; attention.dense [heads, d, h] -> [h, heads, d].
    np.testing.assert_array_equal(per_layer["layers_1"]["mlp"]["up"]["kernel"], host["layers"]["mlp"]["up"]["kernel"][1].T)
    np.testing.assert_array_equal(per_layer["layers_1"]["attention"]["dense"]["kernel"],
                                  host["layers"]["attention"]["dense"]["kernel"][1].transpose(2, 0, 1))
    np.testing.assert_array_equal(per_layer["layers_1"]["input_norm"]["scale"], host["layers"]["input_norm"]["scale"][1])
    back = stack_layers(per_layer)
    assert jax.tree.structure(back) == jax.tree.structure(host)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), back, host)))
    consumed = dict(host)
    unstack_layers(consumed)
    assert "layers" not in consumed  # the stacked subtree is handed over, so it can be freed


def test_model_follows_the_layout_of_its_params():
    config = preset("chatglm-tiny")
    model = GLMForCausalLM(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    assert model_for_params(model, params) is model
    assert not model_for_params(model, unstack_layers(dict(params))).config.scan_layers
    with pytest.raises(ValueError, match="not a GLM param tree"):
        unstack_layers({"word_embeddings": {}})


def _decode_step_hlo(config) -> str:
    model = GLMForCausalLM(config)
    cache_len = 8
    ids, positions = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 2, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1, cache_len), bool)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, cache_len), jnp.int32), jnp.zeros((1, 2, cache_len), jnp.int32),
        jnp.ones((1, 1, cache_len, cache_len), bool), decode=True))

    def step(params, cache):
        return model.apply({"params": params, "cache": cache}, ids, positions, mask, decode=True, mutable=["cache"])

    return jax.jit(step).lower(nn.unbox(variables["params"]), variables["cache"]).compile().as_text()


def test_per_layer_decode_step_reads_weights_in_place():
    """Compiled decode step: with stacked weights XLA writes a copy of layer weights (the scan's
    dynamic slices); with per-layer weights no float buffer the size of a weight is written."""
    config = preset("chatglm-tiny")
    smallest_weight = config.hidden_size * config.hidden_size
    assert materialised_float_buffers(_decode_step_hlo(config), smallest_weight)  # the check can fail
    assert materialised_float_buffers(_decode_step_hlo(config.replace(scan_layers=False)), smallest_weight) == []


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_kv_cache_in_place(batch):
    """The compiled generate loop writes each new key/value into its cache slot: no copy of a layer's
    cache per token (at batch 1 XLA:CPU made four, when the stored cache kept its size-1 batch axis)."""
    config = preset("chatglm-tiny", scan_layers=False)
    model = GLMForCausalLM(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    prompt = [5, 6, 7, config.gmask_token_id, config.bos_token_id]
    generate(model, params, [prompt] * batch, max_new_tokens=9, stop_ids=())
    programs = {plan: p for plan, p in PROGRAMS.compiled("generate")
                if plan.model.config == config and plan.batch == batch}
    assert programs
    for plan, program in programs.items():  # also those of earlier tests with this model
        layer_cache = batch * config.num_kv_heads * plan.cache_len * config.head_dim
        copies = [b for b in materialised_float_buffers(program.as_text(), layer_cache) if b.endswith(" copy")]
        assert copies == [], plan


@pytest.mark.parametrize("features, in_dims, dtype", [((8,), 1, "float32"), ((2, 4), 1, "float32"),
                                                      ((8,), 2, "float32"), ((2, 4), 1, "bfloat16")])
def test_output_major_linear_computes_the_same_function(features, in_dims, dtype):
    """An output-major Linear ([*out, *in] kernel) against float64 NumPy on the same weights: value and
    both gradients (bf16 takes the custom backward pass on CPU)."""
    from glm_jax.modeling.layers import Linear

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *(2, 6)[2 - in_dims:])).astype(np.float32)
    in_shape = x.shape[1:]
    axes = (None,) * (in_dims + len(features))
    linear = Linear(features, axes, use_bias=False, in_dims=in_dims, dtype=dtype, param_dtype=dtype, output_major=True)
    kernel = nn.unbox(linear.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"])["kernel"]
    assert kernel.shape == (*features, *in_shape)
    w = np.asarray(kernel, np.float64).reshape(int(np.prod(features)), -1)  # [out, in]
    x2 = np.asarray(jnp.asarray(x).astype(dtype), np.float64).reshape(3, -1)
    g = rng.standard_normal((3, int(np.prod(features))))

    def loss(x, kernel):
        y = linear.apply({"params": {"kernel": kernel}}, x).astype(jnp.float32)
        return jnp.sum(y.reshape(3, -1) * g)

    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(x), kernel)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(value, np.sum((x2 @ w.T) * g), rtol=tolerance)
    np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(3, -1), g @ w, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(np.asarray(dw, np.float64).reshape(w.shape), g.T @ x2, rtol=tolerance, atol=tolerance)
