"""Does the full GLM-130B fit its target hardware? Ahead-of-time compilation without any weights.

For every sharding plan (`configs/sharding/glm130b_*.py`: mesh, dtype, INT4/INT8 weights, batch,
lengths, device memory) the serving programs of the FULL 130B model - the prefill of a 2048-token
prompt into the KV cache, and one decode step against the full cache - are lowered with abstract
inputs (`jax.ShapeDtypeStruct` carrying each param's / cache slot's sharding) and compiled for a
simulated mesh of CPU devices. `compiled.memory_analysis()` then gives the per-device bytes of
arguments (params + cache + inputs), outputs, buffers aliased between the two (the donated cache) and
temporaries; peak = arguments + outputs - aliased + temporaries, compared with the device memory.

Reference figures in the same table: the per-device param bytes counted from the abstract shapes and
shardings (what the weights alone need), and the official setups' claims (fp16 on 8 x A100-40GB,
INT4 on 4 x RTX 3090). Caveat: the CPU compiler's temporaries are an estimate of a GPU/TPU compile's.

    python bench/glm130b_memory.py                      # every plan, appends to bench/RESULTS.md
    python bench/glm130b_memory.py --plans=configs/sharding/glm130b_a100_8.py --noresults
"""

import os

# Simulated devices must be requested before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import glob  # noqa: E402
import math  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO_ROOT, append_results, markdown_table, peak_rss_mb  # noqa: E402

from glm_jax.config import preset  # noqa: E402
from glm_jax.modeling.transformer import GLMForCausalLM  # noqa: E402
from glm_jax.pretrained import abstract_params  # noqa: E402
from glm_jax.sharding import DEFAULT_RULES, logical_shardings, make_mesh  # noqa: E402

GIB = 2**30
DEFAULT_PLANS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "sharding", "glm130b_*.py")))

flags.DEFINE_list("plans", DEFAULT_PLANS, "Sharding plan config files (each defines get_config()).")
flags.DEFINE_bool("results", True, "Append the table to bench/RESULTS.md.")
flags.DEFINE_bool("bf16_standin", True, "For bfloat16 plans also compile the same plan in float16 (same bytes): "
                  "the CPU compiler, lacking bf16 matmuls, converts the whole stacked bf16 weight set to float32 "
                  "before the layer loop, which a GPU/TPU compile does not.")
FLAGS = flags.FLAGS


