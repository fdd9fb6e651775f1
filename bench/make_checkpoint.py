"""Writes a random checkpoint of a preset in the official Hugging Face ChatGLM layout.

    python bench/make_checkpoint.py --preset=chatglm-6b --out=bench/_work/chatglm-6b-random

For benchmarks and conversion tests at real sizes without downloading weights: see
`glm_jax.testing_checkpoints.write_random_hf_checkpoint` (deterministic per seed, bounded memory,
written to a temporary directory and renamed at the end).
"""

from __future__ import annotations

import time

from absl import app, flags

from glm_jax import preset
from glm_jax.config import PRESETS
from glm_jax.testing_checkpoints import CHECKPOINT_DTYPES, write_random_hf_checkpoint

_PRESET = flags.DEFINE_enum("preset", None, sorted(PRESETS), "Model configuration.")
_OUT = flags.DEFINE_string("out", None, "Directory to create (must not exist).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", sorted(CHECKPOINT_DTYPES), "Dtype of the stored weights.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of weight files (with an index when > 1).")
_SAFETENSORS = flags.DEFINE_boolean("safetensors", False, "Write *.safetensors instead of pytorch_model*.bin.")
flags.mark_flags_as_required(["preset", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    names = write_random_hf_checkpoint(preset(_PRESET.value), _OUT.value, seed=_SEED.value, dtype=_DTYPE.value,
                                       num_shards=_NUM_SHARDS.value, safetensors=_SAFETENSORS.value)
    print(f"wrote {_OUT.value}: config.json + {len(names)} weight file(s) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
