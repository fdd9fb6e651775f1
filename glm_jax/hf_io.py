"""Reading official Hugging Face checkpoint directories tensor by tensor.

Handles sharded or single `pytorch_model*.bin` (read with `torch.load(weights_only=True, mmap=True)`;
torch is an optional extra) and `*.safetensors` (read here without torch through a memory map, so
bfloat16 and int8 tensors work too). Every failure names the file or key at fault.

Tensors come out as zero-copy NumPy views of the memory-mapped file: opening a 2 GB shard costs
nothing, and only the bytes a caller touches are read. Pages a process has touched count in its
resident memory until unmapped, so streaming readers use `WeightFile.read` instead, which copies one
tensor (or a block of its rows) into private memory with direct reads, bypassing the page cache.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file or key."""


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not os.path.isfile(path):
        raise CheckpointError(f"not a Hugging Face checkpoint directory (no {CONFIG_FILE}): {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def weight_files(directory: str) -> dict[str, list[str] | None]:
    """Weight files of `directory`, each with the keys the index assigns to it (None: unknown until read).

    Prefers safetensors over .bin when both exist, like `transformers`.
    """
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path} is not a valid index file: {e}") from e
            files: dict[str, list[str] | None] = {}
            for key, name in weight_map.items():
                files.setdefault(name, []).append(key)
            missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
            if missing:
                raise CheckpointError(f"{index_path} names shard file(s) that do not exist: {sorted(missing)}")
            return {os.path.join(directory, name): keys for name, keys in files.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, single)
        if os.path.isfile(path):
            return {path: None}
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, model.safetensors or pytorch_model.bin"
    )


@dataclasses.dataclass
class WeightFile:
    """The tensors of one weight file as lazy views, in the order their bytes lie in the file.

    `mapped` is True when the views live in a file mapping (False for legacy, non-zip torch files,
    which torch loads into memory).
    """

    path: str
    tensors: dict[str, np.ndarray]
    mapped: bool
    _regions: list[tuple[int, int, int]] | None = dataclasses.field(default=None, repr=False)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """An in-memory copy of `key` (or of its rows `[rows[0], rows[1])`), read from the file with
        large direct reads (`read_file_range`).

        Leaves no mapped pages behind and runs without the GIL, so a background thread can read
        ahead while the caller computes. (Where the file offset is unknown - no /proc/self/maps -
        it copies through the mapping instead.)
        """
        view = self.tensors[key]
        if rows is not None:
            view = view[rows[0]:rows[1]]
        offset = self._file_offset(view) if self.mapped and view.flags.c_contiguous and view.nbytes else None
        if offset is None:
            return np.array(view)
        data = read_file_range(self.path, offset, view.nbytes)
        if data.nbytes != view.nbytes:
            raise CheckpointError(f"{self.path}: file ends inside tensor {key}")
        return data.view(view.dtype).reshape(view.shape)

    def _file_offset(self, view: np.ndarray) -> int | None:
        """Where `view`'s bytes lie in the file, from this process's memory map (None if unknown)."""
        if self._regions is None:
            self._regions = _mapped_regions(self.path)
        address = view.__array_interface__["data"][0]
        for start, end, offset in self._regions:
            if start <= address and address + view.nbytes <= end:
                return address - start + offset
        return None


