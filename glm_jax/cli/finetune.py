"""glm-finetune: full fine-tuning, P-Tuning v2 or LoRA of a ChatGLM checkpoint.

    glm-finetune --config=configs/finetune/ptuning.py --workdir=runs/adgen-pt \\
        --config.base=chatglm-6b --config.data.train_file=AdvertiseGen/train.json \\
        --config.data.validation_file=AdvertiseGen/dev.json
    glm-finetune --config=configs/finetune/tiny_cpu.py --workdir=runs/tiny --config.steps=50

Re-running with the same --workdir resumes from its newest readable checkpoint. At the end the adapter
is exported in its official layout (WORKDIR/adapter: P-Tuning v2 `pytorch_model.bin`, LoRA as a PEFT
directory; load with `load_pretrained(base, prefix=... | lora=...)`) and, with validation data, the
predictions and their BLEU-4 / ROUGE scores are written to WORKDIR/predict.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from glm_jax.cli import quiet_backend_probing
from glm_jax.host_memory import with_huge_page_heap

config_flags.DEFINE_config_file("config", None, "A configs/finetune/*.py file; override fields with --config.x=y.")
flags.DEFINE_string("workdir", None, "Directory for the resolved config, checkpoints, metrics, adapter, predictions.",
                    required=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/finetune/ptuning.py)")
    quiet_backend_probing()
    if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from glm_jax.training.finetune import finetune

    result = finetune(FLAGS.config, FLAGS.workdir)
    print(f"stopped at step {result['step']}" + (" (preempted)" if result["preempted"] else ""), flush=True)
    if result.get("adapter"):
        print(f"adapter: {result['adapter']}", flush=True)


def run() -> None:
    with_huge_page_heap()  # faster steps on CPU (glm_jax/host_memory.py)
    app.run(main)


if __name__ == "__main__":
    run()
