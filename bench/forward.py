"""Prefill benchmark: tokens/s of the jitted JAX forward pass vs the official PyTorch ChatGLM code.

Both sides run the same checkpoint on the same token ids (a ChatGLM prompt: text, `[gMASK]`,
`<sop>`), positions and masks derived inside the forward pass as the official model does. The
official side (`model(input_ids, use_cache=False)` under `torch.no_grad()`, fp32) runs in its own
environment (`bench/reference_env.sh`) through `bench/reference_forward.py`, which also saves its
logits so the run checks that both compute the same function (max |Δ logits|). Without
`--reference_code` only the JAX side runs and the output says so.

    python bench/forward.py --reference_code=DIR_WITH_OFFICIAL_PY_FILES

Reported per (model, precision, batch, seq_len): compile seconds, tokens/s of both, the ratio JAX /
official (from wall time, and from CPU time, which other load on a shared machine distorts less),
and MFU of both against the peak matmul rate measured by `bench/common.py` in the same run. The
table is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from glm_jax import GLMConfig, GLMForCausalLM, load_pretrained  # noqa: E402
from glm_jax.hf_io import read_hf_config  # noqa: E402
from glm_jax.config import from_hf_config  # noqa: E402

GOLDEN = "golden"

_REFERENCE_CODE = flags.DEFINE_string(
    "reference_code", None,
    "Directory with the official ChatGLM-6B remote code (modeling_chatglm.py, configuration_chatglm.py). "
    "Without it only the JAX side is measured.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    "reference_python", os.path.join(common.REPO_ROOT, ".venv-ref", "bin", "python"),
    "Python of the reference environment (created by bench/reference_env.sh).")
_GOLDEN = flags.DEFINE_string(
    "golden", os.path.join(common.REPO_ROOT, "..", "shared", "golden", "chatglm6b", "checkpoint"),
    "The golden ChatGLM-6B checkpoint directory, benchmarked under the config name 'golden'.")
_CONFIGS = flags.DEFINE_list(
    "configs", [GOLDEN, "chatglm-100m"],
    "Models: 'golden' and/or ChatGLM-6B-architecture preset names (a random fp16 checkpoint of the preset "
    "is written into --work_dir once and reused).")
_BATCH = flags.DEFINE_list("batch", ["1", "4"], "Batch sizes.")
_SEQ_LEN = flags.DEFINE_list("seq_len", ["128", "512"], "Prompt lengths in tokens.")
# JAX precision settings: name -> (param dtype, compute dtype).
PRECISIONS = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "float16": ("float16", "float16"),
    "mixed-bfloat16": ("float32", "bfloat16"),
}
_DTYPES = flags.DEFINE_list(
    "dtypes", ["float32", "bfloat16", "mixed-bfloat16"],
    f"JAX precisions, of {sorted(PRECISIONS)} ('mixed-bfloat16': float32 params, bfloat16 compute). The official "
    "side always runs float32 (the parity setting); rows of other precisions compare against it.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case and round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "Rounds of (official side, then every JAX case); the best time over all rounds is reported.")
_REFERENCE_THREADS = flags.DEFINE_integer("reference_threads", 2, "torch threads of the official side.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random checkpoints and of the token ids.")
_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join(common.BENCH_DIR, "_work"),
                                "Scratch directory: random checkpoints, inputs and logits.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")


def model_checkpoint(name: str) -> str:
    """The checkpoint directory of a --configs entry, writing the random one on first use."""
    if name == GOLDEN:
        return _GOLDEN.value
    return common.random_checkpoint(name, _WORK_DIR.value, _SEED.value)


def prompt_ids(config: GLMConfig, batch: int, seq_len: int) -> np.ndarray:
    """Random text tokens ending in `[gMASK] <sop>`: the shape of a ChatGLM prefill."""
    rng = np.random.default_rng([_SEED.value, batch, seq_len])
    text = rng.integers(10, config.mask_token_id, (batch, seq_len - 2))
    tail = np.broadcast_to([config.gmask_token_id, config.bos_token_id], (batch, 2))
    return np.concatenate([text, tail], axis=1).astype(np.int32)


def forward_flops(config: GLMConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass: 2 per weight per token, plus scores and values over the full
    `seq_len x seq_len` attention (both implementations compute every entry)."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    qkv = h * (config.num_heads + 2 * config.num_kv_heads) * d
    mlp = (3 if config.gated_mlp else 2) * h * f
    weights = config.num_layers * (qkv + config.num_heads * d * h + mlp) + config.vocab_size * h
    attention = 4 * config.num_layers * config.num_heads * d * seq_len * seq_len * batch
    return 2 * weights * batch * seq_len + attention


def run_reference(checkpoint: str, inputs: dict[str, np.ndarray], scratch: str) -> dict[str, Any]:
    """Runs bench/reference_forward.py in the reference environment; its logits land in `scratch`."""
    python = _REFERENCE_PYTHON.value
    if not os.path.isfile(python):
        raise app.UsageError(f"no reference environment at {python}: run `bash bench/reference_env.sh` first")
    inputs_file = os.path.join(scratch, "inputs.npz")
    np.savez(inputs_file, **inputs)
    command = [
        python, os.path.join(common.BENCH_DIR, "reference_forward.py"), f"--checkpoint={checkpoint}",
        f"--reference_code={_REFERENCE_CODE.value}", f"--inputs={inputs_file}", f"--logits_dir={scratch}",
        f"--warmup={_WARMUP.value}", f"--repeats={_REPEATS.value}", f"--threads={_REFERENCE_THREADS.value}",
    ]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One (model, dtype, batch, seq_len) point; `official_s`/`max_abs_dlogits` are None without reference."""

    model: str
    params: int
    dtype: str
    batch: int
    seq_len: int
    flops: float
    compile_s: float
    jax_s: float
    official_s: float | None
    jax_cpu_s: float
    official_cpu_s: float | None
    max_abs_dlogits: float | None

    def row(self, peaks: dict[str, float]) -> dict[str, Any]:
        """The table row; MFU against the peak of the row's dtype (official side: float32 peak)."""
        tokens = self.batch * self.seq_len
        official = self.official_s is not None
        return {
            "model": self.model, "params_M": round(self.params / 1e6, 1), "dtype": self.dtype,
            "batch": self.batch, "seq_len": self.seq_len, "compile_s": round(self.compile_s, 2),
            "jax_tok/s": round(tokens / self.jax_s),
            "official_tok/s": round(tokens / self.official_s) if official else "-",
            "jax/official": round(self.official_s / self.jax_s, 2) if official else "-",
            "jax/official_cpu": round(self.official_cpu_s / self.jax_cpu_s, 2) if official else "-",
            "jax_MFU": f"{100 * self.flops / self.jax_s / peaks[PRECISIONS[self.dtype][1]]:.1f}%",
            "official_MFU": f"{100 * self.flops / self.official_s / peaks['float32']:.1f}%" if official else "-",
            "max_abs_dlogits": f"{self.max_abs_dlogits:.1e}" if official else "-",
        }


