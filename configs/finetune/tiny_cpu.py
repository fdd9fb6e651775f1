"""LoRA on a randomly initialised 2-layer model, synthetic instruction pairs: the config of tests and
quick CPU smoke runs (float32, no quantization, greedy prediction)."""

from glm_jax.training.finetune import default_config


def get_config():
    config = default_config()
    config.method = "lora"
    config.steps = 300
    config.batch_size = 16
    config.model.preset = "chatglm-tiny"
    config.model.dtype = "float32"
    config.model.quantization = ""
    config.model.remat_policy = "none"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.lora.target_modules = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"
    config.devices = 1  # a 0.6M-parameter model gains nothing from sharding
    config.data.kind = "synthetic"
    config.data.max_source_length = 12
    config.data.max_target_length = 6
    config.data.synthetic_train = 512
    config.data.synthetic_validation = 64
    config.optimizer.learning_rate = 1e-2
    config.step.grad_accum = 1
    config.step.dropout = False
    config.log_every = 50
    config.checkpoint_every = 300
    config.async_checkpoint = False
    config.predict.do_sample = False
    config.predict.batch_size = 64
    return config
