"""GLM-130B: merge the tensor-parallel SAT checkpoint into one converted checkpoint (spec 3.2).

Input: a directory with a text file `latest` (the iteration) and `<iteration>/mp_rank_XX_model_states.pt`,
one torch pickle `{"module": state_dict}` per tensor-parallel rank (8 for the released model). Each
merged key is rebuilt from its rank partitions by one of four rules:

* replicated (LayerNorms, `attention.dense.bias`, `mlp.dense_4h_to_h.bias`, `rotary_emb.inv_freq`,
  the final LayerNorm): every rank holds the whole tensor; the copies must be identical;
* row-parallel (`attention.dense.weight`, `mlp.dense_4h_to_h.weight`): concatenated along dim 1;
* GLU (`mlp.dense_h_to_4h.weight`/`.bias`): each rank holds `[x1_part ; x2_part]`; the merged tensor is
  the first halves of all ranks in rank order, then all second halves;
* everything else (vocab-parallel embedding, column-parallel QKV weight/bias): concatenated along dim 0.
  Heads are contiguous per rank, so the per-head `[q, k, v]` interleaving survives the concatenation.

Quantized checkpoints (INT8, or INT4 packed two values per byte) store each rank's four Linear weights
as int8 plus a per-row `<key>_scale` computed **on that rank's partition**. For row-parallel layers a
merged output row would need one scale per rank, so partitions cannot be merged as integers: every
partition is **dequantized on its rank** (`q * scale`) and the float partitions are merged. The output
is therefore a float checkpoint; quantize it again with `glm_jax.quantization` (one scale per full
row) if INT4/INT8 weights are wanted.

Streaming: the rank files are opened memory-mapped (`torch.load(weights_only=True, mmap=True)`) and
merged one key at a time in layer order; each merged tensor is split into our leaves and handed to
`glm_jax.converted.ParamWriter`, which writes it into the stacked on-disk arrays, so memory stays at
about one merged tensor (the largest is the 3.7 GB fp16 embedding), not one rank file and never the
model. The result (`params/` orbax checkpoint + `glm_config.json`) is written under a temporary name
and renamed when complete; `load_pretrained` restores it straight into any sharding.

`split_to_sat` is the inverse (a merged state dict -> rank files), used to build test checkpoints.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import numpy as np

from checkpoints_convert.staging import ConversionError, output_directory
from glm_jax import converted
from glm_jax.config import DTYPES, GLMConfig, preset
from glm_jax.hf_io import CheckpointError, load_torch_file, torch_to_numpy
from glm_jax.hf_layout import TensorMap, ignored_keys, tensor_maps
from glm_jax.modeling.layers import rotary_inv_freq
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import abstract_params
from glm_jax.quantization import dequantize_official, quantize_official

LATEST_FILE = "latest"
SCALE_SUFFIX = "_scale"

_ROW_PARALLEL = (".attention.dense.weight", ".mlp.dense_4h_to_h.weight")
_GLU = (".mlp.dense_h_to_4h.weight", ".mlp.dense_h_to_4h.bias")
_COLUMN_PARALLEL = ("word_embeddings.weight", ".attention.query_key_value.weight", ".attention.query_key_value.bias")
# The Linear weights that quantized checkpoints store as int8 + `_scale` (spec 1.7 / 3.2).
_QUANTIZED = (".attention.query_key_value.weight", ".attention.dense.weight", ".mlp.dense_h_to_4h.weight",
              ".mlp.dense_4h_to_h.weight")


def partition_rule(key: str) -> str:
    """How `key` is partitioned over tensor-parallel ranks: "replicated", "rows" (dim 1), "glu" or "columns" (dim 0)."""
    if key.endswith(_ROW_PARALLEL):
        return "rows"
    if key.endswith(_GLU):
        return "glu"
    if key.endswith(_COLUMN_PARALLEL):
        return "columns"
    return "replicated"


def merge_partitions(key: str, parts: list[np.ndarray]) -> np.ndarray:
    """The merged tensor of `key` from its rank partitions (in rank order)."""
    rule = partition_rule(key)
    try:
        if rule == "replicated":
            for rank, part in enumerate(parts[1:], start=1):
                if part.shape != parts[0].shape or not np.array_equal(part, parts[0]):
                    raise CheckpointError(f"{key} should be replicated, but rank {rank} differs from rank 0")
            return parts[0]
        if rule == "rows":
            return np.concatenate(parts, axis=1)
        if rule == "glu":
            halves = [np.split(part, 2, axis=0) for part in parts]
            return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
        return np.concatenate(parts, axis=0)
    except ValueError as e:  # partitions whose shapes do not line up
        raise CheckpointError(f"cannot merge the rank partitions of {key} {[list(p.shape) for p in parts]}: {e}") from e


def split_partitions(key: str, tensor: np.ndarray, ranks: int) -> list[np.ndarray]:
    """Inverse of `merge_partitions`: the partition of every rank."""
    rule = partition_rule(key)
    if rule == "replicated":
        return [tensor] * ranks
    if rule == "rows":
        return np.split(tensor, ranks, axis=1)
    if rule == "glu":
        first, second = (np.split(half, ranks, axis=0) for half in np.split(tensor, 2, axis=0))
        return [np.concatenate([a, b], axis=0) for a, b in zip(first, second)]
    return np.split(tensor, ranks, axis=0)


def rank_files(directory: str) -> list[str]:
    """`<dir>/<latest>/mp_rank_XX_model_states.pt` for ranks 0, 1, ... (all present, none missing)."""
    latest = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"not a SAT checkpoint directory (no '{LATEST_FILE}' file): {directory}")
    with open(latest, encoding="utf-8") as f:
        iteration = f.read().strip()
    folder = os.path.join(directory, iteration)
    if not iteration or not os.path.isdir(folder):
        raise CheckpointError(f"{latest} names iteration {iteration!r}, but {folder} is not a directory")
    matches = [re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", n) for n in os.listdir(folder)]
    found = {m.group(0) for m in matches if m}
    last = max((int(m.group(1)) for m in matches if m), default=-1)
    names = [f"mp_rank_{rank:02d}_model_states.pt" for rank in range(last + 1)]
    if not names or set(names) != found:
        missing = sorted(set(names) - found) or ["mp_rank_00_model_states.pt"]
        raise CheckpointError(f"{folder}: missing rank files {missing} (found {sorted(found)})")
    return [os.path.join(folder, n) for n in names]


def _open_rank(path: str) -> dict[str, Any]:
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT model state file (expected a dict with a 'module' state dict)")
    return checkpoint["module"]


def _check_rank_keys(states: list[dict], paths: list[str], expected: set[str]) -> None:
    problems = []
    for state, path in zip(states, paths):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            problems.append(f"{path}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    if problems:
        raise CheckpointError("rank files do not hold the expected keys: " + "; ".join(problems))


def _quantization_bits(states: list[dict], config: GLMConfig) -> int:
    """0 for a float checkpoint, else 8 or 4 (told apart by the packed width of the QKV weight)."""
    key = "transformer.layers.0.attention.query_key_value.weight"
    if key + SCALE_SUFFIX not in states[0]:
        return 0
    width = states[0][key].shape[1]
    bits = {config.hidden_size: 8, config.hidden_size // 2: 4}.get(width)
    if bits is None:
        raise CheckpointError(f"{key} has {width} columns: neither INT8 ({config.hidden_size}) nor INT4 ({config.hidden_size // 2})")
    return bits


def partition_shape(key: str, shape: tuple[int, ...], ranks: int, bits: int = 0) -> tuple[int, ...]:
    """Shape of one rank's partition of a merged tensor of `shape` (INT4 weights: half the columns)."""
    rule = partition_rule(key)
    axis = {"replicated": None, "rows": 1, "glu": 0, "columns": 0}[rule]
    dims = list(shape)
    if axis is not None:
        if dims[axis] % (2 * ranks if rule == "glu" else ranks):
            raise CheckpointError(f"{key} {list(shape)} cannot be split over {ranks} ranks")
        dims[axis] //= ranks
    if bits == 4:
        dims[-1] //= 2
    return tuple(dims)


