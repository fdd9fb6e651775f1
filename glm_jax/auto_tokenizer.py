"""The tokenizer a checkpoint directory needs, chosen from its model family and files.

ChatGLM-6B reads `ice_text.model`; ChatGLM2 and ChatGLM3 share one model config and one SentencePiece
`tokenizer.model` (ChatGLM3 adds role tokens after the specials); GLM-4 reads a tiktoken rank file,
also named `tokenizer.model`, in both its remote-code layout (model_type "chatglm", like ChatGLM2)
and the `transformers` native one. So the choice is made, in order, from:

* the model family (`GLMConfig.family`): "chatglm" -> ChatGLM-6B, "glm4_hf" -> GLM-4;
* for the "chatglm2" family, the vocabulary file itself (a rank file of base64 tokens -> GLM-4), then
  the directory's ChatGLM3 signs: its remote tokenizer code (`tokenization_chatglm.py`) defines the
  role tokens, or `config.json` / `tokenizer_config.json` names a chatglm3 model. Otherwise ChatGLM2.

`kind` overrides the guess (`auto` = guess). A missing file is one clear error naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from glm_jax import converted
from glm_jax.config import GLMConfig, from_hf_config
from glm_jax.hf_io import read_hf_config
from glm_jax.tokenizer import (
    CHATGLM2_VOCAB_FILE, GLM4_VOCAB_FILE, VOCAB_FILE, ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer,
    GLM4Tokenizer,
)

TOKENIZER_KINDS = ("auto", "chatglm", "chatglm2", "chatglm3", "glm4")
_CLASSES = {"chatglm": ChatGLMTokenizer, "chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLM3Tokenizer,
            "glm4": GLM4Tokenizer}
_FILES = {"chatglm": VOCAB_FILE, "chatglm2": CHATGLM2_VOCAB_FILE, "chatglm3": CHATGLM2_VOCAB_FILE,
          "glm4": GLM4_VOCAB_FILE}
_NAMES = {"chatglm": "ChatGLM-6B (SentencePiece)", "chatglm2": "ChatGLM2 (SentencePiece)",
          "chatglm3": "ChatGLM3 (SentencePiece)", "glm4": "GLM-4 (tiktoken rank file)"}
_REMOTE_TOKENIZER_CODE = "tokenization_chatglm.py"


def model_config(model_dir: str) -> GLMConfig:
    """The model config of a converted or official checkpoint directory, without reading weights."""
    if converted.is_converted_checkpoint(model_dir):
        return converted.read_glm_config(model_dir)
    return from_hf_config(read_hf_config(model_dir))


def is_rank_file(path: str) -> bool:
    """Whether `path` starts like a GLM-4 rank file (`base64(token) rank` lines) rather than a
    SentencePiece model (binary protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _names_chatglm3(directory: str) -> bool:
    code = os.path.join(directory, _REMOTE_TOKENIZER_CODE)
    if os.path.isfile(code):
        with open(code, encoding="utf-8", errors="replace") as f:
            if "<|observation|>" in f.read():
                return True
    for name in ("config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if any("chatglm3" in str(values.get(key, "")).lower() for key in ("_name_or_path", "name_or_path")):
            return True
    return False


def _vocab_path(kind: str, tokenizer_path: str) -> str:
    """The vocabulary file of `kind` given a file or a directory; FileNotFoundError naming it."""
    path = os.path.join(tokenizer_path, _FILES[kind]) if os.path.isdir(tokenizer_path) else tokenizer_path
    if not os.path.isfile(path):
        hint = ""
        if kind == "glm4" and os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json")):
            hint = (" (this directory has the fast tokenizer.json of the transformers layout, which is not read here; "
                    "point --tokenizer at the tokenizer.model of THUDM/glm-4-9b-chat)")
        raise FileNotFoundError(f"the {_NAMES[kind]} tokenizer file {path} does not exist{hint}; "
                                "pass --tokenizer=FILE or a directory holding it")
    return path


def detect_tokenizer_kind(model_dir: str, family: str, tokenizer_path: str | None = None) -> str:
    """The tokenizer kind ("chatglm", "chatglm2", "chatglm3" or "glm4") of a model directory."""
    if family == "chatglm":
        return "chatglm"
    if family == "glm4_hf":
        return "glm4"
    if family != "chatglm2":
        raise ValueError(f"model family {family!r} has no chat tokenizer here (ChatGLM-6B, ChatGLM2/3 and GLM-4 do)")
    vocab = _vocab_path("chatglm2", tokenizer_path or model_dir)
    if is_rank_file(vocab):
        return "glm4"
    directories = {model_dir, os.path.dirname(vocab)}
    return "chatglm3" if any(_names_chatglm3(d) for d in directories) else "chatglm2"


def load_tokenizer(model_dir: str, *, family: str, tokenizer_path: str | None = None, kind: str = "auto") -> Any:
    """The tokenizer of `model_dir` (or of `tokenizer_path`, a file or directory), of `kind`
    ("auto": detected from `family` and the files)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    if kind == "auto":
        kind = detect_tokenizer_kind(model_dir, family, tokenizer_path)
    return _CLASSES[kind](_vocab_path(kind, tokenizer_path or model_dir))


def tokenizer_mismatches(tokenizer: Any, config: GLMConfig) -> list[str]:
    """What makes `tokenizer` wrong for a model of `config` (empty when it fits): special ids the
    prompts are built with, stop ids, and a vocabulary larger than the embedding."""
    if isinstance(tokenizer, ChatGLMTokenizer):
        pairs = {
            "bos (<sop>)": (tokenizer.bos_token_id, config.bos_token_id),
            "eos (<eop>)": (tokenizer.eos_token_id, config.eos_token_id),
            "[MASK]": (tokenizer.mask_token_id, config.mask_token_id),
            "[gMASK]": (tokenizer.gmask_token_id, config.gmask_token_id),
        }
    else:
        pairs = {"eos": (tokenizer.eos_token_id, config.eos_token_id),
                 "pad": (tokenizer.pad_token_id, config.pad_token_id)}
        if config.extra_stop_token_ids:  # GLM-4 configs list <|user|> and <|observation|> as stop ids
            pairs["stop ids"] = (tuple(tokenizer.stop_token_ids), (config.eos_token_id, *config.extra_stop_token_ids))
    wrong = [f"{name}: tokenizer {tok} vs config {conf}" for name, (tok, conf) in pairs.items() if tok != conf]
    if tokenizer.vocab_size > config.vocab_size:
        wrong.append(f"vocabulary: tokenizer {tokenizer.vocab_size} > model {config.vocab_size}")
    return wrong
