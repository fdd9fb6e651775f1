"""Converted checkpoint -> official ChatGLM PyTorch directory (`glm-convert --to=pytorch`).

Writes the official layout: the same keys and shapes (rotary `inv_freq` buffers and, for float
exports, the tied `lm_head.weight` copy included), float16 by default, or the official INT8/INT4
weights (`weight` int8 + `weight_scale`, spec §1.7), sharded into N files plus an index, with
`config.json` and the tokenizer / remote-code files. `.bin` by default, safetensors on request.

Memory stays at about one tensor and the page cache is bypassed: each weight file is written front
to back through an aligned buffer with direct I/O (`glm_jax.converted.DirectFileWriter`). A `.bin`
file's structure comes from torch itself: `torch.save` of fake tensors under
`torch.serialization.skip_data` writes the zip and pickle with holes for the data; the holes are
then filled in file order from slices of the stored leaves. Everything lands in a temporary
directory renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterator

import flax.linen as nn
import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints_convert.arrays import transpose2d
from checkpoints_convert.prefetch import read_ahead
from checkpoints_convert.staging import ConversionError, output_directory
from glm_jax import converted
from glm_jax.config import GLMConfig, to_hf_config
from glm_jax.hf_io import (
    _SAFETENSORS_DTYPES, BIN_INDEX, CONFIG_FILE, SAFETENSORS_INDEX, CheckpointError, DirectFileWriter, aligned_empty,
    open_weight_file,
)
from glm_jax.hf_layout import TIED_HEAD_KEY, TensorMap, ignored_keys, is_linear_weight, tensor_maps
from glm_jax.modeling.layers import rotary_inv_freq
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import abstract_params
from glm_jax.quantization import QKERNEL, dequantize_official, quantize_official

EXPORT_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_SLAB_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class OfficialTensor:
    """One tensor of the exported state dict; `produce()` yields its values as C-contiguous blocks of rows."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """Bytes of a size such as "2GB", "500MB", "1.5GiB" or "1000000" (decimal units, like transformers)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text.upper() if text else "")
    if not match:
        raise ConversionError(f"cannot read the size {text!r} (examples: 2GB, 500MB, 1.5GiB)")
    number, prefix, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(prefix or " "))


