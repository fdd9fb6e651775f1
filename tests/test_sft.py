"""Supervised fine-tuning rows: the official ptuning layout (golden rows of ChatGLM-6B and ChatGLM2),
the loss of the golden training case through the train step's loss, multi-turn label masking, and
the JSON-lines reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm_jax import load_pretrained
from glm_jax.data.sft import (
    IGNORE, Columns, Record, SFTFormat, SFTLoader, build_example, encode_example, eval_prompt_ids, read_records,
    train_batch,
)
from glm_jax.training.train_step import loss_sums

LOSS_ATOL = 2e-5


def _golden_v1_parts(cases6b):
    ids = cases6b["d_train_loss/input_ids"][0].tolist()
    gmask, sop, eop = ids.index(1401), ids.index(1404), ids.index(1405)
    return ids[:gmask], ids[sop + 1:eop]


def test_chatglm6b_row_matches_official(chatglm6b, cases6b):
    model, _ = chatglm6b
    prompt, answer = _golden_v1_parts(cases6b)
    fmt = SFTFormat.for_model(model.config)
    example = build_example(prompt, answer, fmt, max_source_length=8, max_target_length=10)
    np.testing.assert_array_equal(example.input_ids, cases6b["d_train_loss/input_ids"][0])
    np.testing.assert_array_equal(example.labels, cases6b["d_train_loss/labels"][0])
    assert example.context_length == 7


def test_chatglm6b_truncation_follows_the_recipe(chatglm6b):
    fmt = SFTFormat.for_model(chatglm6b[0].config)
    example = build_example(list(range(10, 30)), list(range(40, 60)), fmt, max_source_length=5, max_target_length=6)
    # prompt[:src-1] [gMASK] <sop> answer[:tgt-2] <eop>: exactly src + tgt tokens, nothing padded.
    assert example.input_ids.tolist() == [10, 11, 12, 13, 1401, 1404, 40, 41, 42, 43, 1405]
    assert example.labels.tolist() == [IGNORE] * 5 + [1404, 40, 41, 42, 43, 1405]


@pytest.mark.parametrize("prefix", [None, "pre4_noproj"])
def test_golden_training_loss_through_the_train_step_loss(golden6b, cases6b, prefix):
    model, params = load_pretrained(str(golden6b / "checkpoint"),
                                    prefix=None if prefix is None else str(golden6b / "ptuning" / prefix))
    prompt, answer = _golden_v1_parts(cases6b)
    example = build_example(prompt, answer, SFTFormat.for_model(model.config), 8, 10)
    loss, (_, count) = loss_sums(model, params, train_batch([example], model.config))
    expected = cases6b["d_train_loss/loss" if prefix is None else "e1_ptuning_noproj/train_loss"]
    assert abs(float(loss / count) - float(expected)) < LOSS_ATOL


def test_chatglm2_row_and_loss_match_official(chatglm2, cases2):
    model, params = chatglm2
    ids = cases2["d_train_loss/input_ids"][0].tolist()
    context = 8
    answer = ids[context: ids.index(2, context)]
    fmt = SFTFormat.for_model(model.config, gmask=1451, sop=1453)
    example = build_example(ids[2:context], answer, fmt, max_source_length=10, max_target_length=8)
    np.testing.assert_array_equal(example.input_ids, cases2["d_train_loss/input_ids"][0])
    np.testing.assert_array_equal(example.labels, cases2["d_train_loss/labels"][0])
    batch = train_batch([example], model.config)
    np.testing.assert_array_equal(batch["position_ids"][0], cases2["d_train_loss/position_ids"][0])
    loss, (_, count) = loss_sums(model, params, batch)
    assert abs(float(loss / count) - float(cases2["d_train_loss/loss"])) < 1e-5


class CharTokenizer:
    """One id per distinct character, from 10 up (clear of the special ids) - enough to see the layout."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return [self.ids.setdefault(c, 10 + len(self.ids)) for c in text]

    def text(self, ids):
        chars = {i: c for c, i in self.ids.items()}
        return "".join(chars[i] for i in ids)


