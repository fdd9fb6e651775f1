"""P-Tuning v2 on multi-turn chat data, the official `ptuning/train_chat.sh`: lr 1e-2, source/target 256,
a history column (`[Round k]` prompts), otherwise as configs/finetune/ptuning.py."""

from glm_jax.training.finetune import default_config


def get_config():
    config = default_config()
    config.method = "ptuning"
    config.optimizer.learning_rate = 1e-2
    config.data.prompt_column = "prompt"
    config.data.response_column = "response"
    config.data.history_column = "history"
    config.data.max_source_length = 256
    config.data.max_target_length = 256
    return config
