"""ChatGLM3 / GLM-4 role-token chat (and ChatGLM2's text chat) through `glm_jax.chat`, on tiny random
models with small vocabularies.

References are written from the official code, not from this project's: the ChatGLM3 prompt layout
(spec §2.4: `[gMASK] sop`, then per message `<|role|>` + encode("\\n") + encode(content), ending with
`<|assistant|>`) and GLM-4's (`[gMASK]<sop><|user|>\\n{q}<|assistant|>`, hand-tokenized with the rank
file of `test_tokenizer_glm2_glm4`); the official decoders (`official_decode_*`: SentencePiece
`DecodePieces` over the pieces with specials by name and eos/bos/pad as nothing; GLM-4's byte runs);
ChatGLM3's `process_response` (`official_process_response`, transcribed; tool calls keep their raw
content instead of being `eval`ed) and ChatGLM2's (strip, training date); and the stop ids
[eos, <|user|>, <|observation|>]. New token ids come from `glm_jax.generate` run without stop ids, so
the tests also show that chat stops where the official stop list says.
"""

from __future__ import annotations

import copy
import random
import shutil

import flax
import jax
import numpy as np
import pytest

from glm_jax import GLMForCausalLM, generate, load_pretrained, preset
from glm_jax.chat import chat, default_settings, prepare_turn, stream_chat
from glm_jax.chat_messages import AnswerStream
from glm_jax.testing_checkpoints import write_random_hf_checkpoint
from glm_jax.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, GLM4Tokenizer
from test_tokenizer_glm2_glm4 import MERGES, sp, sp_file, write_ranks  # noqa: F401 (fixtures)

STEPS = 20
ROLE_NAMES = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
              "<|observation|>"]
GLM4_NAMES = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
              "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>"]
GLM4_TOKENS = [bytes([b]) for b in range(256)] + MERGES
G4 = {name: len(GLM4_TOKENS) + i for i, name in enumerate(GLM4_NAMES)}


# ------------------------------------------------------------------------------ official references


def official_decode_chatglm3(sp, ids):  # noqa: F811
    """ChatGLM3's `tokenizer.decode`: `convert_id_to_token` (specials by name, eos/bos/pad -> "") then
    SentencePiece `DecodePieces` over all of them."""
    n = sp.GetPieceSize()
    pieces = [ROLE_NAMES[i - n] if i >= n else "" if i in (0, 1, 2) else sp.IdToPiece(i) for i in ids]
    return sp.DecodePieces(pieces)


def official_decode_glm4(ids):
    """GLM-4's `convert_tokens_to_string`: byte tokens joined and decoded (errors replaced), specials by name."""
    text, run = "", b""
    for i in ids:
        if i >= len(GLM4_TOKENS):
            text, run = text + run.decode("utf-8", errors="replace") + GLM4_NAMES[i - len(GLM4_TOKENS)], b""
        else:
            run += GLM4_TOKENS[i]
    return text + run.decode("utf-8", errors="replace")


def official_process_response(output, history):
    """ChatGLM3's `process_response` (tool calls: raw content instead of the `eval`ed call)."""
    content = ""
    history = copy.deepcopy(history)
    for response in output.split("<|assistant|>"):
        if "\n" in response:
            metadata, content = response.split("\n", maxsplit=1)
        else:
            metadata, content = "", response
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
    return content, history


