"""Supervised fine-tuning data laid out exactly like the official ChatGLM ptuning recipes.

A record is `(query, response, history)` read from a JSON-lines file with configurable columns
(the ADGEN `content` / `summary` layout by default). It becomes one fixed-length training row:

* ChatGLM-6B (`style="glm"`, spec §1.8): `prompt[:src-1] [gMASK] <sop> answer[:tgt-2] <eop>`,
  right-padded with pad to `src + tgt`; labels are -100 over the context (everything before
  `<sop>`), then the input ids, so `[gMASK]` predicts `<sop>` and the last answer token `<eop>`.
* ChatGLM2 (`style="prefix"`): `[gMASK] sop prompt[:src-2] answer[:tgt] eos`, right-padded to
  `src + tgt + 1`; labels cover `answer eos` only.

In both, every label equal to the pad id becomes -100 (so an answer token that *is* the pad id is
ignored too, as officially). With a history column the prompt is the chat format (§1.9 / §2.4), so
earlier turns — their responses included — are context and never trained on. Official quirk kept on
purpose: with a history column, ChatGLM-6B training prompts use the `[Round 0]` header even without
history, while evaluation prompts (like `chat`) use the bare query.

Rows become the train step's batch (`glm_jax.training.train_step.BATCH_KEYS`): next-token `targets`
with a `loss_mask`, one segment per row (trailing pads are ordinary causal tokens, as the official
collator leaves them), Part A = the bidirectional context of ChatGLM-6B, and the official positions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from glm_jax.chat import build_prompt as build_prompt_chatglm, build_prompt_chatglm2
from glm_jax.config import GLMConfig
from glm_jax.positions import positions_and_mask

IGNORE = -100
Style = Literal["glm", "prefix"]
History = tuple[tuple[str, str], ...]


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Record:
    query: str
    response: str
    history: History = ()


@dataclasses.dataclass(frozen=True)
class Columns:
    """Names of the JSON fields; `history=None` means the data has no chat history."""

    prompt: str = "content"
    response: str = "summary"
    history: str | None = None


@dataclasses.dataclass(frozen=True)
class SFTFormat:
    """Special ids and layout of one model family's training rows."""

    style: Style
    gmask: int
    sop: int
    eos: int
    pad: int

    @classmethod
    def for_model(cls, config: GLMConfig, gmask: int | None = None, sop: int | None = None) -> "SFTFormat":
        """ChatGLM-6B rows for 2D-position models, ChatGLM2 rows for causal ones. ChatGLM2 configs do not
        carry the `[gMASK]`/`sop` ids (they are tokenizer-only): pass them."""
        if config.position_scheme == "glm_2d":
            return cls("glm", config.gmask_token_id, config.bos_token_id, config.eos_token_id, config.pad_token_id)
        if config.position_scheme == "causal":
            if gmask is None or sop is None:
                raise ValueError("causal (ChatGLM2-style) models need the tokenizer's [gMASK] and sop ids")
            return cls("prefix", gmask, sop, config.eos_token_id, config.pad_token_id)
        raise ValueError(f"no supervised fine-tuning layout for position_scheme {config.position_scheme!r}")

    def row_length(self, max_source_length: int, max_target_length: int) -> int:
        return max_source_length + max_target_length + (1 if self.style == "prefix" else 0)


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32 [row_length]
    labels: np.ndarray  # int32 [row_length], IGNORE where no loss
    context_length: int  # tokens before the first trained label (ChatGLM-6B: index of <sop>)


