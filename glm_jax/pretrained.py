"""`load_pretrained`: a model and its params from a converted checkpoint or an official Hugging Face
ChatGLM directory (float, or the official INT8/INT4 weights).

Official tensors are read one at a time and written into preallocated stacked arrays, so peak memory
is about one copy of the model plus one tensor. Every key is checked against the family's layout
(`glm_jax.hf_layout`): all missing, unexpected and mis-shaped keys are reported in one error.
Converted checkpoints (`glm_jax.converted`) are restored by orbax directly into the target sharding.
"""

from __future__ import annotations

import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glm_jax import converted
from glm_jax.config import GLMConfig, from_hf_config
from glm_jax.hf_io import CheckpointError, iter_tensors, read_hf_config, weight_files
from glm_jax.hf_layout import TIED_HEAD_KEY, TensorMap, ignored_keys, prefix_tensor_maps, tensor_maps
from glm_jax.modeling.layer_stack import unstack_layers
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.quantization import quantize_params
from glm_jax.sharding import LogicalRules, DEFAULT_RULES, logical_shardings

Params = dict[str, Any]


def abstract_params(model: GLMForCausalLM) -> Any:
    """Shapes/dtypes of the model's params, boxed with logical axis names, without allocating them."""
    ids = jnp.zeros((1, 4), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _allocate(maps: list[TensorMap], shapes: Any, dtype: np.dtype) -> Params:
    params: Params = {}
    for tensor_map in maps:
        for path in tensor_map.paths:
            try:
                leaf = _get(shapes, path)
            except KeyError:
                raise CheckpointError(f"layout maps {tensor_map.key} onto {'/'.join(path)}, which the model lacks") from None
            try:
                _get(params, path)
            except KeyError:
                # Quantized weights stay int8; every float leaf is read in `dtype`.
                _set(params, path, np.empty(leaf.shape, leaf.dtype if jnp.issubdtype(leaf.dtype, jnp.integer) else dtype))
    return params


def _check_key_sets(found: set[str], maps: list[TensorMap], optional: set[str], where: str) -> None:
    expected = {m.key for m in maps}
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))


def read_official_params(
    directory: str, config: GLMConfig, shapes: Any, maps: list[TensorMap], dtype: np.dtype,
    optional: set[str] = frozenset(),
) -> Params:
    """Reads every tensor of `maps` from `directory` into a NumPy param tree of `dtype`.

    Keys in `optional` may be present (buffers, the tied head copy) and are checked, not loaded.
    """
    by_key = {m.key: m for m in maps}
    files = weight_files(directory)
    if all(keys is not None for keys in files.values()):
        _check_key_sets({k for keys in files.values() for k in keys}, maps, optional, f"index of {directory}")

    params = _allocate(maps, shapes, dtype)
    found: set[str] = set()
    digests: dict[str, str] = {}
    bad_shapes: list[str] = []
    for path in files:
        for key, array in iter_tensors(path):
            found.add(key)
            if key in optional:
                if key == TIED_HEAD_KEY or key.endswith("word_embeddings.weight"):
                    digests[key] = hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8)).hexdigest()
                continue
            if key not in by_key:
                continue  # reported below with every other unexpected key
            tensor_map = by_key[key]
            if tuple(array.shape) != tensor_map.shape:
                bad_shapes.append(f"{key}: expected {list(tensor_map.shape)}, got {list(array.shape)}")
                continue
            if key.endswith("word_embeddings.weight") and config.tie_word_embeddings:
                digests[key] = hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8)).hexdigest()
            for leaf_path, leaf in zip(tensor_map.paths, tensor_map.split(np.asarray(array))):
                target = _get(params, leaf_path)
                if tensor_map.layer is None:
                    target[...] = leaf
                else:
                    target[tensor_map.layer] = leaf
    if bad_shapes:
        raise CheckpointError(f"shape mismatch in {directory}: " + "; ".join(bad_shapes))
    _check_key_sets(found, maps, optional, directory)
    embed_keys = [k for k in digests if k.endswith("word_embeddings.weight")]
    if TIED_HEAD_KEY in digests and embed_keys and digests[TIED_HEAD_KEY] != digests[embed_keys[0]]:
        raise CheckpointError(
            f"{directory}: {TIED_HEAD_KEY} differs from {embed_keys[0]}, but the model ties them "
            "(set tie_word_embeddings=false in config.json for an untied head)"
        )
    return params


def _place(params: Params, shardings: Any | None, dtype: np.dtype) -> Params:
    """Moves leaves to devices one at a time, dropping each host copy right after."""
    flat, treedef = jax.tree.flatten(params)
    targets = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    placed = []
    for i, sharding in enumerate(targets):
        leaf, flat[i] = flat[i], None
        target = dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype  # int8 weights stay int8
        placed.append(jax.device_put(jnp.asarray(leaf, target) if sharding is None else leaf.astype(target), sharding))
    return jax.tree.unflatten(treedef, placed)


def _read_prefix(prefix_dir: str, config: GLMConfig) -> tuple[GLMConfig, Params, list[TensorMap]]:
    hf = read_hf_config(prefix_dir)
    pre_seq_len = hf.get("pre_seq_len")
    if not pre_seq_len:
        raise CheckpointError(f"{prefix_dir}/config.json has no pre_seq_len: not a P-Tuning v2 checkpoint")
    config = config.replace(pre_seq_len=int(pre_seq_len), prefix_projection=bool(hf.get("prefix_projection", False)))
    return config, hf, prefix_tensor_maps(config)


