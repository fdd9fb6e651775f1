"""The HTTP side: an ASGI app (FastAPI) in front of the batching `Engine`.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (OpenAI-compatible, with
`stream=true` as server-sent events), `GET /v1/models`, the official ChatGLM-6B `api.py` endpoint
`POST /` (`{prompt, history, max_length, top_p, temperature}` -> `{response, history, status,
time}`), `GET /health`, and the web chat page at `GET /`.

Chat answers are built exactly like `glm_jax.chat`: the model family's prompt format (ChatGLM-6B's
`[Round k]` turns, ChatGLM2's, or the role messages of ChatGLM3 / GLM-4, whose system messages keep
their role), the family's stop tokens and chat sampling defaults, its `process_response`, and
streamed pieces that are never taken back (`glm_jax.chat.answer_stream`).
The OpenAI endpoints never drop history: a prompt that does not fit is a 400. The official endpoint
keeps `glm_jax.chat`'s history truncation, as `chat` itself does.

Limits per request: body size (413), prompt tokens and new tokens (400), waiting requests (503).
With an API key set, every endpoint but the page and `/health` wants `Authorization: Bearer KEY`.
A client that goes away (stream closed, or connection dropped while waiting for a whole answer)
cancels its request, which frees its row of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glm_jax.chat import DEFAULT_RESERVE_TOKENS, answer_stream, default_settings, prepare_turn, prompt_builder
from glm_jax.chat_messages import uses_role_messages
from glm_jax.serve import protocol
from glm_jax.serve.engine import FINISH_CANCELLED, Engine, EngineBusy, EngineClosed, GenerationRequest, RequestHandle
from glm_jax.serve.protocol import APIError
from glm_jax.serve.text import CompletionText

log = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).parent / "static"


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """Per-request limits. `max_prompt_tokens=None` allows the whole context."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 1024
    default_completion_tokens: int = 16  # OpenAI's default max_tokens of /v1/completions


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` (declared or actually sent) gets a 413 before the
    app sees it. The body is read up front and replayed, so the app never holds more than that."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        error = APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(
    engine: Engine,
    tokenizer: Any,
    *,
    model_name: str,
    api_key: str | None = None,
    limits: ServeLimits = ServeLimits(),
) -> FastAPI:
    """The app; it starts the engine's thread on startup and closes the engine on shutdown."""
    context = engine.context_length
    max_prompt = min(limits.max_prompt_tokens or context, context - 1)
    family = engine.model.config.family
    roles = uses_role_messages(tokenizer)  # ChatGLM3 / GLM-4 also stop at <|user|> and <|observation|>
    stop_ids = tuple(dict.fromkeys(engine.stop_ids + tuple(getattr(tokenizer, "stop_token_ids", ()))))
    defaults = default_settings(family)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="glm-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    # ---------------------------------------------------------------------------------- helpers

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def check_model(model_id: str) -> None:
        if model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def read_body(request: Request, schema: type) -> Any:
        authorize(request)
        return protocol.validate(schema, protocol.parse_json(await request.body()))

    async def read_openai_body(request: Request, schema: type) -> Any:
        body = await read_body(request, schema)
        check_model(body.model)
        body.reject_unsupported()
        return body

    def new_tokens(prompt_tokens: int, requested: int | None, default: int, param: str) -> int:
        """New-token budget of a request, or a 400 that says which limit it breaks."""
        if prompt_tokens > max_prompt:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this server accepts prompts of at most "
                                f"{max_prompt} tokens (the model's context is {context})",
                           param=param, code="context_length_exceeded")
        if requested is None:
            return min(default, limits.max_new_tokens, context - prompt_tokens)
        if requested > limits.max_new_tokens:
            raise APIError(400, f"max_tokens={requested} is over this server's limit of {limits.max_new_tokens}",
                           param="max_tokens")
        if prompt_tokens + requested > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{prompt_tokens} tokens and max_tokens asks for {requested} more. Shorten the "
                                "prompt or lower max_tokens.", param=param, code="context_length_exceeded")
        return requested

    def submit(request: GenerationRequest) -> RequestHandle:
        try:
            return engine.submit(request)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except (EngineBusy, EngineClosed) as e:
            raise APIError(503, f"server busy: {e}; retry later", type="server_error", code="overloaded") from None

    async def collect(request: Request, handle: RequestHandle, text: Any) -> tuple[str, str]:
        """(text, finish reason) of a whole answer; cancels the request if the client disconnects."""

        async def cancel_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            handle.cancel()

        watcher = asyncio.create_task(cancel_on_disconnect())
        try:
            while True:
                event = await handle.next_event()
                if event.error:
                    raise APIError(500, event.error, type="server_error")
                text.feed(event.tokens)
                if event.final:
                    return text.response, event.finish_reason
        finally:
            watcher.cancel()
            handle.cancel()

    def stream(handle: RequestHandle, text: Any, first: list[dict], chunk: Callable[[str, str | None], dict],
               usage_chunk: Callable[[dict], dict] | None, prompt_tokens: int) -> StreamingResponse:
        """Server-sent events: `first` chunks, one chunk per new piece of text, the finishing chunk,
        optionally a usage chunk, then `[DONE]`. A closed connection cancels the request."""

        async def events() -> AsyncIterator[bytes]:
            try:
                for item in first:
                    yield protocol.sse(item)
                while True:
                    event = await handle.next_event()
                    if event.error:
                        yield protocol.sse(APIError(500, event.error, type="server_error").body())
                        return
                    piece = text.feed(event.tokens)
                    if event.final:
                        piece += text.finish()
                    if piece:
                        yield protocol.sse(chunk(piece, None))
                    if event.final:
                        if event.finish_reason == FINISH_CANCELLED:
                            return
                        yield protocol.sse(chunk("", event.finish_reason))
                        if usage_chunk is not None:
                            yield protocol.sse(usage_chunk(protocol.usage(prompt_tokens, len(text.ids))))
                        yield protocol.sse("[DONE]")
                        return
            finally:
                handle.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def encode(text: str) -> list[int]:
        return await asyncio.to_thread(tokenizer.encode, text)

    # -------------------------------------------------------------------------------- endpoints

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [protocol.model_card(model_name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        authorize(request)
        check_model(model_id)
        return protocol.model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_openai_body(request, protocol.ChatCompletionRequest)
        if roles:
            query, messages = body.role_messages()
            ids = await asyncio.to_thread(tokenizer.build_chat_input, query, messages)
        else:
            query, history = body.turns()
            try:
                build_prompt = prompt_builder(family)
            except ValueError as e:
                raise APIError(400, f"{e}; /v1/completions takes raw text") from None
            ids = await encode(build_prompt(query, history))
        limit = new_tokens(len(ids), body.requested_tokens, limits.max_new_tokens, "messages")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        handle = submit(GenerationRequest(tuple(ids), limit, body.sampling(defaults), seed, stop_ids))
        id_ = protocol.new_id("chatcmpl")
        if body.stream:
            first = [protocol.chat_chunk(id_, model_name, {"role": "assistant", "content": ""})]
            return stream(
                handle, answer_stream(tokenizer, family, stop_ids), first,
                lambda piece, reason: protocol.chat_chunk(id_, model_name, {"content": piece} if piece else {}, reason),
                (lambda u: protocol.chat_chunk(id_, model_name, {}, usage_=u)) if body.include_usage else None,
                len(ids),
            )
        text = answer_stream(tokenizer, family, stop_ids)
        answer, reason = await collect(request, handle, text)
        return protocol.chat_completion(id_, model_name, answer, reason, protocol.usage(len(ids), len(text.ids)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_openai_body(request, protocol.CompletionRequest)
        ids = await encode(body.text)
        limit = new_tokens(len(ids), body.requested_tokens, limits.default_completion_tokens, "prompt")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        handle = submit(GenerationRequest(tuple(ids), limit, body.sampling(defaults), seed, stop_ids))
        id_ = protocol.new_id("cmpl")
        if body.stream:
            return stream(
                handle, CompletionText(tokenizer), [],
                lambda piece, reason: protocol.completion(id_, model_name, piece, reason),
                (lambda u: {**protocol.completion(id_, model_name, "", None, u), "choices": []})
                if body.include_usage else None,
                len(ids),
            )
        text = CompletionText(tokenizer)
        answer, reason = await collect(request, handle, text)
        return protocol.completion(id_, model_name, answer, reason, protocol.usage(len(ids), len(text.ids)))

    @app.post("/")
    async def official_chat(request: Request) -> dict:
        body = await read_body(request, protocol.OfficialChatRequest)
        history = [(q, r) for q, r in body.history or []]
        try:  # the prompt and history truncation of glm_jax.chat.chat
            turn = prepare_turn(engine.model, tokenizer, body.prompt, history, body.settings(defaults),
                                DEFAULT_RESERVE_TOKENS)
        except ValueError as e:
            raise APIError(400, str(e), param="max_length") from None
        ids, settings = turn.ids, turn.settings
        kept = [(m["content"], r["content"]) for m, r in zip(turn.kept[::2], turn.kept[1::2])] if roles else turn.kept
        sampling = protocol.sampling_params(settings["temperature"], settings["top_p"], settings["top_k"], 1.0)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        limit = min(settings["max_length"] - len(ids), limits.max_new_tokens)
        handle = submit(GenerationRequest(tuple(ids), limit, sampling, seed, stop_ids))
        response, _ = await collect(request, handle, answer_stream(tokenizer, family, stop_ids))
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info("[%s] prompt: %r, response: %r", now, body.prompt, response)
        return {"response": response, "history": [list(turn) for turn in kept] + [[body.prompt, response]],
                "status": 200, "time": now}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **dataclasses.asdict(engine.stats())}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
