"""`glm-convert`: official ChatGLM PyTorch checkpoints <-> this project's checkpoints.

  glm-convert --src=HF_DIR --dst=OUT_DIR [--dtype=bfloat16|float16|float32] [--quantization=...]
  glm-convert --to=pytorch --src=OUT_DIR --dst=HF_DIR [--quantization=int4] [--num_shards=8] [--safetensors]

Every problem with the input (not a ChatGLM directory, unknown model_type, missing / extra /
mis-shaped keys, unreadable shard, index naming a missing file, existing destination, full disk)
ends the run with one `glm-convert: error: ...` line and exit status 1, and nothing at `--dst`.
"""

from __future__ import annotations

import gc
import sys
import time

from absl import app, flags, logging

from glm_jax.cli.distributed import initialize_distributed

FLAGS = flags.FLAGS

flags.DEFINE_string("src", None, "Source directory: an official ChatGLM directory, or ours with --to=pytorch.")
flags.DEFINE_string("dst", None, "Destination directory; must not exist unless --overwrite.")
flags.DEFINE_enum("to", "jax", ["jax", "pytorch"], "jax: official -> ours; pytorch: ours -> official layout.")
flags.DEFINE_enum("dtype", None, ["float16", "bfloat16", "float32"],
                  "Float dtype written. --to=jax: default the source's (asking for one dequantizes an INT8/INT4 "
                  "source unless --quantization says otherwise); --to=pytorch: default float16.")
flags.DEFINE_enum("quantization", "keep", ["keep", "none", "int8", "int4"],
                  "keep: as the source is; none: dequantize INT8/INT4 weights; int8/int4: quantize float weights "
                  "with the official ChatGLM scheme (per-row symmetric, float16 scales).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --dst (only once the new checkpoint is complete).")
flags.DEFINE_bool("safetensors", False, "--to=pytorch: write model*.safetensors instead of pytorch_model*.bin.")
flags.DEFINE_integer("num_shards", 0, "--to=pytorch: number of weight files (0: as many as --max_shard_size needs).")
flags.DEFINE_string("max_shard_size", "2GB", "--to=pytorch: largest weight file when --num_shards=0.")
flags.DEFINE_list("mesh", None, "--to=jax: target mesh sizes data,fsdp,tensor (e.g. 1,8,1): arrays are chunked like "
                  "that sharding and each host reads and writes only its shards.")
flags.DEFINE_bool("progress", True, "Show a progress bar with bytes/s.")

flags.mark_flags_as_required(["src", "dst"])


def _check_flags() -> None:
    if FLAGS.to == "jax":
        for name in ("safetensors", "num_shards", "max_shard_size"):
            if FLAGS[name].present:
                raise app.UsageError(f"--{name} only applies to --to=pytorch")
    elif FLAGS["mesh"].present:
        raise app.UsageError("--mesh only applies to --to=jax")


def _mesh():
    if not FLAGS.mesh:
        return None
    from glm_jax.sharding import make_mesh

    try:
        sizes = [int(size) for size in FLAGS.mesh]
    except ValueError:
        raise app.UsageError(f"--mesh takes three integers data,fsdp,tensor, got {FLAGS.mesh}") from None
    if len(sizes) != 3:
        raise app.UsageError(f"--mesh takes three integers data,fsdp,tensor, got {FLAGS.mesh}")
    try:
        return make_mesh(*sizes)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _check_flags()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs routine warnings while saving
    import jax

    from checkpoints_convert import from_pytorch, to_pytorch
    from checkpoints_convert.staging import ConversionError
    from glm_jax.hf_io import CheckpointError

    initialize_distributed()
    # The objects of JAX, Flax and torch loaded so far live until exit; freezing them keeps the cyclic
    # garbage collector from walking them again and again while tensors stream (~6% of the CPU time).
    gc.freeze()
    start = time.perf_counter()
    try:
        if FLAGS.to == "jax":
            config = from_pytorch.convert(
                FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype, quantization=FLAGS.quantization, overwrite=FLAGS.overwrite,
                mesh=_mesh(), progress=FLAGS.progress)
            what = f"{config.family}, {config.param_dtype}" + (f", INT{config.quantization_bit}" if config.quantization_bit else "")
        else:
            names = to_pytorch.export(
                FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype or "float16", quantization=FLAGS.quantization,
                safetensors=FLAGS.safetensors, num_shards=FLAGS.num_shards, max_shard_size=FLAGS.max_shard_size,
                overwrite=FLAGS.overwrite, progress=FLAGS.progress)
            what = f"{len(names)} weight file(s)"
    except (CheckpointError, ConversionError, OSError) as e:
        print(f"glm-convert: error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(f"glm-convert: wrote {FLAGS.dst} ({what}) in {time.perf_counter() - start:.1f} s")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
