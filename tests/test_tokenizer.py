"""Tests for the ChatGLM-6B tokenizer (spec §1.3).

The real ``ice_text.model`` is not shipped, so a small SentencePiece model is trained here with the
same special pieces laid out like the real vocabulary (relative to each other):

    <unk> <s> </s> <pad> <n> | text pieces | [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC>
    <dBLOCK> | <|tab|> <|blank_2|> ... <|blank_80|> | <0x00> ... <0xFF>

``<n>``, ``<|tab|>`` and the blanks are user-defined pieces (they must be produced from text);
``[MASK]`` ... ``<dBLOCK>`` are control pieces, as in the official tokenizer's configuration code
(never matched in text, decoded to nothing). The normaliser is SentencePiece's default
(``nmt_nfkc`` with ``remove_extra_whitespaces``); the real model folds full-width punctuation too
(spec §1.9: raw decodes give half-width punctuation). With ``CHATGLM_TOKENIZER`` pointing at the
real model (file or directory), the spec's exact test vectors are checked as well.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from glm_jax.tokenizer import ChatGLMTokenizer, blank_piece, preprocess, train_chatglm_sentencepiece

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]

CORPUS = """\
The quick brown fox jumps over the lazy dog.
Machine learning models are trained on large amounts of text.
def main():
    print('hello world')
for i in range(10):
    total = total + i
return the result to the caller
Hello, how are you today? I am fine, thank you.
ChatGLM-6B is an open bilingual language model.
It is based on the General Language Model framework.
Please write a short poem about the sea.
The weather is nice, let us go for a walk in the park.
She said that it wasn't raining anymore.
Numbers: 0 1 2 3 4 5 6 7 8 9 and 2023.
[Round 0] [Round 1] [Round 2]
你好，世界！
我是人工智能助手，很高兴见到你。
欢迎问我任何问题。
今天天气很好，我们去公园散步吧。
晚上睡不着应该怎么办？
问：你好
答：你好！
机器学习模型需要大量的数据进行训练。
这是一个开源的中英双语对话语言模型。
请写一首关于大海的短诗。
北京是中国的首都。
我们一起学习编程吧。
他说明天不会下雨了。
"""


def _train_model_proto(drop: str | None = None) -> bytes:
    """The tiny model in the real id layout, optionally without the piece `drop`."""
    data = train_chatglm_sentencepiece(CORPUS.splitlines(), vocab_size=600)  # 349 special/byte pieces
    if drop is None:
        return data
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(data)
    kept = [p for p in proto.pieces if p.piece != drop]
    assert len(kept) == len(proto.pieces) - 1
    del proto.pieces[:]
    proto.pieces.extend(kept)
    return proto.SerializeToString()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("ice_text")
    (d / "ice_text.model").write_bytes(_train_model_proto())
    return d


@pytest.fixture(scope="session")
def tok(model_dir) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(model_dir)


def _official_preprocess(text: str) -> str:
    """Spec §1.3.2 written literally, as the official loop does it."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


# --- 1. round trip -------------------------------------------------------------------------------

ROUND_TRIP = [
    "hello world",
    "def main():\n    print('hello world')\t# greeting",
    "line one\nline two\n\nline four\n",
    "\nstarts with a newline",
    "\ttab first\tand\t\ttwo tabs",
    "我是人工智能助手\n晚上睡不着应该怎么办",
    "你好👋 emoji 🚀 and 中文 mixed",
    "rare chars fall back to bytes: 鑫 Ω ß",
    "  two leading spaces and two trailing  ",
    "\n\n",
    "",
] + [f"a{' ' * n}b" for n in range(1, 101)] + [" " * n + "x" + " " * n for n in range(2, 101, 7)]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: ChatGLMTokenizer, text: str):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        # NFKC folds full-width punctuation, as the real model does (spec §1.9).
        ("你好，世界！", "你好,世界!"),
        # remove_extra_whitespaces drops a single leading/trailing space. Runs of >= 2 spaces
        # survive because they are rewritten to <|blank_n|> before SentencePiece sees them, but a
        # remainder of one space after <|blank_80|> at the end is dropped.
        (" x ", "x"),
        ("x" + " " * 81, "x" + " " * 80),
        # "▁" is SentencePiece's own space marker.
        ("a\u2581b", "a b"),
        # Literal placeholders are indistinguishable from the whitespace they stand for (official
        # behaviour too).
        ("a<n>b<|tab|>c<|blank_3|>d", "a\nb\tc   d"),
    ],
)
def test_round_trip_limits(tok: ChatGLMTokenizer, text: str, decoded: str):
    assert tok.decode(tok.encode(text)) == decoded


