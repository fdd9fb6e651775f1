"""Tests for the ChatGLM2 / ChatGLM3 / GLM-4 tokenizers (spec §2.4).

The real vocabularies are not shipped. ChatGLM2/3 get a small plain SentencePiece model trained
here (byte fallback, no normalisation, like the real ``tokenizer.model``); expected ids come from
that SentencePiece model directly plus the spec's special-id layout. GLM-4 gets a tiny hand-written
rank file whose BPE results are worked out by hand below. With ``CHATGLM2_TOKENIZER`` pointing at
the real ChatGLM2/3 ``tokenizer.model`` (file or directory), the spec's test vector is checked too.
"""

from __future__ import annotations

import base64
import os

import pytest
import sentencepiece as spm

from glm_jax.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, GLM4Tokenizer
from test_tokenizer import CORPUS

TEXTS = ["Hello, how are you today?", "你好，世界！\n我是人工智能助手。", "def main():\n    print('hi')\n\n",
         "tabs\tand   spaces", "emoji 🙂 and Ω"]


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_prefix=str(path)[: -len(".model")], model_type="bpe",
        vocab_size=700, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    return path


@pytest.fixture(scope="module")
def sp(sp_file):
    return spm.SentencePieceProcessor(model_file=str(sp_file))


@pytest.fixture(scope="module")
def tok2(sp_file):
    return ChatGLM2Tokenizer.from_pretrained(sp_file.parent)


@pytest.fixture(scope="module")
def tok3(sp_file):
    return ChatGLM3Tokenizer(sp_file)


def test_chatglm2_special_ids_follow_the_sentencepiece_vocab(tok2, sp):
    n = sp.GetPieceSize()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert tok2.convert_tokens_to_ids(names) == [n, n + 1, n + 2, n + 3, n + 4]
    assert tok2.convert_ids_to_tokens(range(n, n + 5)) == names
    assert tok2.vocab_size == n + 5
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (1, 2, 0)
    assert tok2.stop_token_ids == (2,)


def test_chatglm3_role_ids_follow_eop(tok3, sp):
    n = sp.GetPieceSize()
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert tok3.convert_tokens_to_ids(["sop", "eop"] + roles) == list(range(n + 3, n + 9))
    assert tok3.vocab_size == n + 9
    assert tok3.stop_token_ids == (2, n + 6, n + 8)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_prefixes_gmask_sop_and_round_trips(tok2, sp, text):
    n = sp.GetPieceSize()
    ids = tok2.encode(text)
    assert ids == [n + 1, n + 3] + sp.EncodeAsIds(text)
    assert tok2.encode(text, add_special_tokens=False) == sp.EncodeAsIds(text)
    assert tok2.decode(ids) == text
    assert tok2.decode(ids, skip_special_tokens=False) == "[gMASK]sop" + text


def test_pair_and_batch_encoding(tok2, sp):
    n = sp.GetPieceSize()
    a, b = sp.EncodeAsIds("question"), sp.EncodeAsIds("answer")
    assert tok2.build_inputs_with_special_tokens(a, b) == [n + 1, n + 3, *a, *b, 2]
    assert tok2.encode_batch(TEXTS[:2]) == [tok2.encode(t) for t in TEXTS[:2]]


def test_special_names_in_text_stay_text(tok3, sp):
    ids = tok3.encode("<|user|>[gMASK]", add_special_tokens=False)
    assert all(i < sp.GetPieceSize() for i in ids)
    assert tok3.decode(ids) == "<|user|>[gMASK]"


def test_chatglm3_chat_input(tok3, sp):
    n = sp.GetPieceSize()
    gmask, sop, system, user, assistant = n + 1, n + 3, n + 5, n + 6, n + 7
    nl = sp.EncodeAsIds("\n")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
               {"role": "assistant", "content": "Hello"}]
    expected = [gmask, sop, system, *nl, *sp.EncodeAsIds("Be brief."), user, *nl, *sp.EncodeAsIds("你好"),
                assistant, *nl, *sp.EncodeAsIds("Hello"), user, *nl, *sp.EncodeAsIds("what time?"), assistant]
    assert tok3.build_chat_input("what time?", history) == expected
    tools = [{"role": "system", "content": "S", "tools": [{"name": "f"}]}]
    json_text = '\n[\n    {\n        "name": "f"\n    }\n]'
    assert tok3.build_chat_input("q", tools)[3:-1] == [*nl, *sp.EncodeAsIds("S" + json_text), user, *nl,
                                                       *sp.EncodeAsIds("q")]


