"""The official Hugging Face state-dict layout of each family, mapped onto this project's params.

One table per family lists every official key with its shape, the param leaves it feeds, and the
pure NumPy functions that split an official tensor into our leaves and merge them back. Loading,
conversion and export all read this one table, so the two directions cannot drift apart.

Our params: a Flax pytree with the layers stacked on a leading axis (`params["layers"][...]`).
Linear kernels are `[in, out...]` (PyTorch stores `[out, in]`); attention projections keep a head
axis (`query: [embed, heads, head_dim]`, `dense: [heads, head_dim, embed]`).

Quantized configs (`quantization_bit` 8 or 4) use the official INT8/INT4 keys (spec §1.7): each
quantized Linear's `weight` is int8 `[out, in * bits / 8]` (our `qkernel`, same byte order) plus a
`weight_scale` `[out]` (our `qscale`) laid out like the bias rows.

Kernel `split`s only transpose and *split* axes of `W.T`, and kernel `merge`s build the transposed
official tensor and return its `.T` view, so a converter that hands in (or writes out) the
transposed tensor with one fast 2-D transpose never pays for a strided N-D copy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glm_jax.config import GLMConfig
from glm_jax.quantization import QKERNEL, QSCALE, packed_size

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One official tensor: its key and shape, and how it maps to our leaves.

    `layer` is the index on the stacked layer axis of every leaf in `paths` (None for unstacked
    leaves). `split(official) -> leaves` and `merge(*leaves) -> official` are exact inverses.
    """

    key: str
    shape: tuple[int, ...]
    paths: tuple[Path, ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    merge: Callable[..., np.ndarray]
    layer: int | None = None


def is_linear_weight(tensor_map: TensorMap) -> bool:
    """Whether the official tensor is a PyTorch Linear weight `[out, in]` whose leaves are kernels."""
    return len(tensor_map.shape) == 2 and all(path[-1] in ("kernel", QKERNEL) for path in tensor_map.paths)


def _kernel(path: Path, bits: int) -> Path:
    return (*path[:-1], QKERNEL) if bits else path


def _width(in_features: int, bits: int) -> int:
    """Stored width of an input axis: INT4 keeps two values per byte."""
    return packed_size(in_features, bits) if bits else in_features


# Per-output-row vectors of a Linear (official key suffix -> our leaf): its bias and, when quantized,
# its scale; both follow the weight's row layout.
_ROW_VECTOR_LEAVES = {"bias": "bias", "weight_scale": QSCALE}


def _row_leaf(key: str) -> str:
    return _ROW_VECTOR_LEAVES[key.rsplit(".", 1)[1]]


def _linear(key: str, out_features: int, in_features: int, path: Path, layer: int | None, bits: int = 0) -> TensorMap:
    return TensorMap(key, (out_features, _width(in_features, bits)), (_kernel(path, bits),),
                     lambda w: (w.T,), lambda k: k.T, layer)


def _vector(key: str, size: int, path: Path, layer: int | None) -> TensorMap:
    return TensorMap(key, (size,), (path,), lambda b: (b,), lambda b: b, layer)


def _qkv_per_head(cfg: GLMConfig, key: str, layer: int, bits: int = 0) -> TensorMap:
    """Fused QKV whose rows are `[head, (q|k|v), head_dim]` (ChatGLM-6B, GLM-130B).

    `key` ends in `.weight` (kernels) or names a row vector (`.bias`, `.weight_scale`).
    """
    n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    names = ("query", "key", "value")
    if not key.endswith(".weight"):
        paths = tuple(("layers", "attention", name, _row_leaf(key)) for name in names)
        split = lambda b: tuple(b.reshape(n, 3, d)[:, part] for part in range(3))  # noqa: E731
        merge = lambda q, k, v: np.stack([q, k, v], axis=1).reshape(3 * n * d)  # noqa: E731
        return TensorMap(key, (3 * n * d,), paths, split, merge, layer)
    paths = tuple(_kernel(("layers", "attention", name, "kernel"), bits) for name in names)
    split = lambda w: tuple(w.reshape(n, 3, d, -1)[:, part].transpose(2, 0, 1) for part in range(3))  # noqa: E731
    merge = lambda q, k, v: np.stack([q, k, v], axis=2).reshape(q.shape[0], 3 * n * d).T  # noqa: E731
    return TensorMap(key, (3 * n * d, _width(h, bits)), paths, split, merge, layer)


def _qkv_blocks(cfg: GLMConfig, key: str, layer: int, bits: int = 0) -> TensorMap:
    """Fused QKV whose rows are `[Q (heads*d) | K (groups*d) | V (groups*d)]` (ChatGLM2, GLM-4).

    `key` ends in `.weight` (kernels) or names a row vector (`.bias`, `.weight_scale`).
    """
    n, g, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    bounds = np.cumsum([n * d, g * d])
    heads = (n, g, g)
    names = ("query", "key", "value")
    rows = (n + 2 * g) * d
    if not key.endswith(".weight"):
        paths = tuple(("layers", "attention", name, _row_leaf(key)) for name in names)
        split = lambda b: tuple(p.reshape(c, d) for p, c in zip(np.split(b, bounds), heads))  # noqa: E731
        merge = lambda q, k, v: np.concatenate([x.reshape(-1) for x in (q, k, v)])  # noqa: E731
        return TensorMap(key, (rows,), paths, split, merge, layer)
    paths = tuple(_kernel(("layers", "attention", name, "kernel"), bits) for name in names)
    split = lambda w: tuple(  # noqa: E731
        p.reshape(c, d, -1).transpose(2, 0, 1) for p, c in zip(np.split(w, bounds), heads))
    merge = lambda q, k, v: np.concatenate([x.reshape(x.shape[0], -1) for x in (q, k, v)], axis=1).T  # noqa: E731
    return TensorMap(key, (rows, _width(h, bits)), paths, split, merge, layer)


def _attention_dense(cfg: GLMConfig, key: str, layer: int, bits: int = 0) -> TensorMap:
    n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    return TensorMap(
        key, (h, _width(n * d, bits)), (_kernel(("layers", "attention", "dense", "kernel"), bits),),
        lambda w: (w.T.reshape(n, -1, h),), lambda k: k.reshape(-1, h).T, layer,
    )


def _gated_up(cfg: GLMConfig, key: str, layer: int, gate_first: bool, bias: bool, bits: int = 0) -> TensorMap:
    """`dense_h_to_4h` of a gated MLP: two halves, gate first (SwiGLU) or second (GLM-130B GeGLU).

    `bias` selects the row vector named by `key` (`.bias` or `.weight_scale`) instead of the weight.
    """
    f, h = cfg.ffn_hidden_size, cfg.hidden_size
    names = ("gate", "up") if gate_first else ("up", "gate")
    if bias:
        paths = tuple(("layers", "mlp", name, _row_leaf(key)) for name in names)
        return TensorMap(key, (2 * f,), paths, lambda b: tuple(np.split(b, 2)), lambda a, b: np.concatenate([a, b]), layer)
    paths = tuple(_kernel(("layers", "mlp", name, "kernel"), bits) for name in names)
    return TensorMap(
        key, (2 * f, _width(h, bits)), paths, lambda w: tuple(x.T for x in np.split(w, 2)),
        lambda a, b: np.concatenate([a, b], axis=1).T, layer,
    )


def _scales(maps: list[TensorMap], bits: int) -> list[TensorMap]:
    """`maps` when `bits` is set (the `weight_scale` row vectors of a quantized module), else nothing."""
    return maps if bits else []


def _chatglm6b(cfg: GLMConfig) -> list[TensorMap]:
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    q = cfg.quantization_bit
    maps = [TensorMap("transformer.word_embeddings.weight", (v, h), (("word_embeddings", "embedding"),),
                      lambda w: (w,), lambda e: e)]
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}"
        maps += [
            _vector(f"{p}.input_layernorm.weight", h, ("layers", "input_norm", "scale"), i),
            _vector(f"{p}.input_layernorm.bias", h, ("layers", "input_norm", "bias"), i),
            _qkv_per_head(cfg, f"{p}.attention.query_key_value.weight", i, q),
            *_scales([_qkv_per_head(cfg, f"{p}.attention.query_key_value.weight_scale", i)], q),
            _qkv_per_head(cfg, f"{p}.attention.query_key_value.bias", i),
            _attention_dense(cfg, f"{p}.attention.dense.weight", i, q),
            *_scales([_vector(f"{p}.attention.dense.weight_scale", h, ("layers", "attention", "dense", QSCALE), i)], q),
            _vector(f"{p}.attention.dense.bias", h, ("layers", "attention", "dense", "bias"), i),
            _vector(f"{p}.post_attention_layernorm.weight", h, ("layers", "post_attention_norm", "scale"), i),
            _vector(f"{p}.post_attention_layernorm.bias", h, ("layers", "post_attention_norm", "bias"), i),
            _linear(f"{p}.mlp.dense_h_to_4h.weight", f, h, ("layers", "mlp", "up", "kernel"), i, q),
            *_scales([_vector(f"{p}.mlp.dense_h_to_4h.weight_scale", f, ("layers", "mlp", "up", QSCALE), i)], q),
            _vector(f"{p}.mlp.dense_h_to_4h.bias", f, ("layers", "mlp", "up", "bias"), i),
            _linear(f"{p}.mlp.dense_4h_to_h.weight", h, f, ("layers", "mlp", "down", "kernel"), i, q),
            *_scales([_vector(f"{p}.mlp.dense_4h_to_h.weight_scale", h, ("layers", "mlp", "down", QSCALE), i)], q),
            _vector(f"{p}.mlp.dense_4h_to_h.bias", h, ("layers", "mlp", "down", "bias"), i),
        ]
    maps += [
        _vector("transformer.final_layernorm.weight", h, ("final_norm", "scale"), None),
        _vector("transformer.final_layernorm.bias", h, ("final_norm", "bias"), None),
    ]
    return maps