def _check_partitions(states: list[dict], paths: list[str], maps: list[TensorMap], quantized: set[str],
                      bits: int, buffers: list[str]) -> None:
    """Shapes of every partition and equality of every replicated tensor, before anything is merged."""
    problems = []
    for tensor_map in maps:
        key = tensor_map.key
        expected = partition_shape(key, tensor_map.shape, len(states), bits if key in quantized else 0)
        for state, path in zip(states, paths):
            found = tuple(state[key].shape)
            if found != expected:
                problems.append(f"{key} in {os.path.basename(path)}: expected {list(expected)}, got {list(found)}")
            if key in quantized and tuple(state[key + SCALE_SUFFIX].shape) != expected[:1]:
                problems.append(f"{key}{SCALE_SUFFIX} in {os.path.basename(path)}: expected {list(expected[:1])}, "
                                f"got {list(state[key + SCALE_SUFFIX].shape)}")
    if problems:
        raise CheckpointError("rank partitions with unexpected shapes: " + "; ".join(problems[:16]))
    for key in buffers + [m.key for m in maps if partition_rule(m.key) == "replicated"]:
        merge_partitions(key, [torch_to_numpy(s[key]) for s in states])  # raises on differing copies


def merged_tensors(paths: list[str], config: GLMConfig) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """`(tensor_map, merged tensor)` for every key of `config`'s layout, one at a time in layer order.

    Every key, partition shape and replicated copy is checked before the first tensor is yielded, so a
    bad checkpoint fails before anything is written. Replicated buffers (`rotary_emb.inv_freq`) are
    checked and dropped.
    """
    states = [_open_rank(p) for p in paths]
    bits = _quantization_bits(states, config)
    maps = tensor_maps(config)
    quantized = {m.key for m in maps if bits and m.key.endswith(_QUANTIZED)}
    _check_rank_keys(states, paths, {m.key for m in maps} | set(ignored_keys(config)) | {k + SCALE_SUFFIX for k in quantized})
    _check_partitions(states, paths, maps, quantized, bits, ignored_keys(config))

    def partition(state: dict, key: str) -> np.ndarray:
        if key in quantized:
            return dequantize_official(torch_to_numpy(state[key]), torch_to_numpy(state[key + SCALE_SUFFIX]), bits)
        return torch_to_numpy(state[key])

    for tensor_map in maps:
        yield tensor_map, merge_partitions(tensor_map.key, [partition(s, tensor_map.key) for s in states])


