"""ChatGLM2-6B parity with the official PyTorch implementation (golden/chatglm2), through the same
model code as ChatGLM-6B with a different configuration."""

import numpy as np
import pytest

from glm_jax import load_pretrained
from parity_helpers import greedy_without_cache
from test_parity_chatglm6b import cross_entropy

ATOL, RTOL, LOSS_ATOL = 1e-4, 1e-4, 1e-5


def test_single_prompt_logits_and_hidden_states(chatglm2, cases2):
    model, params = chatglm2
    logits, hidden = model.apply({"params": params}, cases2["a_single/input_ids"], output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(logits), cases2["a_single/logits"], atol=ATOL, rtol=RTOL)
    # Official hidden states end with the last layer's output before the final norm.
    np.testing.assert_allclose(np.asarray(hidden[:-1]), cases2["a_single/hidden_states"][:-1], atol=ATOL, rtol=RTOL)


def test_left_padded_batch(chatglm2, cases2):
    model, params = chatglm2
    c = "c_batch_leftpad"
    padding = cases2[f"{c}/attention_mask"]
    logits = model.apply({"params": params}, cases2[f"{c}/input_ids"], cases2[f"{c}/position_ids"], padding)
    np.testing.assert_allclose(np.asarray(logits), cases2[f"{c}/logits"], atol=ATOL, rtol=RTOL)
    sequences, _ = greedy_without_cache(model, params, cases2[f"{c}/input_ids"], 16, padding)
    np.testing.assert_array_equal(sequences, cases2[f"{c}/gen_sequences"])


def test_greedy_tokens(chatglm2, cases2):
    model, params = chatglm2
    sequences, scores = greedy_without_cache(model, params, cases2["a_single/input_ids"], 16)
    np.testing.assert_array_equal(sequences, cases2["a_single/gen_sequences"])
    np.testing.assert_allclose(scores, cases2["a_single/gen_scores"], atol=ATOL, rtol=RTOL)


def test_training_loss(chatglm2, cases2):
    model, params = chatglm2
    logits = model.apply({"params": params}, cases2["d_train_loss/input_ids"])
    assert abs(cross_entropy(logits, cases2["d_train_loss/labels"]) - float(cases2["d_train_loss/loss"])) < LOSS_ATOL


@pytest.mark.parametrize("case,prefix", [("e1_ptuning_noproj", "pre4_noproj"), ("e2_ptuning_proj", "pre4_proj")])
def test_ptuning_v2_prefix(golden2, cases2, case, prefix):
    model, params = load_pretrained(str(golden2 / "checkpoint"), prefix=str(golden2 / "ptuning" / prefix))
    logits = model.apply({"params": params}, cases2[f"{case}/input_ids"])
    np.testing.assert_allclose(np.asarray(logits), cases2[f"{case}/logits"], atol=ATOL, rtol=RTOL)
    train_logits = model.apply({"params": params}, cases2["d_train_loss/input_ids"])
    np.testing.assert_allclose(np.asarray(train_logits), cases2[f"{case}/train_logits"], atol=ATOL, rtol=RTOL)
    assert abs(cross_entropy(train_logits, cases2["d_train_loss/labels"]) - float(cases2[f"{case}/train_loss"])) < LOSS_ATOL
    sequences, _ = greedy_without_cache(model, params, cases2[f"{case}/input_ids"], 16)
    np.testing.assert_array_equal(sequences, cases2[f"{case}/gen_sequences"])


def test_fp16_model(golden2, cases2):
    model, params = load_pretrained(str(golden2 / "checkpoint"), dtype="float16", rope_dtype="float16")
    logits = model.apply({"params": params}, cases2["f_fp16_single/input_ids"])
    np.testing.assert_allclose(np.asarray(logits), cases2["f_fp16_single/logits"].astype(np.float32), atol=0.02)
