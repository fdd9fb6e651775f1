"""INT8/INT4 weight-only quantization against independent references.

References: a byte-by-byte INT4 packer/unpacker written from spec §1.7 with Python ints, and the
official `QuantizedLinear` arithmetic replayed with torch float16 ops (the same ops as the official
`quantization.py`, CPU instead of CUDA).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decoding_helpers import chat_model_dir, chat_tok  # noqa: F401 (fixtures)
from hlo_helpers import materialised_float_buffers
from glm_jax import quantization as q
from glm_jax.modeling.layers import Linear


def reference_pack(values: np.ndarray) -> np.ndarray:
    """Spec §1.7: byte j of a row = (q[2j] << 4) | (q[2j+1] & 0xF), as a signed int8."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 2), np.int8)
    for r in range(rows):
        for j in range(cols // 2):
            byte = ((int(values[r, 2 * j]) << 4) | (int(values[r, 2 * j + 1]) & 0xF)) & 0xFF
            out[r, j] = byte - 256 if byte >= 128 else byte
    return out


def reference_unpack(packed: np.ndarray) -> np.ndarray:
    """Spec §1.7: high nibble = arithmetic shift right by 4; low nibble sign-extended."""
    rows, cols = packed.shape
    out = np.zeros((rows, 2 * cols), np.int8)
    for r in range(rows):
        for j in range(cols):
            byte = int(packed[r, j]) & 0xFF
            high, low = byte >> 4, byte & 0xF
            out[r, 2 * j] = high - 16 if high >= 8 else high
            out[r, 2 * j + 1] = low - 16 if low >= 8 else low
    return out


def official_quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The official QuantizedLinear.__init__ arithmetic (before int4 compression), in torch float16."""
    w = torch.from_numpy(weight.astype(np.float16))
    scale = (w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    values = torch.round(w / scale[:, None]).to(torch.int8)
    return values.numpy(), scale.numpy()


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float16) * np.float16(0.05)
    w[3] = 0  # an all-zero row must quantize to zeros, not NaN
    w[5, 7] = 3.0  # one outlier row
    return w


def test_pack_matches_spec_reference_for_every_nibble_pair():
    values = np.array([[a, b] for a in range(-8, 8) for b in range(-8, 8)], np.int8).reshape(16, 32)
    packed = q.pack_int4(values)
    np.testing.assert_array_equal(packed, reference_pack(values))
    np.testing.assert_array_equal(reference_unpack(packed), values)
    np.testing.assert_array_equal(q.unpack_int4(packed), values)
    # High nibble = even column: (1, 2) -> 0x12, (-1, 0) -> 0xF0.
    np.testing.assert_array_equal(q.pack_int4(np.array([[1, 2, -1, 0]], np.int8)), np.array([[0x12, -16]], np.int8))


def test_jax_unpack_equals_numpy_unpack_on_other_axes():
    packed = np.random.default_rng(1).integers(-128, 128, size=(3, 5, 4), dtype=np.int8)
    for axis in range(3):
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda p, a=axis: q.unpack_int4(p, a))(packed)),
                                      q.unpack_int4(packed, axis))
        np.testing.assert_array_equal(q.pack_int4(q.unpack_int4(packed, axis), axis), packed)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_official_matches_official_arithmetic(weight, bits):
    values, scale = official_quantize(weight, bits)
    qweight, qscale = q.quantize_official(weight, bits)
    assert qscale.dtype == np.float16 and qweight.dtype == np.int8
    np.testing.assert_array_equal(qscale, scale)
    expected = reference_pack(values) if bits == 4 else values
    assert qweight.shape == (24, 40 * bits // 8)
    np.testing.assert_array_equal(qweight, expected)
    assert np.abs(values[3]).max() == 0 and np.abs(values).max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_values_times_row_scale(weight, bits):
    qweight, scale = q.quantize_official(weight, bits)
    values = reference_unpack(qweight) if bits == 4 else qweight
    expected = values.astype(np.float32) * scale.astype(np.float32)[:, None]
    np.testing.assert_array_equal(q.dequantize_official(qweight, scale, bits), expected)
    assert np.abs(expected - weight).max() <= scale.max() / 2 * 1.01  # within half a step of the original


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_layout_is_the_transposed_official_layout(weight, bits):
    qkernel, scale = q.quantize_kernel(weight.T, bits)
    qweight, official_scale = q.quantize_official(weight, bits)
    np.testing.assert_array_equal(qkernel, qweight.T)
    np.testing.assert_array_equal(scale, official_scale)
    # Stacked layers with a 2-axis input ([layers, heads, head_dim, out]) quantize layer by layer.
    stacked = np.stack([weight.T.reshape(4, 10, 24), weight.T[::-1].reshape(4, 10, 24)])
    qk, s = q.quantize_kernel(stacked, bits, in_dims=2, batch_dims=1)
    for layer in range(2):
        ref_q, ref_s = q.quantize_kernel(stacked[layer].reshape(40, 24), bits)
        np.testing.assert_array_equal(s[layer], ref_s)
        np.testing.assert_array_equal(q.unpack_kernel(qk[layer], bits, 2).reshape(40, 24), q.unpack_kernel(ref_q, bits))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("lead", [(2, 3), (4, 5)])  # 6 rows: tiled CPU path; 20 rows: dequantize-then-dot
@pytest.mark.parametrize("tile_values", [q.TILE_VALUES, 48])  # one tile; several tiles of 3 packed rows
@pytest.mark.parametrize("group", [0, 4])  # per-row scales; a scale per 4 values of head_dim
def test_quantized_linear_applies_the_dequantized_weight(bits, lead, tile_values, group, monkeypatch):
    """The model's quantized Linear equals x @ dequantize(W) + b computed in float64 NumPy."""
    monkeypatch.setattr(q, "TILE_VALUES", tile_values)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((*lead, 4, 12)).astype(np.float32)  # in_dims=2: [heads=4, head_dim=12]
    layer = Linear((16,), ("heads", "head_dim", "embed"), in_dims=2, quantization_bit=bits,
                   quantization_group_size=group)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"])
    assert params["qkernel"].shape == (4, 12 * bits // 8, 16) and params["qkernel"].dtype == jnp.int8
    assert params["qscale"].shape == ((4, 12 // group, 16) if group else (16,))
    kernel = rng.standard_normal((4, 12, 16)).astype(np.float32)
    qkernel, scale = q.quantize_kernel(kernel, bits, in_dims=2, group_size=group)
    bias = rng.standard_normal(16).astype(np.float32)
    params = {"qkernel": qkernel, "qscale": scale.astype(np.float32), "bias": bias}
    y = np.asarray(jax.jit(layer.apply)({"params": params}, x))
    values = q.unpack_kernel(qkernel, bits, in_dims=2).astype(np.float64)
    # Scale of weight [h, d, e]: scale[e] per row, scale[h, d // group, e] group-wise.
    w = values * (scale[:, np.arange(12) // group, :] if group else scale).astype(np.float64)
    expected = np.einsum("bshd,hde->bse", x.astype(np.float64), w) + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_group_wise_scales_are_the_official_arithmetic_per_group(weight, bits):
    """Group-wise quantization of `[out, in]` equals the official per-row arithmetic applied to every
    group of 8 input columns as if it were a row of its own."""
    out, width, group = weight.shape[0], weight.shape[1], 8
    values, scale = official_quantize(weight.reshape(out * width // group, group), bits)
    qkernel, qscale = q.quantize_kernel(weight.T, bits, group_size=group)
    assert qscale.shape == (width // group, out) and qscale.dtype == np.float16
    np.testing.assert_array_equal(qscale, scale.reshape(out, width // group).T)
    expected = values.reshape(out, width)
    np.testing.assert_array_equal(qkernel.T, reference_pack(expected) if bits == 4 else expected)
    with pytest.raises(ValueError, match="group size"):
        q.quantize_kernel(weight.T, 4, group_size=5)


def test_group_wise_int4_reconstructs_weights_more_closely():
    """Smaller groups, smaller steps: INT4 with a scale per 16 inputs is closer to a (heavy-tailed)
    float kernel than with one scale per output row."""
    kernel = np.random.default_rng(5).standard_t(4, (256, 64)).astype(np.float32) * 0.02

    def error(group: int) -> float:
        qkernel, scale = q.quantize_kernel(kernel, 4, group_size=group)
        return float(np.linalg.norm(q.dequantize_kernel(qkernel, scale, 4) - kernel))

    assert error(16) < 0.8 * error(0)


@pytest.mark.parametrize("bits, group", [(8, 0), (4, 0), (4, 16)])
def test_decode_step_never_writes_a_dequantized_weight(bits, group, monkeypatch):
    """One compiled decode step of an INT8/INT4 model: every float buffer it writes is far smaller than
    any of its weights (dequantization happens tile by tile, inside the cache), while the same step
    with the untiled dequantize-then-dot path does write whole float weights (the check can fail)."""
    from glm_jax.config import preset
    from glm_jax.modeling.transformer import GLMForCausalLM

    config = preset("chatglm-tiny", quantization_bit=bits, quantization_group_size=group)
    model = GLMForCausalLM(config)
    cache_len = 8
    ids, positions = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 2, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1, cache_len), bool)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cache_len), jnp.int32),
                                                  jnp.zeros((1, 2, cache_len), jnp.int32),
                                                  jnp.ones((1, 1, cache_len, cache_len), bool), decode=True))
    params, cache = nn.unbox(variables["params"]), variables["cache"]

    def step(params, cache):
        return model.apply({"params": params, "cache": cache}, ids, positions, mask, decode=True, mutable=["cache"])

    smallest_weight = config.hidden_size * config.hidden_size
    monkeypatch.setattr(q, "TILE_VALUES", smallest_weight // 16)
    tiled = jax.jit(step).lower(params, cache).compile().as_text()
    assert materialised_float_buffers(tiled, smallest_weight // 2) == []
    monkeypatch.setattr(q, "TILED_MAX_ROWS", 0)
    untiled = jax.jit(lambda p, c: step(p, c)).lower(params, cache).compile().as_text()  # traced anew
    assert len(materialised_float_buffers(untiled, smallest_weight)) >= 4  # q, k, v, dense, up, down


def test_quantize_params_replaces_only_the_official_linears():
    rng = np.random.default_rng(3)
    params = {
        "word_embeddings": {"embedding": rng.standard_normal((10, 8)).astype(np.float32)},
        "layers": {
            "attention": {"query": {"kernel": rng.standard_normal((2, 8, 2, 4)).astype(np.float32),
                                    "bias": np.zeros((2, 2, 4), np.float32)},
                          "dense": {"kernel": rng.standard_normal((2, 2, 4, 8)).astype(np.float32)}},
            "mlp": {"up": {"kernel": rng.standard_normal((2, 8, 16)).astype(np.float32)}},
        },
    }
    out = q.quantize_params(params, 4)
    assert set(out["layers"]["attention"]["query"]) == {"qkernel", "qscale", "bias"}
    assert out["layers"]["attention"]["dense"]["qkernel"].shape == (2, 2, 2, 8)
    assert out["layers"]["mlp"]["up"]["qkernel"].shape == (2, 4, 16)
    assert out["word_embeddings"]["embedding"] is params["word_embeddings"]["embedding"]
    expected, _ = q.quantize_kernel(params["layers"]["mlp"]["up"]["kernel"][1], 4)
    np.testing.assert_array_equal(out["layers"]["mlp"]["up"]["qkernel"][1], expected)


def test_odd_input_width_cannot_be_packed():
    with pytest.raises(ValueError, match="even"):
        q.quantize_kernel(np.ones((5, 3), np.float32), 4)


def dequantized_float_params(qparams: dict, bits: int) -> dict:
    """The float param tree a quantized one stands for: every qkernel / qembedding replaced by
    `q * scale` with the dequantization checked bit-exact above."""

    def visit(node: dict, path: tuple[str, ...]) -> dict:
        if q.QEMBEDDING in node:
            return {"embedding": q.dequantize_official(node[q.QEMBEDDING], node[q.QSCALE], bits)}
        if q.QKERNEL in node:
            in_dims = 2 if path[-2:] == ("attention", "dense") else 1
            out = {k: v for k, v in node.items() if k not in (q.QKERNEL, q.QSCALE)}
            out["kernel"] = q.dequantize_kernel(node[q.QKERNEL], node[q.QSCALE], bits, in_dims, batch_dims=1)
            return out
        return {k: visit(v, (*path, k)) if isinstance(v, dict) else v for k, v in node.items()}

    return visit(qparams, ())


# INT4 with 10 rows: tiled layers; INT8 with 20 rows: dequantize-then-dot (the Linear test covers the rest).
@pytest.mark.parametrize("bits, batch, length, group", [(4, 2, 5, 0), (8, 1, 20, 0), (4, 2, 5, 32)])
def test_quantized_model_equals_float_model_on_dequantized_weights(bits, batch, length, group, monkeypatch):
    """Quantized layers and (optionally) the quantized tied embedding/output layer give the logits of
    the float model whose weights are the dequantized ones."""
    from glm_jax.config import preset
    from glm_jax.modeling.transformer import GLMForCausalLM

    monkeypatch.setattr(q, "TILE_VALUES", 1024)  # several tiles per weight and per vocabulary
    config = preset("chatglm-tiny")
    float_model = GLMForCausalLM(config)
    ids = np.random.default_rng(4).integers(0, config.mask_token_id, (batch, length)).astype(np.int32)
    ids[:, -2:] = [config.gmask_token_id, config.bos_token_id]
    params = jax.tree.map(np.asarray, nn.unbox(float_model.init(jax.random.PRNGKey(1), jnp.asarray(ids))["params"]))
    float_apply = jax.jit(float_model.apply)
    for embeddings in (False, True):
        qparams = q.quantize_params(params, bits, embeddings=embeddings, group_size=group)
        assert (q.QEMBEDDING in qparams["word_embeddings"]) == embeddings
        qmodel = GLMForCausalLM(config.replace(quantization_bit=bits, quantize_embeddings=embeddings,
                                               quantization_group_size=group))
        logits = jax.jit(qmodel.apply)({"params": qparams}, ids)
        expected = float_apply({"params": dequantized_float_params(qparams, bits)}, ids)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_quantized_embeddings_and_groups_need_quantized_weights():
    from glm_jax.config import preset

    with pytest.raises(ValueError, match="quantize_embeddings"):
        preset("chatglm-tiny", quantize_embeddings=True)
    with pytest.raises(ValueError, match="quantization_group_size"):
        preset("chatglm-tiny", quantization_group_size=32)
    with pytest.raises(ValueError, match="quantization_group_size"):
        preset("chatglm-tiny", quantization_bit=4, quantization_group_size=48)  # 48 does not divide 128


def test_glm_generate_quantizes_on_load_and_reports_param_bytes(chat_model_dir, chat_tok, tmp_path):  # noqa: F811
    """`glm-generate --quantization=int4 --verbose` generates what `generate` does on the INT4 model
    and reports the int8 bytes the official INT4 layout needs (layers x (qkv + dense + 2 MLP) / 2)."""
    import subprocess
    import sys

    from glm_jax import generate, load_pretrained

    model, params = load_pretrained(str(chat_model_dir), quantization="int4")
    prompt = "你好"
    result = subprocess.run(
        [sys.executable, "-m", "glm_jax.cli.generate", f"--compilation_cache_dir={tmp_path}",
         f"--model={chat_model_dir}", f"--prompt={prompt}", "--max_new_tokens=5", "--quantization=int4", "--verbose"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tokens = generate(model, params, [chat_tok.encode(prompt)], max_new_tokens=5)[0]
    assert result.stdout == chat_tok.decode(tokens) + "\n"
    c = model.config
    int4_bytes = c.num_layers * (4 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.ffn_hidden_size) // 2
    int8 = re.search(r"params [\d.]+ GB: .*int8 [\d.]+ GB \((\d+) B\)", result.stderr)
    assert int8 and int(int8.group(1)) == int4_bytes, result.stderr