def convert(sat_dir: str, dst: str, config: GLMConfig, *, dtype: str = "float16", overwrite: bool = False,
            log: Callable[[str], None] = lambda message: None) -> GLMConfig:
    """Merges the SAT checkpoint in `sat_dir` into the converted checkpoint `dst` (see `glm_jax.converted`);
    returns the written config. `dtype` is the stored float dtype."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {DTYPES}")
    if config.family != "glm130b" or config.quantization_bit:
        raise ConversionError(f"the SAT converter needs a float GLM-130B config, got family {config.family!r}"
                              f"{f' INT{config.quantization_bit}' if config.quantization_bit else ''}")
    paths = rank_files(sat_dir)
    config = config.replace(dtype=dtype, param_dtype=dtype)
    specs = converted.leaf_specs(nn.unbox(abstract_params(GLMForCausalLM(config))))
    with output_directory(dst, overwrite=overwrite, sources=(sat_dir,)) as staging:
        writer = converted.ParamWriter(staging, specs)
        written, last_layer = set(), None
        for tensor_map, merged in merged_tensors(paths, config):
            if tensor_map.layer is not None and tensor_map.layer != last_layer:
                last_layer = tensor_map.layer
                log(f"merging layer {last_layer + 1}/{config.num_layers} from {len(paths)} ranks")
            for path, leaf in zip(tensor_map.paths, tensor_map.split(merged)):
                if path not in specs:
                    raise CheckpointError(f"layout maps {tensor_map.key} onto {'/'.join(path)}, which the model lacks")
                writer.write(path, leaf, layer=tensor_map.layer)
                written.add(path)
        missing = sorted("/".join(p) for p in specs.keys() - written)
        if missing:
            raise CheckpointError(f"the checkpoint layout leaves model params unset: {missing}")
        writer.commit()
        converted.write_glm_config(staging, config)
    return config


def official_state_dict(config: GLMConfig, params: Any) -> dict[str, np.ndarray]:
    """The merged SAT state dict (key -> array) of `params`, with the replicated rotary buffers."""
    state = {}
    for tensor_map in tensor_maps(config):
        leaves = []
        for path in tensor_map.paths:
            leaf = params
            for name in path:
                leaf = leaf[name]
            leaves.append(np.asarray(leaf if tensor_map.layer is None else leaf[tensor_map.layer]))
        state[tensor_map.key] = np.ascontiguousarray(tensor_map.merge(*leaves))
    inv_freq = np.asarray(rotary_inv_freq(config))
    state.update({key: inv_freq for key in ignored_keys(config)})
    return state


def split_to_sat(state: dict[str, np.ndarray], directory: str, ranks: int = 8, iteration: int = 1,
                 quantization_bit: int = 0) -> list[str]:
    """Writes `state` (merged keys) as `ranks` SAT rank files under `directory`; returns their paths.

    With `quantization_bit` the four Linear weights of every layer are quantized per rank partition,
    as the official tensor-parallel quantization does.
    """
    import torch

    folder = os.path.join(directory, str(iteration))
    os.makedirs(folder, exist_ok=True)
    modules: list[dict] = [{} for _ in range(ranks)]
    for key, tensor in state.items():
        for rank, part in enumerate(split_partitions(key, np.asarray(tensor), ranks)):
            if quantization_bit and key.endswith(_QUANTIZED):
                q, scale = quantize_official(part, quantization_bit)
                modules[rank][key], modules[rank][key + SCALE_SUFFIX] = torch.from_numpy(q), torch.from_numpy(scale)
            else:
                modules[rank][key] = torch.from_numpy(np.array(part))
    paths = [os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt") for rank in range(ranks)]
    for module, path in zip(modules, paths):
        torch.save({"module": module}, path)
    with open(os.path.join(directory, LATEST_FILE), "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")
    return paths


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("sat_dir", None, "SAT checkpoint directory (holds 'latest' and <iteration>/mp_rank_XX_model_states.pt).")
    flags.DEFINE_string("output_dir", None, "Converted checkpoint directory to write (params/ + glm_config.json).")
    flags.DEFINE_string("preset", "glm-130b", "GLMConfig preset describing the checkpoint (glm_jax.config.PRESETS).")
    flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "Stored float dtype of the params.")
    flags.DEFINE_bool("overwrite", False, "Replace --output_dir if it exists (only once the new one is complete).")
    flags.mark_flags_as_required(["sat_dir", "output_dir"])


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    flag_values = flags.FLAGS
    try:
        config = preset(flag_values.preset)
        convert(flag_values.sat_dir, flag_values.output_dir, config, dtype=flag_values.dtype,
                overwrite=flag_values.overwrite, log=logging.info)
    except (ValueError, ConversionError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from e
    logging.info("wrote %s", flag_values.output_dir)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
