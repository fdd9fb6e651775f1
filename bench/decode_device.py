"""Decode on an accelerator: full-size ChatGLM-6B in bf16 (and INT8 / INT4 weights) against the HBM roofline.

    python bench/decode_device.py                      # on a GPU or TPU host
    python bench/decode_device.py --config=chatglm-100m --batch=1 --new_tokens=16   # a quick try on CPU

The params are random and made on the device (`common.random_params_on_device`): a 12 GB checkpoint
need not exist, be written or be read, and the timed program is the one a real checkpoint runs
(`glm_jax.generate`, per-layer layout, greedy, exactly `--new_tokens` tokens: no early stop).

Reported per (weights, batch):
- decode tok/s `batch * (N - N2) / (T(N) - T(N2))` (prefill and call overhead cancel) and the step time;
- achieved GB/s: param bytes read per decode step (every weight once; the tied embedding whole, as
  the output layer) / step time, and that as a fraction of the device's memory bandwidth measured
  in the same run (the better of a jitted sum and a jitted elementwise pass over a buffer far larger
  than the caches) — the roofline of batch-1 decoding, which must read every weight once per token;
- end-to-end tok/s `batch * N / T(N)`, time to first token `T(1)`, compile seconds.

No official-code column: the official ChatGLM-6B remote code needs transformers 4.33 / NumPy 1.x,
which accelerator images do not carry; bench/decode.py compares with it on CPU.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from glm_jax import GLMForCausalLM, preset, quantization  # noqa: E402

WEIGHTS = {"bf16": 0, "int8": 8, "int4": 4}

_CONFIG = flags.DEFINE_string("config", "chatglm-6b", "ChatGLM-6B-architecture preset.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Compute and float param dtype.")
_WEIGHTS = flags.DEFINE_list("weights", ["bf16", "int8", "int4"],
                             f"Weight formats, of {list(WEIGHTS)} (bf16: the float dtype of --dtype).")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (text + [gMASK] <sop>).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "N: tokens generated per timed call (N2 = N // 2 + 1).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per token count (the best counts).")
_BANDWIDTH_MB = flags.DEFINE_integer("bandwidth_mb", 2048, "Buffer of the bandwidth measurements, MiB.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random params and prompts.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")


def prompts(config: Any, batch: int) -> list[list[int]]:
    rng = np.random.default_rng([_SEED.value, batch])
    text = rng.integers(10, config.mask_token_id, (batch, _PROMPT_LEN.value - 2))
    return [[*map(int, row), config.gmask_token_id, config.bos_token_id] for row in text]


def bench_weights(name: str, bandwidth: float, notes: list[str]) -> list[dict[str, Any]]:
    bits = WEIGHTS[name]
    config = preset(_CONFIG.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value, scan_layers=False,
                    quantization_bit=bits)
    model = GLMForCausalLM(config)
    start = time.perf_counter()
    params = common.random_params_on_device(model, _SEED.value)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - start
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    notes.append(f"{name}: {quantization.format_param_bytes(params)}, built on the device in {build_s:.1f} s.")
    rows = []
    for batch in map(int, _BATCH.value):
        timing = common.decode_timing(model, params, prompts(config, batch), _NEW_TOKENS.value, _REPEATS.value)
        step_s = timing["step_s"]
        achieved = weight_bytes / step_s / 1e9 if step_s > 0 else 0.0
        rows.append({
            "model": _CONFIG.value, "weights": name if bits else _DTYPE.value, "batch": batch,
            "params_GB": round(weight_bytes / 1e9, 2),
            "decode_tok/s": round(timing["decode_tok_s"], 1), "step_ms": round(1000 * step_s, 2),
            "weights_GB/s": round(achieved), "roofline": f"{100 * achieved / bandwidth:.0f}%",
            "e2e_tok/s": round(timing["e2e_tok_s"], 1), "TTFT_ms": round(1000 * timing["ttft_s"], 1),
            "compile_s": round(timing["compile_s"], 1),
        })
        print(rows[-1], flush=True)
    del params
    gc.collect()
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_WEIGHTS.value) - set(WEIGHTS))
    if unknown:
        raise app.UsageError(f"--weights: unknown {unknown}; choose from {list(WEIGHTS)}")
    if _NEW_TOKENS.value < 4:
        raise app.UsageError("--new_tokens must be at least 4")
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    read = max(common.memory_bandwidth_gbps(_BANDWIDTH_MB.value) for _ in range(3))
    copy = max(common.copy_bandwidth_gbps(_BANDWIDTH_MB.value) for _ in range(3))
    bandwidth = max(read, copy)
    print(f"memory bandwidth: read (sum) {read:.0f} GB/s, copy (read + write) {copy:.0f} GB/s", flush=True)
    notes: list[str] = []
    rows = []
    for name in _WEIGHTS.value:
        rows += bench_weights(name, bandwidth, notes)
    n = _NEW_TOKENS.value
    notes = [
        f"Device: {device.device_kind} ({device.platform}). Random params made on the device; greedy, "
        f"prompt {_PROMPT_LEN.value} tokens, N = {n}, N2 = {n // 2 + 1}; decode tok/s = batch*(N-N2)/(T(N)-T(N2)); "
        f"e2e = batch*N/T(N); TTFT = T(1); best of {_REPEATS.value} calls each.",
        f"roofline = param bytes per decode step / step time / memory bandwidth measured in this run: "
        f"{bandwidth:.0f} GB/s, the higher of a jitted sum ({read:.0f} GB/s read) and a jitted `2 * x` "
        f"({copy:.0f} GB/s read + written), over {_BANDWIDTH_MB.value} MiB, best of 3. KV-cache reads "
        "not counted (batch 1: under 1% of the weight bytes at this length).",
        "No official-code column: its remote code needs transformers 4.33 / NumPy 1.x, absent from the "
        "accelerator image; bench/decode.py compares with it on CPU.",
    ] + notes
    table = common.markdown_table(rows)
    print("\n" + table)
    for note in notes:
        print("- " + note)
    if _RECORD.value:
        command = (f"python bench/decode_device.py --config={_CONFIG.value} --dtype={_DTYPE.value} "
                   f"--weights={','.join(_WEIGHTS.value)} --batch={','.join(_BATCH.value)} --new_tokens={n} "
                   f"--prompt_len={_PROMPT_LEN.value} --repeats={_REPEATS.value}")
        common.append_results(f"Decode on {device.device_kind}: {_CONFIG.value} vs the HBM roofline", command, rows, notes)
        print(f"appended to {os.path.relpath(common.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main)
