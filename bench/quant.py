"""Weight-only INT8 / INT4 inference: memory, decode speed and quality, against fp32 / bf16 and the official code.

    python bench/quant.py --reference_code=DIR_WITH_OFFICIAL_PY_FILES

Three parts, each a section of bench/RESULTS.md:

1. Decode, ~1B model (`--config`, the ChatGLM-6B architecture; the random fp16 checkpoint of
   bench/decode.py, written once into --work_dir). Every variant runs in its own process, one after
   the other (so each reports its own memory): fp32, bf16, int8, int4 (Linear weights quantized on
   load with the official scheme, float32 activations and embedding), `-qe` (the word embedding /
   tied output layer quantized too), `-g128` (group-wise scales, one per 128 inputs), `-xla` (the
   pure-XLA tiled loop instead of the native CPU kernel of glm_jax.cpu_kernels) and `-untiled`
   (the dequantize-then-dot path the CPU tiling replaced, for comparison). Reported: params bytes by dtype, decode tok/s
   `(N - N2) / (T(N) - T(N2))` and end-to-end tok/s of greedy `generate` (batch 1, as
   bench/decode.py), the ratio to the JAX fp32 and bf16 rows, and the fraction of the memory
   roofline (params bytes read per step / step time / read bandwidth measured in the same run).
   With --reference_code the official `generate` runs in fp32 and bf16 on the same checkpoint, and
   its `model.quantize(8|4)` is tried (bench/reference_quant.py).
2. Full-size ChatGLM-6B INT4 (random weights written straight into int8 buffers layer by layer, so
   the float model never exists): peak RSS of a process that builds the params and generates 32
   tokens, with and without the quantized embedding. Target: below the official 6 GB.
3. Quality: the `make demo` model (configs/pretrain/tiny.py pre-training, trained here once into
   --work_dir without the last 40 paragraphs of the corpus, which are the held-out text):
   held-out perplexity of fp32 / INT8 / INT4 (+ `-qe`, + group-wise `-g16`), relative logits error
   and greedy (argmax) agreement with fp32.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from glm_jax import preset, quantization  # noqa: E402

# name -> (compute/param dtype, quantization, quantized embedding, group size, CPU decode matmul path)
# Paths: "native" (glm_jax.cpu_kernels where it applies, else the XLA tiled loop), "xla-tiled",
# "untiled" (dequantize the whole weight, then dot).
VARIANTS = {
    "fp32": ("float32", None, False, 0, "native"),
    "bf16": ("bfloat16", None, False, 0, "native"),
    "int8": ("float32", "int8", False, 0, "native"),
    "int4": ("float32", "int4", False, 0, "native"),
    "int8-qe": ("float32", "int8", True, 0, "native"),
    "int4-qe": ("float32", "int4", True, 0, "native"),
    "int4-g128": ("float32", "int4", False, 128, "native"),
    "int8-xla": ("float32", "int8", False, 0, "xla-tiled"),
    "int4-xla": ("float32", "int4", False, 0, "xla-tiled"),
    "int4-untiled": ("float32", "int4", False, 0, "untiled"),
}

_REFERENCE_CODE = flags.DEFINE_string(
    "reference_code", None,
    "Directory with the official ChatGLM-6B remote code (modeling_chatglm.py, quantization.py, ...). "
    "Without it only the JAX side is measured.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    "reference_python", os.path.join(common.REPO_ROOT, ".venv-ref", "bin", "python"),
    "Python of the reference environment (created by bench/reference_env.sh).")
_REFERENCE_THREADS = flags.DEFINE_integer("reference_threads", 2, "torch threads of the official side.")
_CONFIG = flags.DEFINE_string("config", "chatglm-1b", "ChatGLM-6B-architecture preset of the decode part.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Decode variants, of {list(VARIANTS)}.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (text + [gMASK] <sop>).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 48, "N: tokens generated per timed call (N2 = N // 2 + 1).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per token count, variant and round (the best counts).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds over all decode variants (each variant's best round counts).")
_RSS_6B = flags.DEFINE_list("rss_6b", ["int4", "int4-qe"],
                            "ChatGLM-6B variants whose peak RSS is measured (empty: skip part 2).")
_RSS_NEW_TOKENS = flags.DEFINE_integer("rss_new_tokens", 32, "Tokens the ChatGLM-6B processes generate.")
_QUALITY = flags.DEFINE_bool("quality", True, "Run part 3 (trains the demo model once, a few minutes).")
_QUALITY_STEPS = flags.DEFINE_integer("quality_steps", 1000, "Pre-training steps of the demo model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random checkpoints and prompts.")
_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join(common.BENCH_DIR, "_work"), "Scratch directory.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")
# Internal: the per-variant processes.
_CHILD = flags.DEFINE_enum("child", None, ["decode", "rss6b"], "(internal) run one measurement and print JSON.")
_VARIANT = flags.DEFINE_string("variant", None, "(internal) the variant of a --child run.")

HELD_OUT_PARAGRAPHS = 40
CONTEXT, TARGET = 12, 48  # held-out paragraph tokens given as prompt / scored after <sop>


# ------------------------------------------------------------------------------ shared helpers


def checkpoint_dir(name: str) -> str:
    """The random fp16 checkpoint of a preset, the one bench/decode.py uses (same path)."""
    return common.random_checkpoint(name, _WORK_DIR.value, _SEED.value)


def prompt(config: Any, length: int) -> list[int]:
    rng = np.random.default_rng([_SEED.value, 1])
    return [*map(int, rng.integers(10, config.mask_token_id, length - 2)), config.gmask_token_id, config.bos_token_id]


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def run_child(kind: str, variant: str) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), f"--child={kind}", f"--variant={variant}",
               f"--config={_CONFIG.value}", f"--prompt_len={_PROMPT_LEN.value}", f"--new_tokens={_NEW_TOKENS.value}",
               f"--repeats={_REPEATS.value}", f"--rss_new_tokens={_RSS_NEW_TOKENS.value}", f"--seed={_SEED.value}",
               f"--work_dir={_WORK_DIR.value}"]
    print(f"[{kind} {variant}] ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ part 1: decode, ~1B


def child_decode(variant: str) -> dict[str, Any]:
    from glm_jax import load_pretrained

    dtype, quant, embeddings, group, path = VARIANTS[variant]
    if path == "untiled":
        quantization.TILED_MAX_ROWS = 0  # every matmul dequantizes the whole weight first
    elif path == "xla-tiled":
        quantization.NATIVE_CPU_KERNEL = False
    model, params = load_pretrained(checkpoint_dir(_CONFIG.value), dtype=dtype, quantization=quant,
                                    quantize_embeddings=embeddings, quantization_group_size=group, scan_layers=False)
    rss_loaded = current_rss_mb()
    result = common.decode_timing(model, params, [prompt(model.config, _PROMPT_LEN.value)], _NEW_TOKENS.value, _REPEATS.value)
    return dict(result, params_bytes=quantization.param_bytes_by_dtype(params), rss_loaded_mb=rss_loaded,
                rss_end_mb=current_rss_mb(), peak_rss_mb=common.peak_rss_mb())


def run_official(checkpoint: str, scratch: str) -> dict[str, Any]:
    """Official fp32 / bf16 `generate` (reference_decode.py) and `quantize(8|4)` (reference_quant.py)."""
    python = _REFERENCE_PYTHON.value
    if not os.path.isfile(python):
        raise app.UsageError(f"no reference environment at {python}: run `bash bench/reference_env.sh` first")
    inputs = os.path.join(scratch, "quant-inputs.npz")
    np.savez(inputs, b1=np.asarray([prompt(preset(_CONFIG.value), _PROMPT_LEN.value)], np.int32))
    n, n2 = _NEW_TOKENS.value, _NEW_TOKENS.value // 2 + 1
    common_args = [f"--checkpoint={checkpoint}", f"--reference_code={_REFERENCE_CODE.value}", f"--inputs={inputs}",
                   f"--threads={_REFERENCE_THREADS.value}", f"--repeats={_REPEATS.value}"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    official = {}

    def call(script: str, *args: str) -> dict[str, Any]:
        done = subprocess.run([python, os.path.join(common.BENCH_DIR, script), *common_args, *args],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    for dtype in ("float32", "bfloat16"):
        print(f"[official {dtype}] ...", flush=True)
        out = call("reference_decode.py", f"--dtype={dtype}", f"--new_tokens={n2},{n}", "--warmup=1")
        best = {run["new_tokens"]: run["best_s"] for run in out["runs"]}
        official[dtype] = {"decode_tok_s": (n - n2) / (best[n] - best[n2]), "e2e_tok_s": n / best[n],
                           "peak_rss_mb": out["peak_rss_mb"], "torch": out["torch"],
                           "transformers": out["transformers"]}
    print("[official quantize(8|4)] ...", flush=True)
    official["quantize"] = call("reference_quant.py", f"--new_tokens={n2},{n}")
    return official


def decode_part(bandwidth: list[float]) -> tuple[list[dict], list[str]]:
    checkpoint = checkpoint_dir(_CONFIG.value)
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    results: dict[str, dict[str, Any]] = {}
    for _ in range(_ROUNDS.value):
        for variant in _VARIANTS.value:
            bandwidth.append(common.memory_bandwidth_gbps())
            result = run_child("decode", variant)
            best = results.setdefault(variant, result)
            for key in ("decode_tok_s", "e2e_tok_s"):
                best[key] = max(best[key], result[key])
            best["step_s"] = 1 / best["decode_tok_s"] if best["decode_tok_s"] else float("inf")
    official = run_official(checkpoint, _WORK_DIR.value) if _REFERENCE_CODE.value else None
    rows = []
    for variant, r in results.items():
        total = sum(r["params_bytes"].values())
        row = {"variant": variant, "params_GB": round(total / 1e9, 3),
               "by dtype (GB)": ", ".join(f"{k} {v / 1e9:.3f}" for k, v in r["params_bytes"].items()),
               "decode_tok/s": round(r["decode_tok_s"], 2), "e2e_tok/s": round(r["e2e_tok_s"], 2)}
        for base in ("fp32", "bf16"):
            if base in results:
                row[f"vs {base}"] = round(r["decode_tok_s"] / results[base]["decode_tok_s"], 2)
        if official:
            row["vs official bf16"] = round(r["decode_tok_s"] / official["bfloat16"]["decode_tok_s"], 2)
        row["roofline"] = f"{100 * total / r['step_s'] / 1e9 / max(bandwidth):.0f}%"
        row["RSS after load MiB"] = round(r["rss_loaded_mb"])
        row["compile_s"] = round(r["compile_s"], 1)
        rows.append(row)
    n = _NEW_TOKENS.value
    notes = [
        f"Model: {_CONFIG.value} (random fp16 checkpoint, ChatGLM-6B architecture), batch 1, "
        f"prompt {_PROMPT_LEN.value} "
        f"tokens, greedy; decode tok/s = (N-N2)/(T(N)-T(N2)) with N={n}, N2={n // 2 + 1}, best of {_REPEATS.value}; "
        f"e2e = N/T(N). Each variant in its own process, one after the other, in {_ROUNDS.value} round(s); "
        "the best round counts.",
        "Variants: fp32/bf16 = all params and compute in that dtype; int8/int4 = Linear weights of every block "
        "quantized on load (official per-row symmetric scheme, INT4 two per byte), float32 activations, embedding "
        "and norms; -qe = the word embedding / tied output layer quantized too (per token row); decode matmuls of "
        "per-row INT8/INT4 run in the native CPU kernel (glm_jax.cpu_kernels); -xla = the pure-XLA tiled loop instead; "
        "-untiled = dequantize-then-dot (whole float32 weight written per matmul); "
        "-g128 = group-wise scales (one per 128 input values, float32).",
        f"roofline = params bytes (all read once per step) / step time / memory read bandwidth (best of the run: "
        f"{max(bandwidth):.1f} GB/s).",
        "JAX params in the per-layer layout (scan_layers=False), as glm-generate / glm-chat load them.",
        "bf16 is slow here: XLA's CPU dots take float32 operands only, so every bf16 weight is converted to a "
        "float32 copy in every step (seen in the compiled HLO).",
    ]
    if official:
        q = official["quantize"]
        notes.append(
            f"Official code (torch {official['float32']['torch']}, transformers {official['float32']['transformers']}, "
            f"{_REFERENCE_THREADS.value} threads): fp32 decode {official['float32']['decode_tok_s']:.2f} tok/s "
            f"(e2e {official['float32']['e2e_tok_s']:.2f}), bf16 decode {official['bfloat16']['decode_tok_s']:.2f} "
            f"tok/s (e2e {official['bfloat16']['e2e_tok_s']:.2f}). Its INT8/INT4 `model.quantize(bits)` on this "
            f"CPU: " + "; ".join(
                f"INT{bits}: " + (f"{(n - n // 2 - 1) / (r['best_s'][str(n)] - r['best_s'][str(n // 2 + 1)]):.2f} tok/s"
                                  if r["ok"] else f"fails ({r['error']})")
                for bits, r in q["results"].items()) + ".")
    else:
        notes.append("JAX only: run without --reference_code, so no official figures.")
    return rows, notes


# ------------------------------------------------------------------- part 2: ChatGLM-6B INT4 RSS


def child_rss6b(variant: str) -> dict[str, Any]:
    from glm_jax.modeling.transformer import GLMForCausalLM

    _, quant, embeddings, _, _ = VARIANTS[variant]
    config = preset("chatglm-6b", quantization_bit=int(quant[3:]), quantize_embeddings=embeddings, scan_layers=False)
    model = GLMForCausalLM(config)
    start = time.perf_counter()
    params = common.random_params_on_device(model, _SEED.value)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - start
    rss_built = current_rss_mb()
    result = common.decode_timing(model, params, [prompt(config, 16)], _RSS_NEW_TOKENS.value, _REPEATS.value)
    return dict(result, params_bytes=quantization.param_bytes_by_dtype(params), build_s=build_s,
                rss_built_mb=rss_built, peak_rss_mb=common.peak_rss_mb())


def rss_part() -> tuple[list[dict], list[str]]:
    rows = []
    for variant in _RSS_6B.value:
        r = run_child("rss6b", variant)
        total = sum(r["params_bytes"].values())
        rows.append({
            "model": f"ChatGLM-6B {variant}", "params_GB": round(total / 1e9, 2),
            "by dtype (GB)": ", ".join(f"{k} {v / 1e9:.3f}" for k, v in r["params_bytes"].items()),
            "RSS after build MiB": round(r["rss_built_mb"]), "peak RSS MiB": round(r["peak_rss_mb"]),
            "peak RSS GB": round(r["peak_rss_mb"] * 2**20 / 1e9, 2), "official GB": 6,
            "< 6 GB": "yes" if r["peak_rss_mb"] * 2**20 < 6e9 else "NO",
            "decode_tok/s": round(r["decode_tok_s"], 2), "e2e_tok/s": round(r["e2e_tok_s"], 2),
            "compile_s": round(r["compile_s"], 1),
        })
    notes = [
        "Full-size ChatGLM-6B shapes (28 layers, hidden 4096, vocabulary 130528), random weights written straight "
        "into int8 buffers on the device one layer at a time (the float model never exists), float32 activations; "
        f"int4 keeps the 130528 x 4096 embedding (= tied output layer) in float32, int4-qe stores it as INT4 too. "
        f"Each process builds the params, then generates {_RSS_NEW_TOKENS.value} tokens greedily from a 16-token "
        "prompt; peak RSS = the process' VmHWM (build + compile + prefill + decode).",
        "Official figure: ChatGLM-6B README, INT4 inference 6 GB (GPU memory).",
    ]
    return rows, notes


# ------------------------------------------------------------------------------ part 3: quality


def train_demo_model() -> tuple[Any, Any, Any, list[str]]:
    """(model config, float32 params, tokenizer, held-out paragraphs) of the demo pre-training run on
    the corpus minus its last paragraphs; trained once (glm-train resumes / returns at once later)."""
    from glm_jax.config import GLMConfig
    from glm_jax.modeling.transformer import GLMForCausalLM
    from glm_jax.sharding import make_mesh
    from glm_jax.tokenizer import ChatGLMTokenizer
    from glm_jax.training.checkpoint import Checkpointer
    from glm_jax.training.loop import TOKENIZER_FILE
    from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
    from glm_jax.training.state import abstract_state

    demo_config = os.path.join(common.REPO_ROOT, "configs", "pretrain", "tiny.py")
    corpus = os.path.join(common.REPO_ROOT, "glm_jax", "data", "corpus", "devils_dictionary.txt")
    with open(corpus, encoding="utf-8") as f:
        paragraphs = [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
    steps = _QUALITY_STEPS.value
    workdir = os.path.join(_WORK_DIR.value, f"quant-demo-{steps}")
    os.makedirs(workdir, exist_ok=True)
    train_file = os.path.join(workdir, "train.txt")
    with open(train_file, "w", encoding="utf-8") as f:
        f.write("\n\n".join(paragraphs[:-HELD_OUT_PARAGRAPHS]))
    run = os.path.join(workdir, "run")
    print(f"[quality] demo pre-training, {steps} steps, in {run} ...", flush=True)
    subprocess.run([sys.executable, "-m", "glm_jax.cli.train", f"--config={demo_config}", f"--workdir={run}",
                    f"--config.steps={steps}", f"--config.data.path={train_file}", "--config.data.num_workers=0",
                    "--config.async_checkpoint=false", "--config.peak_flops_per_device=1e12"],
                   check=True, capture_output=True)
    config = runpy.run_path(demo_config)["get_config"]()
    with open(os.path.join(run, "model_config.json"), encoding="utf-8") as f:
        model_config = GLMConfig.from_dict(json.load(f))
    tx, _ = make_optimizer(OptimizerConfig(**{**dict(config.optimizer), "decay_steps": steps}))
    abstract = abstract_state(GLMForCausalLM(model_config), tx, config.seq_len,
                              make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    checkpointer = Checkpointer(os.path.join(run, "checkpoints"))
    _, state, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    tokenizer = ChatGLMTokenizer(os.path.join(run, TOKENIZER_FILE))
    return model_config, jax.tree.map(np.asarray, state.params), tokenizer, paragraphs[-HELD_OUT_PARAGRAPHS:]


def quality_part() -> tuple[list[dict], list[str]]:
    from glm_jax.modeling.transformer import GLMForCausalLM

    model_config, params, tokenizer, held_out = train_demo_model()
    rows_ids = []
    for text in held_out:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= CONTEXT + TARGET:
            rows_ids.append(ids[:CONTEXT] + [model_config.gmask_token_id, model_config.bos_token_id]
                            + ids[CONTEXT:CONTEXT + TARGET])
    ids = np.asarray(rows_ids, np.int32)
    targets = ids[:, CONTEXT + 2:]

    def evaluate(config: Any, p: Any) -> tuple[np.ndarray, float]:
        logits = np.asarray(jax.jit(GLMForCausalLM(config).apply)({"params": p}, ids))[:, CONTEXT + 1:-1]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        return logits, float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())

    reference, reference_nll = evaluate(model_config, params)
    rows = [{"weights": "fp32", "held-out ppl": f"{np.exp(reference_nll):.3f}", "ppl delta": "0",
             "NLL delta (nats)": "0", "logits rel. error": "0", "greedy agreement": "100.0%"}]
    for bits, embeddings, group in ((8, False, 0), (8, True, 0), (4, False, 0), (4, True, 0), (4, False, 16)):
        config = model_config.replace(quantization_bit=bits, quantize_embeddings=embeddings,
                                      quantization_group_size=group)
        logits, nll = evaluate(config, quantization.quantize_params(params, bits, embeddings, group))
        relative = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
        rows.append({
            "weights": f"int{bits}" + ("-qe" if embeddings else "") + (f"-g{group}" if group else ""),
            "held-out ppl": f"{np.exp(nll):.3f}",
            "ppl delta": f"{np.exp(nll) - np.exp(reference_nll):+.3f}",
            "NLL delta (nats)": f"{nll - reference_nll:+.5f}",
            "logits rel. error": f"{relative:.3%}",
            "greedy agreement": f"{np.mean(logits.argmax(-1) == reference.argmax(-1)):.1%}",
        })
    notes = [
        f"Model: the `make demo` pre-training (configs/pretrain/tiny.py: ChatGLM-6B architecture, hidden "
        f"{model_config.hidden_size}, {model_config.num_layers} layers, vocabulary {model_config.vocab_size}), "
        f"{_QUALITY_STEPS.value} steps on the shipped corpus without its last {HELD_OUT_PARAGRAPHS} paragraphs.",
        f"Held-out text: {len(ids)} of those paragraphs with >= {CONTEXT + TARGET} tokens; input = first {CONTEXT} "
        f"tokens + [gMASK] <sop> + the next {TARGET}, which are scored (perplexity) and predicted (greedy "
        "agreement = argmax equal to fp32's at each of those positions, teacher-forced). Logits rel. error = "
        "||logits - fp32 logits|| / ||fp32 logits|| over all scored positions.",
        "Acceptance (quantization issue): INT8 logits within 1% of fp32; INT4 greedy agreement >= 90%.",
    ]
    return rows, notes


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CHILD.value:
        if _VARIANT.value not in VARIANTS:
            raise app.UsageError(f"--variant={_VARIANT.value!r} is not one of {list(VARIANTS)}")
        result = child_decode(_VARIANT.value) if _CHILD.value == "decode" else child_rss6b(_VARIANT.value)
        print(json.dumps(result))
        return
    if _NEW_TOKENS.value < 4:
        raise app.UsageError("--new_tokens must be at least 4")
    if not _REFERENCE_CODE.value:
        print("NOTE: no --reference_code given: no official figures.", flush=True)
    load_at_start = os.getloadavg()[0]
    bandwidth: list[float] = []
    sections = []
    if _VARIANTS.value:
        rows, notes = decode_part(bandwidth)
        sections.append((f"INT8/INT4 decode, {_CONFIG.value}: params bytes and tokens/s vs fp32 / bf16", rows, notes))
    if _RSS_6B.value:
        rows, notes = rss_part()
        sections.append(("Full-size ChatGLM-6B INT4 (random weights): peak RSS generating on CPU", rows, notes))
    if _QUALITY.value:
        rows, notes = quality_part()
        sections.append(("INT8/INT4 quality: held-out perplexity of the demo model", rows, notes))
    load_note = (f"1-minute load average at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f} "
                 "(above the core count = other processes competed for the CPU). No GPU was lent to this run: "
                 "no GPU / Pallas figures.")
    command = "python bench/quant.py" + (
        " --reference_code=<official ChatGLM-6B code>" if _REFERENCE_CODE.value else "")
    for title, rows, notes in sections:
        print(f"\n## {title}\n\n{common.markdown_table(rows)}")
        for note in (*notes, load_note):
            print("- " + note)
        if _RECORD.value:
            common.append_results(title, command, rows, [*notes, load_note])
    if _RECORD.value:
        print(f"appended to {os.path.relpath(common.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main)
