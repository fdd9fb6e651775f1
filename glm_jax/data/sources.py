"""Documents in, packed blank-infilling batches out: text/jsonl files, tokenized on the fly.

The pipeline is deterministic and resumable from a tiny state:

* documents are indexed once (file + byte range), visited in a per-epoch order drawn from the seed;
* each document is tokenized and cut into chunks whose *transformed* length fits a row; chunk `c` of
  document `d` in epoch `e` is transformed with the generator keyed `(seed, e, d, c)`, so workers need
  no shared state and any example can be rebuilt alone;
* examples are packed greedily, in order, into rows of `seq_len` tokens (one attention segment each);
* the state after a batch is `(epoch, position in the epoch order, chunk)` of the next row's first
  example; restoring it reproduces the following batches exactly.

Tokenization and the transform run in worker processes (`num_workers`) and a background thread keeps
`prefetch` batches ready, so the accelerator is not starved by Python-side work. In a multi-host run
every process walks the same global sequence of rows and keeps its own slice of each batch, which
keeps the state global (identical on all hosts) at the cost of redundant CPU work.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import re
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from glm_jax.data.blank_infilling import (
    SENTENCE_END_CHARS, BlankInfillingConfig, Example, SpecialIds, example_rng, make_example, pack_examples,
)

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
SPLITS = ("file", "paragraph", "line")


@dataclasses.dataclass(frozen=True)
class DocumentRef:
    """Where one document lives: a byte range of a file (a jsonl line holds a JSON object)."""

    path: str
    start: int
    end: int


def find_text_files(path: str | os.PathLike[str]) -> list[str]:
    """`path` itself, or every .txt/.md/.jsonl/.json file below the directory `path`, sorted."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"training data not found: {path!r}")
    found = sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    )
    if not found:
        raise FileNotFoundError(f"no .txt/.md/.jsonl/.json files under {path!r}")
    return found


def index_documents(files: Sequence[str], split: str = "paragraph") -> list[DocumentRef]:
    """Document boundaries of `files`: jsonl files have one document per line; text files one per
    file, per blank-line-separated paragraph or per line (`split`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown document split {split!r}; expected one of {SPLITS}")
    refs: list[DocumentRef] = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(JSONL_SUFFIXES) or split == "line":
            refs += _ranges(path, data, b"\n")
        elif split == "paragraph":
            refs += _ranges(path, data, b"\n\n")
        elif data.strip():
            refs.append(DocumentRef(path, 0, len(data)))
    return refs


def _ranges(path: str, data: bytes, separator: bytes) -> list[DocumentRef]:
    refs, start = [], 0
    while start < len(data):
        end = data.find(separator, start)
        end = len(data) if end < 0 else end
        if data[start:end].strip():
            refs.append(DocumentRef(path, start, end))
        start = end + len(separator)
    return refs


def read_document(ref: DocumentRef, jsonl_key: str = "text", join_lines: bool = False) -> str:
    """The text of one document; `join_lines` turns hard-wrapped lines into one line (each line break
    and the indentation around it become one space), for corpora wrapped at a fixed width."""
    text = _read_document(ref, jsonl_key)
    return re.sub(r"[ \t]*\n[ \t]*", " ", text) if join_lines else text


def _read_document(ref: DocumentRef, jsonl_key: str) -> str:
    with open(ref.path, "rb") as f:
        f.seek(ref.start)
        raw = f.read(ref.end - ref.start)
    text = raw.decode("utf-8")
    if not ref.path.endswith(JSONL_SUFFIXES):
        return text.strip("\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ref.path}: bytes {ref.start}-{ref.end} are not a JSON object: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get(jsonl_key), str):
        raise ValueError(f"{ref.path}: bytes {ref.start}-{ref.end} have no string field {jsonl_key!r}")
    return record[jsonl_key]


class TextCorpus:
    """Documents of text files, tokenized on demand with a `ChatGLMTokenizer` model file."""

    def __init__(self, path: str | os.PathLike[str], tokenizer_path: str, split: str = "paragraph",
                 jsonl_key: str = "text", join_lines: bool = False) -> None:
        self.refs = index_documents(find_text_files(path), split)
        if not self.refs:
            raise ValueError(f"no non-empty documents in {os.fspath(path)!r}")
        self.tokenizer_path = tokenizer_path
        self.jsonl_key = jsonl_key
        self.join_lines = join_lines
        self._tokenizer = None

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from glm_jax.tokenizer import ChatGLMTokenizer

            self._tokenizer = ChatGLMTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def tokens(self, index: int) -> np.ndarray:
        text = read_document(self.refs[index], self.jsonl_key, self.join_lines)
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # workers load their own SentencePiece model


class TokenCorpus:
    """Already tokenized documents (tests, benchmarks, pre-tokenized data)."""

    def __init__(self, documents: Sequence[Sequence[int]]) -> None:
        self.documents = [np.asarray(d, np.int32) for d in documents]

    def __len__(self) -> int:
        return len(self.documents)

    def tokens(self, index: int) -> np.ndarray:
        return self.documents[index]


def sentence_end_table(tokenizer) -> np.ndarray:
    """Bool table over the vocabulary: does the piece end a sentence (contains . ? ! ; : … or a newline)."""
    pieces = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    return np.array([p == "<n>" or any(c in p for c in SENTENCE_END_CHARS) for p in pieces], bool)


@dataclasses.dataclass(frozen=True)
class ExampleMaker:
    """Document tokens -> blank-infilling examples that each fit a row of `seq_len` tokens."""

    objective: BlankInfillingConfig
    ids: SpecialIds
    seq_len: int
    seed: int
    is_sentence_end: np.ndarray | None = None
    min_tokens: int = 8

    def __call__(self, tokens: np.ndarray, key: tuple[int, ...]) -> list[Example]:
        """Examples of one document; chunk `c` uses the generator `(seed, *key, c)`.

        A chunk starts as long as a row; if its transformed length overflows the row, the chunk is
        shortened by the overflow and transformed again (same generator), which converges in a step
        or two because the transform adds only two tokens per span.
        """
        examples, start, chunk = [], 0, 0
        while len(tokens) - start >= self.min_tokens:
            n = min(len(tokens) - start, self.seq_len)
            while True:
                rng = example_rng(self.seed, (*key, chunk))
                example = make_example(tokens[start:start + n], rng, self.objective, self.ids, self.is_sentence_end)
                if len(example) <= self.seq_len:
                    break
                n -= len(example) - self.seq_len
            examples.append(example)
            start += n
            chunk += 1
        return examples


# ------------------------------------------------------------------------------------ the loader

_WORKER: dict[str, Any] = {}
# First key word of the document-order generators; example keys start with the epoch, never this.
_ORDER_TAG = 2**31 - 1


def _init_worker(corpus: Any, maker: ExampleMaker) -> None:
    _WORKER["corpus"], _WORKER["maker"] = corpus, maker


def _document_examples(task: tuple[int, int]) -> list[Example]:
    epoch, document = task
    return _WORKER["maker"](_WORKER["corpus"].tokens(document), (epoch, document))


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Where the next row starts: the epoch, the position in that epoch's document order, the chunk."""

    epoch: int = 0
    position: int = 0
    chunk: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoaderState":
        try:
            return cls(**{k: int(values[k]) for k in ("epoch", "position", "chunk")})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid data-loader state {values!r}: {e}") from e


