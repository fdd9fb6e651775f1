"""Command-line programs (absl apps installed as console scripts) and the flags they share."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from absl import flags

from glm_jax.pretrained import load_pretrained
from glm_jax.sampling import SamplingParams
from glm_jax.tokenizer import ChatGLMTokenizer

DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "xla")


def define_model_flags() -> None:
    flags.DEFINE_string("model", None, "Checkpoint directory (official Hugging Face ChatGLM layout).", required=True)
    flags.DEFINE_string("tokenizer", None, "ice_text.model file or directory holding it (default: --model).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and compute dtype.")
    flags.DEFINE_string("prefix", None, "P-Tuning v2 checkpoint directory to apply on top of --model.")
    flags.DEFINE_string(
        "compilation_cache_dir", DEFAULT_COMPILATION_CACHE,
        "JAX persistent compilation cache: later runs reuse compiled programs. Empty = off.",
    )


def define_sampling_flags(*, do_sample: bool, temperature: float, top_p: float, top_k: int) -> None:
    flags.DEFINE_bool("do_sample", do_sample, "Sample (else greedy).")
    flags.DEFINE_float("temperature", temperature, "Softmax temperature (>= 0; 0 = greedy).")
    flags.DEFINE_integer("top_k", top_k, "Keep the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", top_p, "Nucleus sampling: keep the smallest set with this probability, in (0, 1].")
    flags.DEFINE_float("repetition_penalty", 1.0, "Penalty for tokens already in the text (> 0; 1 = off).")
    flags.DEFINE_integer("seed", 0, "Random seed of sampling.")


def sampling_settings(values: Any) -> dict[str, Any]:
    """Sampling keyword arguments from parsed flags, validated before any model is loaded."""
    settings = dict(
        do_sample=values.do_sample, temperature=values.temperature, top_k=values.top_k, top_p=values.top_p,
        repetition_penalty=values.repetition_penalty,
    )
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
    tokenizer = ChatGLMTokenizer.from_pretrained(values.tokenizer or values.model)
    # Inference only: the per-layer layout, which decodes fastest (see glm_jax.modeling.layer_stack).
    model, params = load_pretrained(values.model, dtype=values.dtype, prefix=values.prefix, quantization=quantization,
                                    quantize_embeddings=quantize_embeddings, scan_layers=False)
    cfg = model.config
    pairs = {
        "bos (<sop>)": (tokenizer.bos_token_id, cfg.bos_token_id), "eos (<eop>)": (tokenizer.eos_token_id, cfg.eos_token_id),
        "[MASK]": (tokenizer.mask_token_id, cfg.mask_token_id), "[gMASK]": (tokenizer.gmask_token_id, cfg.gmask_token_id),
    }
    wrong = [f"{name}: tokenizer {tok} vs config {conf}" for name, (tok, conf) in pairs.items() if tok != conf]
    if tokenizer.vocab_size > cfg.vocab_size:
        wrong.append(f"vocabulary: tokenizer {tokenizer.vocab_size} > model {cfg.vocab_size}")
    if wrong:
        raise ValueError(f"tokenizer {tokenizer.model_file} does not match model {values.model}: " + "; ".join(wrong))
    return model, params, tokenizer
