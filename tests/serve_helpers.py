"""A running glm-serve app on 127.0.0.1 (ephemeral port) over the tiny chat model of
`decoding_helpers`, and reference answers computed with `glm_jax.chat` / `glm_jax.generate`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from glm_jax import generate
from glm_jax.chat import build_prompt, chat
from glm_jax.serve import Engine, ServeLimits, create_app, serve_in_thread

MODEL_NAME = "chatglm-tiny"


@contextlib.contextmanager
def running_server(chat_model, chat_tok, *, api_key: str | None = None, limits: ServeLimits = ServeLimits(),
                   warmup: tuple[int, int] | None = None, **engine_options: Any) -> Iterator[tuple[str, Engine]]:
    """(base URL, engine) of the app serving while the `with` block runs; `warmup` = (prompt tokens,
    new tokens) compiles the greedy programs of that shape first."""
    model, params = chat_model
    engine = Engine(model, params, **engine_options)
    if warmup:
        engine.warmup(*warmup)
    app = create_app(engine, chat_tok, model_name=MODEL_NAME, api_key=api_key, limits=limits)
    with serve_in_thread(app) as url:
        yield url, engine


def greedy_chat(chat_model, chat_tok, query: str, history: list[tuple[str, str]],
                max_tokens: int) -> tuple[str, list[int]]:
    """`glm_jax.chat` greedy answer with room for exactly `max_tokens` new tokens and no truncation,
    plus the new token ids `generate` returns for the same prompt."""
    model, params = chat_model
    prompt = chat_tok.encode(build_prompt(query, history))
    response, _ = chat(model, params, chat_tok, query, history, do_sample=False,
                       max_length=len(prompt) + max_tokens, reserve_tokens=1)
    return response, generate(model, params, [prompt], max_new_tokens=max_tokens)[0]


def messages(query: str, history: Iterable[tuple[str, str]] = ()) -> list[dict[str, str]]:
    out = []
    for q, r in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return out + [{"role": "user", "content": query}]


def sse_events(lines: Iterable[str]) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, JSON-decoded ("[DONE]" kept as is)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
