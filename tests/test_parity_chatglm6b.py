"""ChatGLM-6B parity with the official PyTorch implementation (golden/chatglm6b, see its README)."""

import numpy as np
import pytest

from glm_jax import load_pretrained
from glm_jax.positions import positions_and_mask
from parity_helpers import greedy_without_cache

ATOL, RTOL, LOSS_ATOL = 5e-4, 1e-4, 2e-5
PAD = 3


def cross_entropy(logits, labels):
    """Official shifted CE: logits at t predict labels[t+1]; -100 ignored; mean."""
    logits, labels = np.asarray(logits, np.float64)[:, :-1], np.asarray(labels)[:, 1:]
    keep = labels != -100
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return float(((logz - picked) * keep).sum() / keep.sum())


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "d_train_loss"])
def test_logits_with_derived_positions(chatglm6b, cases6b, case):
    model, params = chatglm6b
    logits = model.apply({"params": params}, cases6b[f"{case}/input_ids"])
    np.testing.assert_allclose(np.asarray(logits), cases6b[f"{case}/logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "d_train_loss"])
def test_derived_positions_and_mask_match_official(chatglm6b, cases6b, case):
    model, _ = chatglm6b
    positions, mask = positions_and_mask(model.config, cases6b[f"{case}/input_ids"])
    np.testing.assert_array_equal(np.asarray(positions), cases6b[f"{case}/derived_position_ids"])
    np.testing.assert_array_equal(np.asarray(mask), ~cases6b[f"{case}/derived_attention_mask"])


def test_hidden_states_layer_by_layer(chatglm6b, cases6b):
    model, params = chatglm6b
    _, hidden = model.apply({"params": params}, cases6b["a_gmask_single/input_ids"], output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(hidden), cases6b["a_gmask_single/hidden_states"], atol=ATOL, rtol=RTOL)


def test_left_padded_batch_explicit_positions_and_mask(chatglm6b, cases6b):
    model, params = chatglm6b
    c = "c_batch_leftpad"
    logits = model.apply(
        {"params": params}, cases6b[f"{c}/input_ids"], cases6b[f"{c}/position_ids"], ~cases6b[f"{c}/attention_mask"]
    )
    # Pad rows too: they are fully masked, which the official code turns into a uniform softmax.
    np.testing.assert_allclose(np.asarray(logits), cases6b[f"{c}/logits"], atol=ATOL, rtol=RTOL)


def test_left_padded_batch_from_padding_mask(chatglm6b, cases6b):
    """A [B, L] padding mask reproduces what the official tokenizer's padding computes."""
    model, params = chatglm6b
    c = "c_batch_leftpad"
    ids = cases6b[f"{c}/input_ids"]
    padding = (ids != PAD).astype(np.int32)
    positions, mask = positions_and_mask(model.config, ids, padding)
    np.testing.assert_array_equal(np.asarray(positions), cases6b[f"{c}/position_ids"])
    np.testing.assert_array_equal(np.asarray(mask), ~cases6b[f"{c}/attention_mask"])
    logits = model.apply({"params": params}, ids, attention_mask=padding)
    np.testing.assert_allclose(np.asarray(logits), cases6b[f"{c}/logits"], atol=ATOL, rtol=RTOL)


def test_training_loss(chatglm6b, cases6b):
    model, params = chatglm6b
    logits = model.apply({"params": params}, cases6b["d_train_loss/input_ids"])
    loss = cross_entropy(logits, cases6b["d_train_loss/labels"])
    assert abs(loss - float(cases6b["d_train_loss/loss"])) < LOSS_ATOL


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "c_batch_leftpad"])
def test_greedy_tokens_and_step_scores(chatglm6b, cases6b, case):
    model, params = chatglm6b
    ids = cases6b[f"{case}/input_ids"]
    padding = (ids != PAD).astype(np.int32) if case == "c_batch_leftpad" else None
    sequences, scores = greedy_without_cache(model, params, ids, 16, padding)
    np.testing.assert_array_equal(sequences, cases6b[f"{case}/gen_sequences"])
    np.testing.assert_allclose(scores, cases6b[f"{case}/gen_scores"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case,prefix", [("e1_ptuning_noproj", "pre4_noproj"), ("e2_ptuning_proj", "pre4_proj")])
def test_ptuning_v2_prefix(golden6b, cases6b, case, prefix):
    model, params = load_pretrained(str(golden6b / "checkpoint"), prefix=str(golden6b / "ptuning" / prefix))
    assert model.config.pre_seq_len == 4
    ids = cases6b[f"{case}/input_ids"]
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), cases6b[f"{case}/logits"],
                               atol=ATOL, rtol=RTOL)
    train_logits = model.apply({"params": params}, cases6b["d_train_loss/input_ids"])
    np.testing.assert_allclose(np.asarray(train_logits), cases6b[f"{case}/train_logits"], atol=ATOL, rtol=RTOL)
    loss = cross_entropy(train_logits, cases6b["d_train_loss/labels"])
    assert abs(loss - float(cases6b[f"{case}/train_loss"])) < LOSS_ATOL
    sequences, _ = greedy_without_cache(model, params, ids, 16)
    np.testing.assert_array_equal(sequences, cases6b[f"{case}/gen_sequences"])


def test_fp16_model(golden6b, cases6b):
    """fp16 weights and compute, rotary angles rounded to fp16 like the official `.half()` model."""
    model, params = load_pretrained(str(golden6b / "checkpoint"), dtype="float16", rope_dtype="float16")
    ids = cases6b["f_fp16_single/input_ids"]
    logits = model.apply({"params": params}, ids)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), cases6b["f_fp16_single/logits"].astype(np.float32), atol=0.1)
    sequences, _ = greedy_without_cache(model, params, ids, 16)
    np.testing.assert_array_equal(sequences, cases6b["f_fp16_single/gen_sequences"])


def test_rotary_tables_match_official(chatglm6b, cases6b):
    from glm_jax.modeling.layers import rotary_angles, rotary_inv_freq

    config = chatglm6b[0].config
    np.testing.assert_array_equal(np.asarray(rotary_inv_freq(config)), cases6b["rope/inv_freq_buffer"])
    positions = np.arange(2048)[None, None, :]
    for dtype in ("float32", "float16"):
        cos, sin = rotary_angles(config.replace(rope_dtype=dtype), positions)
        half = cases6b[f"rope/cos_{dtype.replace('float', 'fp')}"].shape[-1] // 2
        atol = 1e-6 if dtype == "float32" else 2e-3
        np.testing.assert_allclose(np.asarray(cos[0, 0], np.float32), cases6b[f"rope/cos_{dtype.replace('float', 'fp')}"][:, :half].astype(np.float32), atol=atol)
        np.testing.assert_allclose(np.asarray(sin[0, 0], np.float32), cases6b[f"rope/sin_{dtype.replace('float', 'fp')}"][:, :half].astype(np.float32), atol=atol)