def until_stop(tokens, stop_ids, *, required=True):
    """The official `outputs[len(prompt):-1]` after a stop: the new tokens before the first stop token
    (at the length limit the official code drops the last real token too; chat here keeps it)."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    assert cut is not None or not required, f"no stop token {stop_ids} among {tokens}: the test model must make one"
    return tokens[:cut]


def stopping_params(model, params, prompt, stop_id):
    """`params` changed so that greedy decoding of `prompt` soon chooses `stop_id`: its output column
    becomes 1.05x the column of the token chosen most often (it wins wherever that one would with a
    positive logit)."""
    tokens = generate(model, params, [prompt], max_new_tokens=STEPS, stop_ids=())[0]
    common = max(set(tokens), key=tokens.count)
    params = jax.tree.map(np.array, flax.linen.unbox(params))
    kernel = params["output_layer"]["kernel"]
    kernel[:, stop_id] = 1.05 * kernel[:, common]
    return params


# ------------------------------------------------------------------------------------------ ChatGLM3


@pytest.fixture(scope="module")
def ids3(sp):  # noqa: F811
    n = sp.GetPieceSize()
    return dict(gmask=n + 1, sop=n + 3, system=n + 5, user=n + 6, assistant=n + 7, observation=n + 8,
                nl=sp.EncodeAsIds("\n"))


@pytest.fixture(scope="module")
def glm3_dir(sp, sp_file, tmp_path_factory):  # noqa: F811
    """A ChatGLM3 checkpoint directory: ChatGLM2 architecture, SentencePiece tokenizer.model and the
    official remote tokenizer code (here only the line naming its special tokens)."""
    directory = tmp_path_factory.mktemp("chatglm3") / "model"
    write_random_hf_checkpoint(preset("chatglm2-tiny", vocab_size=sp.GetPieceSize() + 9), str(directory), seed=5,
                               dtype="float32")
    shutil.copy(sp_file, directory / "tokenizer.model")
    (directory / "tokenization_chatglm.py").write_text(f"special_tokens = {ROLE_NAMES!r}\n")
    return directory


@pytest.fixture(scope="module")
def glm3(glm3_dir):
    model, params = load_pretrained(str(glm3_dir))
    return model, params, ChatGLM3Tokenizer(glm3_dir / "tokenizer.model")


def prompt3(sp, ids3, messages):  # noqa: F811
    """The official ChatGLM3 `build_chat_input` ids of `messages` (the last one is the query)."""
    ids = [ids3["gmask"], ids3["sop"]]
    for m in messages:
        ids += [ids3[m["role"]], *ids3["nl"], *sp.EncodeAsIds(m["content"])]
    return ids + [ids3["assistant"]]


def test_chatglm3_chat_prompt_stop_and_history_follow_the_official_code(glm3, sp, ids3):  # noqa: F811
    model, params, tok = glm3
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
               {"role": "assistant", "content": "你好👋"}]
    query = "今天天气很好"
    prompt = prompt3(sp, ids3, history + [{"role": "user", "content": query}])
    stopping = stopping_params(model, params, prompt, ids3["user"])
    raw = generate(model, stopping, [prompt], max_new_tokens=STEPS, stop_ids=())[0]
    answer = until_stop(raw, (2, ids3["user"], ids3["observation"]))
    turn = history + [{"role": "user", "content": query}]
    expected = official_process_response(official_decode_chatglm3(sp, answer), turn)

    settings = dict(do_sample=False, max_length=len(prompt) + STEPS, reserve_tokens=1)
    assert chat(model, stopping, tok, query, history, **settings) == expected
    items = list(stream_chat(model, stopping, tok, query, history, **settings))
    assert "".join(piece for piece, _ in items) == expected[0]
    assert items[-1][1] == expected[1]


def test_chatglm3_observation_role_and_pair_history(glm3, sp, ids3):  # noqa: F811
    model, params, tok = glm3
    query = '{"temperature": 22}'
    prompt = prompt3(sp, ids3, [{"role": "user", "content": "天气"}, {"role": "assistant", "content": "晴"},
                                {"role": "observation", "content": query}])
    raw = generate(model, params, [prompt], max_new_tokens=8, stop_ids=())[0]
    answer = until_stop(raw, (2, ids3["user"], ids3["observation"]), required=False)
    history = [{"role": "user", "content": "天气"}, {"role": "assistant", "content": "晴"}]
    turn = history + [{"role": "observation", "content": query}]
    expected = official_process_response(official_decode_chatglm3(sp, answer), turn)
    got = chat(model, params, tok, query, [("天气", "晴")], role="observation", do_sample=False,
               max_length=len(prompt) + 8, reserve_tokens=1)
    assert got == expected


def test_role_chat_defaults_and_truncation(glm3, sp, ids3):  # noqa: F811
    model, _, tok = glm3
    turn = prepare_turn(model, tok, "q", [], {}, 256)
    # ChatGLM3 chat(): max_length 8192, top_p 0.8, temperature 0.8 (spec §2.4), capped by the context;
    # transformers' top_k 50; eos_token_id = [eos, <|user|>, <|observation|>].
    assert turn.settings == dict(max_length=min(8192, model.config.max_sequence_length), do_sample=True, top_p=0.8,
                                 temperature=0.8, top_k=50, stop_ids=(2, ids3["user"], ids3["observation"]))
    assert default_settings("chatglm")["top_p"] == 0.7
    system = {"role": "system", "content": "Be brief."}
    rounds = [[{"role": "user", "content": f"问题{i}今天天气很好"}, {"role": "assistant", "content": f"回答{i}我们去公园散步吧"},
               {"role": "observation", "content": f"{i}"}] for i in range(4)]
    history = [system] + [m for r in rounds for m in r]
    kept_two = [system] + rounds[2] + rounds[3]
    size = len(prompt3(sp, ids3, kept_two + [{"role": "user", "content": "你好"}]))
    turn = prepare_turn(model, tok, "你好", history, dict(max_length=size + 1), 1)
    assert turn.kept == kept_two  # whole rounds dropped, oldest first, the system message kept
    assert turn.ids == prompt3(sp, ids3, kept_two + [{"role": "user", "content": "你好"}])
    query = "今天天气很好，" * 30 + "晚上睡不着应该怎么办"
    turn = prepare_turn(model, tok, query, history, dict(max_length=30), 10)  # room for 30 - 10 = 20 tokens
    assert turn.kept == []

    def query_end(k):
        return prompt3(sp, ids3, [{"role": "user", "content": query[len(query) - k:]}])

    kept = next(k for k in range(len(query), 0, -1) if query_end(k) == turn.ids)  # an end of the query
    assert len(query_end(kept)) <= 20 < len(query_end(kept + 1))  # the longest end that fits
    with pytest.raises(ValueError, match="role 'tool'"):
        prepare_turn(model, tok, "q", [], {}, 1, role="tool")
    with pytest.raises(ValueError, match="history\\[0\\] has role 'bot'"):
        prepare_turn(model, tok, "q", [{"role": "bot", "content": "x"}], {}, 1)


def answer_pieces(tok, ids, stop_ids, sizes):
    stream = AnswerStream(tok, stop_ids)
    pieces, at = [], 0
    for size in sizes:
        pieces.append(stream.feed(ids[at:at + size]))
        at += size
        if at >= len(ids):
            break
    return pieces + [stream.finish()], stream


def test_answer_stream_reads_answers_like_the_official_code(glm3, sp, ids3):  # noqa: F811
    _, _, tok = glm3
    stops = (2, ids3["user"], ids3["observation"])
    plain = ids3["nl"] + sp.EncodeAsIds("  你好👋！我是人工智能助手，我出生于[[训练时间]]。 ") + [ids3["user"]]
    call = "```python\ntool_call(city='北京')\n```"
    tool = sp.EncodeAsIds("get_weather\n") + sp.EncodeAsIds(call) + [ids3["observation"]]
    two = ids3["nl"] + sp.EncodeAsIds("让我查一下") + [ids3["assistant"]] + tool
    for ids in (plain, tool, two):
        response, messages = official_process_response(official_decode_chatglm3(sp, ids[:-1]), [])
        pieces, stream = answer_pieces(tok, ids, stops, [1] * len(ids))
        assert (stream.response, stream.messages) == (response, messages)
        if ids is not two:
            assert "".join(pieces) == response
        assert all("\ufffd" not in piece and "[[" not in piece for piece in pieces)
    assert official_process_response(official_decode_chatglm3(sp, plain[:-1]), [])[0] == "你好👋！我是人工智能助手，我出生于2023年。"
    # Two segments: the stream carries on with the second; the history holds both, as the official split.
    _, (first, second) = official_process_response(official_decode_chatglm3(sp, two[:-1]), [])
    assert first["content"] == "让我查一下" and second["metadata"].strip() == "get_weather"
    assert "".join(answer_pieces(tok, two, stops, [1] * len(two))[0]) == first["content"] + second["content"]


def test_answer_stream_on_random_ids_never_takes_text_back(glm3, sp, ids3):  # noqa: F811
    _, _, tok = glm3
    rng = random.Random(0)
    text_ids = list(range(3, sp.GetPieceSize())) + ids3["nl"] * 40  # base pieces, many newlines
    for _ in range(150):
        ids = [rng.choice(text_ids) for _ in range(rng.randrange(1, 25))]
        sizes = [rng.randrange(1, 4) for _ in ids]
        response, messages = official_process_response(official_decode_chatglm3(sp, ids), [])
        pieces, stream = answer_pieces(tok, ids, (), sizes)
        assert (stream.response, stream.messages) == (response, messages), ids
        assert "".join(pieces) == response, ids  # one segment: the pieces add up to the response


# ------------------------------------------------------------------------------------------- ChatGLM2


def test_chatglm2_chat_uses_its_official_prompt_and_response(sp, sp_file):  # noqa: F811
    n = sp.GetPieceSize()
    model = GLMForCausalLM(preset("chatglm2-tiny", vocab_size=n + 5))
    params = model.init(jax.random.PRNGKey(3), np.zeros((1, 4), np.int32))["params"]
    tok = ChatGLM2Tokenizer(sp_file)
    prompt = [n + 1, n + 3, *sp.EncodeAsIds("[Round 1]\n\n问：你好\n\n答：")]
    raw = generate(model, params, [prompt], max_new_tokens=12)[0]  # stops at eos (2), as the official chat
    expected = official_decode_chatglm3(sp, raw).strip().replace("[[训练时间]]", "2023年")
    settings = dict(do_sample=False, max_length=len(prompt) + 12, reserve_tokens=1)
    assert chat(model, params, tok, "你好", **settings) == (expected, [("你好", expected)])
    assert "".join(p for p, _ in stream_chat(model, params, tok, "你好", **settings)) == expected
    assert prepare_turn(model, tok, "你好", [], {}, 256).settings == dict(
        max_length=min(8192, model.config.max_sequence_length), do_sample=True, top_p=0.8, temperature=0.8, top_k=50)
    with pytest.raises(ValueError, match="only role-token chats"):
        chat(model, params, tok, "x", role="observation")


# -------------------------------------------------------------------------------------------- GLM-4


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm4")
    tok = GLM4Tokenizer(write_ranks(directory / "tokenizer.model", GLM4_TOKENS))
    cfg = preset("glm4-tiny", vocab_size=len(GLM4_TOKENS) + len(GLM4_NAMES), eos_token_id=G4["<|endoftext|>"],
                 extra_stop_token_ids=(G4["<|user|>"], G4["<|observation|>"]), pad_token_id=G4["<|endoftext|>"])
    model = GLMForCausalLM(cfg)
    return model, model.init(jax.random.PRNGKey(4), np.zeros((1, 4), np.int32))["params"], tok


def test_glm4_chat_prompt_stop_and_history(glm4):
    model, params, tok = glm4
    # "\nhello world" -> "\n" | "hello" | " world" = [10, 259, 264]; "\nhello" = [10, 259] (rank file by hand)
    prompt = [G4["[gMASK]"], G4["<sop>"], G4["<|system|>"], 10, 259, 264, G4["<|user|>"], 10, 259, G4["<|assistant|>"]]
    stopping = stopping_params(model, params, prompt, G4["<|observation|>"])
    raw = generate(model, stopping, [prompt], max_new_tokens=STEPS, stop_ids=())[0]
    answer = until_stop(raw, (G4["<|endoftext|>"], G4["<|user|>"], G4["<|observation|>"]))
    history = [{"role": "system", "content": "hello world"}]
    expected = official_process_response(official_decode_glm4(answer), history + [{"role": "user", "content": "hello"}])
    settings = dict(do_sample=False, max_length=len(prompt) + STEPS, reserve_tokens=1)
    assert chat(model, stopping, tok, "hello", history, **settings) == expected
    items = list(stream_chat(model, stopping, tok, "hello", history, **settings))
    assert items[-1][1] == expected[1]
