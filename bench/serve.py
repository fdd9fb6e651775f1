"""Serving benchmark: glm-serve over HTTP on 127.0.0.1 with 1, 4 and 16 concurrent clients.

A random checkpoint of a ChatGLM-6B-architecture preset (official layout, float32, with the small
SentencePiece vocabulary of the bench in place of the preset's) runs behind the real app (`glm_jax.serve`:
uvicorn, request queue, batching engine). Each client sends streamed `/v1/chat/completions` requests one
after another (closed loop, greedy, `--new_tokens` each). Reported per concurrency:

- throughput: completion tokens of all requests / wall time of the level;
- latency p50 / p99 of whole requests, and p50 time to the first streamed token;
- the same load on the same app with `max_batch=1` (requests served one at a time, as the official
  ChatGLM-6B `api.py` does): batched / unbatched throughput is what the request queue + batching buys;
- the device-only reference measured in the same run: `glm_jax.generate` of the same batch of prompts,
  no HTTP and no queue (tokens/s of one call): server / generate is the share the server keeps;
- the memory-bandwidth roofline of decoding: batch x bandwidth / weight bytes per step.

    python bench/serve.py [--config=chatglm-100m] [--new_tokens=32] [--requests=16]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from glm_jax import GLMForCausalLM, load_pretrained, preset  # noqa: E402
from glm_jax.chat import build_prompt  # noqa: E402
from glm_jax.generation import generate_with_stats  # noqa: E402
from glm_jax.serve import Engine, create_app, serve_in_thread  # noqa: E402
from glm_jax.testing_checkpoints import write_random_hf_checkpoint  # noqa: E402
from glm_jax.tokenizer import VOCAB_FILE, ChatGLMTokenizer, train_chatglm_sentencepiece  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "chatglm-100m", "ChatGLM-6B-architecture preset of the random model.")
_LAYERS = flags.DEFINE_integer("num_layers", 6, "Layers of the model (0: the preset's).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients, one level each.")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Requests per level (split over the clients; at least one each).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "max_tokens of every request (greedy).")
_DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 4, "Engine decode steps between host reads.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds over all levels; the best throughput of each case counts.")
_LOAD = flags.DEFINE_string("load", None, "Internal: URL,CLIENTS,REQUESTS: run only the clients, print JSON.")
_RECORD = flags.DEFINE_boolean("record", True, "Append the results to bench/RESULTS.md.")

MODEL_NAME = "bench"
QUESTIONS = ["晚上睡不着应该怎么办", "今天天气很好，我们去公园散步吧", "How are you today?", "你好，请介绍一下你自己",
             "What should I cook for dinner?", "给我讲一个笑话", "为什么天空是蓝色的", "Write a haiku about rain."]


def build_model(workdir: str) -> tuple[GLMForCausalLM, Any, ChatGLMTokenizer]:
    """The random checkpoint (official layout, written once into `workdir`) and its tokenizer."""
    overrides = {"num_layers": _LAYERS.value} if _LAYERS.value else {}
    directory = os.path.join(workdir, f"serve-{_CONFIG.value}-{_LAYERS.value}")
    if not os.path.isdir(directory):
        vocab_file = os.path.join(workdir, f"serve-{os.getpid()}-{VOCAB_FILE}")
        train_chatglm_sentencepiece(QUESTIONS * 20, vocab_size=600, model_file=vocab_file)
        tok = ChatGLMTokenizer(vocab_file)
        config = preset(_CONFIG.value).replace(
            vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id,
            **overrides)
        write_random_hf_checkpoint(config, directory, seed=0, dtype="float32")
        os.replace(vocab_file, os.path.join(directory, VOCAB_FILE))
    model, params = load_pretrained(directory, dtype="float32", scan_layers=False)  # as glm-serve loads it
    return model, params, ChatGLMTokenizer.from_pretrained(directory)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def run_level(url: str, clients: int, requests: int) -> dict[str, Any]:
    """`requests` streamed chat requests from `clients` closed-loop clients; per-request timings."""
    per_client = max(1, requests // clients)
    latencies, first_tokens, tokens = [], [], 0

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            question = QUESTIONS[(index + k) % len(QUESTIONS)]
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": _NEW_TOKENS.value, "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            first_tokens.append(first if first is not None else latencies[-1])

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "ttft_p50_s": percentile(first_tokens, 50), "requests": len(latencies), "tokens": tokens}


def load_from_another_process(url: str, clients: int, requests: int) -> dict[str, Any]:
    """`run_level` in a separate Python process, so that the clients do not compete with the server for
    this process's interpreter lock."""
    command = [sys.executable, os.path.abspath(__file__), f"--load={url},{clients},{requests}",
               f"--new_tokens={_NEW_TOKENS.value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_engine(model, params, tok, max_batch: int) -> tuple[Engine, float]:
    """An engine with every batch bucket compiled for the bench's shapes, and the seconds that took."""
    buckets = tuple(sorted({b for b in (1, 4, 16) if b <= max_batch} | {max_batch}))
    engine = Engine(model, params, max_batch=max_batch, batch_buckets=buckets, decode_chunk=_DECODE_CHUNK.value)
    prompt_tokens = max(len(tok.encode(build_prompt(q))) for q in QUESTIONS)
    return engine, engine.warmup(prompt_tokens, _NEW_TOKENS.value)


def generate_reference(model, params, tok, batch: int) -> float:
    """tokens/s of one `generate` call on `batch` of the bench prompts (best of 3, compiled first)."""
    prompts = [tok.encode(build_prompt(QUESTIONS[i % len(QUESTIONS)])) for i in range(batch)]

    def run() -> Any:
        return generate_with_stats(model, params, prompts, max_new_tokens=_NEW_TOKENS.value, stop_ids=())

    run()
    return max(batch * _NEW_TOKENS.value / run().run_seconds for _ in range(3))


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if _LOAD.value:
        url, clients, requests = _LOAD.value.split(",")
        print(json.dumps(asyncio.run(run_level(url, int(clients), int(requests)))))
        return
    levels = [int(c) for c in _CLIENTS.value]
    workdir = os.path.join(common.BENCH_DIR, "_work")
    os.makedirs(workdir, exist_ok=True)
    model, params, tok = build_model(workdir)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"model {_CONFIG.value} x {model.config.num_layers} layers: {weight_bytes / 1e6:.0f} MB float32", flush=True)
    bandwidth = common.memory_bandwidth_gbps()
    # Both apps run side by side and each level alternates between them, round after round, so that
    # the load other processes put on the machine hits both alike; the best round of each counts.
    batched_engine, warm_batched = start_engine(model, params, tok, 16)
    unbatched_engine, _ = start_engine(model, params, tok, 1)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    with serve_in_thread(create_app(batched_engine, tok, model_name=MODEL_NAME)) as batched_url, \
            serve_in_thread(create_app(unbatched_engine, tok, model_name=MODEL_NAME)) as unbatched_url:
        for round_index in range(_ROUNDS.value):
            for clients in levels:
                for name, url in (("batched", batched_url), ("unbatched", unbatched_url)):
                    result = load_from_another_process(url, clients, max(_REQUESTS.value, clients))
                    print(f"round {round_index + 1} {name:9s} clients={clients:2d}: {result}", flush=True)
                    if result["tokens_per_s"] > best.get((name, clients), {"tokens_per_s": 0})["tokens_per_s"]:
                        best[name, clients] = result
    batched = {c: best["batched", c] for c in levels}
    unbatched = {c: best["unbatched", c] for c in levels}
    rows = []
    for clients in levels:
        reference = generate_reference(model, params, tok, clients)
        b, u = batched[clients], unbatched[clients]
        rows.append({
            "clients": clients, "requests": b["requests"], "tok/s": b["tokens_per_s"], "p50 s": b["p50_s"],
            "p99 s": b["p99_s"], "TTFT p50 s": b["ttft_p50_s"], "unbatched tok/s": u["tokens_per_s"],
            "unbatched p50 s": u["p50_s"], "unbatched p99 s": u["p99_s"],
            "batched/unbatched": b["tokens_per_s"] / u["tokens_per_s"],
            "generate tok/s": reference, "server/generate": b["tokens_per_s"] / reference,
            "roofline tok/s": clients * bandwidth * 1e9 / weight_bytes,
        })
    print(common.markdown_table(rows))
    if _RECORD.value:
        command = "python bench/serve.py " + " ".join(
            f"--{f.name}={f.value}" for f in (_CONFIG, _LAYERS, _NEW_TOKENS, _REQUESTS, _DECODE_CHUNK, _ROUNDS))
        notes = [
            f"Model: random {_CONFIG.value} with {model.config.num_layers} layers and a {tok.vocab_size}-piece "
            f"vocabulary, float32, {weight_bytes / 1e6:.0f} MB of weights; greedy, {_NEW_TOKENS.value} new tokens "
            "per request, streamed /v1/chat/completions over HTTP on 127.0.0.1, closed-loop clients.",
            f"Batched: max_batch=16, batch buckets 1/4/16, decode_chunk={_DECODE_CHUNK.value}, warm-up compile "
            f"{warm_batched:.1f} s. Unbatched: the same app with max_batch=1.",
            "generate: one `glm_jax.generate` call on the same batch (no HTTP, no queue). The clients run in "
            f"another process. Roofline: clients x "
            f"{bandwidth:.1f} GB/s measured read bandwidth / weight bytes.",
        ]
        common.append_results("Serving (glm-serve over HTTP)", command, rows, notes)


if __name__ == "__main__":
    app.run(main)