def load_plan(path: str):
    return runpy.run_path(path)["get_config"]()


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of abstract values placed by `shardings` (the largest shard)."""
    leaves, specs = jax.tree.leaves(nn.unbox(abstract)), jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, specs))


def cache_shardings(cache, mesh, config, batch: int, cache_len: int):
    """Cache slots sharded like the activations (batch over data/fsdp, kv heads over tensor).

    The slots' axes are recognised by their sizes (batch, kv heads, head dim, cache length; all distinct
    for GLM-130B), so the plan follows whatever axis order the attention stores its cache in.
    """
    names_by_size = {batch: "cache_batch", config.num_kv_heads: "cache_heads", config.head_dim: "cache_head_dim",
                     cache_len: "cache_sequence"}
    if len(names_by_size) != 4:
        raise SystemExit(f"batch, kv heads, head dim and cache length must differ to name the cache axes: {names_by_size}")

    def box(x):
        names = ("layers",) + tuple(names_by_size.get(size) for size in x.shape[1:])
        return nn.LogicallyPartitioned(x, names)

    return logical_shardings(jax.tree.map(box, cache), mesh, DEFAULT_RULES)


def compile_plan(plan, dtype: str) -> list[dict]:
    """Rows (prefill, decode step) of `plan` compiled with float dtype `dtype`."""
    devices = jax.devices()
    if plan.num_devices > len(devices):
        raise SystemExit(f"plan {plan.name} needs {plan.num_devices} devices, XLA_FLAGS gives {len(devices)}")
    mesh = make_mesh(**plan.mesh, devices=devices[:plan.num_devices])
    config = preset(plan.preset, dtype=dtype, param_dtype=dtype, quantization_bit=plan.quantization_bit)
    model = GLMForCausalLM(config)
    params = abstract_params(model)
    param_sharding = logical_shardings(params, mesh, DEFAULT_RULES)
    b, length, cache_len = plan.batch, plan.prefill_length, plan.cache_length
    cache = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((b, cache_len), jnp.int32), jnp.zeros((b, 1, cache_len), jnp.int32),
        jnp.ones((b, 1, cache_len, cache_len), bool), decode=True))["cache"]
    cache_sharding = cache_shardings(cache, mesh, config, b, cache_len)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp") if b % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None))
    param_bytes = per_device_bytes(params, param_sharding)
    cache_bytes = per_device_bytes(cache, cache_sharding)

    def step(p, c, ids, positions, mask):
        logits, updated = model.apply({"params": p, "cache": c}, ids, positions, mask, decode=True, mutable=["cache"])
        return logits, updated["cache"]

    rows = []
    for program, new_tokens in (("prefill", length), ("decode step", 1)):
        inputs = (
            jax.ShapeDtypeStruct((b, new_tokens), jnp.int32, sharding=batch_sharding),
            jax.ShapeDtypeStruct((b, 1, new_tokens), jnp.int32, sharding=batch_sharding),
            jax.ShapeDtypeStruct((b, 1, new_tokens, cache_len), jnp.bool_, sharding=batch_sharding),
        )
        abstract_args = (
            jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(params), param_sharding),
            jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, cache_sharding),
            *inputs,
        )
        start = time.perf_counter()
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            jitted = jax.jit(step, out_shardings=(None, cache_sharding), donate_argnums=(1,))
            compiled = jitted.lower(*abstract_args).compile()
        seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                + stats.temp_size_in_bytes)
        rows.append({
            "plan": plan.name + ("" if dtype == plan.dtype else f" [compiled as {dtype}]"), "devices": plan.num_devices, "mesh (d,f,t)": "x".join(str(v) for v in plan.mesh.values()),
            "program": f"{program} B={b} L={new_tokens}", "weights GiB/dev": param_bytes / GIB,
            "KV cache GiB/dev": cache_bytes / GIB, "args GiB": stats.argument_size_in_bytes / GIB,
            "out GiB": stats.output_size_in_bytes / GIB, "aliased GiB": stats.alias_size_in_bytes / GIB,
            "temp GiB": stats.temp_size_in_bytes / GIB, "peak GiB/dev": peak / GIB,
            "device GiB": plan.device_memory_gib, "peak / device": peak / (plan.device_memory_gib * GIB),
            "fits": "yes" if peak < plan.device_memory_gib * GIB else "NO", "compile s": seconds,
        })
        print(markdown_table(rows[-1:]), flush=True)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = []
    for path in FLAGS.plans:
        plan = load_plan(path)
        rows += compile_plan(plan, plan.dtype)
        if plan.dtype == "bfloat16" and FLAGS.bf16_standin:
            rows += compile_plan(plan, "float16")
    table = markdown_table(rows)
    print(table)
    notes = [
        "Per-device figures from `compiled.memory_analysis()` of the SPMD-partitioned programs (AOT, abstract "
        "inputs, no weights allocated); peak = args + out - aliased + temp. The cache argument is donated.",
        "`weights GiB/dev` counts the sharded param shapes directly (INT4/INT8 plans: int8 `qkernel`, INT4 packed "
        "two per byte, + float per-row scales; embeddings, norms and biases stay in the float dtype).",
        "Official setups for comparison: fp16 on 8 x A100-40GB, INT8 on 8 x V100-32GB / 8 x RTX 3090, INT4 on "
        "4 x RTX 3090 (GLM-130B README). Temporaries come from the CPU compiler and estimate a GPU/TPU compile's.",
        "bfloat16 plans: the CPU compiler has no bf16 matmul and converts the whole stacked bf16 weight set to "
        "float32 ahead of the layer loop (seen in the optimized HLO: f32[70, ...] converts of every weight), which "
        "inflates `temp` by twice the weights; the `[compiled as float16]` row (same byte widths, no such "
        "conversion on CPU) is the estimate to read for a TPU.",
        f"Peak RSS of the benchmark process: {peak_rss_mb():.0f} MiB.",
    ]
    if FLAGS.results:
        append_results("GLM-130B memory per device (AOT compile, simulated meshes)",
                       "python bench/glm130b_memory.py", rows, notes)


if __name__ == "__main__":
    app.run(main)
