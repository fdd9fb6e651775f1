"""GLM's pre-training objective: autoregressive blank infilling (spec §4.1–4.2, §3.3).

A document `x` becomes one training example in three steps:

1. choose spans: token-level spans with truncated-Poisson lengths until 15 % of the tokens
   ("bert" mode, `[MASK]`), whole sentences until 15 % ("sentence" mode, `[sMASK]`) or one long
   suffix of 50–100 % of the document ("gpt" mode, `[gMASK]`);
2. Part A = `x` with each span replaced by one mask token; Part B = the spans in shuffled order, each
   as input `<sop> span` with target `span <eop>`;
3. 2D positions: a Part A token's position is its index in Part A, every Part B token carries the
   position of its span's mask token; block positions are 0 in Part A and 1, 2, ... inside each span.

Part A is bidirectional, Part B causal (it also sees all of Part A); the loss covers Part B only.
Everything is NumPy and a pure function of the document and a key: the random generator of one
example is seeded with `(seed, *example_key)`, so any example can be rebuilt alone, in any process.

Deviations from the original code, all deliberate: the mode is drawn per example (the original
draws it per batch), the document-level length is drawn per example from `[int(gpt_min_ratio·n),
n − 2]` (per batch there, from the shortest/longest sample), documents carry no leading `<ENC>`
token, and the `[dBLOCK]` noise uses the example's generator instead of Python's global one.
Packed documents never attend to each other (the original lets documents packed in one sample see
each other's Part A).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

MODES = ("bert", "sentence", "gpt")
# Characters that end a sentence (spec §4.2); a token whose piece contains one ends a sentence.
SENTENCE_END_CHARS = ".?!;:。？！；…\n"


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the objective writes into examples."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    pad: int
    dblock: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        """Ids of a `ChatGLMTokenizer` (`[dBLOCK]` is looked up by piece name)."""
        return cls(
            mask=tokenizer.mask_token_id, gmask=tokenizer.gmask_token_id, smask=tokenizer.smask_token_id,
            sop=tokenizer.bos_token_id, eop=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
            dblock=tokenizer.convert_tokens_to_ids("<dBLOCK>"),
        )


@dataclasses.dataclass(frozen=True)
class BlankInfillingConfig:
    """Knobs of the objective; defaults are GLM's token-level blank infilling (`bert_prob` 1).

    GLM-130B's mix (spec §3.3) is `bert_prob=0.3, gap_sentence_prob=0.0` (70 % `[gMASK]`);
    GLM-10B's is `bert_prob=0.5, gap_sentence_prob=0.3, gpt_min_ratio=0.25, block_mask_prob=0.1`.
    """

    bert_prob: float = 1.0
    gap_sentence_prob: float = 0.0
    mask_ratio: float = 0.15
    gap_sentence_ratio: float = 0.15
    average_block_length: float = 3.0
    max_block_length: int = 40
    gpt_min_ratio: float = 0.5
    gpt_infill_prob: float = 0.5
    block_mask_prob: float = 0.0
    shuffle_blocks: bool = True
    # True: sentence spans use [sMASK] and document spans [gMASK] (`--task-mask`); False: [MASK] for all.
    task_mask: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("bert_prob", "gap_sentence_prob", "mask_ratio", "gap_sentence_ratio", "gpt_min_ratio",
                     "gpt_infill_prob", "block_mask_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} is not in [0, 1]")
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            problems.append(f"bert_prob + gap_sentence_prob = {self.bert_prob + self.gap_sentence_prob} exceeds 1")
        if self.max_block_length < 2:
            problems.append(f"max_block_length={self.max_block_length} must be at least 2")
        if self.average_block_length <= 0:
            problems.append(f"average_block_length={self.average_block_length} must be positive")
        if problems:
            raise ValueError("invalid BlankInfillingConfig: " + "; ".join(problems))

    @property
    def gpt_prob(self) -> float:
        return max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob)


@dataclasses.dataclass(frozen=True)
class Example:
    """One document after the transform: Part A (length `sep`) followed by Part B."""

    input_ids: np.ndarray  # [n] int32
    targets: np.ndarray  # [n] int32 (Part A: the input itself, never scored)
    loss_mask: np.ndarray  # [n] int32, 1 on Part B targets
    position_ids: np.ndarray  # [2, n] int32: positions, block positions
    sep: int  # Part A length: keys before `sep` are visible to every query of the document
    mode: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def span_length_weights(config: BlankInfillingConfig) -> np.ndarray:
    """Probabilities of span lengths 1 … max_block_length−1: Poisson(λ) pmf restricted and renormalised."""
    lam = config.average_block_length
    lengths = np.arange(1, config.max_block_length)
    log_pmf = lengths * math.log(lam) - lam - np.array([math.lgamma(k + 1) for k in lengths])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


def example_rng(seed: int, key: Sequence[int]) -> np.random.Generator:
    """The generator of one example, a pure function of `(seed, *key)`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, key)])))


