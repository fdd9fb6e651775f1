"""INT8 / INT4 weight-only quantization with the numerics and byte layout of the official ChatGLM code.

The scheme (spec §1.7): per output row, symmetric, no zero point. `scale[r] = max_c |W[r, c]| / 127`
(int8) or `/ 7` (int4), stored in float16; `q = round(W / scale[r])`. Both steps run in float16 as in
the official `QuantizedLinear`, so a checkpoint quantized here is byte-identical to one quantized by
the official code. INT4 packs two consecutive input columns into one int8 byte, the **even column in
the high nibble**: `byte = (q[2j] << 4) | (q[2j+1] & 0xF)`.

Our Linear kernels are `[*in, *out]` (the transpose of PyTorch's `[out, in]`), so "per output row"
means one scale per output feature and the packed axis is the last *input* axis: a quantized kernel
`qkernel` is int8 of shape `[*in[:-1], in[-1] * bits / 8, *out]` and `qscale` has shape `[*out]`.
Packing along the input axis keeps the official bytes: an official INT4 weight `[out, in/2]` is our
`qkernel` transposed, byte for byte.

Group-wise scales (not an official format; a higher-accuracy mode): with a group size G, each run of
G consecutive values of the last input axis gets its own scale, `qscale [*in[:-1], in[-1] / G, *out]`
(same rounding otherwise). Functions that read a quantized kernel tell the two apart by the rank of
`qscale` (per-row scales have the output axes only). The functions work on NumPy arrays and, where noted, on JAX
arrays inside `jit` (the model dequantizes inside its matmul).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import cpu_kernels

BITS = (4, 8)
# Names of the quantized Linear params (distinct from the float `kernel`, so float-only code paths
# fail loudly instead of multiplying by int8 values).
QKERNEL, QSCALE = "qkernel", "qscale"
# The quantized word embedding `[vocab, hidden * bits / 8]` (official `[out, in]` layout: one scale per
# token row), optional; the tied output layer then reads the same bytes.
QEMBEDDING = "qembedding"
# Our Linear layers that the official code quantizes (`query_key_value`, `attention.dense`,
# `dense_h_to_4h` = up (+ gate), `dense_4h_to_h` = down), as paths under one layer.
QUANTIZED_LINEARS = (
    ("attention", "query"), ("attention", "key"), ("attention", "value"), ("attention", "dense"),
    ("mlp", "up"), ("mlp", "gate"), ("mlp", "down"),
)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    return bits


def packed_size(size: int, bits: int) -> int:
    """Length of an input axis of `size` values once stored with `bits` per value."""
    check_bits(bits)
    if bits == 4 and size % 2:
        raise ValueError(f"INT4 packs pairs of input columns: the input size {size} must be even")
    return size * bits // 8


def _xp(array: Any):
    return jnp if isinstance(array, jax.Array) else np


def pack_int4(values: Any, axis: int = -1) -> Any:
    """Packs int values in [-8, 7] pairwise along `axis`: even index -> high nibble, odd -> low nibble."""
    xp = _xp(values)
    values = xp.asarray(values).astype(xp.int8)
    axis = axis % values.ndim
    if values.shape[axis] % 2:
        raise ValueError(f"INT4 packing needs an even length along axis {axis}, got shape {values.shape}")
    pairs = values.reshape(*values.shape[:axis], values.shape[axis] // 2, 2, *values.shape[axis + 1:])
    even = xp.take(pairs, 0, axis=axis + 1)
    odd = xp.take(pairs, 1, axis=axis + 1)
    return (even << 4) | (odd & 0xF)


def unpack_int4(packed: Any, axis: int = -1) -> Any:
    """Inverse of `pack_int4`: sign-extended int8 values, twice as long along `axis` (NumPy or JAX)."""
    xp = _xp(packed)
    axis = axis % packed.ndim
    high = packed >> 4  # arithmetic shift of the signed byte
    low = (packed << 4) >> 4  # sign-extends the low nibble
    pairs = xp.stack([high, low], axis=axis + 1)
    return pairs.reshape(*packed.shape[:axis], packed.shape[axis] * 2, *packed.shape[axis + 1:])


def check_group_size(size: int, group_size: int, bits: int) -> int:
    """`group_size` if it splits an input axis of `size` values into whole groups (of whole INT4 bytes)."""
    if group_size < 0 or (group_size and (size % group_size or (bits == 4 and group_size % 2))):
        raise ValueError(f"quantization group size {group_size} must divide the input size {size}"
                         + (" and be even for INT4" if bits == 4 else ""))
    return group_size


def _split_groups(array: Any, axis: int, group_size: int) -> Any:
    """`array` with `axis` split into (groups, group_size)."""
    return array.reshape(*array.shape[:axis], array.shape[axis] // group_size, group_size, *array.shape[axis + 1:])


def quantize_kernel(
    kernel: np.ndarray, bits: int, in_dims: int = 1, batch_dims: int = 0, group_size: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`(qkernel, qscale)` of a float kernel `[*batch, *in, *out]` with the official float16 numerics.

    `batch_dims` leading axes (e.g. the stacked layer axis) are quantized independently.
    `group_size` > 0: one scale per group of that many values of the last input axis.
    """
    check_bits(bits)
    w = np.asarray(kernel).astype(np.float16)
    last = batch_dims + in_dims - 1
    packed_size(w.shape[last], bits)
    if check_group_size(w.shape[last], group_size, bits):
        w, reduced = _split_groups(w, last, group_size), (last + 1,)
    else:
        reduced = tuple(range(batch_dims, batch_dims + in_dims))
    row_max = np.abs(w).max(axis=reduced)
    # float16 `max / (2^(bits-1) - 1)` and float16 `w / scale`, each rounded once like the torch ops.
    scale = (row_max.astype(np.float32) / np.float32(2 ** (bits - 1) - 1)).astype(np.float16)
    scale_b = np.expand_dims(scale, reduced)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (w.astype(np.float32) / scale_b.astype(np.float32)).astype(np.float16)
    ratio = np.where(scale_b == 0, np.float16(0), ratio)  # an all-zero row quantizes to zeros
    q = np.round(ratio).astype(np.int8).reshape(np.shape(kernel))
    if bits == 4:
        q = pack_int4(q, axis=last)
    return q, scale


