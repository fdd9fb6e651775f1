"""Parameter-efficient fine-tuning: what trains, LoRA merging, and adapter files in the official layouts.

Methods: "full" (every param), "ptuning" (P-Tuning v2: only `prefix_encoder`, spec §1.8) and "lora"
(only the LoRA leaves: each adapted module's `lora_<target>/kernel` = PEFT `lora_A` and its Linears'
`lora_b` = PEFT `lora_B`, see `glm_jax.modeling.layers.Linear`).

Adapters are saved alone, in the layouts the PyTorch tools read:

* P-Tuning v2: `pytorch_model.bin` with only `transformer.prefix_encoder.*` (float32) plus the model's
  `config.json` with `pre_seq_len` / `prefix_projection` — what the official ptuning trainer writes and
  `load_pretrained(base, prefix=DIR)` / the official `main.py --ptuning_checkpoint` read.
* LoRA: PEFT's `adapter_config.json` + `adapter_model.safetensors` with keys
  `base_model.model.<official module>.lora_A.weight [r, in]` / `.lora_B.weight [out, r]`. A fused
  official module (ChatGLM's `query_key_value`, ChatGLM2's gated `dense_h_to_4h`) has one A and one B
  whose rows are laid out like the module's weight, so the row split/merge functions of
  `glm_jax.hf_layout` convert B exactly as they convert the weight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from glm_jax.config import LORA_TARGETS, GLMConfig, to_hf_config
from glm_jax.hf_io import CheckpointError, iter_tensors
from glm_jax.hf_layout import TensorMap, prefix_tensor_maps, tensor_maps
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import _get, _set, abstract_params
from glm_jax.sharding import DEFAULT_RULES, logical_shardings
from glm_jax.training.train_step import Trainable, combine_params, partition_params

METHODS = ("full", "ptuning", "lora")
PREFIX_WEIGHTS = "pytorch_model.bin"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."

Params = dict[str, Any]
Path = tuple[str, ...]


# ---------------------------------------------------------------------------------- what trains


def is_prefix_param(path: Path) -> bool:
    return path[0] == "prefix_encoder"


def is_lora_param(path: Path) -> bool:
    return path[-1] == "lora_b" or any(name.startswith("lora_") for name in path[:-1])


def trainable_predicate(method: str) -> Trainable | None:
    """The train step's `trainable` predicate of a method (None = every param)."""
    if method == "full":
        return None
    if method == "ptuning":
        return is_prefix_param
    if method == "lora":
        return is_lora_param
    raise ValueError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")


def adapter_params(params: Params, method: str) -> Params:
    """The trainable sub-tree of `params` (all of it for "full")."""
    return partition_params(params, trainable_predicate(method))[0]


def check_method(config: GLMConfig, method: str) -> None:
    """One clear error for a model config that cannot be trained with `method`."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")
    if method == "full" and config.quantization_bit:
        raise ValueError(f"full fine-tuning needs a float base, got INT{config.quantization_bit} weights "
                         "(use method 'ptuning' or 'lora' on a quantized base)")
    if method == "ptuning" and not config.pre_seq_len:
        raise ValueError("method 'ptuning' needs pre_seq_len > 0")
    if method == "lora" and not config.lora_rank:
        raise ValueError("method 'lora' needs lora_rank > 0 and lora_targets")


# ------------------------------------------------------------------------------- LoRA structure


def _official_modules(config: GLMConfig) -> dict[str, list[str]]:
    """Official module names (weight keys without `.weight`) of every LoRA-adaptable leaf name."""
    plain = config.replace(quantization_bit=0, lora_rank=0, lora_targets=())
    modules: dict[str, list[str]] = {}
    for tensor_map in tensor_maps(plain):
        if tensor_map.layer is not None and tensor_map.key.endswith(".weight"):
            module = tensor_map.key[: -len(".weight")]
            leaf = module.rsplit(".", 1)[-1]
            if leaf in LORA_TARGETS:
                modules.setdefault(leaf, []).append(module)
    return modules


def resolve_lora_targets(patterns: str | Sequence[str], config: GLMConfig) -> tuple[str, ...]:
    """Our LoRA targets from PEFT's `target_modules`, matched as PEFT does against the official module
    names: a list entry matches a name equal to it or ending in `.entry`; a string is a regex that must
    match the whole name. Every layer's module must match (no `layers_to_transform`)."""
    def matches(name: str) -> bool:
        if isinstance(patterns, str):
            return re.fullmatch(patterns, name) is not None
        return any(name == p or name.endswith(f".{p}") for p in patterns)

    chosen = []
    for leaf, names in _official_modules(config).items():
        hits = [matches(n) for n in names]
        if all(hits):
            chosen.append(leaf)
        elif any(hits):
            raise ValueError(f"LoRA target_modules {patterns!r} select {leaf!r} in some layers only (unsupported)")
    if not chosen:
        known = sorted(_official_modules(config))
        raise ValueError(f"LoRA target_modules {patterns!r} match no adaptable module ({known})")
    return tuple(t for t in LORA_TARGETS if t in chosen)


