"""Wire formats of the server: OpenAI-compatible requests and responses, the official ChatGLM-6B
`api.py` request, and errors shaped like OpenAI's (`{"error": {message, type, param, code}}`) so that
OpenAI clients surface the message.

Fields a client may send but this server cannot honour with the same meaning (n > 1, logprobs,
echo, suffix, best_of, tools, stop sequences, presence/frequency penalties) are rejected with a 400
naming the field instead of being silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from glm_jax.chat import DEFAULT_SETTINGS
from glm_jax.sampling import SamplingParams


class APIError(Exception):
    """An error answered to the client (status code + OpenAI-style body)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- parsing


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says where it is broken."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def validate(model: type[BaseModel], data: Any) -> Any:
    """`data` as a `model`, or a 400 naming each bad field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        first = ".".join(str(p) for p in e.errors()[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(problems), param=first) from None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _SamplingFields(BaseModel):
    """Sampling fields shared by both OpenAI endpoints; `top_k` and `repetition_penalty` are extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None

    def reject_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n}: this server returns one choice per request (n=1)", param="n")
        if self.stop:
            raise APIError(400, "stop sequences are not supported; generation ends at the model's stop token "
                                "or max_tokens", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (1 = off)", param=name)
        if self.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, defaults: dict[str, Any] = DEFAULT_SETTINGS) -> SamplingParams:
        """Omitted fields take the model's own chat defaults (`defaults`: the family's, ChatGLM-6B's
        temperature 0.95, top-p 0.7, top-k 50 unless given); temperature 0 is greedy."""
        temperature = defaults["temperature"] if self.temperature is None else self.temperature
        return sampling_params(
            temperature, defaults["top_p"] if self.top_p is None else self.top_p,
            defaults["top_k"] if self.top_k is None else self.top_k,
            1.0 if self.repetition_penalty is None else self.repetition_penalty,
        )


def sampling_params(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> SamplingParams:
    """`SamplingParams` (greedy when temperature is 0), or a 400 naming the bad setting."""
    try:
        return SamplingParams(do_sample=temperature > 0, temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), repetition_penalty=float(repetition_penalty))
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Any = None
    functions: Any = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.tools or self.functions:
            raise APIError(400, "tools / function calling are not supported by this model", param="tools")

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def turns(self) -> tuple[str, list[tuple[str, str]]]:
        """(query, history) of ChatGLM's chat format. System messages may only lead; their text is put
        in front of the query (the official ChatGLM OpenAI-style server does the same). The other
        messages must alternate user / assistant and end with a user message."""
        messages = list(self.messages)
        system = ""
        while messages and messages[0].role in ("system", "developer"):
            system += messages.pop(0).text
        if not messages or messages[-1].role != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        history = []
        earlier = messages[:-1]
        for i in range(0, len(earlier), 2):
            pair = earlier[i:i + 2]
            roles = [m.role for m in pair]
            if roles != ["user", "assistant"]:
                raise APIError(400, f"messages[{i + 1}:{i + 3}] have roles {roles}: before the last message, "
                                    "messages must alternate user, assistant (system messages only first)",
                               param="messages")
            history.append((pair[0].text, pair[1].text))
        return system + messages[-1].text, history

    def role_messages(self) -> tuple[str, list[dict[str, str]]]:
        """(query, history) for role-token chats (ChatGLM3, GLM-4): the earlier messages as role
        messages (developer = system), in any order; the last message must come from the user."""
        if self.messages[-1].role != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        history = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                   for m in self.messages[:-1]]
        return self.messages[-1].text, history


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported (use [MASK] infilling with glm_jax.generation)",
                           param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class OfficialChatRequest(BaseModel):
    """The official ChatGLM-6B `api.py` body. Missing or null settings fall back to 2048 / 0.7 / 0.95
    like the official server; `seed` is an extension (default: a fresh one per request)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = None
    max_length: Annotated[int, Field(ge=1)] | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None

    def settings(self, defaults: dict[str, Any] = DEFAULT_SETTINGS) -> dict[str, Any]:
        """`glm_jax.chat` settings: the official chat sampling, with the official fallbacks (`defaults`:
        the model family's chat defaults, ChatGLM-6B's unless given)."""
        return dict(
            defaults,
            max_length=self.max_length or defaults["max_length"],
            top_p=defaults["top_p"] if self.top_p is None else self.top_p,
            temperature=defaults["temperature"] if self.temperature is None else self.temperature,
        )


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id_: str, model: str, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage_,
    }


def chat_chunk(id_: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `usage_` and no delta, the final usage-only chunk."""
    choices = [] if usage_ is not None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion(id_: str, model: str, text: str, finish_reason: str | None,
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A `text_completion` (also each streamed chunk, with the new text only)."""
    body = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "glm-jax"}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: ...` + blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