def _chatglm2(cfg: GLMConfig) -> list[TensorMap]:
    h, v = cfg.hidden_size, cfg.vocab_size
    q = cfg.quantization_bit
    maps = [TensorMap("transformer.embedding.word_embeddings.weight", (v, h), (("word_embeddings", "embedding"),),
                      lambda w: (w,), lambda e: e)]
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}"
        maps += [
            _vector(f"{p}.input_layernorm.weight", h, ("layers", "input_norm", "scale"), i),
            _qkv_blocks(cfg, f"{p}.self_attention.query_key_value.weight", i, q),
            *_scales([_qkv_blocks(cfg, f"{p}.self_attention.query_key_value.weight_scale", i)], q),
            _attention_dense(cfg, f"{p}.self_attention.dense.weight", i, q),
            *_scales([_vector(f"{p}.self_attention.dense.weight_scale", h, ("layers", "attention", "dense", QSCALE), i)], q),
            _vector(f"{p}.post_attention_layernorm.weight", h, ("layers", "post_attention_norm", "scale"), i),
            _gated_up(cfg, f"{p}.mlp.dense_h_to_4h.weight", i, gate_first=True, bias=False, bits=q),
            *_scales([_gated_up(cfg, f"{p}.mlp.dense_h_to_4h.weight_scale", i, gate_first=True, bias=True)], q),
            _linear(f"{p}.mlp.dense_4h_to_h.weight", h, cfg.ffn_hidden_size, ("layers", "mlp", "down", "kernel"), i, q),
            *_scales([_vector(f"{p}.mlp.dense_4h_to_h.weight_scale", h, ("layers", "mlp", "down", QSCALE), i)], q),
        ]
        if cfg.qkv_bias:
            maps.append(_qkv_blocks(cfg, f"{p}.self_attention.query_key_value.bias", i))
    maps.append(_vector("transformer.encoder.final_layernorm.weight", h, ("final_norm", "scale"), None))
    if not cfg.tie_word_embeddings:
        maps.append(_linear("transformer.output_layer.weight", v, h, ("output_layer", "kernel"), None))
    return maps


