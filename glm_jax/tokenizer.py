"""ChatGLM-6B (v1) tokenizer on SentencePiece (spec §1.3).

The v1 vocabulary is a single SentencePiece model (``ice_text.model``) whose piece ids are the
model's token ids. SentencePiece on its own would drop newlines and collapse runs of spaces, which
matters for code and chat transcripts, so the text is rewritten first: ``\\n`` -> ``<n>``,
``\\t`` -> ``<|tab|>`` and runs of 2..80 spaces -> ``<|blank_n|>``, all user-defined pieces of the
model. Decoding undoes the rewrite. Special ids are read from the model by piece name, so the same
code serves the real vocabulary and small test vocabularies.

ChatGLM2/3 differ (specials appended after the SentencePiece vocabulary and *prefixed* to the
prompt, no whitespace rewrite); they would be a separate class, not options of this one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import overload

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
MAX_BLANK_LENGTH = 80

NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"


def blank_piece(n: int) -> str:
    """The piece that stands for a run of ``n`` spaces (2 <= n <= 80)."""
    return f"<|blank_{n}|>"


# The control pieces of the real vocabulary, in their real order (130000 ... 130007).
CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")

# Pieces the tokenizer relies on; a model lacking one would silently tokenize differently.
_SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>")
_WHITESPACE_PIECES = (NEWLINE_PIECE, TAB_PIECE) + tuple(
    blank_piece(n) for n in range(2, MAX_BLANK_LENGTH + 1)
)

_SPACE_RUN = re.compile(" {2,}")
_DECODE_MAP = {NEWLINE_PIECE: "\n", TAB_PIECE: "\t"} | {
    blank_piece(n): " " * n for n in range(2, MAX_BLANK_LENGTH + 1)
}
_DECODE_PATTERN = re.compile("|".join(re.escape(p) for p in _DECODE_MAP))

# transformers' `clean_up_tokenization`, which the official tokenizer applies by default on decode.
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def _blank_run(match: re.Match[str]) -> str:
    # Equivalent to the official loop `for n in 80..2: text = text.replace(" " * n, blank(n))`:
    # whole blocks of 80 from the left, then the remainder; a remainder of 1 stays a space.
    full, rest = divmod(len(match.group()), MAX_BLANK_LENGTH)
    tail = blank_piece(rest) if rest >= 2 else " " * rest
    return blank_piece(MAX_BLANK_LENGTH) * full + tail


def preprocess(text: str) -> str:
    """Rewrite newlines, tabs and space runs into their placeholder pieces (spec §1.3.2)."""
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    return _SPACE_RUN.sub(_blank_run, text)


def postprocess(text: str) -> str:
    """Inverse of :func:`preprocess` on SentencePiece's decoded text."""
    return _DECODE_PATTERN.sub(lambda m: _DECODE_MAP[m.group()], text)


