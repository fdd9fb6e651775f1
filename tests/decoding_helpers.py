"""A tiny chat model for the generation / chat / CLI tests: a small SentencePiece vocabulary laid out
like ChatGLM-6B's, and a random ChatGLM-6B-shaped checkpoint whose special ids match it."""

from __future__ import annotations

import pathlib

import pytest

from glm_jax import load_pretrained, preset
from glm_jax.config import GLMConfig
from glm_jax.testing_checkpoints import write_random_hf_checkpoint
from glm_jax.tokenizer import VOCAB_FILE, ChatGLMTokenizer, train_chatglm_sentencepiece

CORPUS = [
    "你好，世界！我是人工智能助手，很高兴见到你。",
    "晚上睡不着应该怎么办？可以试试听音乐、看书或者散步。",
    "今天天气很好：我们去公园散步吧；好不好?",
    "Hello, how are you today? I am fine, thank you. It's a nice day, isn't it!",
    "She said that it wasn't raining anymore ; they're going out .",
    "def main():\n    print('hello world')\t# greeting",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 and 2023. Emoji 👋 🚀 ok",
    "[Round 0]\n问：你好\n答：你好👋！\n[Round 1]\n问：你是谁\n答：",
]


def tokenizer_config(tok: ChatGLMTokenizer, **overrides) -> GLMConfig:
    """The tiny ChatGLM-6B preset with the vocabulary and special ids of `tok`."""
    return preset("chatglm-tiny").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id,
        **overrides,
    )


def write_chat_model(directory: pathlib.Path) -> pathlib.Path:
    """A loadable model directory (random float32 checkpoint + ice_text.model)."""
    vocab_file = directory.with_name(directory.name + "." + VOCAB_FILE)
    train_chatglm_sentencepiece(CORPUS, vocab_size=520, model_file=vocab_file)
    tok = ChatGLMTokenizer(vocab_file)
    write_random_hf_checkpoint(tokenizer_config(tok), str(directory), seed=1, dtype="float32")
    vocab_file.rename(directory / VOCAB_FILE)
    return directory


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_chat_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="session")
def chat_tok(chat_model_dir) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(chat_model_dir)


@pytest.fixture(scope="session")
def chat_model(chat_model_dir):
    return load_pretrained(str(chat_model_dir))
