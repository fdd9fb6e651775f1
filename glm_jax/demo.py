"""`make demo`: pre-train a small GLM with blank infilling, then let it fill blanks and continue text.

    python -m glm_jax.demo [--workdir=DIR] [--config.steps=N ...]

Runs the glm-train job on `configs/pretrain/tiny.py` (The Devil's Dictionary, public domain, shipped
in `glm_jax/data/corpus/`), reloads the saved checkpoint, compares the final loss with the corpus'
unigram entropy (the loss of a model that knows only token frequencies), renders the loss curve,
then fills `[MASK]` blanks in definitions taken from the corpus and continues `[gMASK]` prompts.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain", "tiny.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Pre-training config of the demo.")
flags.DEFINE_string("workdir", None, "Where the run is written (default: a new temporary directory).")
FLAGS = flags.FLAGS

# (text with [MASK] blanks, the corpus' words) — definitions from the corpus with a few words hidden.
INFILL = [
    ("ABDICATION, n.  An act whereby a sovereign attests his sense of the [MASK] of the throne.",
     "high temperature"),
    ("CYNIC, n.  A blackguard whose faulty vision sees things as they are, not as they [MASK].",
     "ought to be"),
    ("BORE, n.  A person who talks when you wish him to [MASK].", "listen"),
]
CONTINUE = ["ABSURDITY, n.", "LAWYER, n.", "HAPPINESS, n."]


def unigram_entropy(token_ids: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(token_ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    from glm_jax.data.sources import index_documents, read_document
    from glm_jax.generation import fill_blanks_text, generate
    from glm_jax.modeling.transformer import GLMForCausalLM
    from glm_jax.sharding import make_mesh
    from glm_jax.tokenizer import ChatGLMTokenizer
    from glm_jax.training.checkpoint import Checkpointer
    from glm_jax.training.loop import TOKENIZER_FILE, train
    from glm_jax.training.metrics import plot_loss, read_metrics
    from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
    from glm_jax.training.state import abstract_state

    config = FLAGS.config
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="glm-demo-")
    print(f"== pre-training ({config.steps} steps) in {workdir}", flush=True)
    result = train(config, workdir)

    # Reload what was saved, to show the checkpoint is complete.
    model = GLMForCausalLM(result["model_config"])
    tx, _ = make_optimizer(OptimizerConfig(**{**dict(config.optimizer), "decay_steps": config.steps}))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    step, state, _ = checkpointer.restore_latest(abstract_state(model, tx, config.seq_len, mesh))
    checkpointer.close()
    params = state.params
    tokenizer = ChatGLMTokenizer(os.path.join(workdir, TOKENIZER_FILE))

    refs = index_documents([config.data.path], config.data.split)
    corpus_ids = np.concatenate([tokenizer.encode(read_document(r, join_lines=config.data.join_lines),
                                                  add_special_tokens=False) for r in refs])
    baseline = unigram_entropy(corpus_ids)
    losses = [r["loss"] for r in read_metrics(workdir)]
    final = float(np.mean(losses[-3:]))
    png = plot_loss(workdir, os.path.join(workdir, "loss.png"), baseline=baseline)
    print(f"\n== checkpoint step {step}: final loss {final:.3f} nats/token (first logged {losses[0]:.3f}); "
          f"unigram baseline {baseline:.3f}; ratio {final / baseline:.2f}. Loss curve: {png}")

    print("\n== [MASK] blank infilling (greedy with repetition penalty 1.2, then sampled)")
    for text, truth in INFILL:
        greedy = fill_blanks_text(model, params, tokenizer, text, max_new_tokens=12, repetition_penalty=1.2)
        sampled = fill_blanks_text(model, params, tokenizer, text, max_new_tokens=12, do_sample=True, top_p=0.8,
                                   temperature=0.8, seed=0)
        print(f"  prompt:  {text}\n  greedy:  {greedy}\n  sampled: {sampled}\n  corpus:  {truth!r}\n")

    print("== [gMASK] continuation (greedy with repetition penalty 1.2, then sampled)")
    prompts = [tokenizer.encode(p) for p in CONTINUE]
    greedy = generate(model, params, prompts, max_new_tokens=40, repetition_penalty=1.2)
    sampled = generate(model, params, prompts, max_new_tokens=40, do_sample=True, top_p=0.8, temperature=0.8, seed=0)
    for prompt, g, s in zip(CONTINUE, greedy, sampled):
        print(f"  {prompt}\n    greedy:  {tokenizer.decode(g)}\n    sampled: {tokenizer.decode(s)}")


if __name__ == "__main__":
    app.run(main)
