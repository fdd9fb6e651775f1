"""Training-step benchmark: tokens/s and MFU of the jitted JAX train step vs the official PyTorch code,
and the compile time of a full ChatGLM-6B-shaped train step.

    python bench/train.py --reference_code=DIR_WITH_OFFICIAL_PY_FILES

For each `--shapes` entry (a ChatGLM-6B-architecture preset, batch x seq_len) and JAX precision:
one GLM training step = forward on a `[gMASK]` example (text, `[gMASK]`, `<sop>`, span; loss on the
span), backward, global-norm clipping, AdamW — `glm_jax.training.train_step` on the JAX side and
`bench/reference_train.py` (the official model, `torch.optim.AdamW`) on the PyTorch side, run in its
own environment (`bench/reference_env.sh`). Reported: tokens/s of both (batch·seq_len / best step
time), the ratio, and MFU against the peak matmul rate measured in the same run (`bench/common.py`;
FLOPs counted by `glm_jax.training.metrics.train_flops_per_token`, the same for both sides).
The ChatGLM-6B row AOT-compiles the step from abstract inputs (nothing allocated): lowering and
compile seconds. The table is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from glm_jax.config import preset, to_hf_config  # noqa: E402
from glm_jax.host_memory import with_huge_page_heap  # noqa: E402
from glm_jax.data.blank_infilling import layout_generation, pack_examples  # noqa: E402
from glm_jax.modeling.transformer import GLMForCausalLM  # noqa: E402
from glm_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from glm_jax.training.loop import special_ids_of_model  # noqa: E402
from glm_jax.training.metrics import train_flops_per_token  # noqa: E402
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from glm_jax.training.state import abstract_state, count_params, create_state, state_shardings  # noqa: E402
from glm_jax.training.train_step import BATCH_KEYS, StepConfig, global_batch, make_train_step  # noqa: E402

_REFERENCE_CODE = flags.DEFINE_string(
    "reference_code", None, "Directory with the official ChatGLM-6B remote code; without it only JAX runs.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    "reference_python", os.path.join(common.REPO_ROOT, ".venv-ref", "bin", "python"),
    "Python of the reference environment (bench/reference_env.sh).")
_SHAPES = flags.DEFINE_list(
    "shapes", ["chatglm-100m=4x256:float32+mixed-bfloat16", "chatglm-1b=1x128:bfloat16"],
    "PRESET=BATCHxSEQ_LEN:PRECISION+PRECISION entries. Precisions: float32; mixed-bfloat16 (float32 master "
    "weights and optimizer, bfloat16 compute; the official side: bfloat16 autocast); bfloat16 (bfloat16 "
    "weights and compute on both sides, the ~1B model's setting: float32 Adam state would not fit in 24 GiB "
    "next to other work).")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "JAX remat policy.")
_SCAN_LAYERS = flags.DEFINE_boolean(
    "scan_layers", False, "JAX layer layout of the timed rows: one block per layer (faster on CPU: no stacked "
    "gradient buffers to zero, fill and convert) or the scanned stack (compile time independent of depth; the "
    "ChatGLM-6B compile row always uses it).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per case (after one untimed step).")
_COMPILE_6B = flags.DEFINE_string(
    "compile_6b", "1x2048", "BATCHxSEQ_LEN of the AOT-compiled ChatGLM-6B train step (bf16 compute, full remat); "
    "empty to skip.")
_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join(common.BENCH_DIR, "_work"), "Scratch directory.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")

# precision -> (JAX param dtype, JAX compute dtype, official --dtype)
PRECISIONS = {"float32": ("float32", "float32", "float32"), "mixed-bfloat16": ("float32", "bfloat16", "autocast-bfloat16"),
              "bfloat16": ("bfloat16", "bfloat16", "bfloat16")}


def command_line() -> str:
    """How this run was started, with directories outside the repository reduced to their last part."""
    args = [f"{a.partition('=')[0]}=<{os.path.basename(a.partition('=')[2].rstrip('/'))}>"
            if os.path.isabs(a.partition("=")[2]) else a for a in sys.argv[1:]]
    return " ".join(["python bench/train.py", *args])


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, seq_len = text.partition("x")
    return int(batch), int(seq_len)


def training_batch(config, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """`batch` rows of the document-level GLM layout: text, [gMASK], <sop>, span (loss on the span)."""
    ids = special_ids_of_model(config)
    rng = np.random.default_rng([batch, seq_len])
    rows = []
    for _ in range(batch):
        document = rng.integers(10, config.mask_token_id, seq_len - 1)
        example = layout_generation(document, seq_len - 1 - seq_len // 2, ids, ids.gmask)
        rows.append(pack_examples([example], seq_len, ids.pad))
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def jax_case(name: str, dtype: str, batch: int, seq_len: int) -> dict[str, Any]:
    param_dtype, compute_dtype, _ = PRECISIONS[dtype]
    config = preset(name).replace(dtype=compute_dtype, param_dtype=param_dtype, remat_policy=_REMAT.value,
                                  scan_layers=_SCAN_LAYERS.value)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = GLMForCausalLM(config)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0, decay_steps=1000))
    state = create_state(model, tx, seq_len, mesh, seed=0)
    step = make_train_step(model, tx, schedule, StepConfig(), mesh, state_shardings(model, tx, seq_len, mesh))
    data = global_batch(training_batch(config, batch, seq_len), mesh)
    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    result = {"params": count_params(state.params), "first_s": first, "best_s": min(times),
              "loss": float(metrics["loss"]), "flops_per_token": train_flops_per_token(config, seq_len)}
    del state
    return result


def reference_case(name: str, dtype: str, batch: int, seq_len: int) -> dict[str, Any]:
    python = _REFERENCE_PYTHON.value
    if not os.path.isfile(python):
        raise app.UsageError(f"no reference environment at {python}: run `bash bench/reference_env.sh` first")
    config_dir = os.path.join(_WORK_DIR.value, f"{name}-config")
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(preset(name)), f, indent=2)
    command = [python, os.path.join(common.BENCH_DIR, "reference_train.py"), f"--config_dir={config_dir}",
               f"--reference_code={_REFERENCE_CODE.value}", f"--batch={batch}", f"--seq_len={seq_len}",
               f"--repeats={_REPEATS.value}", f"--dtype={PRECISIONS[dtype][2]}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        how = "killed by signal %d (out of memory?)" % -done.returncode if done.returncode < 0 else f"exit {done.returncode}"
        raise RuntimeError(f"official step failed ({name}, {dtype}): {how}: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_6b(batch: int, seq_len: int) -> dict[str, Any]:
    """Lowering and compile seconds of the ChatGLM-6B train step from abstract inputs."""
    config = preset("chatglm-6b").replace(dtype="bfloat16", remat_policy="full")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = GLMForCausalLM(config)
    tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=0, decay_steps=1000))
    abstract = abstract_state(model, tx, seq_len, mesh)
    step = make_train_step(model, tx, schedule, StepConfig(), mesh, state_shardings(model, tx, seq_len, mesh))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    shapes = {k: (batch, 2, seq_len) if k == "position_ids" else (batch, seq_len) for k in BATCH_KEYS}
    abstract_batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding) for k, s in shapes.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        start = time.perf_counter()
        lowered = step.jitted.lower(abstract, abstract_batch)
        lowered_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    return {"params": params, "lower_s": lowered_s, "compile_s": compile_s}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f32, bf16 = common.peak_matmul_flops("float32"), common.peak_matmul_flops("bfloat16")
    peaks = {"float32": f32, "mixed-bfloat16": bf16, "bfloat16": bf16}
    print(f"peak matmul: f32 {f32 / 1e9:.0f} GFLOP/s, bf16->f32 {bf16 / 1e9:.0f} GFLOP/s", flush=True)
    rows, notes = [], [f"Peak matmul rate measured in this run: f32 {f32 / 1e9:.0f} GFLOP/s, bf16 inputs with "
                       f"f32 accumulation {bf16 / 1e9:.0f} GFLOP/s (best of 10); MFU of bf16 rows is against the latter."]
    notes.append(f"JAX layers: {'scanned stack' if _SCAN_LAYERS.value else 'one block per layer'}. Heap of both "
                 f"sides: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} (glm_jax/host_memory.py).")
    if not _REFERENCE_CODE.value:
        notes.append("JAX only: no --reference_code given, so no official PyTorch figures.")
    for entry in _SHAPES.value:
        name, _, rest = entry.partition("=")
        shape, _, precisions = rest.partition(":")
        batch, seq_len = parse_shape(shape)
        for dtype in (precisions or "float32").split("+"):
            if dtype not in PRECISIONS:
                raise app.UsageError(f"--shapes={entry}: unknown precision {dtype!r}; expected one of {sorted(PRECISIONS)}")
            reference = None
            if _REFERENCE_CODE.value:
                try:
                    reference = reference_case(name, dtype, batch, seq_len)
                except RuntimeError as e:
                    notes.append(str(e).splitlines()[0])
                    print(notes[-1], flush=True)
            mine = jax_case(name, dtype, batch, seq_len)
            tokens = batch * seq_len
            row = {"model": name, "params (M)": mine["params"] / 1e6, "dtype": dtype, "batch x seq": shape,
                   "JAX compile+1st step s": mine["first_s"], "JAX tok/s": tokens / mine["best_s"],
                   "JAX MFU": mine["flops_per_token"] * tokens / mine["best_s"] / peaks[dtype]}
            if reference:
                row.update({"official tok/s": tokens / reference["best_s"],
                            "official MFU": mine["flops_per_token"] * tokens / reference["best_s"] / peaks[dtype],
                            "ratio JAX/official": reference["best_s"] / mine["best_s"]})
                notes.append(f"{name} {dtype}: official torch {reference['torch']}, {reference['threads']} threads, "
                             f"{reference['params'] / 1e6:.1f}M params, step times {[round(t, 3) for t in reference['times_s']]} s, "
                             f"peak RSS {reference['peak_rss_mb']:.0f} MiB; JAX loss {mine['loss']:.3f}.")
            print(row, flush=True)
            rows.append(row)
    if _COMPILE_6B.value:
        batch, seq_len = parse_shape(_COMPILE_6B.value)
        compiled = compile_6b(batch, seq_len)
        notes.append(f"ChatGLM-6B train step ({compiled['params'] / 1e9:.2f}B params, bf16 compute, full remat, "
                     f"{_COMPILE_6B.value}) AOT from abstract inputs: lowering {compiled['lower_s']:.1f} s, "
                     f"compile {compiled['compile_s']:.1f} s (goal < 60 s).")
        print(notes[-1], flush=True)
    print(common.markdown_table(rows))
    for note in notes:
        print("-", note)
    if _RECORD.value:
        common.append_results("Training step: JAX vs official PyTorch", command_line(), rows, notes)


if __name__ == "__main__":
    with_huge_page_heap()  # as glm-train does; the official side inherits the same heap setting
    app.run(main)
