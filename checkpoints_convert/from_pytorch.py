"""Official ChatGLM PyTorch directory -> converted checkpoint (`glm-convert --src=HF --dst=OURS`).

Reads every official layout (sharded or single `.bin`, `*.safetensors`, with or without index,
float or the official INT8/INT4 weights) through `glm_jax.hf_io`, checks the whole key set, shapes
and dtypes against the family's layout table *before* writing anything, then streams tensor by
tensor into a `glm_jax.converted.ParamWriter`:

* tensors are read with direct I/O (no page cache, no mapped pages) by a thread that stays a few
  hundred MB ahead, the largest ones slab by slab, so memory stays at about one tensor (peak RSS far
  below one shard, let alone the model);
* Linear weights are transposed with one fast 2-D panel copy, then split into our leaves;
* with a mesh, the arrays are chunked like the target sharding and each host reads and writes only
  the shards it owns;
* everything goes to a temporary directory renamed at the end (`checkpoints_convert.staging`).

Quantized sources stay quantized, bytes unchanged, unless a float `dtype` or `quantization="none"`
asks for floats; a float source can be quantized on the way (`quantization="int8"|"int4"`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from checkpoints_convert.arrays import transpose2d
from checkpoints_convert.prefetch import read_ahead
from checkpoints_convert.staging import ConversionError, output_directory
from glm_jax import converted
from glm_jax.config import DTYPES, GLMConfig, from_hf_config
from glm_jax.hf_io import CONFIG_FILE, CheckpointError, WeightFile, open_weight_file, read_hf_config, weight_files
from glm_jax.hf_layout import TIED_HEAD_KEY, TensorMap, ignored_keys, is_linear_weight, tensor_maps
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import abstract_params
from glm_jax.quantization import QKERNEL, dequantize_official, quantize_official
from glm_jax.sharding import DEFAULT_RULES, LogicalRules, logical_shardings

QUANTIZATION_CHOICES = ("keep", "none", "int8", "int4")
_READ_AHEAD_LARGEST = 256 << 20
_BITS = {"none": 0, "int8": 8, "int4": 4}


def hf_model_config(hf: dict, directory: str) -> GLMConfig:
    """The GLMConfig of an official `config.json`, every problem reported as a CheckpointError."""
    where = os.path.join(directory, CONFIG_FILE)
    if hf.get("model_type") is None:
        raise CheckpointError(f"{where} has no model_type: not a ChatGLM checkpoint directory")
    if hf.get("quantization_embeddings"):
        raise CheckpointError(f"{where}: quantized word embeddings (the '-int4-qe' variant) are not supported")
    try:
        return from_hf_config(hf)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e


@dataclasses.dataclass
class Source:
    """An official directory opened for streaming: every tensor a lazy view, checked against the layout."""

    directory: str
    hf_config: dict
    config: GLMConfig
    files: list[WeightFile]
    where: dict[str, WeightFile]
    maps: dict[str, TensorMap]

    @property
    def embedding_key(self) -> str:
        return next(iter(self.maps))

    @property
    def float_dtype(self) -> np.dtype:
        """The dtype of the word embedding, which no official format quantizes."""
        return self.tensor(self.embedding_key).dtype

    def tensor(self, key: str) -> np.ndarray:
        return self.where[key].tensors[key]


def open_source(directory: str) -> Source:
    """Opens and validates an official directory; one CheckpointError lists every problem found."""
    hf = read_hf_config(directory)
    config = hf_model_config(hf, directory)
    listing = weight_files(directory)
    files = [open_weight_file(path) for path in listing]
    where: dict[str, WeightFile] = {}
    duplicates = []
    for weights in files:
        for key in weights.tensors:
            if key in where:
                duplicates.append(f"{key} ({os.path.basename(where[key].path)}, {os.path.basename(weights.path)})")
            where[key] = weights
    problems = [f"keys stored twice: {duplicates}"] if duplicates else []
    for weights in files:
        listed = listing[weights.path]
        if listed is not None and set(listed) != set(weights.tensors):
            absent = sorted(set(listed) - set(weights.tensors))
            extra = sorted(set(weights.tensors) - set(listed))
            problems.append(f"the index disagrees with {os.path.basename(weights.path)}: "
                            f"listed but absent {absent}, present but not listed {extra}")
    maps = {m.key: m for m in tensor_maps(config)}
    optional = set(ignored_keys(config))
    missing = sorted(maps.keys() - where.keys())
    unexpected = sorted(where.keys() - maps.keys() - optional)
    shapes, dtypes = [], []
    for key in sorted(maps.keys() & where.keys()):
        array, tensor_map = where[key].tensors[key], maps[key]
        if tuple(array.shape) != tensor_map.shape:
            shapes.append(f"{key}: expected {list(tensor_map.shape)}, got {list(array.shape)}")
        wants_int = any(path[-1] == QKERNEL for path in tensor_map.paths)
        if (array.dtype == np.int8) != wants_int or not (wants_int or np.issubdtype(array.dtype, np.floating)):
            dtypes.append(f"{key}: expected {'int8' if wants_int else 'a float dtype'}, got {array.dtype}")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatch", shapes), ("dtype mismatch", dtypes)):
        if items:
            problems.append(f"{label} {items}")
    if problems:
        raise CheckpointError(f"{directory} does not match the {config.family} layout"
                              f"{f' (INT{config.quantization_bit})' if config.quantization_bit else ''}: "
                              + "; ".join(problems))
    return Source(directory, hf, config, files, where, maps)


def _output_bits(source_bits: int, quantization: str, dtype: str | None) -> int:
    if quantization not in QUANTIZATION_CHOICES:
        raise ConversionError(f"quantization={quantization!r} is not one of {QUANTIZATION_CHOICES}")
    if quantization == "keep":
        return 0 if dtype is not None else source_bits
    bits = _BITS[quantization]
    if source_bits and bits and bits != source_bits:
        raise ConversionError(
            f"the source is INT{source_bits}; re-quantizing it to INT{bits} would stack two roundings "
            "(convert from the float checkpoint instead)")
    return bits


def _crc32(blocks, crc: int = 0) -> int:
    """CRC-32 of the bytes of `blocks` (arrays, in order): a cheap equality check for the tied head."""
    for block in blocks:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)), crc)
    return crc


class _Streamer:
    """Writes one official tensor at a time into the ParamWriter."""

    def __init__(self, writer: converted.ParamWriter):
        self.writer = writer

    def write(self, tensor_map: TensorMap, array: np.ndarray, *, digest: bool = False) -> int | None:
        """Splits `array` (official layout, a private in-memory copy) into its leaves and writes them
        slab by slab; `digest` (unsplit maps only) returns the CRC-32 of its bytes, read in the same pass."""
        writer = self.writer
        if is_linear_weight(tensor_map) and all(writer.owns_all(p) for p in tensor_map.paths):
            array = transpose2d(array).T  # one fast copy; the leaves below are cheap views
        crc = 0
        for path, leaf in zip(tensor_map.paths, tensor_map.split(array)):
            if digest and leaf is not array:
                raise ValueError(f"{tensor_map.key}: a digest needs an unsplit tensor")
            rows = writer.slab_rows(path)
            for start in range(0, max(leaf.shape[0], 1), rows):
                slab = leaf[start:start + rows]
                if digest:
                    crc = _crc32([slab], crc)
                writer.write(path, slab, layer=tensor_map.layer, start=start, stable=True)
        return crc if digest else None

    def write_rows(
        self, tensor_map: TensorMap, read_rows: Callable[[int, int], np.ndarray], *, digest: bool = False
    ) -> int | None:
        """Like `write` for an unsplit, unstacked tensor too large to hold: read and written a slab at a time."""
        (path,) = tensor_map.paths
        rows, total, crc = self.writer.slab_rows(path), tensor_map.shape[0], 0
        for start in range(0, total, rows):
            slab = read_rows(start, min(total, start + rows))
            if digest:
                crc = _crc32([slab], crc)
            self.writer.write(path, slab, start=start, stable=True)
        return crc if digest else None


def _flat_shardings(abstract: Any, mesh: Mesh, rules: LogicalRules) -> dict:
    shardings = logical_shardings(abstract, mesh, rules)
    return {path: sharding for path, sharding in zip(converted.leaf_specs(nn.unbox(abstract)), jax.tree.leaves(shardings))}


def convert(
    src: str,
    dst: str,
    *,
    dtype: str | None = None,
    quantization: str = "keep",
    overwrite: bool = False,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    chunk_bytes: int = 64 << 20,
    progress: bool = True,
) -> GLMConfig:
    """Converts the official directory `src` into a converted checkpoint at `dst`; returns its config.

    `dtype` (float16 / bfloat16 / float32) is the stored float dtype, default the source's;
    `quantization` is "keep" (a quantized source stays quantized unless `dtype` is given), "none"
    (dequantize), or "int8" / "int4" (quantize a float source with the official numerics).
    `chunk_bytes` caps the size of one stored chunk (the unit of every later read).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {DTYPES}")
    source = open_source(src)
    source_bits = source.config.quantization_bit
    bits = _output_bits(source_bits, quantization, dtype)
    float_dtype = dtype or source.float_dtype.name
    if float_dtype not in DTYPES:
        raise ConversionError(f"{src}: weights are {float_dtype}; pass --dtype (one of {DTYPES})")
    config = source.config.replace(dtype=float_dtype, param_dtype=float_dtype, quantization_bit=bits)
    out_maps = {m.key: m for m in tensor_maps(config)}
    abstract = abstract_params(GLMForCausalLM(config))
    specs = converted.leaf_specs(nn.unbox(abstract))
    for tensor_map in out_maps.values():
        for path in tensor_map.paths:
            if path not in specs:
                raise CheckpointError(f"layout maps {tensor_map.key} onto {'/'.join(path)}, which the model lacks")
    shardings = _flat_shardings(abstract, mesh, rules) if mesh is not None else None

    total = sum(weights.tensors[key].nbytes for weights in source.files for key in weights.tensors)
    with output_directory(dst, overwrite=overwrite, sources=(src,)) as staging:
        digests: dict[str, int] = {}
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress)
        with converted.ParamWriter(staging, specs, shardings, chunk_bytes=chunk_bytes) as writer, bar:
            streamer = _Streamer(writer)
            # Tensors up to 256 MB are read ahead into memory; larger ones stream from the mapping.
            items = ((w, key, w.read(key) if w.tensors[key].nbytes <= _READ_AHEAD_LARGEST else None)
                     for w in source.files for key in w.tensors)
            for weights, key, array in read_ahead(items, lambda item: 0 if item[2] is None else item[2].nbytes):
                _convert_tensor(source, weights, key, array, out_maps, source_bits, bits, streamer, digests)
                bar.update(weights.tensors[key].nbytes)
            embed_key = source.embedding_key
            if TIED_HEAD_KEY in digests and digests[TIED_HEAD_KEY] != digests.get(embed_key):
                raise CheckpointError(
                    f"{src}: {TIED_HEAD_KEY} differs from {embed_key}, but the model ties them "
                    "(set tie_word_embeddings=false in config.json for an untied head)")
            writer.commit()
        if jax.process_index() == 0:
            _write_metadata(source, staging, config)
    return config