def lora_module_maps(config: GLMConfig) -> list[tuple[str, TensorMap]]:
    """(target, weight TensorMap) of every adapted official module, layer by layer in official order."""
    plain = config.replace(quantization_bit=0, lora_rank=0, lora_targets=())
    found = []
    for tensor_map in tensor_maps(plain):
        if tensor_map.layer is None or not tensor_map.key.endswith(".weight"):
            continue
        target = tensor_map.key[: -len(".weight")].rsplit(".", 1)[-1]
        if target in config.lora_targets:
            found.append((target, tensor_map))
    missing = set(config.lora_targets) - {t for t, _ in found}
    if missing:
        raise ValueError(f"family {config.family!r} has no official modules {sorted(missing)} for LoRA")
    return found


def _linear_paths(tensor_map: TensorMap) -> list[Path]:
    """Our Linear modules (paths without the leaf) fed by an official weight, in its row order."""
    return [path[:-1] for path in tensor_map.paths]


def _down_path(target: str, tensor_map: TensorMap) -> Path:
    return (*tensor_map.paths[0][:-2], f"lora_{target}", "kernel")


def lora_delta(params: Params, config: GLMConfig, linear: Path, down: Path) -> np.ndarray:
    """`scale · A · B` of one Linear for all layers, shaped like its kernel (float32)."""
    a = np.asarray(_get(params, down), np.float32)  # [L, *in, r]
    b = np.asarray(_get(params, (*linear, "lora_b")), np.float32)  # [L, r, *out]
    layers, rank = a.shape[0], a.shape[-1]
    delta = np.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1)) * config.lora_scale
    return delta.reshape(*a.shape[:-1], *b.shape[2:])


def _without_lora(params: Params) -> Params:
    return partition_params(params, lambda path: not is_lora_param(path))[0]


def merge_lora(params: Params, config: GLMConfig, *, subtract: bool = False) -> tuple[Params, GLMConfig]:
    """Folds the adapters into the kernels (`W + scale·A·B`) and drops them: a plain model for serving.
    `subtract=True` undoes an earlier merge given the same adapter leaves (unmerge)."""
    if not config.lora_rank:
        raise ValueError("the config has no LoRA adapters to merge")
    if config.quantization_bit:
        raise ValueError(f"cannot merge LoRA into INT{config.quantization_bit} kernels; merge into the float "
                         "weights, then quantize (or serve the quantized base with the adapter unmerged)")
    merged = _without_lora(params)
    seen = set()
    for target, tensor_map in lora_module_maps(config):
        for linear in _linear_paths(tensor_map):
            if linear in seen:
                continue
            seen.add(linear)
            kernel = _get(params, (*linear, "kernel"))
            delta = lora_delta(params, config, linear, _down_path(target, tensor_map))
            new = np.asarray(kernel, np.float32) + (-delta if subtract else delta)
            _set(merged, (*linear, "kernel"), new.astype(np.asarray(kernel).dtype))
    return merged, config.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0)


# ------------------------------------------------------------------------------ files (atomic)


def _staging(directory: str) -> str:
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.tmp-", dir=parent)


def _publish(staging: str, directory: str) -> None:
    """Renames the finished `staging` directory to `directory` (replacing an older export)."""
    if os.path.isdir(directory):
        old = f"{staging}.old"
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old)
    else:
        os.rename(staging, directory)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- P-Tuning v2 files


def prefix_state_dict(params: Params, config: GLMConfig) -> dict[str, np.ndarray]:
    """The official `transformer.prefix_encoder.*` tensors (float32, official key order)."""
    state = {}
    for tensor_map in prefix_tensor_maps(config):
        leaves = [np.asarray(_get(params, path), np.float32) for path in tensor_map.paths]
        state[tensor_map.key] = np.array(tensor_map.merge(*leaves), np.float32, order="C")  # own, writable
    return state


def export_prefix(directory: str, params: Params, config: GLMConfig) -> str:
    """Writes a P-Tuning v2 checkpoint as the official trainer does (`pytorch_model.bin` + `config.json`)."""
    import torch

    if not config.pre_seq_len:
        raise ValueError("the model has no P-Tuning v2 prefix (pre_seq_len is 0)")
    state = {k: torch.from_numpy(v) for k, v in prefix_state_dict(params, config).items()}
    staging = _staging(directory)
    try:
        torch.save(state, os.path.join(staging, PREFIX_WEIGHTS))
        hf = to_hf_config(config.replace(lora_rank=0, lora_targets=(), quantization_bit=0))
        _write_json(os.path.join(staging, "config.json"), hf)
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


# ------------------------------------------------------------------------------------ LoRA files