# ------------------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike[str], columns: Columns = Columns()) -> list[Record]:
    """Records of a JSON-lines file (one object per line; ADGEN's `.json` files are such) or of a
    file holding one JSON array. Rows with an empty prompt or response are skipped, as officially."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON: {e}") from None
    return [r for r in (_record(row, f"{path}:{n}", columns) for n, row in rows) if r is not None]


def _record(row: Any, where: str, columns: Columns) -> Record | None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    # A row without the history column has no history (datasets fills the column with null).
    missing = [c for c in (columns.prompt, columns.response) if c not in row]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing} (present: {sorted(row)})")
    query, response = row[columns.prompt], row[columns.response]
    if not query or not response:
        return None
    history: History = ()
    if columns.history:
        turns = row.get(columns.history) or []
        if not isinstance(turns, list) or any(not isinstance(t, (list, tuple)) or len(t) != 2 for t in turns):
            raise ValueError(f"{where}: column {columns.history!r} must be a list of [query, response] pairs")
        history = tuple((str(q), str(r)) for q, r in turns)
    return Record(str(query), str(response), history)


# ------------------------------------------------------------------------------------- prompts


def prompt_text(
    record: Record, style: Style, *, training: bool, has_history_column: bool, source_prefix: str = "",
) -> str:
    """The text before `[gMASK]`: `source_prefix` + the query, in the chat format when there is history."""
    if style == "prefix":
        return source_prefix + build_prompt_chatglm2(record.query, record.history)
    if training and has_history_column and not record.history:
        return source_prefix + f"[Round 0]\n问：{record.query}\n答："
    return source_prefix + build_prompt_chatglm(record.query, record.history)


# ------------------------------------------------------------------------------------ examples


def build_example(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], fmt: SFTFormat, max_source_length: int, max_target_length: int
) -> Example:
    """One training row from text token ids (no special tokens), truncated and padded as officially."""
    if fmt.style == "glm":
        if max_source_length < 2 or max_target_length < 2:
            raise ValueError("ChatGLM-6B rows need max_source_length >= 2 and max_target_length >= 2")
        context = [*prompt_ids[: max_source_length - 1], fmt.gmask]
        ids = [*context, fmt.sop, *answer_ids[: max_target_length - 2], fmt.eos]
        labels = [IGNORE] * len(context) + ids[len(context):]
    else:
        if max_source_length < 2 or max_target_length < 0:
            raise ValueError("ChatGLM2 rows need max_source_length >= 2")
        context = [fmt.gmask, fmt.sop, *prompt_ids[: max_source_length - 2]]
        answer = [*answer_ids[:max_target_length], fmt.eos]
        ids = [*context, *answer]
        labels = [IGNORE] * len(context) + answer
    length = fmt.row_length(max_source_length, max_target_length)
    pad = length - len(ids)
    ids = np.array(ids + [fmt.pad] * pad, np.int32)
    labels = np.array(labels + [fmt.pad] * pad, np.int32)
    labels[labels == fmt.pad] = IGNORE
    return Example(ids, labels, len(context))


def encode_example(
    tokenizer: Encoder, record: Record, fmt: SFTFormat, max_source_length: int, max_target_length: int,
    has_history_column: bool = False, source_prefix: str = "",
) -> Example:
    prompt = prompt_text(record, fmt.style, training=True, has_history_column=has_history_column,
                         source_prefix=source_prefix)
    return build_example(tokenizer.encode(prompt, add_special_tokens=False),
                         tokenizer.encode(record.response, add_special_tokens=False),
                         fmt, max_source_length, max_target_length)


def eval_prompt_ids(
    tokenizer: Encoder, record: Record, fmt: SFTFormat, max_source_length: int, source_prefix: str = "",
) -> list[int]:
    """The generation prompt of the official `--do_predict`: the prompt tokenized with special tokens
    and truncated (text first) to `max_source_length`."""
    text = prompt_text(record, fmt.style, training=False, has_history_column=False, source_prefix=source_prefix)
    return generation_prompt(tokenizer.encode(text, add_special_tokens=False), fmt, max_source_length)


def generation_prompt(prompt_ids: Sequence[int], fmt: SFTFormat, max_source_length: int) -> list[int]:
    """Text ids truncated to `max_source_length - 2` plus the family's `[gMASK]`/`<sop>` tokens."""
    ids = list(prompt_ids[: max_source_length - 2])
    return [*ids, fmt.gmask, fmt.sop] if fmt.style == "glm" else [fmt.gmask, fmt.sop, *ids]