def test_bad_ids_and_names_raise(tok3):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok3.decode([tok3.vocab_size])
    with pytest.raises(ValueError, match="unknown special token"):
        tok3.get_command("<|tool|>")
    with pytest.raises(ValueError, match="unknown token"):
        tok3.convert_tokens_to_ids("no-such-piece")
    with pytest.raises(FileNotFoundError):
        ChatGLM2Tokenizer("missing.model")


@pytest.mark.skipif(not os.environ.get("CHATGLM2_TOKENIZER"), reason="set CHATGLM2_TOKENIZER to the real tokenizer.model")
def test_real_chatglm2_vector():
    tok = ChatGLM2Tokenizer.from_pretrained(os.environ["CHATGLM2_TOKENIZER"])
    assert tok.encode("你好") == [64790, 64792, 36474, 54591]


# ---- GLM-4: a hand-written rank file -----------------------------------------------------------
# Ranks 0..255 are the single bytes (rank == byte value), then these merges in rank order.
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world",  # 256..264
          b"34", b"12", b"123", b"45",  # 265..268: "34" is cheaper than "12", so only the
          # pre-tokenizer's 3-digit split yields "123" "45" for "12345" (else 12|34|5)
          "你".encode()[:2], "你".encode()]  # 269, 270
BASE = 256 + len(MERGES)  # 271: first special
EOT, GMASK, SOP, USER, ASSISTANT, OBSERVATION = BASE, BASE + 2, BASE + 4, BASE + 7, BASE + 8, BASE + 9


def write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tok4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm4")
    write_ranks(directory / "tokenizer.model", [bytes([b]) for b in range(256)] + MERGES)
    return GLM4Tokenizer.from_pretrained(directory)


def test_glm4_special_layout(tok4):
    assert tok4.vocab_size == BASE + 14
    assert [tok4.get_command(n) for n in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|observation|>")] == [
        EOT, GMASK, SOP, USER, OBSERVATION]
    assert (tok4.eos_token_id, tok4.pad_token_id) == (EOT, EOT)
    assert tok4.stop_token_ids == (EOT, USER, OBSERVATION)


@pytest.mark.parametrize("text, ids", [
    ("hello", [259]),
    ("hello world", [259, 264]),
    ("12345", [267, 268]),
    ("你好", [270, 0xE5, 0xA5, 0xBD]),
    ("\n你好", [10, 270, 0xE5, 0xA5, 0xBD]),
])
def test_glm4_bpe_by_hand(tok4, text, ids):
    assert tok4.encode(text, add_special_tokens=False) == ids
    assert tok4.encode(text) == [GMASK, SOP, *ids]
    assert tok4.decode(tok4.encode(text)) == text


def test_glm4_round_trip_and_pairs(tok4):
    for text in TEXTS + ["<|user|> stays text"]:
        ids = tok4.encode(text)
        assert max(ids[2:]) < BASE and tok4.decode(ids) == text
    assert tok4.build_inputs_with_special_tokens([259], [264]) == [GMASK, SOP, 259, 264, EOT]
    assert tok4.decode([GMASK, SOP, 259, EOT], skip_special_tokens=False) == "[gMASK]<sop>hello<|endoftext|>"


def test_glm4_chat_input(tok4):
    assert tok4.build_chat_input("你好") == [GMASK, SOP, USER, 10, 270, 0xE5, 0xA5, 0xBD, ASSISTANT]
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]
    assert tok4.build_chat_input("12345", history) == [GMASK, SOP, USER, 10, 259, ASSISTANT, 10, 259, USER, 10,
                                                       267, 268, ASSISTANT]


def test_glm4_bad_rank_files(tmp_path):
    with pytest.raises(ValueError, match="not exactly"):
        (tmp_path / "gap.model").write_text("YQ== 0\nYg== 2\n")
        GLM4Tokenizer(tmp_path / "gap.model")
    (tmp_path / "bad.model").write_text("not-base64! 0\n")
    with pytest.raises(ValueError, match="line 1"):
        GLM4Tokenizer(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError):
        GLM4Tokenizer(tmp_path / "missing.model")
