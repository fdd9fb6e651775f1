"""ChatGLM2 text prompt format (spec §2.4) and its selection by `GLMConfig.family`."""

import pytest

from glm_jax import preset
from glm_jax.chat import build_prompt, build_prompt_chatglm2, fit_prompt, prompt_builder
from glm_jax.tokenizer import ChatGLM2Tokenizer
from test_tokenizer_glm2_glm4 import sp, sp_file  # noqa: F401 (fixtures)


def test_chatglm2_prompt_matches_the_spec():
    assert build_prompt_chatglm2("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert build_prompt_chatglm2("q3", [("q1", "r1"), ("q2", "r2")]) == (
        "[Round 1]\n\n问：q1\n\n答：r1\n\n[Round 2]\n\n问：q2\n\n答：r2\n\n[Round 3]\n\n问：q3\n\n答：")


def test_prompt_builder_selects_by_family():
    assert prompt_builder(preset("chatglm-tiny").family) is build_prompt
    assert prompt_builder(preset("chatglm2-tiny").family) is build_prompt_chatglm2
    with pytest.raises(ValueError, match="glm130b"):
        prompt_builder("glm130b")


def test_fit_prompt_keeps_the_chatglm2_prefix_when_cutting_the_query(sp_file, sp):  # noqa: F811
    tok = ChatGLM2Tokenizer(sp_file)
    query = "The quick brown fox jumps over the lazy dog. " * 4
    ids, kept = fit_prompt(tok, query, [("a", "b")], 20, build_prompt_chatglm2)
    text = sp.EncodeAsIds(build_prompt_chatglm2(query))
    assert kept == [] and ids == [tok.gmask_token_id, tok.sop_token_id, *text[-18:]]
