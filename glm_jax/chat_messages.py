"""Answers of the ChatGLM2 generation of chat models (ChatGLM2/3, GLM-4): role-message histories,
the official `process_response`, and streaming text that is never taken back.

ChatGLM3 and GLM-4 chat in role messages (`{"role", "content"}`, optional `"metadata"`; a ChatGLM3
system message may carry `"tools"`), built into ids by the tokenizer's `build_chat_input`. The model
answers after `<|assistant|>` with a metadata line and the content (`"\\n你好"`: empty metadata), and
may open further `<|assistant|>` segments (tool calls name the tool in the metadata); it ends at
`<|user|>` / `<|observation|>` / eos. The official ChatGLM3 `process_response` splits the decoded
answer (special tokens written by name) at `<|assistant|>`: every segment becomes an assistant message
of the history, a plain segment's content is stripped, and the response is the last segment's
content, with `[[训练时间]]` filled in. Tool calls are not executed or parsed here (the official code
`eval`s them): the call stays in the history with its metadata (the tool's name) and its content.

ChatGLM2's text answers follow the same rules with a single segment and no metadata line (its
`process_response`: strip, fill the training date).

History truncation for role chats: when the prompt does not fit, the oldest round (a user message and
everything up to the next user message) is dropped first, leading system messages last; if the query
alone is still too long, its beginning is cut off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "observation")
ASSISTANT = "<|assistant|>"
_TRAINING_DATE = ("[[训练时间]]", "2023年")


def uses_role_messages(tokenizer: Any) -> bool:
    """Whether `tokenizer` builds chat input from role messages (ChatGLM3, GLM-4)."""
    return callable(getattr(tokenizer, "build_chat_input", None))


def as_messages(history: Iterable[Any]) -> list[Message]:
    """Role messages from `history`: message dicts, or `(query, response)` pairs (a user and an
    assistant message each). Raises on an unknown role or a message without text content."""
    messages: list[Message] = []
    for i, item in enumerate(history):
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if role not in ROLES:
                raise ValueError(f"history[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"history[{i}] ({role}) needs text content, got {type(content).__name__}")
            messages.append(dict(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            messages += [{"role": "user", "content": str(item[0])}, {"role": "assistant", "content": str(item[1])}]
        else:
            raise ValueError(f"history[{i}] is neither a role message nor a (query, response) pair: {item!r}")
    return messages


def _without_oldest_round(messages: list[Message]) -> list[Message] | None:
    """`messages` without their oldest round (a user message up to the next one); the leading system
    messages go only when nothing else is left. None when there is nothing to drop."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if first == len(messages):
        return messages[1:] if messages else None
    end = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), len(messages))
    return messages[:first] + messages[end:]


def fit_chat_input(
    tokenizer: Any, query: str, history: Sequence[Message], budget: int, role: str = "user",
) -> tuple[list[int], list[Message]]:
    """`build_chat_input` ids of at most `budget` tokens and the history actually used (oldest rounds
    dropped first; with no history left, the query's beginning is cut off)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    kept = as_messages(history)
    while True:
        ids = tokenizer.build_chat_input(query, kept, role=role)
        if len(ids) <= budget:
            return ids, kept
        shorter = _without_oldest_round(kept)
        if shorter is None:
            break
        kept = shorter
    # Longest end of the query that fits: prompt length grows with the kept suffix (binary search).
    low, high = 0, len(query)  # invariant: the suffix of length `low` fits (checked below), `high + 1` does not
    if len(tokenizer.build_chat_input("", [], role=role)) > budget:
        raise ValueError(f"a chat prompt needs more than {budget} tokens even without any text: raise max_length")
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.build_chat_input(query[len(query) - middle:], [], role=role)) <= budget:
            low = middle
        else:
            high = middle - 1
    return tokenizer.build_chat_input(query[len(query) - low:], [], role=role), []


@dataclasses.dataclass
class _Segment:
    """One `<|assistant|>` segment of an answer; `content` is None while the metadata line is open."""

    metadata: str
    content: str | None

    @property
    def plain(self) -> bool:
        return not self.metadata.strip()


def _segments(text: str, split_metadata: bool) -> list[_Segment]:
    if not split_metadata:
        return [_Segment("", text)]
    segments = []
    for part in text.split(ASSISTANT):
        metadata, newline, content = part.partition("\n")
        segments.append(_Segment(metadata, content) if newline else _Segment(part, None))
    return segments


def _final_content(segment: _Segment) -> str:
    """A finished segment's content as the official `process_response` leaves it (a segment that
    never had a newline is all content)."""
    if segment.content is None:
        return segment.metadata.strip().replace(*_TRAINING_DATE)
    return segment.content.strip().replace(*_TRAINING_DATE) if segment.plain else segment.content


def _stable_content(segment: _Segment) -> str:
    """The part of an unfinished segment's final content that later tokens cannot change."""
    if segment.content is None:
        return ""  # metadata line still open: a tool name or the start of plain content
    content = segment.content.rstrip("\ufffd")  # incomplete UTF-8
    if not segment.plain:
        return content
    content = content.lstrip().rstrip()  # stripped at both ends once final
    marker = _TRAINING_DATE[0]
    for n in range(len(marker) - 1, 0, -1):  # a partial "[[训练时间]]"
        if content.endswith(marker[:n]):
            content = content[:-n]
            break
    return content.replace(*_TRAINING_DATE)


