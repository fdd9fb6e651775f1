"""`make demo`: a small GLM pre-trained with blank infilling on the shipped public-domain corpus.

About two minutes on 2 CPU cores. The SentencePiece model is trained from the corpus into the
workdir on the first run.

The corpus is the 350 short definitions of The Devil's Dictionary (25 KB, see the corpus README), so
that 1000 steps see each about 140 times and the model learns them by heart: its `[MASK]` infills
are the corpus' own words. A 5000-piece vocabulary makes 19 words in 20 of that text one token (the
text has no more whole-word pieces to give: more pieces do not shorten it), so a hidden word is one
prediction rather than a chain of word pieces; masking 30 % of the tokens (GLM: 15 %) and 80 %
`[MASK]` documents give more scored infilling tokens per step.
"""

import os

import glm_jax.data
from glm_jax.training.loop import default_config


def get_config():
    config = default_config()
    config.steps = 1000
    config.batch_size = 8
    config.seq_len = 128
    config.model.preset = "chatglm-tiny"  # ChatGLM-6B's architecture, scaled down
    config.model.overrides = {"hidden_size": 192, "head_dim": 48, "ffn_hidden_size": 768}
    config.data.kind = "text"
    config.data.path = os.path.join(os.path.dirname(glm_jax.data.__file__), "corpus", "devils_dictionary_short.txt")
    config.data.split = "paragraph"
    config.data.join_lines = True  # the text is hard-wrapped at 70 columns
    config.data.tokenizer_vocab_size = 5000
    config.data.num_workers = 1
    # [MASK] spans on 80 % of the documents, [gMASK] suffixes on the rest: the model infills and continues.
    config.objective.bert_prob = 0.8
    config.objective.mask_ratio = 0.3
    config.optimizer.learning_rate = 5e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.01
    config.log_every = 50
    config.checkpoint_every = 500
    return config
