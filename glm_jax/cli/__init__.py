"""Command-line programs (absl apps installed as console scripts) and the flags they share."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from absl import flags

from glm_jax.auto_tokenizer import TOKENIZER_KINDS, load_tokenizer, model_config, tokenizer_mismatches
from glm_jax.pretrained import load_pretrained
from glm_jax.sampling import SamplingParams

DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "xla")


def define_model_flags() -> None:
    flags.DEFINE_string("model", None, "Checkpoint directory (official Hugging Face ChatGLM layout).", required=True)
    flags.DEFINE_string("tokenizer", None, "Tokenizer file (ice_text.model, or tokenizer.model of ChatGLM2/3 / GLM-4) "
                        "or the directory holding it (default: --model).")
    flags.DEFINE_enum("tokenizer_kind", "auto", list(TOKENIZER_KINDS),
                      "Tokenizer and chat format; auto: from the model family and the checkpoint's files (ChatGLM2 "
                      "and ChatGLM3 share one model config; see glm_jax.auto_tokenizer).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and compute dtype.")
    flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                      "Weights dtype when it differs from --dtype: float16 with --dtype=float32 keeps an fp16 checkpoint "
                      "as stored (half the memory; same weight values, float32 arithmetic; faster CPU decoding).")
    flags.DEFINE_string("prefix", None, "P-Tuning v2 checkpoint directory to apply on top of --model.")
    flags.DEFINE_string(
        "compilation_cache_dir", DEFAULT_COMPILATION_CACHE,
        "JAX persistent compilation cache: later runs reuse compiled programs. Empty = off.",
    )


def define_sampling_flags(*, do_sample: bool, temperature: float | None, top_p: float | None, top_k: int) -> None:
    """The sampling flags; a default of None stands for the model family's official chat setting."""
    def family(default: float | None) -> str:
        return " Default: the model family's official chat setting." if default is None else ""

    flags.DEFINE_bool("do_sample", do_sample, "Sample (else greedy).")
    flags.DEFINE_float("temperature", temperature, "Softmax temperature (>= 0; 0 = greedy)." + family(temperature))
    flags.DEFINE_integer("top_k", top_k, "Keep the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", top_p, "Nucleus sampling: keep the smallest set with this probability, in (0, 1]."
                       + family(top_p))
    flags.DEFINE_float("repetition_penalty", 1.0, "Penalty for tokens already in the text (> 0; 1 = off).")
    flags.DEFINE_integer("seed", 0, "Random seed of sampling.")


def sampling_settings(values: Any) -> dict[str, Any]:
    """Sampling keyword arguments from parsed flags, validated before any model is loaded (flags left
    at None are omitted: the model family's default applies)."""
    settings = dict(
        do_sample=values.do_sample, temperature=values.temperature, top_k=values.top_k, top_p=values.top_p,
        repetition_penalty=values.repetition_penalty,
    )
    settings = {name: value for name, value in settings.items() if value is not None}
    SamplingParams(**settings)
    return dict(settings, seed=values.seed)


def quiet_backend_probing() -> None:
    """JAX logs every accelerator backend it fails to find; that is noise for a user on CPU."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory` (nothing when empty)."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def load_model_and_tokenizer(
    values: Any, quantization: str | None = None, quantize_embeddings: bool = False,
) -> tuple[Any, Any, Any]:
    """(model, params, tokenizer) from the model flags (weights quantized as `load_pretrained`'s
    `quantization` / `quantize_embeddings` say); the tokenizer's special ids must be the model's, otherwise prompts would
    be built with the wrong tokens."""
    if not os.path.isdir(values.model):
        raise FileNotFoundError(f"--model={values.model}: no such checkpoint directory")
    family = model_config(values.model).family
    tokenizer = load_tokenizer(values.model, family=family, tokenizer_path=values.tokenizer, kind=values.tokenizer_kind)
    # Inference only: the per-layer layout, which decodes fastest (see glm_jax.modeling.layer_stack).
    model, params = load_pretrained(values.model, dtype=values.dtype, param_dtype=values.param_dtype, prefix=values.prefix,
                                    quantization=quantization,
                                    quantize_embeddings=quantize_embeddings, scan_layers=False)
    wrong = tokenizer_mismatches(tokenizer, model.config)
    if wrong:
        raise ValueError(f"tokenizer {tokenizer.model_file} does not match model {values.model}: " + "; ".join(wrong))
    return model, params, tokenizer