# --- 2. the space-run rule -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spaces", "pieces"),
    [
        (1, []),
        (2, ["<|blank_2|>"]),
        (79, ["<|blank_79|>"]),
        (80, ["<|blank_80|>"]),
        (81, ["<|blank_80|>"]),
        (85, ["<|blank_80|>", "<|blank_5|>"]),
        (162, ["<|blank_80|>", "<|blank_80|>", "<|blank_2|>"]),
    ],
)
def test_space_runs(tok: ChatGLMTokenizer, spaces: int, pieces: list[str]):
    # "a" and "b" are single characters, so the pieces spell out exactly what SentencePiece saw.
    lone_space = "\u2581" if spaces % 80 == 1 else ""  # a lone remaining space stays a space
    assert "".join(tok.tokenize("a" + " " * spaces + "b")) == (
        "\u2581a" + "".join(pieces) + lone_space + "b"
    )


def test_preprocess_matches_the_official_loop():
    rng = random.Random(0)
    alphabet = [" "] * 6 + ["\n", "\t", "x", "中"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
        assert preprocess(text) == _official_preprocess(text)
    for n in range(0, 250):
        assert preprocess(" " * n) == _official_preprocess(" " * n)


# --- 3. special-id layout ------------------------------------------------------------------------

def test_special_ids_follow_the_real_layout(tok: ChatGLMTokenizer):
    ids = tok.convert_tokens_to_ids
    base = tok.mask_token_id  # 130000 in the real model
    assert [ids(p) - base for p in SPECIALS] == list(range(8))
    assert (tok.gmask_token_id, tok.smask_token_id) == (base + 1, base + 2)
    assert (tok.bos_token_id, tok.eos_token_id) == (base + 4, base + 5)
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<sop>", "<eop>"]
    assert tok.pad_token_id == ids("<pad>") == 3
    assert ids("<n>") == 4
    tab = ids("<|tab|>")  # 130008
    assert tab == base + 8
    for n in range(2, 81):
        assert ids(blank_piece(n)) == tab + n - 1  # blank_n = 130007 + n
    assert ids("<0x00>") == tab + 80  # 130088
    assert tok.vocab_size == ids("<0xFF>") + 1


def test_encode_appends_gmask_sop(tok: ChatGLMTokenizer):
    plain = tok.encode("你好", add_special_tokens=False)
    assert tok.encode("你好") == plain + [tok.gmask_token_id, tok.bos_token_id]


def test_pair_encoding(tok: ChatGLMTokenizer):
    a, b = [10, 11], [12]
    g, sop, eop = tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id
    assert tok.build_inputs_with_special_tokens(a) == [10, 11, g, sop]
    assert tok.build_inputs_with_special_tokens(a, b) == [10, 11, g, sop, 12, eop]
    assert a == [10, 11] and b == [12]  # inputs are not modified


def test_encode_batch_is_encode_per_text(tok: ChatGLMTokenizer):
    texts = ["你好", "def f():\n    return 1", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [
        tok.encode(t, add_special_tokens=False) for t in texts
    ]


def test_special_pieces_in_text_are_not_specials(tok: ChatGLMTokenizer):
    # Control pieces are never matched in text, so typed "[gMASK]" cannot fake a mask token.
    ids = tok.encode("[gMASK]<sop>", add_special_tokens=False)
    assert tok.gmask_token_id not in ids and tok.bos_token_id not in ids


# --- 4. worked examples of spec §1.3 that do not depend on the vocabulary -------------------------

def test_code_example(tok: ChatGLMTokenizer):
    ids = tok.encode("def main():\n    print('hello world')\t# greeting")
    ids_of = tok.convert_tokens_to_ids
    nl, blank4, tab = ids_of("<n>"), ids_of("<|blank_4|>"), ids_of("<|tab|>")
    assert ids.count(nl) == ids.count(blank4) == ids.count(tab) == 1
    assert ids[ids.index(nl) + 1] == blank4  # "\n    print" -> <n> <|blank_4|> ...
    assert ids.index(nl) < ids.index(tab)
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]


def test_chat_prompt_example(tok: ChatGLMTokenizer):
    prompt = (
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n"
        "[Round 1]\n问：晚上睡不着应该怎么办\n答："
    )
    ids = tok.encode(prompt)
    assert ids.count(tok.convert_tokens_to_ids("<n>")) == prompt.count("\n") == 5
    byte0 = tok.convert_tokens_to_ids("<0x00>")  # 130088 in the real model
    emoji = [byte0 + b for b in "👋".encode()]  # F0 9F 91 8B
    assert any(ids[i:i + 4] == emoji for i in range(len(ids)))
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]


