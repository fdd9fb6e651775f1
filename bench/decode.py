"""Decode benchmark: greedy generation with a KV cache, glm_jax.generate vs the official PyTorch `generate`.

Both sides run the same random fp16 checkpoint (official Hugging Face layout, written once into
--work_dir; the official side computes on its float32 copy, the JAX side once per `--param_dtypes`
entry: float32, or float16 storage holding the same values, float32 arithmetic either way) on the
same prompts (random text ids, `[gMASK]`, `<sop>`), greedily, producing exactly `--new_tokens` tokens
(no early stop: `stop_ids=()` here, `min_new_tokens` on the official side). The official side
(`bench/reference_decode.py`) runs in its own environment (`bench/reference_env.sh`), with passive and
spinning OpenMP workers in alternate rounds; without `--reference_code` only the JAX side runs and
the output says so.

    python bench/decode.py --reference_code=DIR_WITH_OFFICIAL_PY_FILES

Reported per (model, batch):
- decode tok/s: steady-state generation speed, `batch * (N - N2) / (T(N) - T(N2))` where T(n) is the
  best wall time in a round of a whole `generate` call producing n tokens and N2 = N // 2 + 1 (the
  prefill and call overheads cancel; on the JAX side both calls run the same compiled program); both
  times come from the same round, and the best round counts;
- end-to-end tok/s: `batch * N / T(N)`;
- time to first token: the JAX streaming API's first token (prefill program + host read) and the
  official `generate(max_new_tokens=1)`;
- roofline: bytes of weights read per decode step (all params as stored: float32 on the official
  side, `--param_dtypes` on the JAX side; the tied embedding is read whole as the output layer) / step time, as a fraction of the memory read bandwidth measured in
  the same run (bench/common.py);
- compile seconds of the JAX generate program, and whether both sides produced the same tokens.
"""

from __future__ import annotations

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

from glm_jax import GLMConfig, load_pretrained  # noqa: E402
from glm_jax.generation import generate_with_stats, stream_generate  # noqa: E402

_REFERENCE_CODE = flags.DEFINE_string(
    "reference_code", None,
    "Directory with the official ChatGLM-6B remote code (modeling_chatglm.py, configuration_chatglm.py). "
    "Without it only the JAX side is measured.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    "reference_python", os.path.join(common.REPO_ROOT, ".venv-ref", "bin", "python"),
    "Python of the reference environment (created by bench/reference_env.sh).")
_CONFIGS = flags.DEFINE_list("configs", ["chatglm-100m", "chatglm-1b"], "ChatGLM-6B-architecture presets.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (text + [gMASK] <sop>).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "N: tokens generated per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per case and round, on each side.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "Rounds of (official side, then the JAX side); the best time of each case over all rounds counts. "
    "The official side alternates its OpenMP wait policy between rounds (passive first).")
_REFERENCE_THREADS = flags.DEFINE_integer("reference_threads", 2, "torch threads of the official side.")
_PARAM_DTYPES = flags.DEFINE_list(
    "param_dtypes", ["float32", "float16"],
    "Storage dtypes of the JAX side's params, one row each; compute is float32 in all. The checkpoint is "
    "fp16, so float16 storage holds the same weight values as the official side's float32 copy.")
_SCAN_LAYERS = flags.DEFINE_boolean(
    "scan_layers", False, "Load the stacked (scanned) layer layout instead of the per-layer one generation uses.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random checkpoints and of the prompts.")
_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join(common.BENCH_DIR, "_work"),
                                "Scratch directory: random checkpoints and inputs.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")


def prompts(config: GLMConfig, batch: int) -> np.ndarray:
    rng = np.random.default_rng([_SEED.value, batch])
    text = rng.integers(10, config.mask_token_id, (batch, _PROMPT_LEN.value - 2))
    tail = np.broadcast_to([config.gmask_token_id, config.bos_token_id], (batch, 2))
    return np.concatenate([text, tail], axis=1).astype(np.int32)


# OpenMP wait policy of the official side, by round: passive workers avoid torch's occasional 5-15x
# slow runs on this shared 2-core machine, spinning ones are a few percent faster otherwise; alternating
# them lets the official side's best round come from whichever suits it.
WAIT_POLICIES = ("PASSIVE", "ACTIVE")


