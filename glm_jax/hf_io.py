"""Reading official Hugging Face checkpoint directories tensor by tensor.

Handles sharded or single `pytorch_model*.bin` (read with `torch.load(weights_only=True, mmap=True)`;
torch is an optional extra) and `*.safetensors` (read here without torch through a memory map, so
bfloat16 and int8 tensors work too). Every failure names the file or key at fault.
"""

from __future__ import annotations

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


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(key, array)` of one weight file, one tensor at a time, without loading the rest."""
    if path.endswith(".safetensors"):
        yield from _iter_safetensors(path)
    else:
        yield from _iter_torch(path)


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
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, stop = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        yield key, data[begin:stop].view(dtype).reshape(info["shape"])


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
    torch = _import_torch()
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for corrupt files; name the file once.
        raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e


def _iter_torch(path: str) -> Iterator[tuple[str, np.ndarray]]:
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for key in list(state):
        try:
            yield key, torch_to_numpy(state.pop(key))
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key} from {path}: {type(e).__name__}: {e}") from e
