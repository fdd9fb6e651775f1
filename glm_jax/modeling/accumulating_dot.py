"""Matmuls with float32 accumulation whose backward pass stays on XLA:CPU's bf16 matmul kernels.

Every matmul of the model rounds its operands to the compute dtype and accumulates in float32. For
bfloat16 compute on one CPU device, JAX's own backward pass of such a dot runs at float32 speed:

- the transpose of a float32-output dot pairs the float32 cotangent with the bf16 operand, a mixed
  pair XLA:CPU computes by copying both to float32;
- the weight gradient `xᵀ · g` contracts the token axis, the *first* axis of the left operand; XLA's
  bf16 matmul library only takes a left operand contracted on its last axis, so XLA upcasts that dot
  too, and it folds any transpose written in front of it back into the dot.

`accumulating_dot` gives bf16 a custom backward pass: the cotangent is rounded to bf16 (as mixed
precision training does), and the transposed operand is materialised through a one-dimensional
view behind an optimisation barrier, which XLA cannot fold away. All three matmuls of a training
step then run on the bf16 kernels, about twice the float32 rate of this kind of CPU.

Other backends, float16 (no half-precision kernel on CPU), float32 and multi-device meshes (where
the flattened transpose would defeat the sharding) use the plain dot and JAX's backward pass.

float16 weights with float32 compute (an fp16 checkpoint kept as stored, computed exactly like its
float32 copy) decode through a native kernel on CPU: XLA hoists the float32 conversion of every
weight out of the decode loop, so the loop would read float32 copies; the kernel reads 2 bytes per
weight and widens them in registers (`glm_jax.cpu_kernels.half_rows_matmul`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from glm_jax import cpu_kernels

Array = jax.Array
Contract = tuple[tuple[int, ...], tuple[int, ...]]

# Token rows up to which float16 weights with float32 compute take the native kernel on CPU: decoding,
# and short prefills, where it still beats converting every weight to float32 first; more rows
# (long prompts, training) are compute-bound and stay on XLA's matmul.
HALF_ROWS_MAX_TOKENS = 64


def accumulating_dot(x: Array, w: Array, contract: Contract, dtype: jnp.dtype) -> Array:
    """`dot_general(x, w, contract)` (no batch axes) of both operands rounded to `dtype`, with float32
    accumulation and result. Gradients come back in the dtypes of `x` and `w`."""
    x_contract, w_contract = (tuple(axes) for axes in contract)
    if _half_rows_apply(x, w, x_contract, w_contract, dtype):
        return _half_rows_dot(x, w)
    if _bf16_backward_applies(x, w, x_contract, w_contract, dtype):
        return _bf16_dot(x, w, len(x_contract), w_contract[0] == 0)
    return lax.dot_general(x.astype(dtype), w.astype(dtype), (contract, ((), ())), preferred_element_type=jnp.float32)


def bf16_backward_applies(dtype: jnp.dtype) -> bool:
    """Whether `accumulating_dot` in `dtype` keeps both passes in half precision here: bf16 on a
    single CPU device (on a mesh the flattened transpose would defeat the sharding)."""
    return (jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"
            and jax.sharding.get_abstract_mesh().size <= 1)


def _bf16_backward_applies(x: Array, w: Array, x_contract: tuple[int, ...], w_contract: tuple[int, ...],
                           dtype: jnp.dtype) -> bool:
    """`x` contracted on its trailing axes against the leading (Linear kernel) or trailing (tied
    table) axes of `w`, in order: the layouts the custom backward pass handles."""
    if not bf16_backward_applies(dtype):
        return False
    n = len(x_contract)
    trailing_x = x_contract == tuple(range(x.ndim - n, x.ndim))
    return trailing_x and w_contract in (tuple(range(n)), tuple(range(w.ndim - n, w.ndim)))


def _half_rows_apply(x: Array, w: Array, x_contract: tuple[int, ...], w_contract: tuple[int, ...],
                     dtype: jnp.dtype) -> bool:
    """float16 weights `[N, K]` (output-major kernels, the tied table) with float32 compute, at most
    `HALF_ROWS_MAX_TOKENS` token rows, one CPU device, and the native kernel built."""
    return (w.dtype == jnp.float16 and jnp.dtype(dtype) == jnp.float32 and w.ndim == 2
            and x_contract == (x.ndim - 1,) and w_contract == (1,) and math.prod(x.shape[:-1]) <= HALF_ROWS_MAX_TOKENS
            and jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1
            and cpu_kernels.native_kernels_available())


@jax.custom_vjp
def _half_rows_dot(x: Array, w: Array) -> Array:
    y = cpu_kernels.half_rows_matmul(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _half_rows_dot_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _half_rows_dot(x, w), (x, w)


def _half_rows_dot_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32), g.reshape(-1, w.shape[0]).astype(jnp.float32)
    dx = _dot(g2, w.astype(jnp.float32), 1, 0).reshape(x.shape).astype(x.dtype)
    dw = _dot(g2, x2, 0, 0).astype(w.dtype)  # gᵀ · x: [N, K]
    return dx, dw


_half_rows_dot.defvjp(_half_rows_dot_fwd, _half_rows_dot_bwd)


def _materialized_transpose(a: Array) -> Array:
    """`a.T` of a 2-D array as a row-major buffer. Through the flat view the transpose must really be
    copied (a 1-D array has one layout), and the barrier keeps XLA from folding it into the dot."""
    rows, cols = a.shape
    return lax.optimization_barrier(a.T.reshape(rows * cols)).reshape(cols, rows)


def _dot(a: Array, b: Array, a_axis: int, b_axis: int) -> Array:
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32)


def _as_matrices(x: Array, w: Array, n_contract: int, w_leading: bool) -> tuple[Array, Array]:
    """`x` as `[tokens, K]` and `w` as `[K, N]` (leading) or `[N, K]` (trailing contraction), in bf16."""
    k = math.prod(x.shape[x.ndim - n_contract:])
    x2 = x.astype(jnp.bfloat16).reshape(-1, k)
    w2 = w.astype(jnp.bfloat16)
    return x2, (w2.reshape(k, -1) if w_leading else w2.reshape(-1, k))


def _out_shape(x: Array, w: Array, n_contract: int, w_leading: bool) -> tuple[int, ...]:
    w_free = w.shape[n_contract:] if w_leading else w.shape[:w.ndim - n_contract]
    return (*x.shape[:x.ndim - n_contract], *w_free)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_dot(x: Array, w: Array, n_contract: int, w_leading: bool) -> Array:
    x2, w2 = _as_matrices(x, w, n_contract, w_leading)
    y = _dot(x2, w2, 1, 0 if w_leading else 1)
    return y.reshape(_out_shape(x, w, n_contract, w_leading))


def _bf16_dot_fwd(x: Array, w: Array, n_contract: int, w_leading: bool) -> tuple[Array, tuple[Array, Array]]:
    # Residuals: the operands as given; their bf16 copies are cheap to redo and would double the
    # memory of float32 master weights.
    return _bf16_dot(x, w, n_contract, w_leading), (x, w)


def _bf16_dot_bwd(n_contract: int, w_leading: bool, residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = residuals
    x2, w2 = _as_matrices(x, w, n_contract, w_leading)
    g2 = g.astype(jnp.bfloat16).reshape(x2.shape[0], -1)  # [tokens, N]
    if w_leading:  # w2 [K, N]
        dx2 = _dot(g2, w2, 1, 1)  # g · w2ᵀ
        dw2 = _dot(_materialized_transpose(x2), g2, 1, 0)  # x2ᵀ · g: [K, N]
    else:  # w2 [N, K]
        dx2 = _dot(g2, w2, 1, 0)  # g · w2
        dw2 = _dot(_materialized_transpose(g2), x2, 1, 0)  # gᵀ · x2: [N, K]
    return dx2.reshape(x.shape).astype(x.dtype), dw2.reshape(w.shape).astype(w.dtype)


_bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd)
