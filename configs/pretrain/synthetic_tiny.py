"""A 2-layer model on generated token documents: the config of tests and quick smoke runs."""

from glm_jax.training.loop import default_config


def get_config():
    config = default_config()
    config.steps = 20
    config.batch_size = 8
    config.seq_len = 64
    config.model.preset = "chatglm-tiny"
    config.data.kind = "synthetic"
    config.data.synthetic_documents = 400
    config.objective.bert_prob = 0.5  # half token spans, half [gMASK] documents
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 5
    config.log_every = 1
    config.checkpoint_every = 5
    config.peak_flops_per_device = 1e11  # skip the start-up matmul measurement
    return config
