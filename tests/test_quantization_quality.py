"""Quality of INT8 / INT4 weight-only quantization on a GLM trained here.

The model is the `make demo` pre-training job (configs/pretrain/tiny.py: ChatGLM-6B's architecture
scaled down, blank infilling on the shipped public-domain corpus), shortened to 160 steps and
trained without the last paragraphs of the corpus, which serve as held-out text. The
float32 model is the reference: INT8 logits must stay within 1% relative error of it and INT4 must
pick the same greedy token at >= 90% of the held-out positions (the acceptance bar of the
quantization issue), with and without the quantized word embedding / output layer, and with group-wise
INT4 scales.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest

from glm_jax import quantization as q
from glm_jax.config import GLMConfig
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.sharding import make_mesh
from glm_jax.tokenizer import ChatGLMTokenizer
from glm_jax.training.checkpoint import Checkpointer
from glm_jax.training.loop import TOKENIZER_FILE
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
from glm_jax.training.state import abstract_state

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "pretrain" / "tiny.py"
CORPUS = REPO / "glm_jax" / "data" / "corpus" / "devils_dictionary.txt"
HELD_OUT_PARAGRAPHS = 40
CONTEXT, TARGET = 12, 48  # tokens of a held-out paragraph given as the prompt / scored after <sop>


def paragraphs() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model config, float32 params as NumPy, eval ids [rows, CONTEXT + 2 + TARGET]).

    glm-train runs in a subprocess on one CPU device (the tests' 8 simulated devices would split a
    batch of 8 rows eight ways); the params are restored from its checkpoint as `make demo` does.
    """
    workdir = tmp_path_factory.mktemp("quality")
    texts = paragraphs()
    train_file = workdir / "train.txt"
    train_file.write_text("\n\n".join(texts[:-HELD_OUT_PARAGRAPHS]), encoding="utf-8")
    run, steps = workdir / "run", 160
    overrides = dict(steps=steps, log_every=steps, checkpoint_every=steps, async_checkpoint=False,
                     peak_flops_per_device=1e12)  # skip the start-up matmul measurement (MFU only)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "glm_jax.cli.train", f"--config={DEMO_CONFIG}", f"--workdir={run}",
                    f"--config.data.path={train_file}", "--config.data.num_workers=0",
                    *(f"--config.{k}={v}" for k, v in overrides.items())],
                   env=env, check=True, capture_output=True, timeout=600)

    config = runpy.run_path(str(DEMO_CONFIG))["get_config"]()
    model_config = GLMConfig.from_dict(json.loads((run / "model_config.json").read_text()))
    tx, _ = make_optimizer(OptimizerConfig(**{**dict(config.optimizer), "decay_steps": steps}))
    abstract = abstract_state(GLMForCausalLM(model_config), tx, config.seq_len,
                              make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    checkpointer = Checkpointer(str(run / "checkpoints"))
    step, state, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert step == steps
    params = jax.tree.map(np.asarray, state.params)
    tokenizer = ChatGLMTokenizer(str(run / TOKENIZER_FILE))
    rows = []
    for text in texts[-HELD_OUT_PARAGRAPHS:]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= CONTEXT + TARGET:
            rows.append(ids[:CONTEXT] + [model_config.gmask_token_id, model_config.bos_token_id]
                        + ids[CONTEXT:CONTEXT + TARGET])
    assert len(rows) >= 8, "too few long held-out paragraphs"
    return model_config, params, np.asarray(rows, np.int32)


def target_logits(model_config, params, ids: np.ndarray) -> np.ndarray:
    """Logits at the positions that predict the TARGET tokens (from <sop> on)."""
    logits = jax.jit(GLMForCausalLM(model_config).apply)({"params": params}, ids)
    return np.asarray(logits)[:, CONTEXT + 1:-1]


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return float(-np.take_along_axis(log_probs, ids[:, CONTEXT + 2:, None], axis=-1).mean())


def test_quantized_models_track_the_float_model_on_held_out_text(trained):
    model_config, params, ids = trained
    reference = target_logits(model_config, params, ids)
    vocab = model_config.vocab_size
    # The model learned something: clearly better than a uniform guess over the vocabulary (ln V).
    assert nll(reference, ids) < np.log(vocab) - 0.75
    for embeddings in (False, True):
        int8 = target_logits(model_config.replace(quantization_bit=8, quantize_embeddings=embeddings),
                             q.quantize_params(params, 8, embeddings=embeddings), ids)
        relative = np.linalg.norm(int8 - reference) / np.linalg.norm(reference)
        assert relative < 0.01, f"INT8 (embeddings quantized: {embeddings}) logits off by {relative:.2%}"
    for embeddings, group in ((False, 0), (True, 0), (False, 16)):
        int4 = target_logits(model_config.replace(quantization_bit=4, quantize_embeddings=embeddings,
                                                  quantization_group_size=group),
                             q.quantize_params(params, 4, embeddings=embeddings, group_size=group), ids)
        agree = np.mean(int4.argmax(-1) == reference.argmax(-1))
        assert agree >= 0.9, f"INT4 (embeddings {embeddings}, group {group}) greedy tokens agree on {agree:.1%}"
        # Quantization noise costs little: held-out NLL within 5% of the float model's.
        assert nll(int4, ids) < 1.05 * nll(reference, ids)