class AnswerStream:
    """Generated ids -> final pieces of the answer, and the official response and history messages.

    `split_metadata=True` for role chats (ChatGLM3, GLM-4), False for ChatGLM2's text answers. Stop
    tokens are not part of the answer (at the length limit the official code drops the last token
    as if it were one; it is kept here). The pieces concatenate to `response` whenever the answer is a
    single segment; when the model opens another `<|assistant|>` segment the stream carries on with
    it (nothing is taken back), and `messages` hold the official split.
    """

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int] = (), *, split_metadata: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._split = split_metadata
        self.ids: list[int] = []
        self._segment = 0  # index of the segment being streamed
        self._emitted = ""  # what was emitted of it

    def _text(self) -> str:
        """The answer decoded as the official tokenizers do it: one SentencePiece `DecodePieces` over
        every piece, with the special tokens by name (role chats) or as nothing (ChatGLM2) and the pad
        id as nothing. Decoding the runs between specials separately would drop the space of a
        word-start piece (`▁x`) that follows a special; the official single decode keeps it."""
        tok = self._tokenizer
        specials = set(tok.special_ids.values())
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                first = tok.convert_ids_to_tokens(run[0])
                space = " " if "".join(out) and isinstance(first, str) and first.startswith("\u2581") else ""
                out.append(space + tok.decode(run, skip_special_tokens=False))
                run.clear()

        for i in self.ids:
            if i in self._stop_ids or i == tok.pad_token_id:
                continue
            if i in specials:
                flush()
                out.append(tok.convert_ids_to_tokens(i) if self._split else "")
            else:
                run.append(i)
        flush()
        return "".join(out)

    def _decoded(self) -> list[_Segment]:
        return _segments(self._text(), self._split)

    def feed(self, new_ids: Sequence[int]) -> str:
        """New final text after `new_ids` (possibly empty)."""
        self.ids += [int(i) for i in new_ids]
        return self._advance(self._decoded(), finished=False)

    def finish(self) -> str:
        """The rest of the answer once generation has ended."""
        return self._advance(self._decoded(), finished=True)

    def _advance(self, segments: list[_Segment], finished: bool) -> str:
        out = []
        for index in range(self._segment, len(segments)):
            done = finished or index < len(segments) - 1
            text = _final_content(segments[index]) if done else _stable_content(segments[index])
            if text.startswith(self._emitted):  # always, while the held-back rules cover every rewrite
                out.append(text[len(self._emitted):])
                self._emitted = text
            if index < len(segments) - 1:
                self._segment, self._emitted = index + 1, ""
        return "".join(out)

    @property
    def response(self) -> str:
        """The official response: the last segment's content."""
        return _final_content(self._decoded()[-1])

    @property
    def messages(self) -> list[Message]:
        """The assistant messages of the answer, one per segment, as the official history keeps them
        (a plain segment's content stripped, before the training date is filled in)."""
        messages = []
        for segment in self._decoded():
            if segment.content is None:
                metadata, content = "", segment.metadata
            else:
                metadata, content = segment.metadata, segment.content
            messages.append({"role": "assistant", "metadata": metadata,
                             "content": content.strip() if not metadata.strip() else content})
        return messages
