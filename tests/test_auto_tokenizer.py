"""Which tokenizer (and so which chat format) a checkpoint directory gets, the errors when its files
are missing, and glm-chat end to end on a ChatGLM3 directory.

ChatGLM2 and ChatGLM3 share their model config (spec §2.1: the ChatGLM3 config.json differs only in
`_name_or_path`); ChatGLM3's remote tokenizer code defines the role tokens; GLM-4's remote-code
config is a ChatGLM2-style config with `eos_token_id` [151329, 151336, 151338] and a tiktoken rank
file as `tokenizer.model` (spec §2.1, §2.4).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import pytest

from glm_jax import preset
from glm_jax.auto_tokenizer import detect_tokenizer_kind, load_tokenizer, model_config, tokenizer_mismatches
from glm_jax.chat import chat
from glm_jax.cli import load_model_and_tokenizer
from glm_jax.config import to_hf_config
from glm_jax.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, GLM4Tokenizer
from test_chat_roles import GLM4_TOKENS, ROLE_NAMES, glm3_dir  # noqa: F401 (fixture)
from test_tokenizer_glm2_glm4 import sp, sp_file, write_ranks  # noqa: F401 (fixtures)

CHATGLM3_REMOTE_CODE = f"special_tokens = {ROLE_NAMES!r}\n"


def config_dir(tmp_path, name, hf_config, **files):
    """A directory with `config.json` and the given files (name -> bytes, or a path to copy)."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config))
    for file, content in files.items():
        if isinstance(content, bytes):
            (directory / file.replace("__", ".")).write_bytes(content)
        else:
            shutil.copy(content, directory / file.replace("__", "."))
    return str(directory)


def chatglm2_config(**changes):
    return dict(to_hf_config(preset("chatglm2-tiny")), **changes)


def test_chatglm2_and_chatglm3_are_told_apart_by_their_files(tmp_path, sp_file):  # noqa: F811
    plain = config_dir(tmp_path, "v2", chatglm2_config(), tokenizer__model=sp_file)
    code = config_dir(tmp_path, "v3code", chatglm2_config(), tokenizer__model=sp_file,
                      tokenization_chatglm__py=CHATGLM3_REMOTE_CODE.encode())
    named = config_dir(tmp_path, "v3name", chatglm2_config(_name_or_path="THUDM/chatglm3-6b"), tokenizer__model=sp_file)
    assert [model_config(d).family for d in (plain, code, named)] == ["chatglm2"] * 3
    assert type(load_tokenizer(plain, family="chatglm2")) is ChatGLM2Tokenizer
    assert type(load_tokenizer(code, family="chatglm2")) is ChatGLM3Tokenizer
    assert type(load_tokenizer(named, family="chatglm2")) is ChatGLM3Tokenizer
    assert type(load_tokenizer(plain, family="chatglm2", kind="chatglm3")) is ChatGLM3Tokenizer  # override
    # --tokenizer pointing at a ChatGLM3 directory decides too
    assert detect_tokenizer_kind(plain, "chatglm2", tokenizer_path=code) == "chatglm3"


def test_glm4_in_both_layouts_gets_the_rank_file_tokenizer(tmp_path):
    ranks = write_ranks(tmp_path / "ranks.model", GLM4_TOKENS)
    n = len(GLM4_TOKENS)
    remote = chatglm2_config(eos_token_id=[n, n + 7, n + 9], pad_token_id=n, padded_vocab_size=n + 14)
    remote_dir = config_dir(tmp_path, "glm4_remote", remote, tokenizer__model=ranks)
    cfg = model_config(remote_dir)
    assert (cfg.family, cfg.eos_token_id, cfg.extra_stop_token_ids) == ("chatglm2", n, (n + 7, n + 9))
    assert to_hf_config(cfg)["eos_token_id"] == [n, n + 7, n + 9]
    tok = load_tokenizer(remote_dir, family=cfg.family)
    assert type(tok) is GLM4Tokenizer and tokenizer_mismatches(tok, cfg) == []
    native = preset("glm4-tiny", vocab_size=n + 14, eos_token_id=n, extra_stop_token_ids=(n + 7, n + 9), pad_token_id=n)
    native_dir = config_dir(tmp_path, "glm4_native", to_hf_config(native), tokenizer__model=ranks)
    assert model_config(native_dir).family == "glm4_hf"
    assert type(load_tokenizer(native_dir, family="glm4_hf")) is GLM4Tokenizer
    wrong = tokenizer_mismatches(tok, native.replace(extra_stop_token_ids=(n + 7,)))
    assert wrong == [f"stop ids: tokenizer {(n, n + 7, n + 9)} vs config {(n, n + 7)}"]


