"""Multi-process flags shared by the jobs that run across hosts (`glm-train`, `glm-convert`).

One process per host: either `--distributed` (jax.distributed auto-detects TPU VMs, SLURM, ...) or
the three explicit flags, which also run several processes on one machine (tests, CPU clusters).
"""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detects TPU VMs, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """jax.distributed.initialize() as the flags ask (nothing for a single-process run)."""
    import jax

    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
