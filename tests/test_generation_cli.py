"""glm-generate end to end (a subprocess, as a user runs it) on a tiny random checkpoint."""

from __future__ import annotations

import subprocess
import sys

from glm_jax import generate
from glm_jax.generation import fill_blanks_text
from decoding_helpers import chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)


def run_cli(*args: str, cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glm_jax.cli.generate", f"--compilation_cache_dir={cache_dir}", *args],
        capture_output=True, text=True, timeout=300,
    )


def test_generate_prints_the_generated_text(chat_model_dir, chat_model, chat_tok, tmp_path):  # noqa: F811
    model, params = chat_model
    prompts = ["你好", "今天天气很好：我们去公园散步吧"]
    result = run_cli(f"--model={chat_model_dir}", *(f"--prompt={p}" for p in prompts), "--max_new_tokens=6",
                     "--do_sample", "--top_k=20", "--seed=5", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    tokens = generate(model, params, [chat_tok.encode(p) for p in prompts], max_new_tokens=6, do_sample=True,
                      top_k=20, seed=5)
    assert result.stdout == "".join(chat_tok.decode(t) + "\n" for t in tokens)
    assert "compile" in result.stderr and "tokens/s" in result.stderr
    assert any(tmp_path.iterdir())  # the persistent compilation cache was written


def test_generate_fills_blanks(chat_model_dir, chat_model, chat_tok, tmp_path):  # noqa: F811
    model, params = chat_model
    text = "今天[MASK]很好：我们去[MASK]散步吧"
    result = run_cli(f"--model={chat_model_dir}", f"--prompt={text}", "--max_new_tokens=4", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == fill_blanks_text(model, params, chat_tok, text, max_new_tokens=4) + "\n"


def test_generate_rejects_bad_input_clearly(chat_model_dir, tmp_path):  # noqa: F811
    cases = [
        (["--prompt="], "--prompt number 1 is empty"),
        (["--prompt=x", "--top_p=1.5"], "top_p must be in (0, 1]"),
    ]
    for args, message in cases:
        result = run_cli(f"--model={chat_model_dir}", *args, cache_dir=tmp_path)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    missing = run_cli(f"--model={tmp_path / 'nothing'}", "--prompt=x", cache_dir=tmp_path)
    assert missing.returncode == 1 and "no such checkpoint directory" in missing.stderr


def test_generate_keeps_params_in_the_requested_dtype(chat_model_dir, tmp_path):  # noqa: F811
    """--param_dtype=float16 with float32 compute: the loaded params are float16 (the --verbose memory report)."""
    result = run_cli(f"--model={chat_model_dir}", "--prompt=你好", "--max_new_tokens=2", "--param_dtype=float16",
                     "--verbose", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    report = [line for line in result.stderr.splitlines() if "float" in line and "param" in line.lower()]
    assert report and all("float32" not in line for line in report) and any("float16" in line for line in report), report