def _projection(cfg: GLMConfig, key: str, heads: int, name: str, layer: int, bias: bool) -> TensorMap:
    """A separate q/k/v projection `[heads*head_dim, hidden]` (transformers' native GLM-4 layout)."""
    d, h = cfg.head_dim, cfg.hidden_size
    if bias:
        return TensorMap(key, (heads * d,), (("layers", "attention", name, "bias"),),
                         lambda b: (b.reshape(heads, d),), lambda b: b.reshape(-1), layer)
    return TensorMap(key, (heads * d, h), (("layers", "attention", name, "kernel"),),
                     lambda w: (w.reshape(heads, d, h).transpose(2, 0, 1),),
                     lambda k: k.transpose(1, 2, 0).reshape(heads * d, h), layer)


def _glm4_hf(cfg: GLMConfig) -> list[TensorMap]:
    h, v = cfg.hidden_size, cfg.vocab_size
    maps = [TensorMap("model.embed_tokens.weight", (v, h), (("word_embeddings", "embedding"),), lambda w: (w,), lambda e: e)]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        maps.append(_vector(f"{p}.input_layernorm.weight", h, ("layers", "input_norm", "scale"), i))
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            leaf = {"q": "query", "k": "key", "v": "value"}[name]
            maps.append(_projection(cfg, f"{p}.self_attn.{name}_proj.weight", heads, leaf, i, bias=False))
            if cfg.qkv_bias:
                maps.append(_projection(cfg, f"{p}.self_attn.{name}_proj.bias", heads, leaf, i, bias=True))
        maps += [
            _attention_dense(cfg, f"{p}.self_attn.o_proj.weight", i),
            _vector(f"{p}.post_attention_layernorm.weight", h, ("layers", "post_attention_norm", "scale"), i),
            _gated_up(cfg, f"{p}.mlp.gate_up_proj.weight", i, gate_first=True, bias=False),
            _linear(f"{p}.mlp.down_proj.weight", h, cfg.ffn_hidden_size, ("layers", "mlp", "down", "kernel"), i),
        ]
    maps.append(_vector("model.norm.weight", h, ("final_norm", "scale"), None))
    if not cfg.tie_word_embeddings:
        maps.append(_linear("lm_head.weight", v, h, ("output_layer", "kernel"), None))
    return maps