def run_official(checkpoint: str, inputs: dict[str, np.ndarray], counts: list[int], scratch: str,
                 wait_policy: str) -> dict[str, Any]:
    python = _REFERENCE_PYTHON.value
    if not os.path.isfile(python):
        raise app.UsageError(f"no reference environment at {python}: run `bash bench/reference_env.sh` first")
    inputs_file = os.path.join(scratch, "inputs.npz")
    np.savez(inputs_file, **inputs)
    command = [
        python, os.path.join(common.BENCH_DIR, "reference_decode.py"), f"--checkpoint={checkpoint}",
        f"--reference_code={_REFERENCE_CODE.value}", f"--inputs={inputs_file}",
        f"--new_tokens={','.join(map(str, counts))}", "--warmup=0", f"--repeats={_REPEATS.value}",
        f"--threads={_REFERENCE_THREADS.value}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY=wait_policy))
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_to_first_token(model, params, prompt: list[int]) -> float:
    start = time.perf_counter()
    stream = stream_generate(model, params, prompt, max_new_tokens=_NEW_TOKENS.value, stop_ids=())
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


def bench_config(name: str, bandwidth: list[float], notes: list[str]) -> list[dict[str, Any]]:
    checkpoint = common.random_checkpoint(name, _WORK_DIR.value, _SEED.value)
    variants = {dtype: load_pretrained(checkpoint, dtype="float32", param_dtype=dtype, scan_layers=_SCAN_LAYERS.value)
                for dtype in _PARAM_DTYPES.value}
    model = next(iter(variants.values()))[0]
    weight_bytes = {dtype: sum(x.nbytes for x in jax.tree.leaves(params)) for dtype, (_, params) in variants.items()}
    param_count = sum(x.size for x in jax.tree.leaves(next(iter(variants.values()))[1]))
    n, n2 = _NEW_TOKENS.value, _NEW_TOKENS.value // 2 + 1
    batches = [int(b) for b in _BATCH.value]
    inputs = {f"b{b}": prompts(model.config, b) for b in batches}

    def jax_run(dtype: str, key: str, count: int):
        model, params = variants[dtype]
        return generate_with_stats(model, params, inputs[key].tolist(), max_new_tokens=count, stop_ids=())

    # Compiles (N2 reuses the program), and the streaming prefill.
    compile_s = {(dtype, key): jax_run(dtype, key, n).compile_seconds for dtype in variants for key in inputs}
    for dtype in variants:
        for key in inputs:
            time_to_first_token(*variants[dtype], inputs[key][0].tolist())
    best: dict[tuple[str, str, int], float] = {}  # over all rounds
    in_round: dict[tuple[str, str, int, int], float] = {}  # best of each round
    tokens: dict[tuple[str, str], list] = {}
    round_index = 0

    def keep(side: str, key: str, count: int, seconds: float) -> None:
        best[side, key, count] = min(best.get((side, key, count), float("inf")), seconds)
        in_round[side, key, count, round_index] = min(in_round.get((side, key, count, round_index), float("inf")),
                                                      seconds)

    scratch = os.path.join(_WORK_DIR.value, f"decode-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    try:
        for round_index in range(_ROUNDS.value):
            bandwidth.append(common.memory_bandwidth_gbps())
            if _REFERENCE_CODE.value:
                print(f"[{name}] round {round_index + 1}: official PyTorch generate ...", flush=True)
                wait_policy = WAIT_POLICIES[round_index % len(WAIT_POLICIES)]
                reference = run_official(checkpoint, inputs, [1, n2, n], scratch, wait_policy)
                for run in reference["runs"]:
                    keep("official", run["name"], run["new_tokens"], run["best_s"])
                    if run["new_tokens"] == n:
                        tokens["official", run["name"]] = run["tokens"]
            for dtype in variants:
                print(f"[{name}] round {round_index + 1}: JAX generate, {dtype} params ...", flush=True)
                side = f"jax_{dtype}"
                for key in inputs:
                    for count in (n, n2):
                        for _ in range(_REPEATS.value):
                            out = jax_run(dtype, key, count)
                            keep(side, key, count, out.run_seconds)
                            if count == n:
                                tokens[side, key] = out.sequences
                    for _ in range(_REPEATS.value):
                        keep(side, key, 1, time_to_first_token(*variants[dtype], inputs[key][0].tolist()))
        if _REFERENCE_CODE.value:
            notes.append(f"{name}: official side torch {reference['torch']}, transformers {reference['transformers']}, "
                         f"{reference['threads']} threads, peak RSS {reference['peak_rss_mb']:.0f} MiB.")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def step_seconds(side: str, key: str) -> float:
        # T(N) - T(N2) of the same round (measured back to back), the best round: the difference of
        # two bests taken from different rounds can pair a quiet T(N) with a disturbed T(N2).
        return min((in_round[side, key, n, r] - in_round[side, key, n2, r]) / (n - n2) for r in range(_ROUNDS.value))

    rows = []
    for batch, key in zip(batches, inputs):
        for dtype in variants:
            row = {"model": name, "params_M": round(param_count / 1e6, 1), "batch": batch, "jax_params": dtype}
            sides = {"jax": f"jax_{dtype}"}
            if _REFERENCE_CODE.value:
                sides["official"] = "official"
            decode, e2e = {}, {}
            for column, side in sides.items():
                step_s = step_seconds(side, key)
                decode[column] = batch / step_s
                e2e[column] = batch * n / best[side, key, n]
                # The official side reads float32 weights; the JAX side the bytes of its params.
                read = weight_bytes[dtype] if column == "jax" else 4 * param_count
                row[f"{column}_decode_tok/s"] = round(decode[column], 1)
                row[f"{column}_e2e_tok/s"] = round(e2e[column], 1)
                row[f"{column}_TTFT_ms"] = round(1000 * best[side, key, 1])
                row[f"{column}_roofline"] = f"{100 * read / step_s / 1e9 / max(bandwidth):.0f}%"
            if _REFERENCE_CODE.value:
                row["decode_jax/official"] = round(decode["jax"] / decode["official"], 2)
                row["e2e_jax/official"] = round(e2e["jax"] / e2e["official"], 2)
                same = [a == b for a, b in zip(tokens[sides["jax"], key], tokens["official", key])]
                row["same_tokens"] = f"{sum(same)}/{len(same)} rows"
            row["compile_s"] = round(compile_s[dtype, key], 2)
            rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NEW_TOKENS.value < 4:
        raise app.UsageError("--new_tokens must be at least 4")
    if not _REFERENCE_CODE.value:
        print("NOTE: no --reference_code given: measuring the JAX side only (no ratio to the official code).", flush=True)
    load_at_start = os.getloadavg()[0]
    bandwidth: list[float] = []
    notes: list[str] = []
    rows = []
    for name in _CONFIGS.value:
        rows += bench_config(name, bandwidth, notes)
    n = _NEW_TOKENS.value
    notes = [
        f"Greedy, float32 arithmetic on both sides, prompt {_PROMPT_LEN.value} tokens, N = {n} new tokens; decode tok/s = "
        f"batch*(N-N2)/(T(N)-T(N2)) with N2 = {n // 2 + 1} (prefill and call overhead cancel; T(N) and T(N2) of the same "
        f"round, best round); e2e = batch*N/T(N); "
        "TTFT: JAX streaming API's first token vs official generate(max_new_tokens=1). Best time over "
        f"{_ROUNDS.value} round(s) x {_REPEATS.value} call(s) per side.",
        f"roofline = weight bytes read per decode step (the JAX side's params as stored, float32 on the official "
        f"side) / step time / memory read bandwidth "
        f"(best of the run: {max(bandwidth):.1f} GB/s; KV-cache reads not counted).",
        f"JAX params in the {'stacked (scanned)' if _SCAN_LAYERS.value else 'per-layer (scan_layers=False)'} layout, "
        "stored as jax_params; every matmul computes in float32 (float16 storage: the checkpoint's fp16 values, "
        "widened in registers).",
        f"Official side's OpenMP wait policy by round: {', '.join(WAIT_POLICIES)}, alternating (its best round counts).",
        "same_tokens: rows whose N greedy tokens are identical on both sides (the official side cannot pick "
        "eos: min_new_tokens).",
    ] + notes
    if not _REFERENCE_CODE.value:
        notes.append("JAX only: run without --reference_code, so no official figures or ratios.")
    notes.append(f"Peak RSS of the JAX process: {common.peak_rss_mb():.0f} MiB. 1-minute load average at start "
                 f"{load_at_start:.1f}, at end {os.getloadavg()[0]:.1f} (above the core count = other processes "
                 "competed for the CPU).")
    table = common.markdown_table(rows)
    print("\n" + table)
    for note in notes:
        print("- " + note)
    if _RECORD.value:
        command = (f"python bench/decode.py --configs={','.join(_CONFIGS.value)} --batch={','.join(_BATCH.value)} "
                   f"--new_tokens={n} --prompt_len={_PROMPT_LEN.value} --rounds={_ROUNDS.value} --repeats={_REPEATS.value} "
                   f"--param_dtypes={','.join(_PARAM_DTYPES.value)}"
                   + (" --reference_code=<official ChatGLM-6B code>" if _REFERENCE_CODE.value else ""))
        common.append_results("Decode (greedy generate, KV cache): JAX vs official PyTorch", command, rows, notes)
        print(f"appended to {os.path.relpath(common.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main)