def test_multi_turn_history_is_context_only(chatglm6b):
    fmt = SFTFormat.for_model(chatglm6b[0].config)
    tok = CharTokenizer()
    record = Record("q2", "a2", (("q0", "a0"), ("q1", "a1")))
    example = encode_example(tok, record, fmt, max_source_length=64, max_target_length=8, has_history_column=True)
    expected_prompt = "[Round 0]\n问：q0\n答：a0\n[Round 1]\n问：q1\n答：a1\n[Round 2]\n问：q2\n答："
    n = len(expected_prompt)
    ids, labels = example.input_ids.tolist(), example.labels.tolist()
    assert tok.text(ids[:n]) == expected_prompt
    assert ids[n:n + 2] == [1401, 1404] and tok.text(ids[n + 2:n + 4]) == "a2" and ids[n + 4] == 1405
    # Earlier answers (a0, a1) and the whole prompt are never trained on; only <sop> a2 <eop> are.
    assert labels[: n + 1] == [IGNORE] * (n + 1)
    assert labels[n + 1:n + 5] == ids[n + 1:n + 5]
    assert set(labels[n + 5:]) == {IGNORE}
    batch = train_batch([example], chatglm6b[0].config)
    # Next-token targets: [gMASK] -> <sop>, <sop> -> 'a', 'a' -> '2', '2' -> <eop>, nothing else.
    assert np.flatnonzero(batch["loss_mask"][0]).tolist() == [n, n + 1, n + 2, n + 3]
    assert batch["targets"][0, n:n + 4].tolist() == ids[n + 1:n + 5]
    assert batch["part_a"][0].tolist() == [True] * (n + 1) + [False] * (len(ids) - n - 1)


def test_history_prompt_formats(chatglm6b):
    fmt = SFTFormat.for_model(chatglm6b[0].config)
    tok = CharTokenizer()
    no_history = Record("你好", "hi")
    # Official quirk: training prompts with a history column always carry the round header; prediction
    # prompts (like chat) use the bare query when there is no history.
    train = encode_example(tok, no_history, fmt, 32, 8, has_history_column=True)
    assert tok.text(train.input_ids[: train.context_length - 1].tolist()) == "[Round 0]\n问：你好\n答："
    assert tok.text(eval_prompt_ids(tok, no_history, fmt, 32)[:-2]) == "你好"
    fmt2 = SFTFormat("prefix", gmask=1451, sop=1453, eos=2, pad=0)
    two = eval_prompt_ids(tok, Record("q1", "x", (("q0", "a0"),)), fmt2, 64)
    assert two[:2] == [1451, 1453]
    assert tok.text(two[2:]) == "[Round 1]\n\n问：q0\n\n答：a0\n\n[Round 2]\n\n问：q1\n\n答："


def test_read_records_adgen_layout_and_errors(tmp_path):
    path = tmp_path / "train.json"
    rows = [{"content": "类型#裙", "summary": "一条裙子"}, {"content": "", "summary": "skipped"},
            {"content": "q", "summary": "r", "history": [["a", "b"]]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    records = read_records(path)
    assert records == [Record("类型#裙", "一条裙子"), Record("q", "r")]
    with_history = read_records(path, Columns(history="history"))
    assert with_history[1].history == (("a", "b"),) and with_history[0].history == ()
    with pytest.raises(ValueError, match=r"train.json:1: missing column\(s\) \['prompt'\]"):
        read_records(path, Columns(prompt="prompt"))
    (tmp_path / "bad.json").write_text('{"content": "x", "summary": "y"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.json:2: not valid JSON"):
        read_records(tmp_path / "bad.json")


def test_loader_is_resumable_and_covers_every_example(chatglm6b):
    config = chatglm6b[0].config
    fmt = SFTFormat.for_model(config)
    examples = [build_example([10 + i], [20 + i], fmt, 4, 4) for i in range(10)]
    loader = SFTLoader(examples, config, batch_size=4, seed=3)
    first = [next(loader) for _ in range(2)]
    resumed = SFTLoader(examples, config, batch_size=4, seed=3, state=loader.state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(loader)["input_ids"])
    seen = np.concatenate([b["input_ids"][:, 0] for b in first] + [next(SFTLoader(
        examples, config, batch_size=4, seed=3, state={"epoch": 0, "position": 8}))["input_ids"][:2, 0]])
    assert sorted(seen.tolist()) == list(range(10, 20))  # one epoch = every example once


def test_scores_like_the_official_predict():
    from glm_jax.evaluation import corpus_scores, example_scores

    assert example_scores("这条裙子很好看", "这条裙子很好看") == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    disjoint = example_scores("天气", "裙子")
    assert disjoint["rouge-1"] == 0.0 and disjoint["bleu-4"] < 1.0
    # An empty prediction scores 0 instead of stopping the run (rouge_chinese raises on it).
    assert example_scores("", "裙子")["rouge-l"] == 0.0
    mean = corpus_scores(["这条裙子很好看", "天气"], ["这条裙子很好看", "裙子"])
    assert mean["rouge-1"] == 50.0
