"""The fine-tuning job end to end: a tiny model learns a synthetic instruction set with LoRA (held-out
exact match far above the base), its PEFT adapter reloads with `load_pretrained(lora=...)` and
generates the same answers, and `glm-finetune` runs P-Tuning v2 on ADGEN-style text, resumes, predicts,
exports the official prefix checkpoint, and chat runs with it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util

from glm_jax import load_pretrained
from glm_jax.evaluation import PREDICTIONS_FILE, RESULTS_FILE
from glm_jax.generation import generate
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.training.finetune import finetune
from decoding_helpers import chat_model_dir  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "finetune", "tiny_cpu.py")


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_cpu", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_lora_learns_a_synthetic_instruction_set(golden6b, tmp_path):
    config = _tiny_config()
    config.base = str(golden6b / "checkpoint")  # a (tiny) checkpoint in the official layout
    result = finetune(config, str(tmp_path / "run"))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.3 * losses[0]

    # Held-out prompts (drawn with another seed), greedy: exact match of the whole answer.
    lines = [json.loads(line) for line in open(tmp_path / "run" / "predict" / PREDICTIONS_FILE, encoding="utf-8")]
    assert len(lines) == config.data.synthetic_validation
    tuned = np.mean([line["predict"] == line["labels"] for line in lines])
    scores = json.load(open(tmp_path / "run" / "predict" / RESULTS_FILE))
    assert set(scores) >= {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}

    model, params, data = result["model"], result["state"].params, result["data"]
    serving = GLMForCausalLM(model.config.replace(remat_policy="none"))
    zero_b = {p: (np.zeros_like(v) if p[-1] == "lora_b" else v)
              for p, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    base_new = generate(serving, traverse_util.unflatten_dict(zero_b), data.prompts, max_new_tokens=6)
    base = np.mean([data.decode(ids) == ref for ids, ref in zip(base_new, data.references)])
    print(f"held-out exact match: base {base:.3f}, fine-tuned {tuned:.3f}")
    assert base <= 0.05 and tuned >= 0.6  # measured: base 0.0, tuned 0.83-0.94

    # The exported PEFT adapter, loaded on the base checkpoint, generates the same answers.
    loaded_model, loaded = load_pretrained(config.base, lora=result["adapter"])
    again = generate(loaded_model, loaded, data.prompts[:8], max_new_tokens=6)
    assert [data.decode(ids) for ids in again] == [line["predict"] for line in lines[:8]]


def _cli(workdir, base, data, steps, predict):
    command = [
        sys.executable, "-m", "glm_jax.cli.finetune", f"--config={TINY}", f"--workdir={workdir}",
        "--config.method=ptuning", "--config.ptuning.pre_seq_len=4", "--config.ptuning.prefix_projection=True",
        f"--config.base={base}", f"--config.steps={steps}", "--config.checkpoint_every=2", "--config.log_every=1",
        "--config.data.kind=jsonl", f"--config.data.train_file={data}", f"--config.data.validation_file={data}",
        "--config.data.history_column=history", "--config.data.max_source_length=32",
        "--config.data.max_target_length=48", f"--config.predict.enabled={predict}", "--config.predict.max_samples=2",
        "--config.predict.batch_size=2",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_ptuning_on_adgen_text_resumes_exports_and_chats(chat_model_dir, tmp_path):
    """glm-finetune on ADGEN-style JSON lines (content/summary + a history column): P-Tuning v2 runs,
    resumes, predicts Chinese text scored with jieba/ROUGE/BLEU, exports the official prefix checkpoint,
    and `chat` runs with that prefix loaded."""
    from glm_jax.chat import chat
    from glm_jax.tokenizer import ChatGLMTokenizer

    rows = [{"content": "类型#裙*颜色#蓝色", "summary": "这条蓝色的裙子很好看。", "history": []},
            {"content": "你是谁", "summary": "我是人工智能助手。", "history": [["你好", "你好！"]]}] * 4
    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    workdir = tmp_path / "pt"
    first = _cli(workdir, chat_model_dir, data, 2, False)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(workdir, chat_model_dir, data, 4, True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [1, 2, 3, 4]
    lines = [json.loads(line) for line in open(workdir / "predict" / PREDICTIONS_FILE, encoding="utf-8")]
    assert [line["labels"] for line in lines] == ["这条蓝色的裙子很好看。", "我是人工智能助手。"]
    scores = json.load(open(workdir / "predict" / RESULTS_FILE))
    assert set(scores) == {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4", "predict_samples"}

    assert sorted(os.listdir(workdir / "adapter")) == ["config.json", "pytorch_model.bin"]
    model, params = load_pretrained(str(chat_model_dir), prefix=str(workdir / "adapter"))
    assert (model.config.pre_seq_len, model.config.prefix_projection) == (4, True)
    tok = ChatGLMTokenizer.from_pretrained(chat_model_dir)
    response, history = chat(model, params, tok, "你好", do_sample=False, max_length=24)
    assert isinstance(response, str) and history == [("你好", response)]
