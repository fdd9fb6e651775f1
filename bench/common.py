"""Helpers shared by the benchmarks: timing, hardware rooflines, machine facts, RESULTS.md.

Absolute times mean little on a shared machine; every bench therefore reports ratios to a reference
measured in the same run and to the rooflines measured here (memory bandwidth, peak matmul rate),
each the best of several tries so that other load on the machine biases them as little as possible.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_FILE = os.path.join(BENCH_DIR, "RESULTS.md")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of a timed function: the best (least disturbed) and the median of `times`,
    and the least CPU time (all threads of this process) of one call.

    CPU time barely grows when other processes compete for the cores, so on a busy shared machine
    it is the steadier measure of how much work a call is; wall time is what a user waits.
    """

    best: float
    median: float
    times: tuple[float, ...]
    cpu_best: float


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Times `fn()` (its result blocked on with `jax.block_until_ready`) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return Timing(min(times), statistics.median(times), tuple(times), min(cpu_times))


def memory_bandwidth_gbps(megabytes: int = 512, repeats: int = 10) -> float:
    """Read bandwidth in GB/s: a jitted sum over a float32 array far larger than the caches."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = time_calls(lambda: total(x), warmup=2, repeats=repeats).best
    return x.nbytes / seconds / 1e9


def copy_bandwidth_gbps(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second, in GB/s, of a jitted elementwise pass (`2 * x`) over a
    float32 array far larger than the caches: on accelerators a streaming pass reaches closer to the
    memory's peak than a reduction does."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    double = jax.jit(lambda x: 2 * x)
    seconds = time_calls(lambda: double(x), warmup=2, repeats=repeats).best
    return 2 * x.nbytes / seconds / 1e9


def peak_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a jitted `size`^3 matmul; "bfloat16" means bf16 inputs with float32 accumulation
    (`preferred_element_type`), the way the model computes."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    seconds = time_calls(lambda: matmul(a, b), warmup=2, repeats=repeats).best
    return 2 * size**3 / seconds


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux's VmHWM where available: `ru_maxrss` of an exec'd child also counts the parent's memory
    at fork, which would blur the figures of the reference subprocess.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: CPU model, usable cores, memory, JAX version and devices, load average now."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    devices = jax.devices()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{_cpu_model()}, {cores} cores, {memory_gib:.0f} GiB; jax {jax.__version__} on "
            f"{len(devices)} {devices[0].platform} device(s); load average {load}")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys, in column order) as a markdown table."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def append_results(section_title: str, command: str, table_rows: Sequence[dict[str, Any]],
                   notes: Sequence[str] = (), path: str = RESULTS_FILE) -> str:
    """Appends a dated section (machine, command, table, notes) to RESULTS.md; returns its text."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = (f"\n## {section_title} — {now}\n\n"
            f"- Machine: {machine_description()}\n"
            f"- Command: `{command}`\n"
            + "".join(f"- {note}\n" for note in notes)
            + "\n" + markdown_table(table_rows))
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    return text


def random_checkpoint(name: str, work_dir: str, seed: int) -> str:
    """The random float16 checkpoint of ChatGLM-6B-architecture preset `name` in the official layout
    (`work_dir/NAME-seedSEED-float16`, two shards), written on first use and shared by the benches."""
    from glm_jax import preset
    from glm_jax.testing_checkpoints import write_random_hf_checkpoint

    config = preset(name)
    if config.family != "chatglm":
        raise ValueError(f"{name!r} is not a ChatGLM-6B-architecture preset (family {config.family!r})")
    directory = os.path.join(work_dir, f"{name}-seed{seed}-float16")
    if not os.path.isdir(directory):
        print(f"writing random checkpoint {directory}", flush=True)
        write_random_hf_checkpoint(config, directory, seed=seed, dtype="float16", num_shards=2)
    return directory


def random_params_on_device(model: Any, seed: int) -> Any:
    """Random params of `model` (float or quantized, any layer layout) built on the default device
    block by block.

    Each leaf is allocated once and filled one layer (stacked leaves) or one row block at a time
    through a donated buffer, so a full-size model is built without a checkpoint on disk, without
    host memory, and without a float copy of a quantized weight. Weights ~N(0, 0.02); int8 weights
    uniform; quantization scales those of such weights; LayerNorms identity; biases zero.
    """
    import flax.linen as nn

    from glm_jax import quantization

    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"])
    keys = iter(jax.random.split(jax.random.key(seed), 4096))

    @functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=0)
    def fill(buffer: jax.Array, block: tuple, kind: str, start: jax.Array, key: jax.Array) -> jax.Array:
        if kind == "int8":
            values = jax.random.randint(key, block, -128, 128, jnp.int32)
        elif kind == "qscale":  # per-row scales of weights ~N(0, 0.02): max |w| / 7 for INT4
            values = jax.random.uniform(key, block, jnp.float32, 0.5, 1.5) * (0.06 / 7)
        else:
            values = jax.random.normal(key, block, jnp.float32) * 0.02
        return jax.lax.dynamic_update_slice_in_dim(buffer, values.astype(buffer.dtype), start, axis=0)

    def make(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name in ("bias", "scale"):  # Linear / LayerNorm biases, LayerNorm weights
            return (jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)
        kind = "int8" if leaf.dtype == jnp.int8 else ("qscale" if name == quantization.QSCALE else "normal")
        stacked = path[0].key == "layers"
        rows = 1 if stacked else max(d for d in range(1, 4097) if leaf.shape[0] % d == 0)
        buffer = jnp.zeros(leaf.shape, leaf.dtype)
        for start in range(0, leaf.shape[0], rows):
            buffer = fill(buffer, (rows, *leaf.shape[1:]), kind, start, next(keys))
        return buffer

    return jax.tree_util.tree_map_with_path(make, shapes)


def decode_timing(model: Any, params: Any, prompts: list[list[int]], n: int, repeats: int) -> dict[str, Any]:
    """Greedy `generate` of exactly n and n // 2 + 1 tokens per prompt (compiled first; best of `repeats`
    calls each): decode tok/s `batch * (N - N2) / (T(N) - T(N2))`, in which prefill and call overheads
    cancel, the step time, end-to-end tok/s `batch * N / T(N)`, time to first token (`T(1)`) and
    the compile seconds of the program (N2 and 1 reuse it: the token budget is a traced limit)."""
    from glm_jax.generation import generate_with_stats

    n2 = n // 2 + 1
    compile_s = generate_with_stats(model, params, prompts, max_new_tokens=n, stop_ids=()).compile_seconds
    best: dict[int, float] = {}
    for _ in range(repeats):
        for count in (n, n2, 1):
            out = generate_with_stats(model, params, prompts, max_new_tokens=count, stop_ids=())
            best[count] = min(best.get(count, float("inf")), out.run_seconds)
    step_s = (best[n] - best[n2]) / (n - n2)  # <= 0 only when noise swamps the extra tokens: reported as 0
    batch = len(prompts)
    return {"decode_tok_s": batch / step_s if step_s > 0 else 0.0, "step_s": step_s, "e2e_tok_s": batch * n / best[n],
            "ttft_s": best[1], "compile_s": compile_s}