def _shard_of_each(sizes: list[int], num_shards: int) -> list[int]:
    """Contiguous shards in state-dict order, about `total / num_shards` bytes each (empty ones dropped)."""
    total = max(sum(sizes), 1)
    starts = np.cumsum([0, *sizes[:-1]])
    raw = [min(num_shards - 1, int(start * num_shards // total)) for start in starts]
    renumber = {shard: i for i, shard in enumerate(sorted(set(raw)))}
    return [renumber[shard] for shard in raw]


class _Producer:
    """Makes the official tensors of the export from the stored leaves, one at a time."""

    def __init__(self, reader: converted.ParamReader, stored: GLMConfig, out: GLMConfig, dtype: np.dtype):
        self.reader, self.stored, self.out, self.dtype = reader, stored, out, dtype
        self.stored_maps = {m.key: m for m in tensor_maps(stored)}
        self._quantized: dict[str, list] = {}  # weight key -> [qweight, scale, uses left]

    def plan(self) -> list[OfficialTensor]:
        tensors = []
        out_maps = tensor_maps(self.out)
        for tensor_map in out_maps:
            quantized = any(p[-1] == QKERNEL for p in tensor_map.paths)
            dtype = np.dtype(np.int8) if quantized else self.dtype
            tensors.append(OfficialTensor(tensor_map.key, tensor_map.shape, dtype, self._producer(tensor_map)))
        inv_freq = np.asarray(rotary_inv_freq(self.out), np.float32).astype(self.dtype)
        for key in ignored_keys(self.out):
            if key == TIED_HEAD_KEY:
                if self.out.quantization_bit:
                    continue  # the official INT8/INT4 checkpoints store the tied embedding once
                head = dataclasses.replace(out_maps[0], key=key)
                tensors.append(OfficialTensor(key, head.shape, self.dtype, self._producer(head)))
            else:
                buffer = OfficialTensor(key, inv_freq.shape, self.dtype, lambda: iter([inv_freq]))
                tensors.insert(_buffer_position(tensors, key), buffer)
        return tensors

    def _producer(self, tensor_map: TensorMap) -> Callable[[], Iterator[np.ndarray]]:
        return lambda: self._produce(tensor_map)

    def _leaves(self, tensor_map: TensorMap) -> list[np.ndarray]:
        return [self.reader.read(path, tensor_map.layer) for path in tensor_map.paths]

    def _produce(self, tensor_map: TensorMap) -> Iterator[np.ndarray]:
        key = tensor_map.key
        stored_map = self.stored_maps.get(key)
        stored_quantized = stored_map is not None and any(p[-1] == QKERNEL for p in stored_map.paths)
        out_quantized = any(p[-1] == QKERNEL for p in tensor_map.paths)
        if _is_row_slicable(tensor_map, self.reader):
            (path,) = tensor_map.paths
            rows = max(1, _SLAB_BYTES // (math.prod(tensor_map.shape[1:]) * self.dtype.itemsize))
            for start in range(0, tensor_map.shape[0], rows):
                yield self.reader.read(path, rows=(start, min(tensor_map.shape[0], start + rows))).astype(self.dtype, copy=False)
        elif key.endswith(".weight_scale") and stored_map is None:  # made with its weight, quantized here
            yield self._quantize(key[: -len("_scale")])[1].astype(self.dtype)
        elif out_quantized and not stored_quantized:
            yield self._quantize(key)[0]
        elif stored_quantized and not out_quantized:  # dequantize
            weight = stored_map.merge(*self._leaves(stored_map))
            scale_map = self.stored_maps[key + "_scale"]
            yield dequantize_official(weight, scale_map.merge(*self._leaves(scale_map)), self.stored.quantization_bit,
                                      self.dtype)
        else:
            dtype = np.dtype(np.int8) if out_quantized else self.dtype
            merged = tensor_map.merge(*self._leaves(tensor_map))
            if is_linear_weight(tensor_map) and merged.T.flags.c_contiguous:
                out = aligned_empty(merged.size * dtype.itemsize).view(dtype).reshape(merged.shape)
                yield transpose2d(merged.T, out=out)
            else:
                yield np.ascontiguousarray(merged, dtype=dtype)

    def _quantize(self, weight_key: str) -> tuple[np.ndarray, np.ndarray]:
        """(qweight, scale) of a float weight, made once for its two official tensors (either comes first)."""
        if weight_key not in self._quantized:
            stored_map = self.stored_maps[weight_key]
            weight = stored_map.merge(*self._leaves(stored_map))
            self._quantized[weight_key] = [*quantize_official(weight, self.out.quantization_bit), 2]
        entry = self._quantized[weight_key]
        entry[2] -= 1
        if not entry[2]:
            del self._quantized[weight_key]
        return entry[0], entry[1]


def _is_row_slicable(tensor_map: TensorMap, reader: converted.ParamReader) -> bool:
    """An unsplit, unstacked leaf (the embedding, the tied head): copied in slabs of rows."""
    return (tensor_map.layer is None and len(tensor_map.paths) == 1 and not is_linear_weight(tensor_map)
            and len(tensor_map.shape) == 2 and reader.leaves[tensor_map.paths[0]][0] == tensor_map.shape)


def _buffer_position(tensors: list[OfficialTensor], key: str) -> int:
    """Where the official state dict has a rotary buffer: before its layer's attention weights."""
    module = key.rsplit(".rotary_emb.", 1)[0] if ".rotary_emb." in key else None
    for i, tensor in enumerate(tensors):
        if module is not None and tensor.key.startswith(module + ".query_key_value"):
            return i
    return len(tensors)


# ------------------------------------------------------------------------------------ weight files


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError("writing pytorch_model*.bin needs PyTorch: pip install 'glm-jax[convert]' "
                              "(or pass --safetensors)") from e
    return torch


def _bin_layout(path: str, tensors: list[OfficialTensor]) -> tuple[dict[str, int], int]:
    """Writes the skeleton of a `torch.save`d state dict at `path` (torch's own zip and pickle, holes
    for the data, so any torch loads the result) and returns (offset of each tensor's data, file size)."""
    torch = _import_torch()
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch_dtypes = {np.dtype(np.float16): torch.float16, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
                    np.dtype(np.float32): torch.float32, np.dtype(np.int8): torch.int8}
    with FakeTensorMode():
        fake = {t.key: torch.empty(t.shape, dtype=torch_dtypes[t.dtype]) for t in tensors}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)
    mapped = open_weight_file(path)  # mapping the holes reads nothing
    offsets = {t.key: mapped._file_offset(mapped.tensors[t.key]) for t in tensors}
    missing = [key for key, offset in offsets.items() if offset is None]
    if missing:
        raise ConversionError(f"cannot locate the data of {missing[:3]} in {path} (needs Linux /proc/self/maps)")
    return offsets, os.path.getsize(path)


def _safetensors_layout(path: str, tensors: list[OfficialTensor]) -> tuple[dict[str, int], int]:
    """Writes the header of a safetensors file at `path`; returns (offset of each tensor's data, file size)."""
    codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # 8-byte aligned data, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
    start = 8 + len(encoded)
    return {t.key: start + header[t.key]["data_offsets"][0] for t in tensors}, start + offset


def _write_weight_file(path: str, tensors: list[OfficialTensor], safetensors: bool, progress: tqdm) -> None:
    """Writes one weight file front to back: the structure bytes of its skeleton and, in file order,
    each tensor's bytes as they are produced."""
    offsets, size = (_safetensors_layout if safetensors else _bin_layout)(path, tensors)
    by_offset = sorted(tensors, key=lambda t: offsets[t.key])
    ends = [offsets[t.key] + t.nbytes for t in by_offset]
    gaps = list(zip([0, *ends], [offsets[t.key] for t in by_offset] + [size]))
    with open(path, "rb") as f:  # the zip / pickle / header bytes around the data (kilobytes)
        structure = [os.pread(f.fileno(), stop - start, start) for start, stop in gaps]
    blocks = ((i, block) for i, tensor in enumerate(by_offset) for block in [None, *tensor.produce()])
    with DirectFileWriter(path) as out:
        written = [0] * len(by_offset)
        for i, block in read_ahead(blocks, lambda item: 0 if item[1] is None else item[1].nbytes):
            tensor = by_offset[i]
            if block is None:  # a new tensor starts: first the structure bytes before it
                out.write(structure[i])
                continue
            if block.dtype != tensor.dtype:
                raise AssertionError(f"{tensor.key}: produced {block.dtype}, declared {tensor.dtype}")
            out.write(block)
            written[i] += block.nbytes
            progress.update(block.nbytes)
        bad = [t.key for t, n in zip(by_offset, written) if n != t.nbytes]
        if bad:
            raise AssertionError(f"produced the wrong number of bytes for {bad[:3]}")
        out.write(structure[-1])


def _hf_config(src: str, stored: GLMConfig, out: GLMConfig, dtype: str) -> dict:
    path = os.path.join(src, CONFIG_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    else:
        hf = to_hf_config(stored)
    hf.pop("quantization_bit", None)
    if out.quantization_bit:
        hf["quantization_bit"] = out.quantization_bit
    hf["torch_dtype"] = dtype
    return hf


def export(
    src: str,
    dst: str,
    *,
    dtype: str = "float16",
    quantization: str = "keep",
    safetensors: bool = False,
    num_shards: int = 0,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Exports the converted checkpoint `src` to the official layout at `dst`; returns the weight file names.

    `quantization`: "keep" (as stored), "none" (dequantize to `dtype`), "int8"/"int4" (quantize a float
    checkpoint with the official numerics). `num_shards` files (0: as many as `max_shard_size` needs).
    """
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    if not converted.is_converted_checkpoint(src):
        raise CheckpointError(f"not a converted checkpoint (needs {converted.GLM_CONFIG_FILE} and "
                              f"{converted.PARAMS_DIR}/): {src}")
    stored = converted.read_glm_config(src)
    bits = {"keep": stored.quantization_bit, "none": 0, "int8": 8, "int4": 4}.get(quantization)
    if bits is None:
        raise ConversionError(f"quantization={quantization!r} is not one of ['keep', 'none', 'int8', 'int4']")
    if stored.quantization_bit and bits not in (0, stored.quantization_bit):
        raise ConversionError(f"{src} is INT{stored.quantization_bit}; re-quantizing it to INT{bits} would stack "
                              "two roundings (export the float checkpoint instead)")
    out = stored.replace(quantization_bit=bits)
    specs = converted.leaf_specs(nn.unbox(abstract_params(GLMForCausalLM(stored))))
    converted.check_leaves(src, {leaf: spec.shape for leaf, spec in specs.items()})
    reader = converted.ParamReader(src)
    tensors = _Producer(reader, stored, out, np.dtype(EXPORT_DTYPES[dtype])).plan()

    sizes = [t.nbytes for t in tensors]
    count = num_shards if num_shards > 0 else max(1, math.ceil(sum(sizes) / parse_size(max_shard_size)))
    shard_ids = _shard_of_each(sizes, count)
    count = max(shard_ids) + 1
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if count == 1 else [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]

    with output_directory(dst, overwrite=overwrite, sources=(src,)) as staging:
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress)
        with bar:
            for shard, name in enumerate(names):
                members = [t for t, s in zip(tensors, shard_ids) if s == shard]
                _write_weight_file(os.path.join(staging, name), members, safetensors, bar)
        if count > 1:
            index = {"metadata": {"total_size": sum(sizes)},
                     "weight_map": {t.key: names[s] for t, s in sorted(zip(tensors, shard_ids), key=lambda p: p[0].key)}}
            with open(os.path.join(staging, SAFETENSORS_INDEX if safetensors else BIN_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(_hf_config(src, stored, out, dtype), f, indent=2)
        converted.copy_aux_files(src, staging)
    return names


__all__ = ["EXPORT_DTYPES", "OfficialTensor", "export", "parse_size"]
