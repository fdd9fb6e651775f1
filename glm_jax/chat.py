"""ChatGLM-6B chat: the history prompt format, response post-processing and streaming text
(spec §1.9), on top of `glm_jax.generation`.

`chat` returns the whole answer; `stream_chat` yields it piece by piece. Streaming must never emit
text that a later token would change, so each step decodes *all* generated ids and emits only the
part that is final: a trailing U+FFFD (a multi-byte character split across tokens), trailing
whitespace, a trailing ASCII `, ! : ; ?` (converted to full width when a CJK character follows) and
partial matches of the other rewrites are held back until the next token decides them. The pieces
therefore always concatenate to exactly the text `chat` returns for the same settings.

History policy: when the prompt would not leave `reserve_tokens` of room under `max_length` (and
the model's context), the oldest rounds are dropped first; if the query alone is still too long,
its beginning is cut off (the end of the question is kept). Nothing raises for long histories.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from glm_jax.generation import generate, stream_generate
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.tokenizer import ChatGLMTokenizer

History = list[tuple[str, str]]

# Official ChatGLM-6B `chat` defaults; top_k=50 is transformers' default, which applies because the
# official repository ships no generation_config.json (spec §1.9).
DEFAULT_SETTINGS: dict[str, Any] = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)
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


def _prepare(
    model: GLMForCausalLM, tokenizer: ChatGLMTokenizer, query: str, history: Sequence[tuple[str, str]] | None,
    settings: dict[str, Any], reserve_tokens: int,
) -> tuple[list[int], History, dict[str, Any]]:
    """(prompt ids, history used, `generate` settings) for one turn."""
    merged = {**DEFAULT_SETTINGS, **settings}
    limit = min(int(merged.pop("max_length")), model.config.max_sequence_length)
    if limit < 8:
        raise ValueError(f"max_length={limit} is too small for a chat turn")
    budget = limit - max(1, min(reserve_tokens, limit // 2))
    ids, kept = fit_prompt(tokenizer, query, history or [], budget, prompt_builder(model.config.family))
    return ids, kept, dict(merged, max_length=limit)


def chat(
    model: GLMForCausalLM,
    params: Any,
    tokenizer: ChatGLMTokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    *,
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    **settings: Any,
) -> tuple[str, History]:
    """`(response, history + [(query, response)])`: the official `chat`, with history truncation.

    `settings` are `generate`'s keyword arguments; the defaults are the official chat's sampling
    (`do_sample=True, top_p=0.7, temperature=0.95, top_k=50`) and `max_length=2048`.
    """
    ids, kept, gen_settings = _prepare(model, tokenizer, query, history, settings, reserve_tokens)
    new_ids = generate(model, params, [ids], **gen_settings)[0]
    response = process_response(tokenizer.decode(new_ids, clean_up_tokenization_spaces=True))
    return response, kept + [(query, response)]


def stream_chat(
    model: GLMForCausalLM,
    params: Any,
    tokenizer: ChatGLMTokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    *,
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    **settings: Any,
) -> Iterator[tuple[str, History]]:
    """Yields `(new_text, history)` while the answer is generated; same answer as `chat`.

    The `new_text` pieces concatenate to the response; `history` is the history used (after
    truncation) plus `(query, response so far)`. The last item carries the complete response.
    """
    ids, kept, gen_settings = _prepare(model, tokenizer, query, history, settings, reserve_tokens)
    stream = ResponseStream(tokenizer)
    for new_ids in stream_generate(model, params, ids, **gen_settings):
        delta = stream.feed(new_ids)
        if delta:
            yield delta, kept + [(query, stream.emitted)]
    yield stream.finish(), kept + [(query, stream.response)]
