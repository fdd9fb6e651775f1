"""ChatGLM-6B (v1) tokenizer on SentencePiece (spec §1.3).

The v1 vocabulary is a single SentencePiece model (``ice_text.model``) whose piece ids are the
model's token ids. SentencePiece on its own would drop newlines and collapse runs of spaces, which
matters for code and chat transcripts, so the text is rewritten first: ``\\n`` -> ``<n>``,
``\\t`` -> ``<|tab|>`` and runs of 2..80 spaces -> ``<|blank_n|>``, all user-defined pieces of the
model. Decoding undoes the rewrite. Special ids are read from the model by piece name, so the same
code serves the real vocabulary and small test vocabularies.

ChatGLM2/3 and GLM-4 differ (specials appended after the base vocabulary and *prefixed* to the
prompt, no whitespace rewrite; GLM-4 is byte-level BPE): they are the separate classes at the end
(spec §2.4), not options of this one.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
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


def _load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    """A loaded SentencePiece model, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SentencePiece model not found: {path!r} (for a directory use from_pretrained)"
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from e
    return sp


class ChatGLMTokenizer:
    """ChatGLM-6B tokenizer: whitespace rewrite + SentencePiece + ``[gMASK] <sop>`` suffix."""

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = os.fspath(model_file)
        self._sp = _load_sentencepiece(path)
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


# ---------------------------------------------------------------------------------------------
# ChatGLM2 / ChatGLM3 / GLM-4 (spec §2.4): special ids appended after the base vocabulary and
# *prefixed* to every sequence; no whitespace rewrite.