class ChatGLMTokenizer:
    """ChatGLM-6B tokenizer: whitespace rewrite + SentencePiece + ``[gMASK] <sop>`` suffix."""

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"SentencePiece model not found: {path!r} (for a directory use from_pretrained)"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from e
        for piece in _SPECIAL_PIECES + _WHITESPACE_PIECES:
            if self._sp.PieceToId(piece) == self._sp.unk_id():
                raise ValueError(f"SentencePiece model {path!r} lacks the required piece {piece!r}")
        self.model_file = path
        self._ids = {p: self._sp.PieceToId(p) for p in _SPECIAL_PIECES}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ChatGLMTokenizer:
        """Load from a model file or from a checkpoint directory holding ``ice_text.model``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_FILE)
        return cls(path)

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (the real model's embedding has extra unused rows)."""
        return self._sp.GetPieceSize()

    @property
    def mask_token_id(self) -> int:
        return self._ids["[MASK]"]

    @property
    def gmask_token_id(self) -> int:
        return self._ids["[gMASK]"]

    @property
    def smask_token_id(self) -> int:
        return self._ids["[sMASK]"]

    @property
    def bos_token_id(self) -> int:
        """``<sop>``: starts the generated block; the context ends right before it."""
        return self._ids["<sop>"]

    @property
    def eos_token_id(self) -> int:
        """``<eop>``: generation stops here (not SentencePiece's ``</s>``)."""
        return self._ids["<eop>"]

    @property
    def pad_token_id(self) -> int:
        return self._ids["<pad>"]

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` without special tokens."""
        return self._sp.EncodeAsPieces(preprocess(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens`` the prompt form ``... [gMASK] <sop>``."""
        ids = self._sp.EncodeAsIds(preprocess(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """:meth:`encode` for many texts, unpadded: positions and masks are made when padding."""
        batch = self._sp.EncodeAsIds([preprocess(t) for t in texts])
        if add_special_tokens:
            batch = [self.build_inputs_with_special_tokens(ids) for ids in batch]
        return batch

    def build_inputs_with_special_tokens(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """``a [gMASK] <sop>``, or ``a [gMASK] <sop> b <eop>`` for a training pair (spec §1.3.3)."""
        ids = [*token_ids_0, self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], clean_up_tokenization_spaces: bool = False) -> str:
        """Text of ``ids``: pads dropped, control pieces (``[gMASK]``, ``<eop>`` ...) give nothing.

        Byte-fallback pieces are joined by SentencePiece; incomplete UTF-8 becomes U+FFFD.
        ``clean_up_tokenization_spaces=True`` reproduces the official tokenizer's default
        (transformers removes the space before ``.,!?`` and some English contractions); it is
        off here because it is lossy.
        """
        size = self.vocab_size
        kept = []
        for i in map(int, ids):
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {size})")
            if i != self.pad_token_id:
                kept.append(i)
        text = postprocess(self._sp.DecodeIds(kept))
        if clean_up_tokenization_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int: ...
    @overload
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]: ...
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Piece -> id. Unknown pieces raise instead of mapping silently to ``<unk>``."""
        if isinstance(tokens, str):
            i = self._sp.PieceToId(tokens)
            if i == self._sp.unk_id() and tokens != self._sp.IdToPiece(i):
                raise ValueError(f"unknown token {tokens!r}")
            return i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @overload
    def convert_ids_to_tokens(self, ids: int) -> str: ...
    @overload
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]: ...
    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Id -> piece."""
        if isinstance(ids, Iterable):
            return [self.convert_ids_to_tokens(i) for i in ids]
        i = int(ids)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.IdToPiece(i)


def train_chatglm_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_file: str | os.PathLike[str] | None = None
) -> bytes:
    """Trains a small BPE SentencePiece model laid out like ChatGLM-6B's ``ice_text.model``.

    Piece order: ``<unk> <s> </s> <pad> <n>`` | text pieces | ``[MASK] [gMASK] [sMASK] <unused_0>
    <sop> <eop> <ENC> <dBLOCK>`` | ``<|tab|> <|blank_2|> ... <|blank_80|>`` | ``<0x00> ... <0xFF>``,
    so special ids keep their real offsets relative to each other and ``<pad>`` = 3, ``<n>`` = 4.
    ``[MASK]`` ... ``<dBLOCK>`` are control pieces (never matched in text); ``<n>``, ``<|tab|>`` and the
    blanks are user-defined pieces (produced by :func:`preprocess`). ``vocab_size`` counts all pieces
    (349 of them are special or byte pieces) and is a soft limit. Returns the serialized model and
    writes it to ``model_file`` when given (via a temporary file, then renamed).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # needs protobuf

    whitespace = [TAB_PIECE] + [blank_piece(n) for n in range(2, MAX_BLANK_LENGTH + 1)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([preprocess(t) for t in texts]), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=list(CONTROL_PIECES),
        user_defined_symbols=[NEWLINE_PIECE] + whitespace, minloglevel=2,
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    by_name = {p.piece: p for p in proto.pieces}
    kinds = sp_pb2.ModelProto.SentencePiece
    head = [by_name[n] for n in ("<unk>", "<s>", "</s>", "<pad>", NEWLINE_PIECE)]
    text = [p for p in proto.pieces if p.type == kinds.NORMAL]
    tail = [by_name[n] for n in list(CONTROL_PIECES) + whitespace]
    byte_pieces = [p for p in proto.pieces if p.type == kinds.BYTE]
    ordered = sp_pb2.ModelProto()
    ordered.CopyFrom(proto)
    del ordered.pieces[:]
    ordered.pieces.extend(head + text + tail + byte_pieces)
    if len(ordered.pieces) != len(proto.pieces):
        raise RuntimeError("SentencePiece produced pieces of an unexpected type; the id layout would be wrong")
    data = ordered.SerializeToString()
    if model_file is not None:
        path = os.fspath(model_file)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return data
