"""`accumulating_dot`: bf16 matmuls with float32 accumulation and a backward pass that stays in bf16
on CPU, checked against float64 NumPy and against the compiled program."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from glm_jax.modeling.accumulating_dot import accumulating_dot
from hlo_helpers import float32_dot_operands


def _einsum_subscripts(x_ndim: int, w_ndim: int, contract) -> tuple[str, str, str]:
    letters = "abcdefgh"
    x_sub = [letters[i] for i in range(x_ndim)]
    w_sub = [letters[x_ndim + i] for i in range(w_ndim)]
    for xa, wa in zip(*contract):
        w_sub[wa] = x_sub[xa]
    out = [s for i, s in enumerate(x_sub) if i not in contract[0]] + [s for i, s in enumerate(w_sub) if i not in contract[1]]
    return "".join(x_sub), "".join(w_sub), "".join(out)


@pytest.mark.parametrize("x_shape, w_shape, contract", [
    ((2, 3, 8), (8, 4, 5), ((2,), (0,))),  # Linear, multi-axis output (q/k/v kernels)
    ((2, 3, 4, 6), (4, 6, 7), ((2, 3), (0, 1))),  # Linear over two input axes (attention dense)
    ((2, 5, 6), (9, 6), ((2,), (1,))),  # the tied head: x · tableᵀ
])
@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])  # float32 master weights, or bf16 weights
def test_bf16_dot_value_and_gradients_match_float64(x_shape, w_shape, contract, w_dtype):
    """Value and both gradients equal float64 products of the bf16-rounded operands and cotangent
    (only the float32 accumulation and the final rounding to the operand dtype differ); gradients
    come back in the operands' own dtypes."""
    rng = np.random.default_rng(len(x_shape))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), w_dtype)
    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    xr, wr = as64(x), as64(w)
    x_s, w_s, o_s = _einsum_subscripts(len(x_shape), len(w_shape), contract)
    upstream = jnp.asarray(rng.standard_normal(np.einsum(f"{x_s},{w_s}->{o_s}", xr, wr).shape), jnp.float32)
    ur = as64(upstream)

    y, vjp = jax.vjp(lambda a, b: accumulating_dot(a, b, contract, jnp.bfloat16), x, w)
    dx, dw = vjp(upstream)
    assert y.dtype == jnp.float32 and dx.dtype == x.dtype and dw.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(y), np.einsum(f"{x_s},{w_s}->{o_s}", xr, wr), rtol=1e-5, atol=1e-5)
    for got, want in ((dx, np.einsum(f"{o_s},{w_s}->{x_s}", ur, wr)), (dw, np.einsum(f"{x_s},{o_s}->{w_s}", xr, ur))):
        tolerance = 1e-5 if got.dtype == jnp.float32 else 2 ** -8  # bf16 gradients are rounded at the end
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance * np.abs(want).max())


def _compiled_gradient(dot) -> str:
    x = jax.ShapeDtypeStruct((4, 64, 96), jnp.float32)
    w = jax.ShapeDtypeStruct((96, 128), jnp.float32)  # float32 master weights, bf16 compute
    loss = lambda x, w: jnp.sum(dot(x, w) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 backward pass is specific to XLA:CPU")
def test_every_matmul_of_the_bf16_backward_reads_bf16():
    """The compiled gradient of a bf16 Linear has three matmuls, none of them on float32 operands
    (JAX's own backward pass of the same dot, compiled alongside, does run float32 matmuls)."""
    ours = _compiled_gradient(lambda x, w: accumulating_dot(x, w, ((2,), (0,)), jnp.bfloat16))
    assert len(re.findall(r" dot\(", ours)) == 3
    assert float32_dot_operands(ours) == []
    plain = _compiled_gradient(lambda x, w: lax.dot_general(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32))
    assert float32_dot_operands(plain) != []
