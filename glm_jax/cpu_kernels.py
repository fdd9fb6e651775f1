"""Native CPU kernels, compiled on first use and called from jitted code through the XLA FFI.

Why compile at run time: the kernel is a few dozen lines of C++ that must match the installed
jaxlib's FFI headers and should use the host's vector instructions (`-march=native`); building it
where it runs needs only a C++ compiler, and the result is cached per source / jaxlib / compiler.
Without a compiler (or if the build fails) `native_kernels_available()` is False, a warning says
why once, and callers keep their pure-XLA path, so nothing breaks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "quantized_matmul.cc")
# FFI target name -> symbol in the library.
_TARGETS = {"glm_jax_quantized_matmul": "QuantizedMatmul", "glm_jax_quantized_rows_matmul": "QuantizedRowsMatmul",
            "glm_jax_half_rows_matmul": "HalfRowsMatmul"}
# Reassociation lets the compiler vectorise the row kernel's dot-product loops.
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math")


def cache_dir() -> str:
    """Where built kernels live: `$GLM_JAX_KERNEL_CACHE`, else `~/.cache/glm_jax/kernels`."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "kernels")
    return os.environ.get("GLM_JAX_KERNEL_CACHE", default)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _build(compiler: str) -> str:
    """Path of the shared library, compiled unless an identical build is cached. Concurrent
    processes each compile into a temporary file and rename it into place (atomic)."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode() + " ".join(_FLAGS).encode())
    target = os.path.join(cache_dir(), f"quantized_matmul-{key.hexdigest()[:16]}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", scratch],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return target


@functools.lru_cache(maxsize=None)
def native_kernels_available() -> bool:
    """Builds (once) and registers the INT8/INT4 and float16-weight matmul kernels; False, with a
    warning, if impossible."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C++ compiler found (set CXX): INT8/INT4/float16 decoding on CPU uses the slower XLA path")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build(compiler))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not build the INT8/INT4/float16 CPU kernels ({e}): decoding uses the slower XLA path")
        return False
    return True


def _call(target: str, x: jax.Array, q: jax.Array, scale: jax.Array, bits: int, outputs: int) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], outputs), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x.astype(jnp.float32), q, scale.astype(jnp.float32), bits=np.int64(bits))


def quantized_matmul(x: jax.Array, qkernel: jax.Array, qscale: jax.Array, bits: int) -> jax.Array:
    """`x [M, K] · dequantize(qkernel [K * bits / 8, N], per-column qscale [N])`, float32 `[M, N]`,
    on CPU with the native kernel (check `native_kernels_available()` first)."""
    return _call("glm_jax_quantized_matmul", x, qkernel, qscale, bits, qkernel.shape[1])


def quantized_rows_matmul(x: jax.Array, qweight: jax.Array, qscale: jax.Array, bits: int) -> jax.Array:
    """`x [M, K] · dequantize(qweight [N, K * bits / 8], per-row qscale [N])ᵀ` (the official layout, as
    the quantized embedding is stored), float32 `[M, N]`, on CPU with the native kernel."""
    return _call("glm_jax_quantized_rows_matmul", x, qweight, qscale, bits, qweight.shape[0])


def half_rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [M, K] · w [N, K]ᵀ` for float16 `w`, float32 `[M, N]` with every product and sum in float32,
    on CPU with the native kernel: `w` is read at 2 bytes per weight and widened in registers, where
    XLA would write (or, in a loop, keep) a float32 copy of it first."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("glm_jax_half_rows_matmul", out)(x.astype(jnp.float32), w)


__all__ = ["cache_dir", "half_rows_matmul", "native_kernels_available", "quantized_matmul", "quantized_rows_matmul"]