def _glm130b(cfg: GLMConfig) -> list[TensorMap]:
    """GLM-130B's SAT state dict once its tensor-parallel ranks are merged (spec 3.2).

    The key names and per-head QKV layout are ChatGLM-6B's; only `dense_h_to_4h` differs: it holds
    the two GeGLU halves, the gated one second.
    """
    maps = []
    for tensor_map in _chatglm6b(cfg):
        if ".mlp.dense_h_to_4h." in tensor_map.key:
            tensor_map = _gated_up(cfg, tensor_map.key, tensor_map.layer, gate_first=False,
                                   bias=tensor_map.key.endswith(".bias"))
        maps.append(tensor_map)
    return maps


def _glm_original(cfg: GLMConfig) -> list[TensorMap]:
    """The original GLM as released for `transformers` (`glm-large`, `glm-10b`, ...; spec 4.3).

    Same layer keys as ChatGLM-6B but with a `[Q | K | V]` block QKV layout; the word embedding sits
    outside `transformer.`, which holds the learned position and block position tables.
    """
    h, v, rows = cfg.hidden_size, cfg.vocab_size, cfg.max_sequence_length + 1
    maps = [TensorMap("word_embeddings.weight", (v, h), (("word_embeddings", "embedding"),), lambda w: (w,), lambda e: e)]
    maps += [
        TensorMap(f"transformer.{name}.weight", (rows, h), ((name, "embedding"),), lambda w: (w,), lambda e: e)
        for name in ("position_embeddings", "block_position_embeddings")
    ]
    for tensor_map in _chatglm6b(cfg)[1:]:
        if ".attention.query_key_value." in tensor_map.key:
            tensor_map = _qkv_blocks(cfg, tensor_map.key, tensor_map.layer)
        maps.append(tensor_map)
    return maps


_TABLES = {"chatglm": _chatglm6b, "chatglm2": _chatglm2, "glm4_hf": _glm4_hf, "glm130b": _glm130b, "glm": _glm_original}
_QUANTIZED_FAMILIES = ("chatglm", "chatglm2")

# Official keys that carry no parameters: rotary buffers (recomputed), and ChatGLM-6B's `lm_head`,
# which the official model ties to the embedding (checked, then dropped).
IGNORED_KEY_SUFFIXES = (".rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
TIED_HEAD_KEY = "lm_head.weight"


def tensor_maps(config: GLMConfig) -> list[TensorMap]:
    """Every official key of `config`'s family, in the official state-dict order."""
    if config.family not in _TABLES:
        raise ValueError(f"no checkpoint layout for family {config.family!r}")
    if config.quantization_bit and config.family not in _QUANTIZED_FAMILIES:
        raise ValueError(f"family {config.family!r} has no official INT{config.quantization_bit} checkpoint layout")
    if config.quantize_embeddings or config.quantization_group_size:
        raise ValueError("quantized word embeddings and group-wise scales (quantize_embeddings, "
                         "quantization_group_size) have no official checkpoint layout")
    return _TABLES[config.family](config)


def ignored_keys(config: GLMConfig) -> list[str]:
    """Official keys written on export though they carry nothing new (buffers, the tied head copy)."""
    if config.family == "chatglm":
        keys = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(config.num_layers)]
        return keys + ([TIED_HEAD_KEY] if config.tie_word_embeddings else [])
    if config.family == "glm4_hf":
        return [TIED_HEAD_KEY] if config.tie_word_embeddings else []
    if config.family == "glm130b":
        return [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(config.num_layers)]
    if config.family == "glm":
        return []
    return ["transformer.rotary_pos_emb.inv_freq"]


def prefix_tensor_maps(config: GLMConfig) -> list[TensorMap]:
    """Keys of a P-Tuning v2 prefix checkpoint (`transformer.prefix_encoder.*`)."""
    p = "transformer.prefix_encoder"
    kv = config.prefix_kv_size
    if not config.prefix_projection:
        return [TensorMap(f"{p}.embedding.weight", (config.pre_seq_len, kv), (("prefix_encoder", "embedding", "embedding"),),
                          lambda w: (w,), lambda e: e)]
    width = kv if config.prefix_embed_in_kv_size else config.hidden_size
    h = config.hidden_size
    return [
        TensorMap(f"{p}.embedding.weight", (config.pre_seq_len, width), (("prefix_encoder", "embedding", "embedding"),),
                  lambda w: (w,), lambda e: e),
        _linear(f"{p}.trans.0.weight", h, width, ("prefix_encoder", "trans_0", "kernel"), None),
        _vector(f"{p}.trans.0.bias", h, ("prefix_encoder", "trans_0", "bias"), None),
        _linear(f"{p}.trans.2.weight", kv, h, ("prefix_encoder", "trans_2", "kernel"), None),
        _vector(f"{p}.trans.2.bias", kv, ("prefix_encoder", "trans_2", "bias"), None),
    ]
