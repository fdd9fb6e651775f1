"""Choosing the next token from logits, in the order the official `generate` uses.

The official ChatGLM code runs Hugging Face `generate`: logits processors first (repetition penalty,
then ChatGLM's invalid-score guard, spec §1.9), then warpers (temperature -> top-k -> top-p), then
argmax (greedy) or a categorical draw. The same order is kept here so that the same settings mean
the same distribution.

Settings are split in two: what changes the compiled program (greedy or not, top-k's `k`, whether
top-p / the repetition penalty are on) is a small hashable `SamplingPlan`; the values (temperature,
top-p, penalty) are traced scalars, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jnp.ndarray

# The official InvalidScoreLogitsProcessor puts all mass on this id when a row has NaN/Inf scores.
INVALID_SCORE_TOKEN_ID = 5
INVALID_SCORE_VALUE = 5e4


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """User-facing decoding settings; invalid values raise `ValueError` naming the setting.

    `temperature == 0` means greedy even with `do_sample=True` (the limit of sampling as the
    temperature goes to zero). `top_k == 0` and `top_p == 1` switch those filters off;
    `repetition_penalty == 1` switches the penalty off.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        penalty = self.repetition_penalty
        if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def plan(self, vocab_size: int) -> SamplingPlan:
        """The static part: settings that change the shape of the computation."""
        if self.greedy:
            return SamplingPlan(greedy=True, top_k=0, top_p=False, penalty=self.repetition_penalty != 1)
        top_k = min(self.top_k, vocab_size) if self.top_k else 0
        return SamplingPlan(greedy=False, top_k=top_k, top_p=self.top_p < 1, penalty=self.repetition_penalty != 1)

    def values(self) -> SamplingValues:
        """The traced part (float32 scalars)."""
        temperature = self.temperature if not self.greedy else 1.0
        return SamplingValues(
            jnp.float32(temperature), jnp.float32(self.top_p), jnp.float32(self.repetition_penalty)
        )


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    greedy: bool
    top_k: int
    top_p: bool
    penalty: bool


class SamplingValues(NamedTuple):
    temperature: Array
    top_p: Array
    repetition_penalty: Array


def apply_repetition_penalty(logits: Array, seen: Array, penalty: Array) -> Array:
    """Hugging Face's rule: scores of already seen tokens are divided by `penalty` if positive,
    multiplied by it if negative. `seen [B, V]` bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def guard_invalid_scores(logits: Array) -> Array:
    """ChatGLM's InvalidScoreLogitsProcessor, per row: a row with any NaN/Inf becomes all zeros
    except `INVALID_SCORE_VALUE` at `INVALID_SCORE_TOKEN_ID`, so decoding never draws from NaN."""
    bad = ~jnp.all(jnp.isfinite(logits), axis=-1, keepdims=True)
    replacement = jnp.zeros_like(logits).at[:, INVALID_SCORE_TOKEN_ID].set(INVALID_SCORE_VALUE)
    return jnp.where(bad, replacement, logits)


def top_k_filter(logits: Array, k: int) -> tuple[Array, Array]:
    """Removes (sets to -inf) every logit below the k-th largest of its row (ties kept, as HF does).

    Also returns the k largest values, sorted descending, for `top_p_filter`.
    """
    largest = lax.top_k(logits, k)[0]
    return jnp.where(logits < largest[:, -1:], -jnp.inf, logits), largest


def top_p_filter(logits: Array, top_p: Array, sorted_desc: Array | None = None) -> Array:
    """Nucleus filter: keeps the most likely tokens whose cumulative probability before them is
    below `top_p` (the most likely token is always kept).

    This is HF's rule (sort ascending, remove while the cumulative probability is <= 1 - top_p)
    written from the top. `sorted_desc` may be the candidates already sorted descending (e.g. the
    top-k values), which avoids sorting the whole vocabulary; tokens tied with the k-th value that
    top-k kept then do not count towards the cumulative probability.
    """
    if sorted_desc is None:
        sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, jnp.maximum(keep, 1) - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def process_logits(logits: Array, plan: SamplingPlan, values: SamplingValues, seen: Array | None) -> Array:
    """Processors then warpers: the scores the next token is drawn from (-inf = excluded).

    `logits [B, V]` float32; `seen [B, V]` bool (tokens of the prompt and the output so far), needed
    only when the plan has a repetition penalty.
    """
    logits = logits.astype(jnp.float32)
    if plan.penalty:
        logits = apply_repetition_penalty(logits, seen, values.repetition_penalty)
    logits = guard_invalid_scores(logits)
    if plan.greedy:
        return logits
    logits = logits / values.temperature
    largest = None
    if plan.top_k:
        logits, largest = top_k_filter(logits, plan.top_k)
    if plan.top_p:
        logits = top_p_filter(logits, values.top_p, largest)
    return logits


def choose_tokens(
    logits: Array, rng: Array, plan: SamplingPlan, values: SamplingValues, seen: Array | None = None
) -> Array:
    """Next token ids `[B]` (int32): argmax when greedy, else a draw from the processed scores."""
    scores = process_logits(logits, plan, values, seen)
    if plan.greedy:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, scores, axis=-1).astype(jnp.int32)
