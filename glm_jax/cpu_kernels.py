"""Native CPU kernels, compiled on first use and called from jitted code through the XLA FFI.

Why compile at run time: the kernel is a few dozen lines of C++ that must match the installed
jaxlib's FFI headers and should use the host's vector instructions (`-march=native`); building it
where it runs needs only a C++ compiler, and the result is cached per source / jaxlib / compiler.
Without a compiler (or if the build fails) `quantized_matmul_available()` is False, a warning says
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
_TARGET = "glm_jax_quantized_matmul"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


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
def quantized_matmul_available() -> bool:
    """Builds (once) and registers the INT8/INT4 matmul kernel; False, with a warning, if impossible."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C++ compiler found (set CXX): INT8/INT4 decoding on CPU uses the slower XLA path")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build(compiler))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.QuantizedMatmul), platform="cpu")
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not build the INT8/INT4 CPU kernel ({e}): decoding uses the slower XLA path")
        return False
    return True


def quantized_matmul(x: jax.Array, qkernel: jax.Array, qscale: jax.Array, bits: int) -> jax.Array:
    """`x [M, K] · dequantize(qkernel [K * bits / 8, N], per-column qscale [N])`, float32 `[M, N]`,
    on CPU with the native kernel (check `quantized_matmul_available()` first)."""
    out = jax.ShapeDtypeStruct((x.shape[0], qkernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(x.astype(jnp.float32), qkernel, qscale.astype(jnp.float32),
                                          bits=np.int64(bits))


__all__ = ["cache_dir", "quantized_matmul", "quantized_matmul_available"]
