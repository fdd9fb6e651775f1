"""Generation metrics of the official ptuning `main.py --do_predict`: BLEU-4 and ROUGE-1/2/L.

Computed exactly as there, per example then averaged, in percent:

* ROUGE-1/2/L F1 of `rouge_chinese` on jieba-segmented words (hypothesis and reference joined by
  spaces);
* BLEU-4 of NLTK's `sentence_bleu` on *characters* with smoothing method 3.

One deliberate difference: an empty prediction or reference (which makes `rouge_chinese` raise and
stops the official script) scores 0 on the ROUGE metrics. Predictions are written like the official
`generated_predictions.txt`: one JSON object `{"labels": ..., "predict": ...}` per line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
PREDICTIONS_FILE = "generated_predictions.txt"
RESULTS_FILE = "predict_results.json"


def example_scores(prediction: str, reference: str) -> dict[str, float]:
    """The four metrics of one example, in percent (rounded to 4 decimals as officially)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    hypothesis, words = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    scores = {}
    if hypothesis.strip() and words.strip():
        for name, value in Rouge().get_scores(hypothesis, words)[0].items():
            scores[name] = round(value["f"] * 100, 4)
    else:
        scores.update({name: 0.0 for name in METRICS[:3]})
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of the per-example metrics."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    rows = [example_scores(p, r) for p, r in zip(predictions, references)]
    return {name: float(np.mean([row[name] for row in rows])) for name in METRICS}


def generate_predictions(
    model: Any, params: Any, prompts: Sequence[Sequence[int]], decode: Callable[[list[int]], str], *,
    max_length: int, batch_size: int = 8, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
    top_k: int = 0, seed: int = 0,
) -> list[str]:
    """Decoded, stripped continuations of `prompts` with `glm_jax.generate` (official settings by
    default: sampling, top_p 0.7, temperature 0.95; `max_length` counts prompt + new tokens)."""
    from glm_jax.generation import generate

    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        new = generate(model, params, chunk, max_length=max_length, do_sample=do_sample, top_p=top_p,
                       temperature=temperature, top_k=top_k, seed=seed + start)
        out.extend(decode(ids).strip() for ids in new)
    return out


def write_predictions(directory: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Writes `generated_predictions.txt` and `predict_results.json` (the scores) into `directory`;
    returns the scores."""
    scores = corpus_scores(predictions, references)
    os.makedirs(directory, exist_ok=True)
    lines = "".join(json.dumps({"labels": r, "predict": p}, ensure_ascii=False) + "\n"
                    for p, r in zip(predictions, references))
    _write_atomic(os.path.join(directory, PREDICTIONS_FILE), lines)
    results = {f"predict_{k}": v for k, v in scores.items()} | {"predict_samples": len(predictions)}
    _write_atomic(os.path.join(directory, RESULTS_FILE), json.dumps(results, indent=2) + "\n")
    return scores


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
