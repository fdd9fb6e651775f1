"""glm-chat end to end under a pipe (a subprocess reading stdin), on a tiny random checkpoint."""

from __future__ import annotations

import subprocess
import sys

from glm_jax.chat import chat
from glm_jax.tokenizer import VOCAB_FILE, train_chatglm_sentencepiece
from decoding_helpers import CORPUS, chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)


def test_chat_under_a_pipe_streams_answers_and_obeys_commands(chat_model_dir, chat_model, chat_tok, tmp_path):  # noqa: F811
    model, params = chat_model
    settings = dict(do_sample=False, max_length=96)
    first, history = chat(model, params, chat_tok, "你好", **settings)
    second, _ = chat(model, params, chat_tok, "晚上睡不着应该怎么办", history, **settings)
    script = "你好\n晚上睡不着应该怎么办\nclear\n\n你好\nstop\n今天天气很好\n"
    result = subprocess.run(
        [sys.executable, "-m", "glm_jax.cli.chat", f"--model={chat_model_dir}", "--nodo_sample", "--max_length=96",
         f"--compilation_cache_dir={tmp_path}"],
        input=script, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # After `clear` the history is empty again, so the third answer equals the first; `stop` ends.
    assert result.stdout == f"ChatGLM：{first}\nChatGLM：{second}\nChatGLM：{first}\n"
    assert "compiled in" in result.stderr


def test_chat_rejects_a_tokenizer_of_another_vocabulary(chat_model_dir, tmp_path):  # noqa: F811
    other = tmp_path / VOCAB_FILE
    train_chatglm_sentencepiece(CORPUS, vocab_size=600, model_file=other)  # special ids move
    result = subprocess.run(
        [sys.executable, "-m", "glm_jax.cli.chat", f"--model={chat_model_dir}", f"--tokenizer={other}",
         f"--compilation_cache_dir={tmp_path}"],
        input="", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not match model" in result.stderr and "[gMASK]: tokenizer" in result.stderr