def lora_state_dict(params: Params, config: GLMConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors of the adapters: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`."""
    state = {}
    for target, tensor_map in lora_module_maps(config):
        layer, module = tensor_map.layer, tensor_map.key[: -len(".weight")]
        a = np.asarray(_get(params, _down_path(target, tensor_map))[layer], np.float32)
        bs = [np.asarray(_get(params, (*linear, "lora_b"))[layer], np.float32) for linear in _linear_paths(tensor_map)]
        state[f"{PEFT_KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        state[f"{PEFT_KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(tensor_map.merge(*bs))
    return state


def peft_config(config: GLMConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    return {
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_to_transform": None, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "modules_to_save": None, "peft_type": "LORA", "r": config.lora_rank,
        "revision": None, "target_modules": list(config.lora_targets), "task_type": "CAUSAL_LM",
    }


def export_lora(directory: str, params: Params, config: GLMConfig, base_model_name_or_path: str = "") -> str:
    """Writes the adapters as a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`)."""
    from safetensors.numpy import save_file

    if not config.lora_rank:
        raise ValueError("the model has no LoRA adapters (lora_rank is 0)")
    staging = _staging(directory)
    try:
        save_file(lora_state_dict(params, config), os.path.join(staging, PEFT_WEIGHTS), metadata={"format": "pt"})
        _write_json(os.path.join(staging, PEFT_CONFIG), peft_config(config, base_model_name_or_path))
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_lora_config(directory: str, config: GLMConfig) -> GLMConfig:
    """`config` with the LoRA settings of a PEFT adapter directory."""
    path = os.path.join(directory, PEFT_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {PEFT_CONFIG}: not a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        peft = json.load(f)
    if peft.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft.get('peft_type')!r} is not LORA")
    unsupported = {k: peft[k] for k in ("fan_in_fan_out", "layers_to_transform", "modules_to_save", "use_dora")
                   if peft.get(k)}
    if peft.get("bias", "none") != "none":
        unsupported["bias"] = peft["bias"]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LoRA settings {unsupported}")
    try:
        targets = resolve_lora_targets(peft["target_modules"], config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config.replace(lora_rank=int(peft["r"]), lora_alpha=float(peft["lora_alpha"]),
                          lora_dropout=float(peft.get("lora_dropout", 0.0)), lora_targets=targets)


def read_lora_params(directory: str, config: GLMConfig, shapes: Params) -> Params:
    """The adapter leaves of a PEFT directory as a NumPy param sub-tree (layers stacked), checked
    against `shapes` (the model's param shapes); every missing / unexpected / mis-shaped key is named."""
    files = [os.path.join(directory, f) for f in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN)]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise CheckpointError(f"{directory} has neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")
    tensors = {k.replace(".default.", "."): v for k, v in iter_tensors(files[0])}
    out: Params = {}
    problems, expected = [], set()
    for target, tensor_map in lora_module_maps(config):
        layer, module = tensor_map.layer, tensor_map.key[: -len(".weight")]
        linears = _linear_paths(tensor_map)
        a_key, b_key = (f"{PEFT_KEY_PREFIX}{module}.lora_{x}.weight" for x in ("A", "B"))
        expected |= {a_key, b_key}
        if a_key not in tensors or b_key not in tensors:
            continue
        down = _down_path(target, tensor_map)
        a_shape = _get(shapes, down).shape[1:]
        a, b = np.asarray(tensors[a_key], np.float32), np.asarray(tensors[b_key], np.float32)
        rows = sum(int(np.prod(_get(shapes, (*lin, "lora_b")).shape[2:])) for lin in linears)
        if a.shape != (a_shape[-1], int(np.prod(a_shape[:-1]))) or b.shape != (rows, config.lora_rank):
            problems.append(f"{a_key} {list(a.shape)} / {b_key} {list(b.shape)}: expected "
                            f"{[a_shape[-1], int(np.prod(a_shape[:-1]))]} / {[rows, config.lora_rank]}")
            continue
        _layer_slot(out, down, _get(shapes, down).shape)[layer] = a.T.reshape(a_shape)
        parts = tensor_map.split(b) if len(linears) > 1 else (b.T,)
        for linear, part in zip(linears, parts):
            full = _get(shapes, (*linear, "lora_b")).shape
            _layer_slot(out, (*linear, "lora_b"), full)[layer] = part.reshape(full[1:])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise CheckpointError(f"LoRA adapter {files[0]}: " + "; ".join(problems))
    return out


def _layer_slot(tree: Params, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return _get(tree, path)
    except KeyError:
        _set(tree, path, np.zeros(shape, np.float32))
        return _get(tree, path)


def attach_lora(
    directory: str, model: Any, params: Params, mesh: Any = None, rules: Any = None,
) -> tuple[Any, Params]:
    """(model with the adapter's LoRA settings, params + adapter leaves) for a PEFT LoRA directory;
    the adapter stays unmerged (so it also works on an INT8/INT4 base) and float32."""
    config = read_lora_config(directory, model.config)
    model = GLMForCausalLM(config)
    abstract = abstract_params(model)
    lora = read_lora_params(directory, config, nn.unbox(abstract))
    if mesh is not None:
        shardings = partition_params(logical_shardings(abstract, mesh, rules or DEFAULT_RULES), is_lora_param)[0]
        lora = jax.tree.map(jax.device_put, lora, shardings)
    else:
        lora = jax.tree.map(jax.device_put, lora)
    return model, combine_params(lora, params)