def test_missing_or_wrong_tokenizer_files_are_named(tmp_path, sp_file):  # noqa: F811
    native = config_dir(tmp_path, "glm4_hf_fast_only", to_hf_config(preset("glm4-tiny")), tokenizer__json=b"{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model does not exist .*tokenizer.json of the transformers"):
        load_tokenizer(native, family="glm4_hf")
    empty = config_dir(tmp_path, "v3_without_tokenizer", chatglm2_config(_name_or_path="THUDM/chatglm3-6b"))
    with pytest.raises(FileNotFoundError, match="ChatGLM2 \\(SentencePiece\\) tokenizer file .*tokenizer.model"):
        load_tokenizer(empty, family="chatglm2")
    with pytest.raises(FileNotFoundError, match="ChatGLM-6B \\(SentencePiece\\) tokenizer file .*ice_text.model"):
        load_tokenizer(empty, family="chatglm")
    with pytest.raises(ValueError, match="model family 'glm130b' has no chat tokenizer"):
        load_tokenizer(empty, family="glm130b")
    v3 = ChatGLM3Tokenizer(sp_file)
    wrong = tokenizer_mismatches(v3, preset("glm4-tiny"))
    assert wrong[0].startswith("eos: tokenizer 2 vs config 1500")


def flags_for(model_dir, **values):
    return types.SimpleNamespace(**dict(dict(model=str(model_dir), tokenizer=None, tokenizer_kind="auto",
                                             dtype="float32", param_dtype=None, prefix=None), **values))


def test_cli_loading_picks_the_chatglm3_tokenizer_and_checks_it(glm3_dir, tmp_path, sp_file):  # noqa: F811
    model, _, tok = load_model_and_tokenizer(flags_for(glm3_dir))
    assert type(tok) is ChatGLM3Tokenizer and model.config.family == "chatglm2"
    ranks = write_ranks(tmp_path / "tokenizer.model", GLM4_TOKENS)
    with pytest.raises(ValueError, match="does not match model .*eos: tokenizer 271 vs config 2"):
        load_model_and_tokenizer(flags_for(glm3_dir, tokenizer=str(ranks), tokenizer_kind="glm4"))


def test_glm_chat_on_a_chatglm3_directory(glm3_dir, tmp_path):  # noqa: F811
    """Each stdin line is a user turn; the answers equal `glm_jax.chat` with role-message history."""
    from glm_jax import load_pretrained

    model, params = load_pretrained(str(glm3_dir))
    tok = ChatGLM3Tokenizer(glm3_dir / "tokenizer.model")
    settings = dict(do_sample=False, max_length=80)
    first, history = chat(model, params, tok, "你好", **settings)
    assert [m["role"] for m in history] == ["user", "assistant"]
    second, _ = chat(model, params, tok, "晚上睡不着应该怎么办", history, **settings)
    result = subprocess.run(
        [sys.executable, "-m", "glm_jax.cli.chat", f"--model={glm3_dir}", "--nodo_sample", "--max_length=80",
         f"--compilation_cache_dir={tmp_path}"],
        input="你好\n晚上睡不着应该怎么办\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ChatGLM：{first}\nChatGLM：{second}\n"
    missing = tmp_path / "no_tokenizer"
    shutil.copytree(glm3_dir, missing)
    (missing / "tokenizer.model").unlink()
    result = subprocess.run([sys.executable, "-m", "glm_jax.cli.chat", f"--model={missing}"], input="",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"tokenizer file {missing}/tokenizer.model does not exist" in result.stderr