def _convert_tensor(
    source: Source, weights: WeightFile, key: str, array: np.ndarray | None, out_maps: dict[str, TensorMap],
    source_bits: int, bits: int, streamer: _Streamer, digests: dict[str, int],
) -> None:
    """Writes the leaves of one source tensor: `array` is its in-memory copy, or None for a tensor too
    large to read ahead (read here: an unsplit one slab by slab, any other whole)."""
    primary = jax.process_index() == 0
    read_rows = lambda start, stop: weights.read(key, rows=(start, stop))  # noqa: E731
    slab_rows = (64 << 20) // max(1, weights.tensors[key][:1].nbytes)
    if key not in source.maps:  # an ignored key: the tied head is compared with the embedding
        if key == TIED_HEAD_KEY and primary:
            total = weights.tensors[key].shape[0]
            blocks = [array] if array is not None else (
                read_rows(s, min(total, s + slab_rows)) for s in range(0, total, slab_rows))
            digests[key] = _crc32(blocks)
        return
    if key.endswith(".weight_scale"):
        if bits:  # kept quantized: the scale is a leaf like any other
            streamer.write(out_maps[key], array if array is not None else weights.read(key))
        return  # dequantized: consumed with its weight
    out_map = out_maps[key]
    digest = key == source.embedding_key and TIED_HEAD_KEY in source.where and primary
    quantized_source = any(p[-1] == QKERNEL for p in source.maps[key].paths)
    quantize = bits and not quantized_source and any(p[-1] == QKERNEL for p in out_map.paths)
    unsplit = (out_map.layer is None and len(out_map.paths) == 1 and not is_linear_weight(out_map)
               and streamer.writer.specs[out_map.paths[0]].shape == out_map.shape)  # e.g. the word embedding
    if array is None and unsplit and not quantize and not (quantized_source and not bits):
        crc = streamer.write_rows(out_map, read_rows, digest=digest)
        if digest:
            digests[key] = crc
        return
    array = weights.read(key) if array is None else array
    if quantized_source and not bits:
        scale = np.array(source.tensor(key + "_scale"))
        streamer.write(out_map, dequantize_official(array, scale, source_bits, np.float32))
    elif quantize:
        qweight, scale = quantize_official(array, bits)
        streamer.write(out_map, qweight)
        streamer.write(out_maps[key + "_scale"], scale)
    elif digest:
        digests[key] = streamer.write(out_map, array, digest=True)
    else:
        streamer.write(out_map, array)


def _write_metadata(source: Source, directory: str, config: GLMConfig) -> None:
    converted.write_glm_config(directory, config)
    hf = dict(source.hf_config)
    hf.pop("quantization_bit", None)
    if config.quantization_bit:
        hf["quantization_bit"] = config.quantization_bit
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    converted.copy_aux_files(source.directory, directory)


__all__ = ["QUANTIZATION_CHOICES", "Source", "convert", "hf_model_config", "open_source"]
