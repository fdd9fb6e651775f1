"""Chat: the ChatGLM-6B prompt and post-processing rules (spec §1.9), streaming text that never has
to be taken back, history truncation, and chat == stream_chat == generate on the same settings."""

from __future__ import annotations

import random

import numpy as np
import pytest

from glm_jax import generate
from glm_jax.chat import ResponseStream, build_prompt, chat, fit_prompt, process_response, stream_chat
from decoding_helpers import chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)


def test_prompt_without_history_is_the_query():
    assert build_prompt("你好", []) == "你好"


def test_prompt_with_history_numbers_rounds_from_zero():
    history = [("你好", "你好👋！我是人工智能助手 ChatGLM-6B"), ("1+1", "2")]
    assert build_prompt("晚上睡不着应该怎么办", history) == (
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B\n"
        "[Round 1]\n问：1+1\n答：2\n"
        "[Round 2]\n问：晚上睡不着应该怎么办\n答："
    )


@pytest.mark.parametrize(
    "raw,processed",
    [
        ("  你好,世界!  ", "你好，世界！"),
        ("答案:好;对吗?", "答案：好；对吗？"),
        ("Hello, world! a:b", "Hello, world! a:b"),  # no CJK neighbour: unchanged
        (",你好", "，你好"),  # CJK on the right only
        ("我出生于[[训练时间]],谢谢", "我出生于2023年，谢谢"),
        ("\n\n 第一行\n第二行 \n", "第一行\n第二行"),
    ],
)
def test_process_response(raw, processed):
    assert process_response(raw) == processed


# ---------------------------------------------------------------------------------- streaming


def stream_pieces(tok, ids, sizes):
    stream = ResponseStream(tok)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(stream.feed(ids[start : start + size]))
        start += size
    pieces.append(stream.feed(ids[start:]))
    pieces.append(stream.finish())
    return pieces


@pytest.mark.parametrize(
    "text",
    [
        "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你。😀鑫",
        "你好,世界!今天:好;吗?ok, fine!",
        "我出生于[[训练时间]],谢谢",
        "It 's fine , isn't it ? They 're here . I 'm ok",
        "def main():\n    print('hello world')\t# 🚀",
        "  leading and trailing  ",
    ],
)
def test_stream_pieces_are_final_and_add_up_to_the_response(chat_tok, text):  # noqa: F811
    ids = chat_tok.encode(text, add_special_tokens=False)
    final = process_response(chat_tok.decode(ids, clean_up_tokenization_spaces=True))
    pieces = stream_pieces(chat_tok, ids, [1] * len(ids))
    assert "".join(pieces) == final
    if "\ufffd" not in final:  # a character split over byte tokens is never shown half-done
        assert all("\ufffd" not in piece for piece in pieces)


def test_stream_pieces_for_random_token_sequences(chat_tok):  # noqa: F811
    """Any ids, any chunking: the pieces only ever extend the text (nothing is taken back)."""
    rng = random.Random(0)
    vocab = range(chat_tok.vocab_size)
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randrange(1, 30))]
        sizes = [rng.randrange(1, 4) for _ in range(len(ids))]
        final = process_response(chat_tok.decode(ids, clean_up_tokenization_spaces=True))
        assert "".join(stream_pieces(chat_tok, ids, sizes)) == final, ids


def test_punctuation_waits_for_the_next_character(chat_tok):  # noqa: F811
    stream = ResponseStream(chat_tok)
    assert stream.feed(chat_tok.encode("你好,", add_special_tokens=False)) == "你好"
    assert stream.feed(chat_tok.encode("世界", add_special_tokens=False)).startswith("，")


# ---------------------------------------------------------------------------------- history


def test_history_is_truncated_oldest_first(chat_tok):  # noqa: F811
    history = [(f"问题{i}今天天气很好", f"回答{i}我们去公园散步吧") for i in range(6)]
    sizes = [len(chat_tok.encode(build_prompt("你好", history[k:]))) for k in range(7)]
    budget = sizes[3]  # the newest 3 rounds fit, 4 do not
    assert sizes[2] > budget
    ids, kept = fit_prompt(chat_tok, "你好", history, budget)
    assert kept == history[3:]
    assert ids == chat_tok.encode(build_prompt("你好", history[3:]))


def test_overlong_query_keeps_its_end(chat_tok):  # noqa: F811
    query = "今天天气很好，" * 40 + "晚上睡不着应该怎么办"
    ids, kept = fit_prompt(chat_tok, query, [("a", "b")], 20)
    text_ids = chat_tok.encode(query, add_special_tokens=False)
    assert kept == [] and len(ids) == 20
    assert ids == text_ids[-18:] + [chat_tok.gmask_token_id, chat_tok.bos_token_id]


# ------------------------------------------------------------------------------- end to end


def test_chat_is_generate_on_the_official_prompt(chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    settings = dict(max_length=80, do_sample=True, top_p=0.7, temperature=0.95, top_k=50, seed=4)
    response, history = chat(model, params, chat_tok, "你好", **settings)
    ids = chat_tok.encode("你好")
    expected = generate(model, params, [ids], **settings)[0]
    assert response == process_response(chat_tok.decode(expected, clean_up_tokenization_spaces=True))
    assert history == [("你好", response)]
    response2, history2 = chat(model, params, chat_tok, "晚上睡不着应该怎么办", history, max_length=200, do_sample=False)
    ids2 = chat_tok.encode(build_prompt("晚上睡不着应该怎么办", history))
    expected2 = generate(model, params, [ids2], max_length=200)[0]
    assert response2 == process_response(chat_tok.decode(expected2, clean_up_tokenization_spaces=True))
    assert history2 == history + [("晚上睡不着应该怎么办", response2)]


def test_stream_chat_adds_up_to_chat(chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    settings = dict(max_length=64, seed=1)
    response, history = chat(model, params, chat_tok, "今天天气很好", **settings)
    items = list(stream_chat(model, params, chat_tok, "今天天气很好", **settings))
    assert "".join(piece for piece, _ in items) == response
    assert items[-1][1] == history
    partial = [h[-1][1] for _, h in items]
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))


def test_long_history_never_overflows(chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    history = [("今天天气很好" * 5, "我们去公园散步吧" * 5)] * 8
    response, new_history = chat(model, params, chat_tok, "你好", history, max_length=64, reserve_tokens=16)
    assert isinstance(response, str) and new_history[-1] == ("你好", response)
    assert len(new_history) < len(history) + 1  # old rounds were dropped to fit
    assert np.all([isinstance(q, str) for q, _ in new_history])