# Direct I/O (O_DIRECT) moves data between the disk and our buffers without the page cache. On
# shared VMs the page cache path costs more CPU than the copy itself (~1.4 s of kernel time per GB
# written, ~0.25 s per GB read, against ~0.03 s direct), so streaming converters use it where the
# file system allows it; buffers, offsets and lengths must then be multiples of DIRECT_ALIGN.
DIRECT_ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has no direct I/O


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose address is a multiple of DIRECT_ALIGN."""
    raw = np.empty(nbytes + DIRECT_ALIGN, np.uint8)
    start = -raw.__array_interface__["data"][0] % DIRECT_ALIGN
    return raw[start:start + nbytes]


def read_file_range(path: str, offset: int, nbytes: int) -> np.ndarray:
    """Bytes `[offset, offset + nbytes)` of a file (fewer at its end), read directly where possible.

    The aligned range around the request is read into an aligned buffer and a view is returned;
    file systems without O_DIRECT (tmpfs, some network mounts) get ordinary reads.
    """
    begin = offset - offset % DIRECT_ALIGN
    end = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
    buffer = aligned_empty(end - begin)
    try:
        fd = os.open(path, os.O_RDONLY | O_DIRECT)
    except OSError:
        fd, begin, buffer = os.open(path, os.O_RDONLY), offset, aligned_empty(nbytes)
    try:
        done = _read_fully(fd, buffer, begin)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        os.close(fd)  # O_DIRECT accepted at open but not for reads: fall back to the page cache
        fd, begin, buffer = os.open(path, os.O_RDONLY), offset, aligned_empty(nbytes)
        done = _read_fully(fd, buffer, begin)
    finally:
        os.close(fd)
    start = offset - begin
    return buffer[start:min(start + nbytes, done)]


class DirectFileWriter:
    """Writes a file front to back through an aligned buffer, with direct I/O where the file system
    allows it (see DIRECT_ALIGN); the file ends up exactly as long as what was written."""

    def __init__(self, path: str, buffer_bytes: int = 64 << 20):
        self.path = path
        self._buffer = aligned_empty(buffer_bytes)
        self._filled = self._offset = 0
        self._direct = bool(O_DIRECT)
        self._fd = self._open()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT
        if self._direct:
            try:
                return os.open(self.path, flags | O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False
        return os.open(self.path, flags)

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else \
            np.frombuffer(data, np.uint8)
        while raw.size:
            n = min(raw.size, self._buffer.size - self._filled)
            self._buffer[self._filled:self._filled + n] = raw[:n]
            self._filled += n
            raw = raw[n:]
            if self._filled == self._buffer.size:
                self._flush(self._filled)

    def _flush(self, nbytes: int) -> None:
        view, done = memoryview(self._buffer[:nbytes]), 0
        while done < nbytes:
            try:
                done += os.pwrite(self._fd, view[done:], self._offset + done)
            except OSError as e:
                if not self._direct or e.errno != errno.EINVAL:
                    raise
                os.close(self._fd)  # direct writes refused after all: go through the page cache
                self._direct = False
                self._fd = self._open()
        self._offset += nbytes
        self._filled = 0

    def close(self) -> None:
        """Writes the tail (padded for direct I/O, then truncated), syncs and closes the file."""
        size = self._offset + self._filled
        padded = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
        self._buffer[self._filled:padded] = 0
        self._flush(padded)
        os.ftruncate(self._fd, size)
        os.fdatasync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> "DirectFileWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            os.close(self._fd)


def _read_fully(fd: int, buffer: np.ndarray, offset: int) -> int:
    view, done = memoryview(buffer), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + (256 << 20)]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _mapped_regions(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of `path` (Linux /proc/self/maps; else none)."""
    target = os.path.realpath(path)
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    regions.append((start, end, int(fields[2], 16)))
    except OSError:
        pass
    return regions


def open_weight_file(path: str) -> WeightFile:
    """Maps one `.bin` / `.safetensors` file; raises CheckpointError naming it if it is unreadable."""
    if path.endswith(".safetensors"):
        return WeightFile(path, dict(_iter_safetensors(path)), mapped=True)
    state, mapped = _load_torch(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    torch = _import_torch()
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {bad[:5]}")
    try:
        tensors = {key: torch_to_numpy(tensor) for key, tensor in state.items()}
    except Exception as e:
        raise CheckpointError(f"cannot read tensors of {path}: {type(e).__name__}: {e}") from e
    order = sorted(tensors, key=lambda k: tensors[k].__array_interface__["data"][0])
    return WeightFile(path, {key: tensors[key] for key in order}, mapped)


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(key, array)` of one weight file, one tensor at a time, without loading the rest."""
    weights = open_weight_file(path)
    for key in list(weights.tensors):
        yield key, weights.tensors.pop(key)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
            header = json.loads(f.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {data_start + end} bytes, has {size})")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,)) if end else None
    for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, stop = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        if stop - begin != dtype.itemsize * int(np.prod(info["shape"])):
            raise CheckpointError(f"{path}: tensor {key} has {stop - begin} bytes, its shape {info['shape']} needs "
                                  f"{dtype.itemsize * int(np.prod(info['shape']))}")
        yield key, np.asarray(data[begin:stop]).view(dtype).reshape(info["shape"])


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "reading pytorch_model*.bin needs PyTorch: pip install 'glm-jax[convert]' (or use safetensors)"
        ) from e
    return torch


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as NumPy, bfloat16 included (viewed bit-for-bit through ml_dtypes)."""
    torch = _import_torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def load_torch_file(path: str) -> dict:
    """`torch.load` with `weights_only=True` (never runs pickled code), memory-mapped when possible."""
    return _load_torch(path)[0]


def _load_torch(path: str) -> tuple[dict, bool]:
    """`(state, mapped)`: the loaded object and whether its tensors live in a file mapping."""
    torch = _import_torch()
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True), False  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for corrupt files; name the file once.
        raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
