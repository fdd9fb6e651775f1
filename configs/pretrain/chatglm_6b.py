"""ChatGLM-6B-shaped pre-training with GLM-130B's objective mix, for an accelerator slice.

    glm-train --config=configs/pretrain/chatglm_6b.py --workdir=DIR \\
        --config.data.path=CORPUS_DIR --config.data.tokenizer=ice_text.model

30 % token-level [MASK] spans, 70 % document-level [gMASK] (spec §3.3), embedding gradient shrink
0.1, bfloat16 compute over float32 master weights, full remat, params and Adam state sharded over
every device (FSDP); set --config.mesh.tensor to add tensor parallelism.
"""

from glm_jax.training.loop import default_config


def get_config():
    config = default_config()
    config.steps = 100_000
    config.batch_size = 256
    config.seq_len = 2048
    config.model.preset = "chatglm-6b"
    config.model.overrides = {"dtype": "bfloat16", "remat_policy": "full"}
    config.data.kind = "text"
    config.data.split = "file"
    config.data.num_workers = 8
    config.objective.bert_prob = 0.3
    config.objective.gap_sentence_prob = 0.0
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 1000
    config.optimizer.min_lr_ratio = 0.1
    config.step.embedding_grad_shrink = 0.1
    config.step.spike_factor = 3.0
    config.log_every = 10
    config.checkpoint_every = 500
    return config
