"""Memory of one fine-tuning step of ChatGLM-6B, from the compiled program, without any weights.

For P-Tuning v2 (pre_seq_len 128, no projection) and LoRA (rank 8 on `query_key_value`), each on a
float16 and an INT4 base, the jitted train step of `glm_jax.training.train_step` (the one
`glm-finetune` runs: frozen base, gradients and Adam state for the adapter only, gradient
checkpointing as the official recipe) is lowered with abstract inputs (`jax.ShapeDtypeStruct`) at
batch 1 x 128 tokens (source 64 + target 64) and compiled. `compiled.memory_analysis()` gives the
bytes of arguments (params + optimizer state + batch), outputs, buffers aliased between them (the
donated state) and temporaries (activations, gradients); peak = args + out - aliased + temp.

Reference figures in the same table: the official ChatGLM-6B P-Tuning v2 numbers (ptuning README,
batch 1, gradient accumulation 16: about 7 GB with an INT4 base, 14 GB with fp16; no official LoRA
figure) and the bytes of the weights alone, counted from the abstract shapes. Caveat: the temporaries
come from the CPU compiler and estimate a GPU compile's.

    python bench/finetune.py                    # all four rows, appends to bench/RESULTS.md
    python bench/finetune.py --methods=ptuning --bases=int4 --noresults
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, markdown_table, peak_rss_mb  # noqa: E402

from glm_jax.config import preset  # noqa: E402
from glm_jax.modeling.transformer import GLMForCausalLM  # noqa: E402
from glm_jax.pretrained import abstract_params  # noqa: E402
from glm_jax.sharding import DEFAULT_RULES, logical_shardings, make_mesh  # noqa: E402
from glm_jax.training import peft  # noqa: E402
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from glm_jax.training.state import TrainState  # noqa: E402
from glm_jax.training.train_step import BATCH_KEYS, StepConfig, make_train_step, partition_params  # noqa: E402

GIB = 2**30
# Official ChatGLM-6B P-Tuning v2 memory (ptuning README: INT4 base ~7 GB, fp16 base ~14 GB); no LoRA figure.
OFFICIAL_GB = {("ptuning", "int4"): 7.0, ("ptuning", "fp16"): 14.0}

flags.DEFINE_list("methods", ["ptuning", "lora"], "Fine-tuning methods to compile.")
flags.DEFINE_list("bases", ["fp16", "int4"], "Base weight formats: fp16 and/or int4.")
flags.DEFINE_integer("batch", 1, "Rows per micro-batch.")
flags.DEFINE_integer("seq_len", 128, "Tokens per row (official: max_source 64 + max_target 64).")
flags.DEFINE_integer("pre_seq_len", 128, "P-Tuning v2 prefix length.")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank (targets: query_key_value).")
flags.DEFINE_string("remat_policy", "full", "Gradient checkpointing policy (the official recipe checkpoints).")
flags.DEFINE_bool("results", True, "Append the table to bench/RESULTS.md.")
FLAGS = flags.FLAGS


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nn.unbox(tree)))


def compile_row(method: str, base: str) -> dict:
    adapter = (dict(pre_seq_len=FLAGS.pre_seq_len) if method == "ptuning"
               else dict(lora_rank=FLAGS.lora_rank, lora_alpha=32.0, lora_dropout=0.1,
                         lora_targets=("query_key_value",)))
    config = preset("chatglm-6b", dtype="float16", param_dtype="float16", remat_policy=FLAGS.remat_policy,
                    quantization_bit=4 if base == "int4" else 0, **adapter)
    model = GLMForCausalLM(config)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainable = peft.trainable_predicate(method)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=2e-2, warmup_steps=0, decay_steps=3000,
                                                  schedule="linear", min_lr_ratio=0.0, b2=0.999, weight_decay=0.0))
    boxed = abstract_params(model)
    train_boxed, frozen_boxed = partition_params(boxed, trainable)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    boxed_state = TrainState(step=scalar, params=boxed, opt_state=jax.eval_shape(tx.init, train_boxed),
                             loss_ema=jax.ShapeDtypeStruct((), jnp.float32), skipped=scalar)
    shardings = logical_shardings(boxed_state, mesh, DEFAULT_RULES)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         nn.unbox(boxed_state), shardings)
    b, length = FLAGS.batch, FLAGS.seq_len
    shapes = {"input_ids": ((b, length), jnp.int32), "targets": ((b, length), jnp.int32),
              "loss_mask": ((b, length), jnp.float32), "segment_ids": ((b, length), jnp.int32),
              "part_a": ((b, length), jnp.bool_), "position_ids": ((b, 2, length), jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(*shapes[k]) for k in BATCH_KEYS}
    step = make_train_step(model, tx, schedule, StepConfig(grad_accum=1, dropout=True), mesh, shardings, trainable)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = step.jitted.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    # The CPU compiler has no float16 GEMM: it converts the tied float16 embedding/head table to a float32
    # temporary for the logits matmul (seen in the optimized HLO); a GPU compile multiplies in float16.
    table = rf"f32\[{config.vocab_size},{config.hidden_size}\]\S* (convert|fusion)\("
    head_copy = config.vocab_size * config.hidden_size * 4 if re.search(table, compiled.as_text()) else 0
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    official = OFFICIAL_GB.get((method, base))
    row = {
        "method": method + (f" P={FLAGS.pre_seq_len}" if method == "ptuning" else f" r={FLAGS.lora_rank} qkv"),
        "base": base, "B x L": f"{b} x {length}",
        "trainable M": sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(train_boxed))) / 1e6,
        "frozen weights GiB": nbytes(frozen_boxed) / GIB,
        "adam state MiB": nbytes(boxed_state.opt_state) / 2**20,
        "args GiB": stats.argument_size_in_bytes / GIB, "out GiB": stats.output_size_in_bytes / GIB,
        "aliased GiB": stats.alias_size_in_bytes / GIB, "temp GiB": stats.temp_size_in_bytes / GIB,
        "peak GiB": peak / GIB, "CPU f32 head copy GiB": head_copy / GIB,
        "peak w/o head copy GiB": (peak - head_copy) / GIB, "official GB": official if official is not None else "-",
        "peak / official": peak / GIB / official if official else "-", "compile s": seconds,
    }
    print(markdown_table([row]), flush=True)
    return row


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = [compile_row(method, base) for method in FLAGS.methods for base in FLAGS.bases]
    print(markdown_table(rows))
    notes = [
        "ChatGLM-6B shapes (28 layers, hidden 4096, vocab 130528), float16 compute, frozen base in float16 or "
        "official INT4 (int8 `qkernel` two values per byte + per-row scales; embeddings and norms stay float16); "
        "adapters and their Adam moments in float32; gradient checkpointing "
        f"(`remat_policy={FLAGS.remat_policy}`).",
        "From `compiled.memory_analysis()` of the train step (AOT, abstract inputs, no weights allocated); "
        "peak = args + out - aliased + temp; the state is donated, so params and Adam state count once.",
        "Official figures: ChatGLM-6B ptuning README (P-Tuning v2, batch 1, gradient accumulation 16; INT4 ~7 GB, "
        "fp16 ~14 GB, GPU memory as reported by the GPU tools). No official LoRA figure exists for ChatGLM-6B.",
        "Temporaries come from the CPU compiler and estimate a GPU compile's. Lacking float16 GEMMs, it converts "
        "float16 matmul operands to float32 temporaries: each layer's weights inside the layer loop (0.25 GiB per "
        "4096 x 16384 matrix) and one chunk of 16316 rows (0.25 GiB) of the tied 130528 x 4096 embedding/head "
        "table at a time (the model projects the tied head in chunks on CPU: "
        "glm_jax.modeling.layers.tied_logits); `CPU f32 head copy` is a float32 copy of the whole table found in "
        "the compiled program (2.0 GiB before the chunking; 0 now). A GPU compile has none of these copies, "
        "so the peak is an upper bound of GPU memory.",
        f"Peak RSS of the benchmark process: {peak_rss_mb():.0f} MiB.",
    ]
    if FLAGS.results:
        append_results("Fine-tuning memory, ChatGLM-6B shapes (AOT compile of the train step)",
                       "python bench/finetune.py", rows, notes)


if __name__ == "__main__":
    app.run(main)
