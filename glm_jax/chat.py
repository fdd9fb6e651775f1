"""Chat with the GLM chat models on top of `glm_jax.generation`: the prompt format of each family,
response post-processing and streaming text.

Formats: ChatGLM-6B (spec §1.9: `[Round k]` text turns, `process_response` with full-width
punctuation) and ChatGLM2 (spec §2.4: 1-based `[Round k]` turns, strip) take `(query, response)`
history pairs; ChatGLM3 and GLM-4 chat in role messages built by their tokenizer's
`build_chat_input` and stop at `<|user|>` / `<|observation|>` too (`glm_jax.chat_messages`). The
tokenizer decides between the two (ChatGLM2 and ChatGLM3 share one model config); the sampling
defaults are the family's official ones.

`chat` returns the whole answer; `stream_chat` yields it piece by piece. Streaming must never emit
text that a later token would change, so each step decodes *all* generated ids and emits only the
part that is final: a trailing U+FFFD (a multi-byte character split across tokens), trailing
whitespace, a trailing ASCII `, ! : ; ?` (ChatGLM-6B: converted to full width when a CJK character
follows) and partial matches of the other rewrites are held back until the next token decides them.
The pieces therefore concatenate to exactly the text `chat` returns for the same settings.

History policy: when the prompt would not leave `reserve_tokens` of room under `max_length` (and
the model's context), the oldest rounds are dropped first; if the query alone is still too long,
its beginning is cut off (the end of the question is kept). Nothing raises for long histories.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from glm_jax.chat_messages import AnswerStream, fit_chat_input, uses_role_messages
from glm_jax.generation import generate, stream_generate
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.tokenizer import ChatGLMTokenizer

History = list[tuple[str, str]]

# Official ChatGLM-6B `chat` defaults; top_k=50 is transformers' default, which applies because the
# official repository ships no generation_config.json (spec §1.9).
DEFAULT_SETTINGS: dict[str, Any] = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)
# ChatGLM2/3 `chat` (spec §2.4); top_k=50 as above.
CHATGLM2_SETTINGS: dict[str, Any] = dict(max_length=8192, do_sample=True, top_p=0.8, temperature=0.8, top_k=50)
DEFAULT_RESERVE_TOKENS = 256

_TRAINING_DATE = ("[[训练时间]]", "2023年")
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = "\u4e00-\u9fff"
# transformers' clean_up_tokenization removes the space before these (the official decode runs it).
_CLEANUP_TAILS = (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re")


def build_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM-6B prompt: the bare query without history, else numbered `[Round k]` turns."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def build_prompt_chatglm2(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM2 prompt (spec §2.4): 1-based `[Round k]` turns, header present even without history."""
    turns = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, start=1))
    return turns + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


PromptBuilder = Callable[[str, Sequence[tuple[str, str]]], str]
# ChatGLM3 and GLM-4 chat with role tokens instead (their tokenizers' `build_chat_input`).
_PROMPT_BUILDERS: dict[str, PromptBuilder] = {"chatglm": build_prompt, "chatglm2": build_prompt_chatglm2}


def prompt_builder(family: str) -> PromptBuilder:
    """The text prompt format of a model family (`GLMConfig.family`)."""
    if family not in _PROMPT_BUILDERS:
        raise ValueError(f"no text chat prompt format for model family {family!r} (known: {', '.join(_PROMPT_BUILDERS)})")
    return _PROMPT_BUILDERS[family]


def process_response(text: str) -> str:
    """The official `process_response`: strip, fill the training date, and make ASCII `, ! : ; ?`
    full width where they touch a CJK character."""
    text = text.strip().replace(*_TRAINING_DATE)
    for ascii_mark, wide in _PUNCTUATION:
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\g<1>{wide}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{wide}\g<1>", text)
    return text