# --------------------------------------------------------------------------------------- batches


def train_batch(examples: Sequence[Example], config: GLMConfig) -> dict[str, np.ndarray]:
    """The train step's batch (`BATCH_KEYS`) of equal-length rows."""
    input_ids = np.stack([e.input_ids for e in examples]).astype(np.int32)
    labels = np.stack([e.labels for e in examples])
    next_labels = np.concatenate([labels[:, 1:], np.full((len(examples), 1), IGNORE, np.int32)], axis=1)
    loss_mask = next_labels != IGNORE
    length = input_ids.shape[1]
    if config.position_scheme == "glm_2d":
        positions, _ = positions_and_mask(config, input_ids)
        position_ids = np.asarray(positions, np.int32)
        context = np.array([e.context_length for e in examples])
        part_a = np.arange(length)[None, :] < context[:, None]
    else:
        position_ids = np.broadcast_to(np.arange(length, dtype=np.int32), input_ids.shape).copy()
        part_a = np.zeros(input_ids.shape, bool)
    return {
        "input_ids": input_ids,
        "targets": np.where(loss_mask, next_labels, 0).astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
        "segment_ids": np.ones(input_ids.shape, np.int32),
        "part_a": part_a,
        "position_ids": position_ids,
    }


class SFTLoader:
    """Endless, resumable batches of `batch_size` rows (this process's share of them), reshuffled
    every epoch with `seed`; `state` (epoch, position) is what a checkpoint stores."""

    def __init__(
        self, examples: Sequence[Example], config: GLMConfig, batch_size: int, *, seed: int = 0, shuffle: bool = True,
        state: dict[str, int] | None = None, process_index: int = 0, process_count: int = 1,
    ) -> None:
        if not examples:
            raise ValueError("no training examples (every record had an empty prompt or response?)")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
        self.examples, self.config, self.batch_size = list(examples), config, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.state = dict(state or {"epoch": 0, "position": 0})

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        epoch, position = self.state["epoch"], self.state["position"]
        order = self.order(epoch)
        while len(rows) < self.batch_size:
            if position == len(order):
                epoch, position = epoch + 1, 0
                order = self.order(epoch)
            rows.append(self.examples[order[position]])
            position += 1
        self.state = {"epoch": epoch, "position": position}
        share = self.batch_size // self.process_count
        return train_batch(rows[self.process_index * share:(self.process_index + 1) * share], self.config)


def synthetic_instructions(
    count: int, *, low: int, high: int, seed: int, table_seed: int = 0, tasks: int = 8, arguments: int = 12,
) -> list[tuple[list[int], list[int]]]:
    """Token-level (prompt, answer) pairs of a small learnable instruction set, for smoke runs and the
    learning check: each prompt hides one task token and one argument token among random filler, and
    the answer `[word(task), word(argument), word(task)]` is fixed by a table drawn from `table_seed`
    (same table for every `seed`, so pairs drawn with another seed are held-out prompts of one task)."""
    vocab = np.arange(low, high)
    table_rng = np.random.default_rng([table_seed, 7])
    shuffled = table_rng.permutation(vocab)
    task_ids, argument_ids = shuffled[:tasks], shuffled[tasks:tasks + arguments]
    task_words = shuffled[tasks + arguments:2 * tasks + arguments]
    argument_words = shuffled[2 * tasks + arguments:2 * tasks + 2 * arguments]
    filler = shuffled[2 * tasks + 2 * arguments:]
    rng = np.random.default_rng([seed, 11])
    pairs = []
    for _ in range(count):
        t, a = int(rng.integers(tasks)), int(rng.integers(arguments))
        before, after = rng.choice(filler, int(rng.integers(1, 5))), rng.choice(filler, int(rng.integers(0, 3)))
        prompt = [*before.tolist(), int(task_ids[t]), int(argument_ids[a]), *after.tolist()]
        pairs.append((prompt, [int(task_words[t]), int(argument_words[a]), int(task_words[t])]))
    return pairs