class BlankInfillingLoader:
    """Iterator of packed batches: dicts of `[local_batch, seq_len]` arrays (`position_ids` `[b, 2, L]`).

    `state` is the position after the last batch handed out; pass it to a new loader to resume.
    """

    def __init__(
        self, corpus: Any, maker: ExampleMaker, *, batch_size: int, shuffle: bool = True,
        num_workers: int = 0, prefetch: int = 4, state: LoaderState | None = None,
        process_index: int = 0, process_count: int = 1,
    ) -> None:
        if len(corpus) == 0:
            raise ValueError("the corpus has no documents")
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
        self.corpus, self.maker = corpus, maker
        self.batch_size, self.shuffle = batch_size, shuffle
        self.local_rows = slice(process_index * batch_size // process_count,
                                (process_index + 1) * batch_size // process_count)
        self.state = state or LoaderState()
        self._pool = None
        if num_workers > 0:
            context = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
            self._pool = context.Pool(num_workers, initializer=_init_worker, initargs=(corpus, maker))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self.state,), daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.state = item
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __enter__(self) -> "BlankInfillingLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------------------- internals

    def order(self, epoch: int) -> np.ndarray:
        """Document visiting order of `epoch` (a permutation drawn from `(seed, epoch)` when shuffling)."""
        if not self.shuffle:
            return np.arange(len(self.corpus))
        return example_rng(self.maker.seed, (_ORDER_TAG, epoch)).permutation(len(self.corpus))

    def _examples(self, state: LoaderState) -> Iterator[tuple[Example, LoaderState]]:
        epoch, position, skip = state.epoch, state.position, state.chunk
        while True:
            order = self.order(epoch)
            tasks = [(epoch, int(d)) for d in order[position:]]
            results = (self._pool.imap(_document_examples, tasks, chunksize=4) if self._pool
                       else (self.maker(self.corpus.tokens(d), (e, d)) for e, d in tasks))
            produced = False
            for offset, examples in enumerate(results):
                for chunk, example in enumerate(examples):
                    if chunk >= skip:
                        produced = True
                        yield example, LoaderState(epoch, position + offset, chunk)
                skip = 0
                if self._stop.is_set():
                    return
            if not produced and position == 0:
                raise ValueError(f"no document yields an example of at least {self.maker.min_tokens} tokens")
            epoch, position = epoch + 1, 0

    def _rows(self, state: LoaderState) -> Iterator[tuple[dict[str, np.ndarray], LoaderState]]:
        pending: list[Example] = []
        used = 0
        for example, where in self._examples(state):
            if pending and used + len(example) > self.maker.seq_len:
                yield pack_examples(pending, self.maker.seq_len, self.maker.ids.pad), where
                pending, used = [], 0
            pending.append(example)
            used += len(example)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _produce(self, state: LoaderState) -> None:
        try:
            rows = []
            for row, after in self._rows(state):
                rows.append(row)
                if len(rows) == self.batch_size:
                    local = rows[self.local_rows]
                    self._put(({k: np.stack([r[k] for r in local]) for k in local[0]}, after))
                    rows = []
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised by __next__
            self._put(e)