def sample_span_lengths(rng: np.random.Generator, length: int, config: BlankInfillingConfig) -> list[int]:
    """Span lengths drawn until their sum reaches `int(mask_ratio · length)` (may be empty)."""
    weights = span_length_weights(config)
    target = int(config.mask_ratio * length)
    lengths: list[int] = []
    while sum(lengths) < target:
        lengths.append(int(rng.choice(len(weights), p=weights)) + 1)
    # Keep only what fits with one unmasked token between spans (the original drops the sample
    # instead; this only triggers on very short documents).
    while lengths and sum(lengths) + len(lengths) - 1 > length:
        lengths.pop()
    return lengths


def place_spans(lengths: Sequence[int], total_length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Non-overlapping `[start, end)` spans of the given lengths, in order, at least one token apart.

    The original's placement: draw one offset per span uniformly in the "free" length
    `total − Σ lengths − (k − 1)`, sort the offsets, and lay the spans out left to right.
    """
    free = total_length - sum(lengths) - len(lengths) + 1
    if free < 0:
        raise ValueError(f"spans of lengths {list(lengths)} do not fit into {total_length} tokens")
    places = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, offset = [], 0
    for place, span_length in zip(places.tolist(), lengths):
        spans.append((offset + place, offset + place + span_length))
        offset += span_length + 1
    return spans


def sentence_spans(tokens: np.ndarray, is_sentence_end: np.ndarray) -> list[tuple[int, int]]:
    """Sentences of `tokens` as `[start, end)` spans; a sentence ends with a token flagged in `is_sentence_end`."""
    spans, start = [], 0
    for i, token in enumerate(tokens.tolist()):
        if is_sentence_end[token]:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return spans


def layout_blocks(
    tokens: np.ndarray, spans_in_order: Sequence[tuple[int, int]], mask_id: int, ids: SpecialIds,
    mode: str = "bert", block_noise: np.ndarray | None = None,
) -> Example:
    """Part A / Part B layout of `tokens` with `spans_in_order` already in their Part B order.

    `block_noise`, if given, is a bool array over Part B's span tokens (concatenated in Part B
    order) saying which inputs are replaced by `[dBLOCK]`.
    """
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    ordered = sorted(spans_in_order)
    for (s0, e0), (s1, _) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise ValueError(f"spans overlap: {ordered}")
    # Position of every original token in Part A: spans collapse onto their first token.
    step = np.ones(n, np.int64)
    for start, end in ordered:
        step[start + 1:end] = 0
    part_a_position = np.cumsum(step) - 1

    keep = np.ones(n, bool)
    for start, end in ordered:
        keep[start:end] = False
    is_mask_slot = np.zeros(n, bool)
    is_mask_slot[[start for start, _ in ordered]] = True
    a_select = keep | is_mask_slot
    a_tokens = np.where(is_mask_slot, mask_id, tokens)[a_select]
    a_positions = part_a_position[a_select]
    sep = len(a_tokens)

    b_inputs, b_targets, b_positions, b_blocks = [], [], [], []
    noise_offset = 0
    for start, end in spans_in_order:
        span = tokens[start:end]
        span_inputs = span.copy()
        if block_noise is not None and ids.dblock is not None:
            span_inputs[block_noise[noise_offset:noise_offset + len(span)]] = ids.dblock
        noise_offset += len(span)
        b_inputs.append(np.concatenate([[ids.sop], span_inputs]))
        b_targets.append(np.concatenate([span, [ids.eop]]))
        b_positions.append(np.full(len(span) + 1, part_a_position[start]))
        b_blocks.append(np.arange(1, len(span) + 2))

    input_ids = np.concatenate([a_tokens, *b_inputs]).astype(np.int32)
    targets = np.concatenate([a_tokens, *b_targets]).astype(np.int32)
    loss_mask = (np.arange(len(input_ids)) >= sep).astype(np.int32)
    positions = np.concatenate([a_positions, *b_positions])
    blocks = np.concatenate([np.zeros(sep, np.int64), *b_blocks])
    return Example(input_ids, targets, loss_mask, np.stack([positions, blocks]).astype(np.int32), sep, mode)


def layout_generation(tokens: np.ndarray, generation_length: int, ids: SpecialIds, mask_id: int) -> Example:
    """Document-level layout: `source [gMASK] <sop> target[:-1]`, scored on `target` (spec §4.2)."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    if not 1 <= generation_length <= n - 1:
        raise ValueError(f"generation length {generation_length} must be in [1, {n - 1}] for {n} tokens")
    division = n - generation_length
    source, target = tokens[:division], tokens[division:]
    input_ids = np.concatenate([source, [mask_id, ids.sop], target[:-1]]).astype(np.int32)
    targets = np.concatenate([source, [mask_id], target]).astype(np.int32)
    loss_mask = np.concatenate([np.zeros(division + 1, np.int32), np.ones(generation_length, np.int32)])
    positions = np.arange(n + 1)
    positions[division + 1:] = division
    blocks = np.concatenate([np.zeros(division, np.int64), np.arange(generation_length + 1)])
    return Example(input_ids, targets, loss_mask, np.stack([positions, blocks]).astype(np.int32), division + 1, "gpt")


