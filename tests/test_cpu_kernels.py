"""The native INT8/INT4 CPU matmul: equal to a float64 NumPy product of the weights dequantized by the
official formula, used by `quantized_dot` on the decode path, and a clean fallback when it cannot be
built."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import cpu_kernels
from glm_jax import quantization as q


def reference(x: np.ndarray, kernel_q: np.ndarray, scale: np.ndarray, bits: int, in_dims: int) -> np.ndarray:
    """float64 `x · (values * scale)` with INT4 values unpacked by hand from the spec's nibble order."""
    if bits == 4:
        packed = kernel_q.astype(np.int64)
        high, low = packed >> 4, ((packed & 0xF) ^ 8) - 8  # sign-extend the low nibble
        axis = in_dims - 1
        values = np.stack([high, low], axis=axis + 1)
        shape = list(kernel_q.shape)
        shape[axis] *= 2
        values = values.reshape(shape)
    else:
        values = kernel_q.astype(np.int64)
    weight = values * scale.astype(np.float64)
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    return np.tensordot(x.astype(np.float64), weight, axes=contract)


@pytest.fixture(scope="module")
def kernel_built():
    assert cpu_kernels.native_kernels_available(), "the test machine has a C++ compiler: the kernel must build"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_kernel_matches_float64_reference(kernel_built, bits, rows):
    rng = np.random.default_rng(bits * 10 + rows)
    kernel = rng.standard_normal((96, 200)).astype(np.float32)  # rows not a multiple of the 4-row unroll
    qkernel, scale = q.quantize_kernel(kernel, bits)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    got = jax.jit(lambda a, b, c: cpu_kernels.quantized_matmul(a, b, c, bits))(x, qkernel, scale)
    np.testing.assert_allclose(np.asarray(got), reference(x, qkernel, scale, bits, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_dot_uses_the_kernel_on_the_decode_path(kernel_built, bits, monkeypatch):
    """Attention-output shape (two input axes), batch 2 x 1 token: the result equals the reference,
    the kernel is in the compiled program, and the XLA tiled path agrees."""
    rng = np.random.default_rng(bits)
    kernel = rng.standard_normal((4, 8, 64)).astype(np.float32)  # [heads, head_dim, embed]
    qkernel, scale = q.quantize_kernel(kernel, bits, in_dims=2)
    x = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)

    def dot(a, b, c):
        return q.quantized_dot(a, b, c, bits, 2, jnp.float32)

    compiled = jax.jit(dot).lower(x, qkernel, scale).compile().as_text()
    assert "glm_jax_quantized_matmul" in compiled
    native = np.asarray(jax.jit(dot)(x, qkernel, scale))
    np.testing.assert_allclose(native, reference(x, qkernel, scale, bits, 2), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(q, "NATIVE_CPU_KERNEL", False)
    tiled = jax.jit(lambda a, b, c: dot(a, b, c))(x, qkernel, scale)  # traced anew
    np.testing.assert_allclose(native, np.asarray(tiled), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_kernel_is_unavailable_with_a_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert cpu_kernels.native_kernels_available.__wrapped__() is False


def test_a_failed_build_warns_and_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_SOURCE", str(tmp_path / "missing.cc"))
    (tmp_path / "missing.cc").write_text("this is not C++\n")
    with pytest.warns(UserWarning, match="could not build"):
        assert cpu_kernels.native_kernels_available.__wrapped__() is False
    assert [p.name for p in tmp_path.iterdir()] == ["missing.cc"]  # no half-written library


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_rows_kernel_matches_float64_reference(kernel_built, bits, rows):
    """The official `[out, in * bits / 8]` layout (a quantized embedding used as the output layer)."""
    rng = np.random.default_rng(bits * 10 + rows + 1)
    weight = rng.standard_normal((150, 64)).astype(np.float32)  # 150 output rows: a partial last chunk
    qweight, scale = q.quantize_official(weight, bits)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    got = jax.jit(lambda a, b, c: cpu_kernels.quantized_rows_matmul(a, b, c, bits))(x, qweight, scale)
    np.testing.assert_allclose(np.asarray(got), reference(x, qweight.T, scale, bits, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_output_layer_uses_the_rows_kernel_when_decoding(kernel_built, bits, monkeypatch):
    rng = np.random.default_rng(bits + 7)
    qweight, scale = q.quantize_official(rng.standard_normal((96, 32)).astype(np.float32), bits)
    x = rng.standard_normal((2, 1, 32)).astype(np.float32)

    def head(a, b, c):
        return q.quantized_dot_rows(a, b, c, bits, jnp.float32)

    assert "glm_jax_quantized_rows_matmul" in jax.jit(head).lower(x, qweight, scale).compile().as_text()
    native = np.asarray(jax.jit(head)(x, qweight, scale))
    np.testing.assert_allclose(native, reference(x, qweight.T, scale, bits, 1), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(q, "NATIVE_CPU_KERNEL", False)
    np.testing.assert_allclose(native, np.asarray(jax.jit(lambda a, b, c: head(a, b, c))(x, qweight, scale)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, width", [(1, 2048), (3, 70), (16, 96)])
def test_half_rows_kernel_matches_float64_reference(kernel_built, rows, width):
    """float16 weights `[N, K]`, float32 inputs: the float64 product of the same values (widths that
    are not multiples of the vector loop run its tail)."""
    rng = np.random.default_rng(rows + width)
    w = rng.standard_normal((33, width)).astype(np.float16)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    got = jax.jit(cpu_kernels.half_rows_matmul)(x, w)
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4 * np.sqrt(width))


def test_half_rows_kernel_widens_every_float16_value_exactly(kernel_built):
    """One weight per product with an input of 1: subnormals, signed zero, the largest half and
    infinities come back as the float32 values NumPy widens them to."""
    values = np.array([0.0, -0.0, 2.0**-24, -(2.0**-20), 6.1e-5, 1.5, -2.75, 65504.0, np.inf, -np.inf], np.float16)
    w = values.reshape(-1, 1)
    got = np.asarray(cpu_kernels.half_rows_matmul(jnp.ones((1, 1), jnp.float32), jnp.asarray(w)))
    np.testing.assert_array_equal(got[0], values.astype(np.float32))