_QUANTIZATION_BITS = {None: 0, "int8": 8, "int4": 4}


def load_pretrained(
    path: str,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    quantization: str | None = None,
    quantize_embeddings: bool = False,
    quantization_group_size: int = 0,
    mesh: Mesh | None = None,
    prefix: str | None = None,
    lora: str | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    **config_overrides: Any,
) -> tuple[GLMForCausalLM, Params]:
    """Model and params from a converted checkpoint directory or an official Hugging Face ChatGLM directory.

    `dtype` sets both compute and param dtype (default float32, exact for fp16 checkpoints);
    `param_dtype` stores the params in another dtype: "float16" keeps an fp16 checkpoint as stored
    (half the memory) while every matmul still computes in `dtype` with the same weight values, and
    on CPU decodes about 1.7x faster with float32 compute (2 bytes read per weight);
    `quantization` "int8" / "int4" quantizes the Linear weights of a float checkpoint with the
    official scheme (None: load as stored; quantized checkpoints, official or converted, stay
    quantized); `quantize_embeddings` also quantizes the word embedding (tied output layer) per
    token row with the same bits, the official `-qe` scheme; `quantization_group_size` > 0 gives
    every group of that many input values its own scale (more accurate, no official layout);
    `mesh` places every param with its logical sharding; `prefix` is a P-Tuning v2 checkpoint directory whose prefix encoder is loaded on top (its `pre_seq_len`/`prefix_projection` apply);
    `lora` is a PEFT LoRA adapter directory attached unmerged (`glm_jax.training.peft.attach_lora`).
    `scan_layers=False` (a GLMConfig field, passed through `config_overrides` like any other) returns
    the per-layer layout that decodes fastest (`glm_jax.modeling.layer_stack`); the default stacked
    layout is the one to train.
    """
    if quantization not in _QUANTIZATION_BITS:
        raise ValueError(f"quantization={quantization!r} is not one of {list(_QUANTIZATION_BITS)}")
    dtype = dtype or "float32"
    param_dtype = param_dtype or dtype
    is_converted = converted.is_converted_checkpoint(path)
    if is_converted:
        config = converted.read_glm_config(path).replace(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    else:
        config = from_hf_config(read_hf_config(path), dtype=dtype, param_dtype=param_dtype, **config_overrides)
    bits = _QUANTIZATION_BITS[quantization]
    if bits and config.quantization_bit not in (0, bits):
        raise CheckpointError(f"{path} holds an INT{config.quantization_bit} checkpoint; "
                              f"quantization={quantization!r} would quantize it twice")
    quantize = bool(bits) and not config.quantization_bit
    if (quantize_embeddings or quantization_group_size) and not quantize:
        raise ValueError("quantize_embeddings / quantization_group_size need quantization='int8' or 'int4' "
                         "on a float checkpoint")
    prefix_maps: list[TensorMap] = []
    if prefix is not None:
        config, _, prefix_maps = _read_prefix(prefix, config)
    # Checkpoints hold the stacked layout: read into it, then unstack at the end for `scan_layers=False`.
    scan_layers = config.scan_layers
    config = config.replace(scan_layers=True)
    model = GLMForCausalLM(config)
    abstract = abstract_params(model)
    shapes = nn.unbox(abstract)
    np_dtype = np.float32  # read at full precision, cast once when placing on devices
    base_shapes = {name: tree for name, tree in shapes.items() if name != "prefix_encoder" or prefix is None}
    if is_converted and not quantize:
        # Straight from disk into the target sharding and dtype (each host reads its shards only).
        shardings = logical_shardings(abstract, mesh, rules) if mesh is not None else None
        base_shardings = None if shardings is None else {k: shardings[k] for k in base_shapes}
        params = converted.restore_params(path, base_shapes, param_dtype, base_shardings)
    else:
        if is_converted:
            params = converted.restore_params(path, base_shapes, "float32", to_host=True)
        else:
            params = read_official_params(path, config, shapes, tensor_maps(config), np_dtype, set(ignored_keys(config)))
        if quantize:
            config = config.replace(quantization_bit=bits, quantize_embeddings=quantize_embeddings,
                                    quantization_group_size=quantization_group_size)  # validates first
            params = quantize_params(params, bits, embeddings=quantize_embeddings, group_size=quantization_group_size)
            model = GLMForCausalLM(config)
            abstract = abstract_params(model)
        shardings = logical_shardings(abstract, mesh, rules) if mesh is not None else None
        base_shardings = None if shardings is None else {k: shardings[k] for k in params}
        params = _place(params, base_shardings, np.dtype(param_dtype))
    if prefix is not None:
        prefix_params = read_official_params(prefix, config, shapes, prefix_maps, np_dtype)
        prefix_shardings = None if shardings is None else {"prefix_encoder": shardings["prefix_encoder"]}
        params["prefix_encoder"] = _place(prefix_params, prefix_shardings, np.dtype(param_dtype))["prefix_encoder"]
        # The prefix encoder stays in float32, as the official recipe keeps it.
        params["prefix_encoder"] = jax.tree.map(lambda x: x.astype(jnp.float32), params["prefix_encoder"])
    if lora is not None:
        from glm_jax.training.peft import attach_lora

        model, params = attach_lora(lora, model, params, mesh, rules)
    if not scan_layers:
        model = GLMForCausalLM(model.config.replace(scan_layers=False))
        params = unstack_layers(params)
        if mesh is not None:
            shardings = logical_shardings(abstract_params(model), mesh, rules)
            params = {name: jax.device_put(tree, shardings[name]) for name, tree in params.items()}
    return model, params

