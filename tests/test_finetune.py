"""The fine-tuning job end to end: a tiny model learns a synthetic instruction set with LoRA (held-out
exact match far above the base), its PEFT adapter reloads with `load_pretrained(lora=...)` and
generates the same answers, and `glm-finetune` runs P-Tuning v2, resumes and exports the official
prefix checkpoint."""

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


def _cli(workdir, golden6b, steps):
    command = [
        sys.executable, "-m", "glm_jax.cli.finetune", f"--config={TINY}", f"--workdir={workdir}",
        "--config.method=ptuning", "--config.ptuning.pre_seq_len=4", "--config.ptuning.prefix_projection=True",
        f"--config.base={golden6b / 'checkpoint'}", f"--config.steps={steps}", "--config.checkpoint_every=2",
        "--config.log_every=1", "--config.predict.enabled=False", "--config.optimizer.learning_rate=2e-2",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_ptuning_resumes_and_exports_the_official_prefix(golden6b, tmp_path):
    workdir = tmp_path / "pt"
    first = _cli(workdir, golden6b, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(workdir, golden6b, 4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    model, params = load_pretrained(str(golden6b / "checkpoint"), prefix=str(workdir / "adapter"))
    assert (model.config.pre_seq_len, model.config.prefix_projection) == (4, True)
    assert sorted(os.listdir(workdir / "adapter")) == ["config.json", "pytorch_model.bin"]
