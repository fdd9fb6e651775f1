"""glm-train: GLM blank-infilling pre-training.

    glm-train --config=configs/pretrain/tiny.py --workdir=runs/tiny
    glm-train --config=configs/pretrain/tiny.py --workdir=runs/tiny --config.steps=2000 --config.mesh.fsdp=2
    glm-train --plot --workdir=runs/tiny            # loss curve -> runs/tiny/loss.png

Re-running with the same --workdir resumes from its newest readable checkpoint. Multi-host: run one
process per host with --coordinator_address/--num_processes/--process_id (on TPU VMs and other
clusters JAX finds them itself with --distributed); every process gets the same flags otherwise.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from glm_jax.cli import quiet_backend_probing
from glm_jax.cli.distributed import initialize_distributed
from glm_jax.host_memory import with_huge_page_heap

config_flags.DEFINE_config_file("config", None, "A configs/pretrain/*.py file; override fields with --config.x=y.")
flags.DEFINE_string("workdir", None, "Directory for the resolved config, checkpoints and metrics.", required=True)
flags.DEFINE_bool("plot", False, "Render the loss curve of --workdir to WORKDIR/loss.png and exit.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_backend_probing()
    if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.plot:
        from glm_jax.training.metrics import plot_loss

        print(plot_loss(FLAGS.workdir, os.path.join(FLAGS.workdir, "loss.png")))
        return
    if FLAGS.config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/pretrain/tiny.py)")
    initialize_distributed()
    from glm_jax.training.loop import train

    result = train(FLAGS.config, FLAGS.workdir)
    print(f"stopped at step {result['step']}" + (" (preempted)" if result["preempted"] else ""), flush=True)


def run() -> None:
    with_huge_page_heap()  # faster steps on CPU (glm_jax/host_memory.py)
    app.run(main)


if __name__ == "__main__":
    run()