CHATGLM2_VOCAB_FILE = "tokenizer.model"
GLM4_VOCAB_FILE = "tokenizer.model"
CHATGLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)
# GLM-4's pre-tokenizer (cl100k family): text is cut into these chunks before byte-level BPE.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _AppendedSpecialsTokenizer:
    """Shared logic of the v2+ tokenizers: a base vocabulary of ``base_size`` ids followed by
    named special ids, and the ``[gMASK] sop`` prefix. Text is never scanned for special names, so
    user text cannot forge a role or control token; specials enter only through the builders."""

    special_names: tuple[str, ...] = ()
    gmask_name = "[gMASK]"
    sop_name = "sop"
    vocab_file = "tokenizer.model"  # the file name in a checkpoint directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "_AppendedSpecialsTokenizer":
        """Load from a vocabulary file or a checkpoint directory holding ``cls.vocab_file``."""
        path = os.fspath(path)
        return cls(os.path.join(path, cls.vocab_file) if os.path.isdir(path) else path)

    def _setup_specials(self, base_size: int) -> None:
        self.base_size = base_size
        self.special_ids = {name: base_size + i for i, name in enumerate(self.special_names)}
        self._special_names_by_id = {i: name for name, i in self.special_ids.items()}

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus the appended specials (the model's embedding may be larger)."""
        return self.base_size + len(self.special_names)

    @property
    def gmask_token_id(self) -> int:
        return self.special_ids[self.gmask_name]

    @property
    def sop_token_id(self) -> int:
        return self.special_ids[self.sop_name]

    def get_command(self, name: str) -> int:
        """Id of the special token ``name`` (e.g. ``"<|user|>"``)."""
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_names)}")
        return self.special_ids[name]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens`` prefixed with ``[gMASK] sop``."""
        ids = self._encode_text(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts, unpadded."""
        return [self.encode(t, add_special_tokens) for t in texts]

    def build_inputs_with_special_tokens(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """``[gMASK] sop a``, or ``[gMASK] sop a b eos`` for a training pair."""
        ids = [self.gmask_token_id, self.sop_token_id, *token_ids_0]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Specials (and the pad id) are dropped, or written by name when
        ``skip_special_tokens`` is false; the base ids between them are decoded together so that
        characters split over several byte tokens come out whole."""
        text, run = [], []
        for i in map(int, ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i < self.base_size and not (skip_special_tokens and i == self.pad_token_id):
                run.append(i)
            elif i >= self.base_size:
                text.append(self._decode_text(run))
                run = []
                if not skip_special_tokens:
                    text.append(self._special_names_by_id[i])
        text.append(self._decode_text(run))
        return "".join(text)

    @property
    def eos_token_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        raise NotImplementedError


class ChatGLM2Tokenizer(_AppendedSpecialsTokenizer):
    """ChatGLM2-6B tokenizer: plain SentencePiece ``tokenizer.model`` + ``[MASK] [gMASK] [sMASK]
    sop eop`` appended after its pieces. bos/eos are SentencePiece's ``<s>``/``</s>``, pad its
    ``<unk>``; generation stops at eos."""

    special_names = CHATGLM2_SPECIAL_TOKENS

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = os.fspath(model_file)
        self._sp = _load_sentencepiece(path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {path!r} has no <s> / </s> piece")
        self.model_file = path
        self._setup_specials(self._sp.GetPieceSize())

    @property
    def bos_token_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_token_id(self) -> int:
        return self._sp.unk_id()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` without special tokens."""
        return self._sp.EncodeAsPieces(text)

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(ids) if ids else ""

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Id -> piece or special name."""
        if isinstance(ids, Iterable):
            return [self.convert_ids_to_tokens(i) for i in ids]
        i = int(ids)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._special_names_by_id[i] if i >= self.base_size else self._sp.IdToPiece(i)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Piece or special name -> id. Unknown pieces raise instead of mapping to ``<unk>``."""
        if not isinstance(tokens, str):
            return [self.convert_tokens_to_ids(t) for t in tokens]
        if tokens in self.special_ids:
            return self.special_ids[tokens]
        i = self._sp.PieceToId(tokens)
        if i == self._sp.unk_id() and tokens != self._sp.IdToPiece(i):
            raise ValueError(f"unknown token {tokens!r}")
        return i


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B tokenizer: ChatGLM2's plus the role tokens appended after ``eop``; chat input
    is built from role-tagged messages and generation also stops at ``<|user|>``/``<|observation|>``."""

    special_names = CHATGLM2_SPECIAL_TOKENS + CHATGLM3_ROLE_TOKENS

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>"))

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + encode(metadata + "\\n") + encode(message), as the official code does
        (two separate encodes, so the newline never merges with the message)."""
        return [self.get_command(f"<|{role}|>"), *self._encode_text(f"{metadata}\n"), *self._encode_text(message)]

    def build_chat_input(
        self, query: str, history: Sequence[dict] = (), role: str = "user"
    ) -> list[int]:
        """``[gMASK] sop`` + every message of ``history`` (dicts with ``role``, ``content`` and
        optional ``metadata``; a system message's ``tools`` are appended as JSON) + the query as a
        ``role`` message + ``<|assistant|>``."""
        ids: list[int] = []
        for item in history:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content += "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return self.build_inputs_with_special_tokens(ids)


def read_glm4_ranks(path: str) -> dict[bytes, int]:
    """``tokenizer.model`` of GLM-4: one ``base64(token) rank`` per line; ranks must be 0..n-1
    (the specials' ids start right after them)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError("expected two fields")
            except (ValueError, IndexError, binascii.Error) as e:
                raise ValueError(f"{path!r} line {number}: not 'base64(token) rank': {e}") from e
            if token in ranks:
                raise ValueError(f"{path!r} line {number}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path!r}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class GLM4Tokenizer(_AppendedSpecialsTokenizer):
    """GLM-4-9B tokenizer: byte-level BPE (``tiktoken``) over the cl100k-family pre-tokenizer,
    specials from ``<|endoftext|>`` on appended after the ranks. ``<|endoftext|>`` is eos and pad."""

    special_names = GLM4_SPECIAL_TOKENS
    sop_name = "<sop>"

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        import tiktoken

        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GLM-4 tokenizer file not found: {path!r}")
        ranks = read_glm4_ranks(path)
        self._bpe = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._tokens = {rank: token for token, rank in ranks.items()}
        self.model_file = path
        self._setup_specials(len(ranks))

    @property
    def eos_token_id(self) -> int:
        return self.get_command("<|endoftext|>")

    @property
    def pad_token_id(self) -> int:
        return self.get_command("<|endoftext|>")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>"))

    def _encode_text(self, text: str) -> list[int]:
        return self._bpe.encode_ordinary(text)

    def _decode_text(self, ids: list[int]) -> str:
        return b"".join(self._tokens[i] for i in ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> bytes | str | list[bytes | str]:
        """Id -> token bytes, or the special's name."""
        if isinstance(ids, Iterable):
            return [self.convert_ids_to_tokens(i) for i in ids]
        i = int(ids)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._special_names_by_id[i] if i >= self.base_size else self._tokens[i]

    def build_chat_input(self, query: str, history: Sequence[dict] = (), role: str = "user") -> list[int]:
        """The chat template's ids: ``[gMASK]<sop>`` + ``<|role|>{metadata}\\n{content}`` per message
        (the text after the role token is one chunk, as when the rendered template is tokenized)
        + the query as a ``role`` message + ``<|assistant|>``."""
        ids: list[int] = []
        for item in [*history, {"role": role, "content": query}]:
            ids.append(self.get_command(f"<|{item['role']}|>"))
            ids += self._encode_text(f"{item.get('metadata', '')}\n{item['content']}")
        ids.append(self.get_command("<|assistant|>"))
        return self.build_inputs_with_special_tokens(ids)