def measure_peaks(peaks: dict[str, float]) -> None:
    """Raises each entry of `peaks` (compute dtype -> FLOP/s) to a fresh measurement if higher: other
    load on a shared machine only ever lowers it, so the best seen over the run is the machine's."""
    for dtype in peaks:
        peaks[dtype] = max(peaks[dtype], common.peak_matmul_flops(dtype))


def bench_model(name: str, peaks: dict[str, float], notes: list[str]) -> list[Measurement]:
    """Measures one --configs entry at every (precision, batch, seq_len).

    Everything is compiled first; then each of --rounds runs the official side and every JAX case
    once, and the best time of each case over all rounds is kept, so that load from other users of
    the machine, which comes and goes, hits both sides alike.
    """
    checkpoint = model_checkpoint(name)
    config = from_hf_config(read_hf_config(checkpoint))
    shapes = [(int(b), int(s)) for b in _BATCH.value for s in _SEQ_LEN.value]
    inputs = {f"b{b}_l{s}": prompt_ids(config, b, s) for b, s in shapes}
    cases = []  # (precision, (batch, seq_len), input key, compiled forward, params, compile seconds)
    for dtype in _DTYPES.value:
        param_dtype, compute_dtype = PRECISIONS[dtype]
        model, params = load_pretrained(checkpoint, dtype=param_dtype)
        model = GLMForCausalLM(model.config.replace(dtype=compute_dtype))
        forward = jax.jit(lambda p, ids, model=model: model.apply({"params": p}, ids))
        for shape, (key, ids) in zip(shapes, inputs.items()):
            print(f"[{name}] compiling JAX {dtype} batch {shape[0]} seq_len {shape[1]} ...", flush=True)
            start = time.perf_counter()
            compiled = forward.lower(params, ids).compile()
            cases.append((dtype, shape, key, compiled, params, time.perf_counter() - start))

    scratch = os.path.join(_WORK_DIR.value, f"forward-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    try:
        official: dict[str, float] = {}
        official_cpu: dict[str, float] = {}
        best: dict[int, float] = {}
        best_cpu: dict[int, float] = {}
        for round_index in range(_ROUNDS.value):
            measure_peaks(peaks)
            if _REFERENCE_CODE.value:
                print(f"[{name}] round {round_index + 1}: official PyTorch forward ...", flush=True)
                reference = run_reference(checkpoint, inputs, scratch)
                for run in reference["runs"]:
                    official[run["name"]] = min(official.get(run["name"], float("inf")), run["best_s"])
                    official_cpu[run["name"]] = min(official_cpu.get(run["name"], float("inf")), run["cpu_best_s"])
            print(f"[{name}] round {round_index + 1}: JAX forward ...", flush=True)
            for i, (_, _, key, compiled, params, _) in enumerate(cases):
                timing = common.time_calls(lambda: compiled(params, inputs[key]), warmup=_WARMUP.value,
                                           repeats=_REPEATS.value)
                best[i] = min(best.get(i, float("inf")), timing.best)
                best_cpu[i] = min(best_cpu.get(i, float("inf")), timing.cpu_best)
        if _REFERENCE_CODE.value:
            notes.append(f"{name}: official side torch {reference['torch']}, transformers {reference['transformers']}, "
                         f"{reference['threads']} threads, peak RSS {reference['peak_rss_mb']:.0f} MiB.")
        measurements = []
        for i, (dtype, (batch, seq_len), key, compiled, params, compile_s) in enumerate(cases):
            diff = None
            if official:
                logits = np.asarray(compiled(params, inputs[key]), np.float32)
                diff = float(np.abs(logits - np.load(os.path.join(scratch, key + ".npy"))).max())
            measurements.append(Measurement(
                name, param_count(params), dtype, batch, seq_len, forward_flops(config, batch, seq_len),
                compile_s, best[i], official.get(key), best_cpu[i], official_cpu.get(key), diff))
        return measurements
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def param_count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def command_line() -> str:
    """argv as a shell command, with paths outside the repository shortened to their last part."""
    parts = []
    for arg in ["python", os.path.relpath(os.path.abspath(sys.argv[0]), common.REPO_ROOT), *sys.argv[1:]]:
        flag, sep, value = arg.partition("=")
        if sep and os.path.isabs(value):
            inside = os.path.abspath(value).startswith(common.REPO_ROOT + os.sep)
            value = os.path.relpath(value, common.REPO_ROOT) if inside else f"<{os.path.basename(value.rstrip('/'))}>"
        parts.append(flag + sep + value)
    return " ".join(parts)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    bad = [d for d in _DTYPES.value if d not in PRECISIONS]
    if bad:
        raise app.UsageError(f"--dtypes: unknown {bad}; known: {sorted(PRECISIONS)}")
    if _REFERENCE_CODE.value:
        missing = [f for f in ("modeling_chatglm.py", "configuration_chatglm.py")
                   if not os.path.isfile(os.path.join(_REFERENCE_CODE.value, f))]
        if missing:
            raise app.UsageError(f"--reference_code={_REFERENCE_CODE.value} lacks {missing}")
    else:
        print("NOTE: no --reference_code given: measuring the JAX side only (no ratio to the official code).", flush=True)
    load_at_start = os.getloadavg()[0]
    peaks = {dtype: 0.0 for dtype in dict.fromkeys(["float32", *(PRECISIONS[d][1] for d in _DTYPES.value)])}
    notes: list[str] = []
    measurements = []
    for name in _CONFIGS.value:
        measurements += bench_model(name, peaks, notes)
    measure_peaks(peaks)
    rows = [m.row(peaks) for m in measurements]
    bandwidth = common.memory_bandwidth_gbps()
    notes = [
        "Peak matmul (jax, 2048^3, f32 accumulation; best over the run): "
        + ", ".join(f"{dtype} {flops / 1e9:.0f} GFLOP/s" for dtype, flops in peaks.items())
        + f"; memory read bandwidth {bandwidth:.1f} GB/s.",
        "tok/s = batch*seq_len / best of the timed calls; MFU = (2*matmul params*tokens + 4*layers*seq_len^2*heads*"
        "head_dim*batch) / time / peak of the row's compute dtype (official: float32 peak). All rows of a model "
        "compare with the official float32 run (max_abs_dlogits too, so low-precision rows show their rounding). "
        "jax/official_cpu: the same ratio from CPU seconds per call (all threads), which other load on the "
        "machine distorts far less than wall time.",
    ] + notes
    if not _REFERENCE_CODE.value:
        notes.append("JAX only: run without --reference_code, so no official figures or ratios.")
    notes.append(f"Peak RSS of the JAX process: {common.peak_rss_mb():.0f} MiB. 1-minute load average at start "
                 f"{load_at_start:.1f}, at end {os.getloadavg()[0]:.1f} (a figure above the core count means other "
                 f"processes competed for the CPU; times are the best over {_ROUNDS.value} round(s) x "
                 f"{_REPEATS.value} calls).")
    table = common.markdown_table(rows)
    print("\n" + table)
    for note in notes:
        print("- " + note)
    if _RECORD.value:
        common.append_results("Prefill (forward) throughput: JAX vs official PyTorch", command_line(), rows, notes)
        print(f"appended to {os.path.relpath(common.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main)