def choose_mode(rng: np.random.Generator, config: BlankInfillingConfig) -> str:
    draw = rng.random()
    if draw < config.bert_prob:
        return "bert"
    if draw < config.bert_prob + config.gap_sentence_prob:
        return "sentence"
    return "gpt"


def make_example(
    tokens: np.ndarray, rng: np.random.Generator, config: BlankInfillingConfig, ids: SpecialIds,
    is_sentence_end: np.ndarray | None = None, mode: str | None = None,
) -> Example:
    """The GLM example of one document (at least 3 tokens); `mode` None draws it from `config`."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    if n < 3:
        raise ValueError(f"a document needs at least 3 tokens for blank infilling, got {n}")
    mode = choose_mode(rng, config) if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"unknown blank-infilling mode {mode!r}; expected one of {MODES}")

    if mode == "bert":
        spans = place_spans(sample_span_lengths(rng, n, config), n, rng)
        return _shuffled_layout(tokens, spans, ids.mask, ids, rng, config, mode, noisy=True)

    if mode == "sentence":
        if is_sentence_end is None:
            raise ValueError("sentence mode needs an is_sentence_end table over the vocabulary")
        sentences = sentence_spans(tokens, is_sentence_end)
        order = rng.permutation(len(sentences))
        target, chosen, covered = int(config.gap_sentence_ratio * n), [], 0
        for index in order.tolist():
            chosen.append(sentences[index])
            covered += sentences[index][1] - sentences[index][0]
            if covered >= target:
                break
        mask_id = ids.smask if config.task_mask else ids.mask
        return _shuffled_layout(tokens, chosen, mask_id, ids, rng, config, mode, noisy=False)

    shortest = max(1, min(int(config.gpt_min_ratio * n), n - 2))
    generation_length = int(rng.integers(shortest, n - 2, endpoint=True))
    mask_id = ids.gmask if config.task_mask else ids.mask
    if rng.random() < config.gpt_infill_prob:
        return layout_generation(tokens, generation_length, ids, mask_id)
    spans = place_spans([generation_length], n, rng)
    return _shuffled_layout(tokens, spans, mask_id, ids, rng, config, mode, noisy=False)


def _shuffled_layout(
    tokens: np.ndarray, spans: list[tuple[int, int]], mask_id: int, ids: SpecialIds, rng: np.random.Generator,
    config: BlankInfillingConfig, mode: str, noisy: bool,
) -> Example:
    spans = sorted(spans)
    if config.shuffle_blocks:
        spans = [spans[i] for i in rng.permutation(len(spans)).tolist()]
    noise = None
    if noisy and config.block_mask_prob > 0 and ids.dblock is not None:
        noise = rng.random(sum(end - start for start, end in spans)) < config.block_mask_prob
    return layout_blocks(tokens, spans, mask_id, ids, mode, noise)


# ------------------------------------------------------------------------------------------ packing


def pack_examples(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lays examples end to end in one row of `length` tokens, each as its own attention segment.

    Returns `[length]` arrays `input_ids, targets, loss_mask, segment_ids` (1, 2, ... per example,
    0 on padding), `part_a` (1 on tokens every query of the segment may see) and `position_ids [2, length]`.
    """
    total = sum(len(e) for e in examples)
    if total > length:
        raise ValueError(f"examples of total length {total} do not fit into a row of {length} tokens")
    row = {
        "input_ids": np.full(length, pad_id, np.int32), "targets": np.full(length, pad_id, np.int32),
        "loss_mask": np.zeros(length, np.int32), "segment_ids": np.zeros(length, np.int32),
        "part_a": np.zeros(length, np.int32), "position_ids": np.zeros((2, length), np.int32),
    }
    offset = 0
    for segment, example in enumerate(examples, start=1):
        end = offset + len(example)
        row["input_ids"][offset:end] = example.input_ids
        row["targets"][offset:end] = example.targets
        row["loss_mask"][offset:end] = example.loss_mask
        row["segment_ids"][offset:end] = segment
        row["part_a"][offset:offset + example.sep] = 1
        row["position_ids"][:, offset:end] = example.position_ids
        offset = end
    return row


def attention_mask(segment_ids, part_a):
    """Bool `[B, 1, L, L]`, True = may attend: same segment, and the key is in Part A or not after the query.

    Written with the array module of its inputs, so it runs in NumPy and inside `jax.jit` alike.
    """
    xp = _array_module(segment_ids)
    length = segment_ids.shape[-1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    causal = xp.arange(length)[None, :, None] >= xp.arange(length)[None, None, :]
    visible = part_a.astype(bool)[:, None, :] | causal
    return (same & visible)[:, None, :, :]


def _array_module(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp
