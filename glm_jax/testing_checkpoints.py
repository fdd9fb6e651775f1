"""Random checkpoints in the official Hugging Face layout, for tests and benchmarks.

`write_random_hf_checkpoint(config, directory)` writes what an official ChatGLM directory holds
(`config.json` + sharded `pytorch_model-*.bin` with an index, or `*.safetensors`) for any
`GLMConfig`, with random weights. Both this project and the official PyTorch code load it, so
loaders, converters and benchmarks can run on any model size without downloading real weights.

Tensors are made one at a time in *our* param layout and merged into the official layout with the
functions of `glm_jax.hf_layout` (the same table the loader reads). Memory stays bounded by one shard
(`.bin`: `torch.save` takes a whole state dict) or one tensor (safetensors are streamed), so a full
13 GB ChatGLM-6B-shaped checkpoint can be written on a small machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
import zlib
from typing import Callable, Iterable

import flax.linen as nn
import ml_dtypes
import numpy as np

from glm_jax.config import GLMConfig, to_hf_config
from glm_jax.hf_io import BIN_INDEX, CONFIG_FILE, SAFETENSORS_INDEX, _SAFETENSORS_DTYPES
from glm_jax.hf_layout import TIED_HEAD_KEY, Path, TensorMap, ignored_keys, tensor_maps
from glm_jax.modeling.layers import rotary_inv_freq
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.pretrained import abstract_params

CHECKPOINT_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class OfficialTensor:
    """One tensor of the official state dict: key, shape and how to make its values on demand."""

    key: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def _normal_init(config: GLMConfig, path: Path) -> tuple[float, float]:
    """(mean, std) of a random leaf at `path`, chosen so that a random model is well-conditioned.

    Scales are set so that every branch adds to the residual stream about as much as the stream
    already carries: for "deepnorm" the residual is `norm(x) * alpha` (alpha = sqrt(56) for ChatGLM-6B),
    so the branch outputs are scaled by alpha. Attention scores then have a standard deviation of
    about 2 and logits of about 2.5, finite in float16 at any depth. With a tied head the final norm
    scale is zero-mean: otherwise the `alpha * norm(embedding)` residual makes a random model predict
    its own input token everywhere (useless for generation benchmarks).
    """
    h, f = config.hidden_size, config.ffn_hidden_size
    gain = config.residual_alpha if config.residual_style == "deepnorm" else 1.0
    name, leaf = path[-2], path[-1]
    if leaf == "bias":
        return 0.0, 0.1
    if leaf == "scale":
        return (0.0, 1.0) if name == "final_norm" and config.tie_word_embeddings else (1.0, 0.2)
    if name == "word_embeddings":
        return 0.0, 2.5 / math.sqrt(h) if config.tie_word_embeddings else 0.5
    if name == "output_layer":
        return 0.0, 1.5 / math.sqrt(h)
    if name in ("query", "key", "value"):
        return 0.0, 1.5 / math.sqrt(h)
    if name == "dense":
        return 0.0, gain / math.sqrt(config.num_heads * config.head_dim)
    if name in ("up", "gate"):
        return 0.0, 1.0 / math.sqrt(h)
    if name == "down":
        return 0.0, gain / math.sqrt(f)
    raise ValueError(f"no random initialisation rule for param {'/'.join(path)}")


def _leaf_shape(shapes: dict, path: Path, stacked: bool) -> tuple[int, ...]:
    node = shapes
    for name in path:
        node = node[name]
    return tuple(node.shape[1:] if stacked else node.shape)


def _random_official(
    config: GLMConfig, tensor_map: TensorMap, shapes: dict, seed: int, dtype: np.dtype
) -> Callable[[], np.ndarray]:
    """A maker of `tensor_map`'s official tensor: random leaves merged by the layout table.

    Each leaf has its own generator seeded by (seed, key, leaf), so a tensor can be made again
    identically (the tied head copy) without keeping it in memory.
    """
    key_hash = zlib.crc32(tensor_map.key.encode())

    def make() -> np.ndarray:
        leaves = []
        for index, path in enumerate(tensor_map.paths):
            mean, std = _normal_init(config, path)
            rng = np.random.default_rng([seed, key_hash, index])
            shape = _leaf_shape(shapes, path, tensor_map.layer is not None)
            leaves.append(rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))
        return np.ascontiguousarray(tensor_map.merge(*leaves).astype(dtype))

    return make


def random_official_tensors(config: GLMConfig, seed: int, dtype: str = "float16") -> list[OfficialTensor]:
    """Every tensor of `config`'s official state dict (buffers and the tied head copy included)."""
    if config.pre_seq_len or config.quantization_bit:
        raise ValueError(
            "random checkpoints are written for base models only: got "
            f"pre_seq_len={config.pre_seq_len}, quantization_bit={config.quantization_bit} (set both to 0)"
        )
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(CHECKPOINT_DTYPES)}")
    np_dtype = np.dtype(CHECKPOINT_DTYPES[dtype])
    shapes = nn.unbox(abstract_params(GLMForCausalLM(config)))
    maps = tensor_maps(config)
    tensors = [OfficialTensor(m.key, m.shape, _random_official(config, m, shapes, seed, np_dtype)) for m in maps]
    embedding = next(t for t in tensors if t.key.endswith("word_embeddings.weight"))
    inv_freq = np.asarray(rotary_inv_freq(config)).astype(np_dtype)
    for key in ignored_keys(config):
        if key == TIED_HEAD_KEY:
            tensors.append(OfficialTensor(key, embedding.shape, embedding.make))
        else:
            tensors.append(OfficialTensor(key, inv_freq.shape, lambda: inv_freq.copy()))
    return tensors


