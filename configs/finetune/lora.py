"""LoRA of ChatGLM-6B on ADGEN with the P-Tuning recipe's data and schedule: rank 8, alpha 32, dropout
0.1 on `query_key_value` (the usual PEFT setting for ChatGLM), lr 1e-3 (LoRA's usual rate; 2e-2 is a
prefix rate), fp16 base (set model.quantization="int4" for the memory of the INT4 recipe)."""

from glm_jax.training.finetune import default_config


def get_config():
    config = default_config()
    config.method = "lora"
    config.lora.rank = 8
    config.lora.alpha = 32.0
    config.lora.dropout = 0.1
    config.lora.target_modules = "query_key_value"
    config.optimizer.learning_rate = 1e-3
    config.model.quantization = ""
    config.model.dtype = "float16"
    return config
