"""P-Tuning v2 of ChatGLM-6B on ADGEN, the official `ptuning/train.sh`: pre_seq_len 128, lr 2e-2,
source/target 64, batch 1 x gradient accumulation 16, 3000 steps, INT4 base in fp16, prefix in fp32.

    glm-finetune --config=configs/finetune/ptuning.py --workdir=runs/adgen-pt \\
        --config.base=PATH/chatglm-6b --config.data.train_file=AdvertiseGen/train.json \\
        --config.data.validation_file=AdvertiseGen/dev.json
"""

from glm_jax.training.finetune import default_config


def get_config():
    config = default_config()  # the defaults are this recipe
    config.method = "ptuning"
    config.ptuning.pre_seq_len = 128
    config.optimizer.learning_rate = 2e-2
    config.data.max_source_length = 64
    config.data.max_target_length = 64
    config.batch_size = 16
    config.step.grad_accum = 16
    config.steps = 3000
    config.model.quantization = "int4"
    config.model.dtype = "float16"
    return config
