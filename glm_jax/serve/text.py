"""Incremental text of a raw completion (no chat post-processing), for streaming `/v1/completions`.

Same contract as `glm_jax.chat.ResponseStream` (`feed` / `finish` / `response`): the pieces only
ever extend the text and concatenate to exactly the final decode. A character whose UTF-8 bytes are
split over byte-fallback tokens decodes to U+FFFD until its last byte arrives, so a trailing U+FFFD
is held back.
"""

from __future__ import annotations

from collections.abc import Sequence

from glm_jax.tokenizer import ChatGLMTokenizer


class CompletionText:
    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    @property
    def response(self) -> str:
        return self._tokenizer.decode(self.ids)

    def feed(self, new_ids: Sequence[int]) -> str:
        """New final text after `new_ids` (possibly empty)."""
        self.ids += list(new_ids)
        return self._advance(self.response.rstrip("\ufffd"))

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._advance(self.response)

    def _advance(self, stable: str) -> str:
        if not stable.startswith(self.emitted):
            return ""  # SentencePiece decoding only appends; kept as a guard against taking text back
        delta = stable[len(self.emitted):]
        self.emitted = stable
        return delta