def unpack_kernel(qkernel: Any, bits: int, in_dims: int = 1, batch_dims: int = 0) -> Any:
    """The int8 values of a quantized kernel (INT4 unpacked), same layout as the float kernel."""
    check_bits(bits)
    return unpack_int4(qkernel, axis=batch_dims + in_dims - 1) if bits == 4 else qkernel


def _apply_scale(values: Any, qscale: Any, in_dims: int, batch_dims: int = 0) -> Any:
    """`values [*batch, *in, *out] * scale` for per-row or group-wise `qscale` (told apart by rank)."""
    xp = _xp(values)
    last = batch_dims + in_dims - 1
    if qscale.ndim == values.ndim:  # group-wise: [*batch, *in[:-1], groups, *out]
        group_size = values.shape[last] // qscale.shape[last]
        grouped = _split_groups(values, last, group_size) * xp.expand_dims(qscale, last + 1)
        return grouped.reshape(values.shape)
    return values * xp.expand_dims(qscale, tuple(range(batch_dims, batch_dims + in_dims)))


def dequantize_kernel(
    qkernel: np.ndarray, qscale: np.ndarray, bits: int, in_dims: int = 1, batch_dims: int = 0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """`q * scale` in float32 (the converter's dequantization, spec §1.7), cast to `dtype`."""
    values = unpack_kernel(np.asarray(qkernel), bits, in_dims, batch_dims).astype(np.float32)
    return _apply_scale(values, np.asarray(qscale).astype(np.float32), in_dims, batch_dims).astype(dtype)


def quantize_official(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The official checkpoint tensors of a PyTorch `[out, in]` weight: (`weight` int8 `[out, in*bits/8]`,
    `weight_scale` float16 `[out]`)."""
    q, scale = quantize_kernel(np.asarray(weight).T, bits)
    return np.ascontiguousarray(q.T), scale


def dequantize_official(weight: np.ndarray, weight_scale: np.ndarray, bits: int, dtype: Any = np.float32) -> np.ndarray:
    """Float `[out, in]` weight of an official quantized `weight` / `weight_scale` pair."""
    return np.ascontiguousarray(dequantize_kernel(np.asarray(weight).T, weight_scale, bits, dtype=dtype).T)


# Weight-only matmuls of at most this many activation rows (batch x tokens: decoding) take the tiled
# path on CPU; more rows (prefill) amortise one dequantized copy of the weight over many rows.
TILED_MAX_ROWS = 16
# On that path, per-row scales use the native kernel (glm_jax.cpu_kernels) when it can be built; it
# reads the packed bytes once, where XLA's best formulation is several times slower.
NATIVE_CPU_KERNEL = True
# Weights dequantized per tile on the tiled path: 2^17 values = 512 KiB of float32, which stays in a
# core's L2 cache between the conversion and the dot that reads it.
TILE_VALUES = 1 << 17


def quantized_dot(
    x: jax.Array, qkernel: jax.Array, qscale: jax.Array, bits: int, in_dims: int, dtype: Any,
) -> jax.Array:
    """`x · dequantize(qkernel, qscale)` contracting the last `in_dims` axes of `x`, float32 result.

    A per-row scale is applied after the matmul: `(x · q) * scale` equals `x · (q * scale)` up to
    float rounding, and the int values (|q| <= 127) are exact in every float dtype, including
    bfloat16. Group-wise scales multiply each group's partial sum (tiled) or the weight (untiled).

    XLA's CPU dots read float32 operands only: a dequantized weight is written out in full and read
    back (more bytes than the float32 weight itself), so on CPU a few rows (decoding) go through the
    native kernel (per-row scales) or `_tiled_dot`, which dequantizes tile by tile into the cache.
    Other backends fuse the int8 conversion into their matmul and take the plain path.
    """
    rows = math.prod(x.shape[:x.ndim - in_dims])
    if rows <= TILED_MAX_ROWS and jax.default_backend() == "cpu":
        if NATIVE_CPU_KERNEL and qscale.ndim != qkernel.ndim and cpu_kernels.native_kernels_available():
            lead, out_shape = x.shape[:x.ndim - in_dims], qkernel.shape[in_dims:]
            y = cpu_kernels.quantized_matmul(
                x.astype(dtype).reshape(rows, -1), qkernel.reshape(-1, math.prod(out_shape)),
                qscale.reshape(-1), bits)
            return y.reshape(*lead, *out_shape)
        return _tiled_dot(x.astype(dtype), qkernel, qscale, bits, in_dims)
    # INT4 stays split: high nibbles meet the even input columns, low nibbles the odd ones (an
    # interleaved unpack is a slow gather on CPU).
    x = x.astype(dtype)
    parts = ((x, qkernel),) if bits == 8 else ((x[..., 0::2], qkernel >> 4), (x[..., 1::2], (qkernel << 4) >> 4))
    grouped = qscale.ndim == qkernel.ndim
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    y = 0
    for xp, values in parts:
        if grouped:
            values = _apply_scale(values.astype(jnp.float32), qscale.astype(jnp.float32), in_dims)
        y = y + jax.lax.dot_general(xp, values.astype(dtype), (contract, ((), ())), preferred_element_type=jnp.float32)
    return y if grouped else y * qscale.astype(jnp.float32)


def _tiled_dot(x: jax.Array, qkernel: jax.Array, qscale: jax.Array, bits: int, in_dims: int) -> jax.Array:
    """`x · dequantize(qkernel, qscale)` as a loop over tiles of input rows, each converted to float32
    just before its dot (`x` already rounded to the compute dtype; float32 math, as XLA's CPU dot
    does for every dtype).

    INT4 is never interleaved back: packed row j holds input rows 2j (high nibble) and 2j+1 (low
    nibble), so the tile's high and low nibbles meet the even and odd input columns in two dots.
    Group-wise scales: a tile holds whole groups, each group's dot is scaled before the sum.
    """
    lead, out_shape = x.shape[:x.ndim - in_dims], qkernel.shape[in_dims:]
    packed = qkernel.reshape(-1, math.prod(out_shape))
    rows, cols = packed.shape
    grouped = qscale.ndim == qkernel.ndim
    scales = qscale.astype(jnp.float32).reshape(-1, cols) if grouped else None
    group_rows = rows // scales.shape[0] if grouped else 1  # packed rows per scale row
    tile = group_rows * _largest_divisor(rows // group_rows, max(1, TILE_VALUES // (cols * group_rows)))
    tiles = packed.reshape(rows // tile, tile // group_rows, group_rows, cols)
    x = x.astype(jnp.float32).reshape(-1, rows * 8 // bits)
    parts = (x,) if bits == 8 else (x[:, 0::2], x[:, 1::2])
    parts = tuple(p.reshape(p.shape[0], rows // tile, tile // group_rows, group_rows).transpose(1, 0, 2, 3)
                  for p in parts)
    inputs = (tiles, *parts) + ((scales.reshape(rows // tile, tile // group_rows, cols),) if grouped else ())

    def step(acc: jax.Array, tile_inputs: tuple) -> tuple[jax.Array, None]:
        q, *xs = tile_inputs[:1 + len(parts)]
        weights = (q,) if bits == 8 else (q >> 4, (q << 4) >> 4)
        if grouped:  # per group: [groups, M, cols], scaled, summed
            partial = sum(jnp.einsum("mgk,gkc->gmc", xt, w.astype(jnp.float32), preferred_element_type=jnp.float32)
                          for xt, w in zip(xs, weights))
            return acc + jnp.sum(partial * tile_inputs[-1][:, None, :], axis=0), None
        for xt, w in zip(xs, weights):
            acc = acc + jnp.dot(xt.reshape(xt.shape[0], -1), w.reshape(-1, cols).astype(jnp.float32),
                                preferred_element_type=jnp.float32)
        return acc, None

    acc = jnp.zeros((x.shape[0], cols), jnp.float32)
    acc, _ = jax.lax.scan(step, acc, inputs)
    if not grouped:
        acc = acc * qscale.astype(jnp.float32).reshape(cols)
    return acc.reshape(*lead, *out_shape)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def quantized_dot_rows(x: jax.Array, qweight: jax.Array, qscale: jax.Array, bits: int, dtype: Any) -> jax.Array:
    """`x · dequantize(qweight)ᵀ` for a weight in the official `[out, in * bits / 8]` layout (the
    quantized embedding as output layer), float32 `[..., out]`.

    On CPU a few rows (decoding) go through the native kernel; otherwise it runs tile by tile over
    output rows, prefill included: a vocabulary-sized table dequantized at once would be the largest
    float buffer of the program (2 GiB for ChatGLM-6B).
    """
    if jax.default_backend() != "cpu":
        values = unpack_int4(qweight) if bits == 4 else qweight
        y = jax.lax.dot_general(x.astype(dtype), values.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y * qscale.astype(jnp.float32)
    lead = x.shape[:-1]
    if math.prod(lead) <= TILED_MAX_ROWS and NATIVE_CPU_KERNEL and cpu_kernels.native_kernels_available():
        y = cpu_kernels.quantized_rows_matmul(x.astype(dtype).reshape(-1, x.shape[-1]), qweight, qscale, bits)
        return y.reshape(*lead, qweight.shape[0])
    rows, width = qweight.shape
    tile = _largest_divisor(rows, max(1, TILE_VALUES // width))
    x = x.astype(dtype).astype(jnp.float32).reshape(-1, x.shape[-1])
    parts = (x,) if bits == 8 else (x[:, 0::2], x[:, 1::2])

    def tile_logits(inputs: tuple) -> jax.Array:
        q, s = inputs
        weights = (q,) if bits == 8 else (q >> 4, (q << 4) >> 4)
        y = sum(jax.lax.dot_general(xp, w.astype(jnp.float32), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) for xp, w in zip(parts, weights))
        return y * s.astype(jnp.float32)

    tiles = (qweight.reshape(rows // tile, tile, width), qscale.reshape(rows // tile, tile))
    y = jax.lax.map(tile_logits, tiles)  # [tiles, M, tile]
    return y.transpose(1, 0, 2).reshape(*lead, rows)


def quantized_embedding_lookup(
    ids: jax.Array, qweight: jax.Array, qscale: jax.Array, bits: int, dtype: Any,
) -> jax.Array:
    """Rows `ids` of a quantized embedding, `q * scale` rounded once to `dtype` (the official
    `QuantizedEmbedding` computes the same product in float16)."""
    values = jnp.take(qweight, ids, axis=0)
    values = unpack_int4(values) if bits == 4 else values
    return (values.astype(jnp.float32) * jnp.take(qscale, ids, axis=0)[..., None].astype(jnp.float32)).astype(dtype)


def param_bytes_by_dtype(params: Any) -> dict[str, int]:
    """Bytes of a param tree per dtype name (largest first): the memory report of a quantized model,
    where int8 holds the packed weights and the float dtypes the scales, embeddings, norms, biases."""
    totals: dict[str, int] = {}
    for leaf in jax.tree.leaves(params):
        dtype = np.dtype(leaf.dtype)
        totals[dtype.name] = totals.get(dtype.name, 0) + int(np.prod(leaf.shape)) * dtype.itemsize
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def format_param_bytes(params: Any) -> str:
    """One line, e.g. `params 3.93 GB: int8 2.82 GB (2818572288 B), float32 1.11 GB (1107296256 B)`."""
    totals = param_bytes_by_dtype(params)
    parts = ", ".join(f"{name} {size / 1e9:.2f} GB ({size} B)" for name, size in totals.items())
    return f"params {sum(totals.values()) / 1e9:.2f} GB: {parts}"


def linear_in_dims(path: tuple[str, ...]) -> int:
    """Input axes of a block's Linear kernel (`attention/dense` contracts heads and head_dim)."""
    return 2 if path[-2:] == ("attention", "dense") else 1


def is_quantized_linear(path: tuple[str, ...]) -> bool:
    """Whether `path` (ending at the Linear, e.g. ("layers", "mlp", "up")) is quantized by the model."""
    return len(path) >= 3 and path[0] == "layers" and tuple(path[-2:]) in QUANTIZED_LINEARS


def quantize_params(params: dict, bits: int, embeddings: bool = False, group_size: int = 0) -> dict:
    """A float param tree (NumPy leaves, layers stacked) with every quantizable kernel replaced by
    `qkernel`/`qscale` (group-wise scales with `group_size` > 0) and, with `embeddings`, the word
    embedding by `qembedding`/`qscale` (per token row, the official `-qe` scheme); other leaves are
    kept as they are."""

    def visit(node: dict, path: tuple[str, ...]) -> dict:
        out = {}
        for name, value in node.items():
            if isinstance(value, dict):
                out[name] = visit(value, (*path, name))
            elif name == "kernel" and is_quantized_linear(path):
                q, s = quantize_kernel(np.asarray(value), bits, linear_in_dims(path), 1, group_size)
                out[QKERNEL], out[QSCALE] = q, s
            elif embeddings and path == ("word_embeddings",) and name == "embedding":
                out[QEMBEDDING], out[QSCALE] = quantize_official(np.asarray(value), bits)
            else:
                out[name] = value
        return out

    return visit(params, ())


__all__ = [
    "BITS", "QEMBEDDING", "QKERNEL", "QSCALE", "QUANTIZED_LINEARS", "check_group_size", "dequantize_kernel",
    "dequantize_official", "format_param_bytes", "is_quantized_linear", "linear_in_dims", "pack_int4", "packed_size",
    "param_bytes_by_dtype", "quantize_kernel", "quantize_official", "quantize_params", "quantized_dot",
    "quantized_dot_rows", "quantized_embedding_lookup", "unpack_int4", "unpack_kernel",
]
