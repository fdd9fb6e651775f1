"""Full fine-tuning of ChatGLM-6B, the official `ds_train_finetune.sh`: lr 1e-4, batch 4 per device on 4
devices (16 rows), 5000 steps, source/target 64, float base (the official run is DeepSpeed ZeRO-2 fp16;
here bfloat16 weights/compute with fp32 Adam moments, FSDP over the devices of the mesh)."""

from glm_jax.training.finetune import default_config


def get_config():
    config = default_config()
    config.method = "full"
    config.optimizer.learning_rate = 1e-4
    config.batch_size = 16
    config.step.grad_accum = 1
    config.steps = 5000
    config.model.quantization = ""
    config.model.dtype = "bfloat16"
    config.step.dropout = False
    return config