def _shard_of_each(sizes: list[int], num_shards: int) -> list[int]:
    """Contiguous shards of about equal bytes, in state-dict order; empty shards are dropped."""
    total = sum(sizes)
    starts = np.cumsum([0, *sizes[:-1]])
    raw = [min(num_shards - 1, int(start * num_shards // max(total, 1))) for start in starts]
    renumber = {shard: i for i, shard in enumerate(sorted(set(raw)))}
    return [renumber[shard] for shard in raw]


def _write_safetensors(path: str, tensors: list[OfficialTensor], dtype: np.dtype) -> None:
    """Streams `tensors` into one safetensors file: the header is known from the shapes alone."""
    code = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * dtype.itemsize
        header[tensor.key] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors:
            array = tensor.make()
            if array.shape != tensor.shape:
                raise AssertionError(f"{tensor.key}: made {array.shape}, declared {tensor.shape}")
            f.write(array.tobytes())


def _write_torch_bin(path: str, tensors: list[OfficialTensor]) -> None:
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("writing pytorch_model*.bin needs PyTorch: pip install 'glm-jax[convert]' "
                          "(or pass safetensors=True)") from e
    state = {}
    for tensor in tensors:
        array = tensor.make()
        if array.dtype == ml_dtypes.bfloat16:
            state[tensor.key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[tensor.key] = torch.from_numpy(array)
    torch.save(state, path)


def write_hf_checkpoint(
    config: GLMConfig,
    directory: str,
    tensors: Iterable[OfficialTensor],
    *,
    dtype: str = "float16",
    num_shards: int = 1,
    safetensors: bool = False,
) -> list[str]:
    """Writes an official Hugging Face directory (config.json, weights, index) from lazy tensors.

    Everything is written into a temporary sibling directory that is renamed to `directory` at the
    end, so a failure never leaves a half-written checkpoint. `directory` must not exist yet.
    Returns the weight file names. With `num_shards > 1` the files are
    `pytorch_model-0000i-of-0000n.bin` / `model-0000i-of-0000n.safetensors` plus the index file
    (shards are contiguous in state-dict order and about equal in size; never more than
    `num_shards`, fewer when one tensor is larger than a shard).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory already exists: {directory}")
    tensors = list(tensors)
    np_dtype = np.dtype(CHECKPOINT_DTYPES[dtype])
    sizes = [math.prod(t.shape) * np_dtype.itemsize for t in tensors]
    shard_ids = _shard_of_each(sizes, num_shards)
    count = max(shard_ids) + 1
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if count == 1 else [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)  # not mkdtemp: the checkpoint gets the usual (umask) permissions
    try:
        hf = dict(to_hf_config(config), torch_dtype=dtype)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        for shard, name in enumerate(names):
            members = [t for t, s in zip(tensors, shard_ids) if s == shard]
            path = os.path.join(staging, name)
            if safetensors:
                _write_safetensors(path, members, np_dtype)
            else:
                _write_torch_bin(path, members)
        if count > 1:
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {t.key: names[s] for t, s in sorted(zip(tensors, shard_ids), key=lambda p: p[0].key)},
            }
            with open(os.path.join(staging, SAFETENSORS_INDEX if safetensors else BIN_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return names


def write_random_hf_checkpoint(
    config: GLMConfig,
    directory: str,
    *,
    seed: int = 0,
    dtype: str = "float16",
    num_shards: int = 1,
    safetensors: bool = False,
) -> list[str]:
    """Writes a random checkpoint of `config` in the official Hugging Face layout into `directory`.

    The same (config, seed, dtype) always gives the same weights. The result loads with
    `glm_jax.load_pretrained` and with the official remote code (`AutoModel.from_pretrained(dir,
    trust_remote_code=True)`, once its .py files are placed beside it). Returns the weight file names.
    """
    tensors = random_official_tensors(config, seed, dtype)
    return write_hf_checkpoint(config, directory, tensors, dtype=dtype, num_shards=num_shards, safetensors=safetensors)


__all__ = ["OfficialTensor", "random_official_tensors", "write_hf_checkpoint", "write_random_hf_checkpoint"]