def _undecided_tail(text: str) -> int:
    """Length of the end of `text` (decoded, cleaned up, before `process_response`) that later
    tokens may still change."""
    cut = len(text)
    while True:
        before = cut
        cut = len(text[:cut].rstrip("\ufffd"))  # incomplete UTF-8
        cut = len(text[:cut].rstrip())  # stripped at the end; cleanup removes a space before ".,!?'"
        if cut and text[cut - 1] in ",!:;?":  # full width iff a CJK character follows
            cut -= 1
        marker = _TRAINING_DATE[0]
        for n in range(len(marker) - 1, 0, -1):  # a partial "[[训练时间]]"
            if text[:cut].endswith(marker[:n]):
                cut -= n
                break
        space = text.rfind(" ", 0, cut)
        if space >= 0 and any(tail.startswith(text[space + 1:cut]) for tail in _CLEANUP_TAILS):
            cut = space  # " n" may become "n't" without the space
        if cut == before:
            return len(text) - cut


class ResponseStream:
    """Turns the growing list of generated ids into final pieces of the processed response."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def _decode(self) -> str:
        return self._tokenizer.decode(self.ids, clean_up_tokenization_spaces=True)

    def feed(self, new_ids: Sequence[int]) -> str:
        """New final text after `new_ids` (possibly empty)."""
        self.ids += list(new_ids)
        text = self._decode()
        stable = process_response(text[: len(text) - _undecided_tail(text)])
        return self._advance(stable)

    def finish(self) -> str:
        """The rest of the response once generation has ended."""
        return self._advance(self.response)

    @property
    def response(self) -> str:
        return process_response(self._decode())

    def _advance(self, stable: str) -> str:
        if not stable.startswith(self.emitted):
            return ""  # cannot happen while the held-back rules cover every rewrite
        delta = stable[len(self.emitted):]
        self.emitted = stable
        return delta


def fit_prompt(
    tokenizer: ChatGLMTokenizer, query: str, history: Sequence[tuple[str, str]], budget: int,
    build: PromptBuilder = build_prompt,
) -> tuple[list[int], History]:
    """Prompt ids of at most `budget` tokens, and the history actually used (oldest rounds
    dropped first; with no history left, the query's beginning is cut off)."""
    kept = [(str(q), str(r)) for q, r in history]
    while True:
        ids = tokenizer.encode(build(query, kept))
        if len(ids) <= budget:
            return ids, kept
        if not kept:  # keep the end of the text; the tokenizer puts [gMASK] <sop> back where they go
            text_ids = tokenizer.encode(build(query, kept), add_special_tokens=False)
            return tokenizer.build_inputs_with_special_tokens(text_ids[-(budget - 2):]), kept
        kept = kept[1:]


def answer_stream(tokenizer: Any, family: str, stop_ids: Sequence[int] | None = None) -> ResponseStream | AnswerStream:
    """A reader of one answer's generated ids (`feed` / `finish` / `response`) in the format of the
    tokenizer and model family: ChatGLM-6B's `process_response`, ChatGLM2's, or role segments."""
    roles = uses_role_messages(tokenizer)
    if family == "chatglm" and not roles:
        return ResponseStream(tokenizer)
    return AnswerStream(tokenizer, getattr(tokenizer, "stop_token_ids", ()) if stop_ids is None else stop_ids,
                        split_metadata=roles)


@dataclasses.dataclass
class ChatTurn:
    """One prepared chat turn: the prompt ids, the history they hold (after truncation), the
    `generate` settings, and how the answer is read back into a response and a history."""

    ids: list[int]
    kept: list[Any]
    settings: dict[str, Any]
    query: str
    role: str
    tokenizer: Any
    roles: bool  # role messages (ChatGLM3, GLM-4) rather than (query, response) pairs
    family: str

    def answer_stream(self) -> ResponseStream | AnswerStream:
        """A fresh reader of this turn's generated ids."""
        return answer_stream(self.tokenizer, self.family, self.settings.get("stop_ids"))

    def history(self, answer: ResponseStream | AnswerStream, response: str) -> list[Any]:
        """The history after this turn: role messages with every assistant segment, or pairs."""
        if self.roles:
            return self.kept + [{"role": self.role, "content": self.query}] + answer.messages
        return self.kept + [(self.query, response)]


def default_settings(family: str) -> dict[str, Any]:
    """The official `chat` defaults of a model family (`GLMConfig.family`): ChatGLM-6B's, or those of
    ChatGLM2/3 (spec §2.4), also used for GLM-4 (the spec records no chat defaults of its own)."""
    return dict(DEFAULT_SETTINGS if family == "chatglm" else CHATGLM2_SETTINGS)


def prepare_turn(
    model: GLMForCausalLM, tokenizer: Any, query: str, history: Sequence[Any] | None, settings: dict[str, Any],
    reserve_tokens: int, role: str = "user",
) -> ChatTurn:
    """The prompt (in the format of the tokenizer / model family), the history it holds and the
    `generate` settings (the family's chat defaults under `settings`) of one turn."""
    family = model.config.family
    merged = {**default_settings(family), **settings}
    limit = min(int(merged.pop("max_length")), model.config.max_sequence_length)
    if limit < 8:
        raise ValueError(f"max_length={limit} is too small for a chat turn")
    budget = limit - max(1, min(reserve_tokens, limit // 2))
    roles = uses_role_messages(tokenizer)
    if roles:
        ids, kept = fit_chat_input(tokenizer, query, history or [], budget, role)
        merged.setdefault("stop_ids", tuple(tokenizer.stop_token_ids))
    elif role != "user":
        raise ValueError(f"role={role!r}: only role-token chats (ChatGLM3, GLM-4) take roles other than 'user'")
    else:
        ids, kept = fit_prompt(tokenizer, query, history or [], budget, prompt_builder(family))
    return ChatTurn(ids, kept, dict(merged, max_length=limit), query, role, tokenizer, roles, family)


def chat(
    model: GLMForCausalLM,
    params: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Any] | None = None,
    *,
    role: str = "user",
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    **settings: Any,
) -> tuple[str, list[Any]]:
    """`(response, history after the turn)`: the official `chat`, with history truncation.

    ChatGLM-6B / ChatGLM2: `history` is `(query, response)` pairs. ChatGLM3 / GLM-4 (a tokenizer with
    role tokens): `history` is role messages (pairs are accepted too), `role` is the query's role
    ("observation" returns a tool's result), and the history gains the query and one assistant
    message per answer segment. `settings` are `generate`'s keyword arguments; the defaults are the
    family's official chat sampling (`default_settings`).
    """
    turn = prepare_turn(model, tokenizer, query, history, settings, reserve_tokens, role)
    new_ids = generate(model, params, [turn.ids], **turn.settings)[0]
    answer = turn.answer_stream()
    answer.feed(new_ids)
    return answer.response, turn.history(answer, answer.response)


def stream_chat(
    model: GLMForCausalLM,
    params: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Any] | None = None,
    *,
    role: str = "user",
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    **settings: Any,
) -> Iterator[tuple[str, list[Any]]]:
    """Yields `(new_text, history)` while the answer is generated; same answer as `chat`.

    The `new_text` pieces concatenate to the response (for role chats: unless the model opens a
    second `<|assistant|>` segment, see `glm_jax.chat_messages`); `history` is the history used
    (after truncation) plus the turn so far. The last item carries the complete history.
    """
    turn = prepare_turn(model, tokenizer, query, history, settings, reserve_tokens, role)
    answer = turn.answer_stream()
    streamed = ""
    for new_ids in stream_generate(model, params, turn.ids, **turn.settings):
        delta = answer.feed(new_ids)
        if delta:
            streamed += delta
            yield delta, turn.history(answer, streamed)
    yield answer.finish(), turn.history(answer, answer.response)
