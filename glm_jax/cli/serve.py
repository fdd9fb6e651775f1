"""glm-serve: an OpenAI-compatible HTTP server, the official ChatGLM-6B `api.py` endpoint and a web
chat page for a ChatGLM-6B, ChatGLM2/3 or GLM-4 checkpoint (chat format and tokenizer by model family).

    glm-serve --model=DIR                         # http://127.0.0.1:8000/ (web chat), /v1/...
    glm-serve --model=DIR --quantization=int4 --port=8080
    GLM_SERVE_API_KEY=secret glm-serve --model=DIR --host=0.0.0.0

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with stream=true as server-sent
events), GET /v1/models, POST / (official api.py: {prompt, history, max_length, top_p,
temperature} -> {response, history, status, time}), GET /health, GET / (web chat).
Requests are queued and batched onto the device (see glm_jax.serve.engine). It binds to 127.0.0.1
unless --host says otherwise; with an API key, clients send `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from glm_jax.cli import define_model_flags, enable_compilation_cache, load_model_and_tokenizer, quiet_backend_probing
from glm_jax.hf_io import CheckpointError

define_model_flags()
flags.DEFINE_enum("quantization", None, ["int8", "int4"], "Quantize the weights of a float checkpoint on load.")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at startup).")
flags.DEFINE_string("model_name", None, "Model id clients ask for (default: the --model directory's name).")
flags.DEFINE_string(
    "api_key", None,
    "Key clients must send as 'Authorization: Bearer KEY' (default: $GLM_SERVE_API_KEY; neither = no key). "
    "Prefer the environment variable: a flag shows in the process list.")
flags.DEFINE_integer("max_batch", 8, "Most requests decoded together.")
flags.DEFINE_list("batch_buckets", [], "Batch sizes to compile for (default: powers of two up to --max_batch).")
flags.DEFINE_integer("decode_chunk", 4, "Decode steps between host reads (1 = stream every token).")
flags.DEFINE_float("batch_window_ms", 2.0, "How long the first request of a batch waits for others.")
flags.DEFINE_integer("max_queue", 256, "Waiting requests accepted before answering 503.")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body (413 above).")
flags.DEFINE_integer("max_prompt_tokens", None, "Longest prompt in tokens (default: the model's context).")
flags.DEFINE_integer("max_new_tokens", 1024, "Most new tokens per request.")
FLAGS = flags.FLAGS


def _serve() -> None:
    import uvicorn

    from glm_jax.serve import Engine, ServeLimits, create_app

    quiet_backend_probing()
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    model, params, tokenizer = load_model_and_tokenizer(FLAGS, quantization=FLAGS.quantization)
    engine = Engine(
        model, params, max_batch=FLAGS.max_batch, batch_buckets=tuple(int(b) for b in FLAGS.batch_buckets) or None,
        decode_chunk=FLAGS.decode_chunk, batch_window_s=FLAGS.batch_window_ms / 1000, max_queue=FLAGS.max_queue,
    )
    limits = ServeLimits(max_body_bytes=FLAGS.max_body_bytes, max_prompt_tokens=FLAGS.max_prompt_tokens,
                         max_new_tokens=FLAGS.max_new_tokens)
    name = FLAGS.model_name or os.path.basename(os.path.normpath(FLAGS.model))
    api_key = FLAGS.api_key or os.environ.get("GLM_SERVE_API_KEY") or None
    asgi = create_app(engine, tokenizer, model_name=name, api_key=api_key, limits=limits)
    if FLAGS.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.warning("listening on %s without an API key: anyone who can reach it can use the model", FLAGS.host)
    uvicorn.run(asgi, host=FLAGS.host, port=FLAGS.port, log_level="info", timeout_graceful_shutdown=10)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _serve()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"glm-serve: {e}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
