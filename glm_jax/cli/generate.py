"""glm-generate: continue one or more prompts, or fill the [MASK] blanks of a text.

    glm-generate --model=DIR --prompt="写一首关于大海的诗" --max_new_tokens=128
    glm-generate --model=DIR --prompt=a --prompt=b --do_sample --top_p=0.7 --temperature=0.95
    glm-generate --model=DIR --prompt="北京是[MASK]的首都，上海是[MASK]。" --max_new_tokens=16
    glm-generate --model=DIR --quantization=int4 --verbose --prompt="你好"

Several `--prompt`s run as one ragged batch. A prompt holding `[MASK]` is blank infilling: each
blank is generated left to right and the filled text is printed. Generated text goes to stdout,
one prompt after the other, each followed by a newline; timings (compile seconds, tokens/s) go to
stderr, and with --verbose the bytes of the loaded params by dtype (the memory report of a
quantized model).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from glm_jax.cli import (
    define_model_flags, define_sampling_flags, enable_compilation_cache, load_model_and_tokenizer, quiet_backend_probing,
    sampling_settings,
)
from glm_jax.generation import PROGRAMS, fill_blanks_text, generate_with_stats
from glm_jax.hf_io import CheckpointError
from glm_jax.quantization import format_param_bytes

define_model_flags()
define_sampling_flags(do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch. '[MASK]' marks a blank to fill.", required=True)
flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt (per blank when infilling).")
flags.DEFINE_integer("max_length", None, "Most tokens of prompt + new tokens (optional).")
flags.DEFINE_list("prompt_buckets", [], "Prompt length buckets (default: powers of two).")
flags.DEFINE_enum("quantization", None, ["int8", "int4"], "Quantize the weights of a float checkpoint on load.")
flags.DEFINE_bool("quantize_embeddings", False, "With --quantization: quantize the word embedding / output layer too.")
flags.DEFINE_bool("verbose", False, "Also print the bytes of the params by dtype to stderr.")
FLAGS = flags.FLAGS

MASK_MARKER = "[MASK]"


def _limits() -> dict:
    buckets = [int(b) for b in FLAGS.prompt_buckets] or None
    return dict(max_new_tokens=FLAGS.max_new_tokens, max_length=FLAGS.max_length, prompt_buckets=buckets)


def _run() -> None:
    for i, text in enumerate(FLAGS.prompt):
        if not text.strip():
            raise ValueError(f"--prompt number {i + 1} is empty")
    settings = sampling_settings(FLAGS)
    quiet_backend_probing()
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    model, params, tokenizer = load_model_and_tokenizer(FLAGS, FLAGS.quantization, FLAGS.quantize_embeddings)
    if FLAGS.verbose:
        print(format_param_bytes(params), file=sys.stderr)
    start = time.perf_counter()
    blanks = [MASK_MARKER in text for text in FLAGS.prompt]
    if any(blanks):
        if len(FLAGS.prompt) > 1:
            raise ValueError("blank infilling takes one --prompt at a time")
        print(fill_blanks_text(model, params, tokenizer, FLAGS.prompt[0], MASK_MARKER, **settings, **_limits()))
        print(f"filled in {time.perf_counter() - start:.2f} s (compile {PROGRAMS.compile_seconds:.2f} s)", file=sys.stderr)
        return
    prompts = tokenizer.encode_batch(FLAGS.prompt)
    out = generate_with_stats(model, params, prompts, **settings, **_limits())
    for tokens in out.sequences:
        print(tokenizer.decode(tokens))
    produced = sum(len(t) for t in out.sequences)
    print(
        f"prompt bucket {out.prompt_bucket}, new-token bucket {out.new_token_bucket}; compile {out.compile_seconds:.2f} s; "
        f"{produced} tokens in {out.run_seconds:.2f} s ({produced / out.run_seconds:.1f} tokens/s)",
        file=sys.stderr,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _run()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"glm-generate: {e}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