def test_dummy_prefix(tok: ChatGLMTokenizer):
    # "你好" -> "▁"(5) + "你好" in the real model: SentencePiece adds a leading "▁".
    assert tok.tokenize("你好")[0].startswith("\u2581")


# --- decode --------------------------------------------------------------------------------------

def test_decode_drops_pad_and_control_pieces(tok: ChatGLMTokenizer):
    ids = tok.encode("你好\n  x", add_special_tokens=False)
    padded = [tok.pad_token_id] * 3 + ids + [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(padded) == "你好\n  x"
    assert tok.decode(ids + [tok.eos_token_id]) == "你好\n  x"
    assert tok.decode([]) == ""


def test_decode_accepts_numpy_ints(tok: ChatGLMTokenizer):
    ids = tok.encode("hello world")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "hello world"


def test_decode_split_byte_sequence(tok: ChatGLMTokenizer):
    ids = tok.encode("👋", add_special_tokens=False)
    assert tok.decode(ids) == "👋"
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # incomplete UTF-8 is replaced, not raised


def test_decode_clean_up_tokenization_spaces(tok: ChatGLMTokenizer):
    ids = tok.encode("Hello , world ! It 's fine .")
    assert tok.decode(ids) == "Hello , world ! It 's fine ."
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "Hello, world! It's fine."


# --- 5. errors -----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        ChatGLMTokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "ice_text.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        ChatGLMTokenizer(bad)


@pytest.mark.parametrize("piece", ["<sop>", "<|blank_80|>"])
def test_model_without_required_piece(tmp_path, piece: str):
    path = tmp_path / "ice_text.model"
    path.write_bytes(_train_model_proto(drop=piece))
    with pytest.raises(ValueError, match=f"lacks the required piece '{piece}'".replace("|", r"\|")):
        ChatGLMTokenizer(path)


def test_unknown_token_and_bad_id(tok: ChatGLMTokenizer):
    with pytest.raises(ValueError, match="unknown token 'no-such-piece'"):
        tok.convert_tokens_to_ids("no-such-piece")
    assert tok.convert_tokens_to_ids("<unk>") == 0
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tok.convert_ids_to_tokens(-1)


# --- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_tok() -> ChatGLMTokenizer:
    path = os.environ.get("CHATGLM_TOKENIZER")
    if not path:
        pytest.skip("set CHATGLM_TOKENIZER to the real ice_text.model (file or directory)")
    return ChatGLMTokenizer.from_pretrained(path)


def test_real_model_vectors(real_tok: ChatGLMTokenizer):
    tok = real_tok
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id) == (130000, 130001, 130002)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (130004, 130005, 3)
    assert tok.encode("你好") == [5, 74874, 130001, 130004]
    assert tok.encode("def main():\n    print('hello world')\t# greeting") == [
        1616, 594, 125936, 4, 130011, 2274, 89, 7283, 398, 125686, 130008, 61, 25672,
        130001, 130004,
    ]
    prompt = (
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n"
        "[Round 1]\n问：晚上睡不着应该怎么办\n答："
    )
    assert tok.encode(prompt) == [
        53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4, 67342, 12, 74874, 130328, 130247, 130233,
        130227, 35, 65806, 68241, 75890, 14132, 5388, 340, 11, 21, 222, 6, 76693, 66877, 63852,
        6, 66430, 68747, 102501, 63823, 4, 52, 6945, 5, 9, 42, 4, 64286, 12, 65450, 83400,
        64213, 66846, 4, 67342, 12, 130001, 130004,
    ]
