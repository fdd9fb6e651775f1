"""The official Hugging Face state-dict layout of each family, mapped onto this project's params.

One table per family lists every official key with its shape, the param leaves it feeds, and the
pure NumPy functions that split an official tensor into our leaves and merge them back. Loading,
conversion and export all read this one table, so the two directions cannot drift apart.

Our params: a Flax pytree with the layers stacked on a leading axis (`params["layers"][...]`).
Linear kernels are `[in, out...]` (PyTorch stores `[out, in]`); attention projections keep a head
axis (`query: [embed, heads, head_dim]`, `dense: [heads, head_dim, embed]`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glm_jax.config import GLMConfig

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


def _linear(key: str, out_features: int, in_features: int, path: Path, layer: int | None) -> TensorMap:
    return TensorMap(key, (out_features, in_features), (path,), lambda w: (w.T,), lambda k: k.T, layer)


def _vector(key: str, size: int, path: Path, layer: int | None) -> TensorMap:
    return TensorMap(key, (size,), (path,), lambda b: (b,), lambda b: b, layer)


def _qkv_per_head(cfg: GLMConfig, prefix: str, layer: int, bias: bool) -> TensorMap:
    """Fused QKV whose rows are `[head, (q|k|v), head_dim]` (ChatGLM-6B, GLM-130B)."""
    n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    suffix = "bias" if bias else "kernel"
    paths = tuple(("layers", "attention", name, suffix) for name in ("query", "key", "value"))
    if bias:
        split = lambda b: tuple(b.reshape(n, 3, d)[:, part] for part in range(3))  # noqa: E731
        merge = lambda q, k, v: np.stack([q, k, v], axis=1).reshape(3 * n * d)  # noqa: E731
        return TensorMap(f"{prefix}.bias", (3 * n * d,), paths, split, merge, layer)
    split = lambda w: tuple(w.reshape(n, 3, d, h)[:, part].transpose(2, 0, 1) for part in range(3))  # noqa: E731
    merge = lambda q, k, v: np.stack([x.transpose(1, 2, 0) for x in (q, k, v)], axis=1).reshape(3 * n * d, h)  # noqa: E731
    return TensorMap(f"{prefix}.weight", (3 * n * d, h), paths, split, merge, layer)


def _qkv_blocks(cfg: GLMConfig, prefix: str, layer: int, bias: bool) -> TensorMap:
    """Fused QKV whose rows are `[Q (heads*d) | K (groups*d) | V (groups*d)]` (ChatGLM2, GLM-4)."""
    n, g, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    bounds = np.cumsum([n * d, g * d])
    heads = (n, g, g)
    suffix = "bias" if bias else "kernel"
    paths = tuple(("layers", "attention", name, suffix) for name in ("query", "key", "value"))
    rows = (n + 2 * g) * d
    if bias:
        split = lambda b: tuple(p.reshape(c, d) for p, c in zip(np.split(b, bounds), heads))  # noqa: E731
        merge = lambda q, k, v: np.concatenate([x.reshape(-1) for x in (q, k, v)])  # noqa: E731
        return TensorMap(f"{prefix}.bias", (rows,), paths, split, merge, layer)
    split = lambda w: tuple(  # noqa: E731
        p.reshape(c, d, h).transpose(2, 0, 1) for p, c in zip(np.split(w, bounds), heads))
    merge = lambda q, k, v: np.concatenate([x.transpose(1, 2, 0).reshape(-1, h) for x in (q, k, v)])  # noqa: E731
    return TensorMap(f"{prefix}.weight", (rows, h), paths, split, merge, layer)


def _attention_dense(cfg: GLMConfig, key: str, layer: int) -> TensorMap:
    n, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    return TensorMap(
        key, (h, n * d), (("layers", "attention", "dense", "kernel"),),
        lambda w: (w.T.reshape(n, d, h),), lambda k: k.reshape(n * d, h).T, layer,
    )


def _gated_up(cfg: GLMConfig, key: str, layer: int, gate_first: bool, bias: bool) -> TensorMap:
    """`dense_h_to_4h` of a gated MLP: two halves, gate first (SwiGLU) or second (GLM-130B GeGLU)."""
    f, h = cfg.ffn_hidden_size, cfg.hidden_size
    suffix = "bias" if bias else "kernel"
    names = ("gate", "up") if gate_first else ("up", "gate")
    paths = tuple(("layers", "mlp", name, suffix) for name in names)
    if bias:
        return TensorMap(key, (2 * f,), paths, lambda b: tuple(np.split(b, 2)), lambda a, b: np.concatenate([a, b]), layer)
    return TensorMap(
        key, (2 * f, h), paths, lambda w: tuple(x.T for x in np.split(w, 2)),
        lambda a, b: np.concatenate([a.T, b.T]), layer,
    )


def _chatglm6b(cfg: GLMConfig) -> list[TensorMap]:
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    maps = [TensorMap("transformer.word_embeddings.weight", (v, h), (("word_embeddings", "embedding"),),
                      lambda w: (w,), lambda e: e)]
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}"
        maps += [
            _vector(f"{p}.input_layernorm.weight", h, ("layers", "input_norm", "scale"), i),
            _vector(f"{p}.input_layernorm.bias", h, ("layers", "input_norm", "bias"), i),
            _qkv_per_head(cfg, f"{p}.attention.query_key_value", i, bias=False),
            _qkv_per_head(cfg, f"{p}.attention.query_key_value", i, bias=True),
            _attention_dense(cfg, f"{p}.attention.dense.weight", i),
            _vector(f"{p}.attention.dense.bias", h, ("layers", "attention", "dense", "bias"), i),
            _vector(f"{p}.post_attention_layernorm.weight", h, ("layers", "post_attention_norm", "scale"), i),
            _vector(f"{p}.post_attention_layernorm.bias", h, ("layers", "post_attention_norm", "bias"), i),
            _linear(f"{p}.mlp.dense_h_to_4h.weight", f, h, ("layers", "mlp", "up", "kernel"), i),
            _vector(f"{p}.mlp.dense_h_to_4h.bias", f, ("layers", "mlp", "up", "bias"), i),
            _linear(f"{p}.mlp.dense_4h_to_h.weight", h, f, ("layers", "mlp", "down", "kernel"), i),
            _vector(f"{p}.mlp.dense_4h_to_h.bias", h, ("layers", "mlp", "down", "bias"), i),
        ]
    maps += [
        _vector("transformer.final_layernorm.weight", h, ("final_norm", "scale"), None),
        _vector("transformer.final_layernorm.bias", h, ("final_norm", "bias"), None),
    ]
    return maps


def _chatglm2(cfg: GLMConfig) -> list[TensorMap]:
    h, v = cfg.hidden_size, cfg.vocab_size
    maps = [TensorMap("transformer.embedding.word_embeddings.weight", (v, h), (("word_embeddings", "embedding"),),
                      lambda w: (w,), lambda e: e)]
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}"
        maps += [
            _vector(f"{p}.input_layernorm.weight", h, ("layers", "input_norm", "scale"), i),
            _qkv_blocks(cfg, f"{p}.self_attention.query_key_value", i, bias=False),
            _attention_dense(cfg, f"{p}.self_attention.dense.weight", i),
            _vector(f"{p}.post_attention_layernorm.weight", h, ("layers", "post_attention_norm", "scale"), i),
            _gated_up(cfg, f"{p}.mlp.dense_h_to_4h.weight", i, gate_first=True, bias=False),
            _linear(f"{p}.mlp.dense_4h_to_h.weight", h, cfg.ffn_hidden_size, ("layers", "mlp", "down", "kernel"), i),
        ]
        if cfg.qkv_bias:
            maps.append(_qkv_blocks(cfg, f"{p}.self_attention.query_key_value", i, bias=True))
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


_TABLES = {"chatglm": _chatglm6b, "chatglm2": _chatglm2, "glm4_hf": _glm4_hf}

# Official keys that carry no parameters: rotary buffers (recomputed), and ChatGLM-6B's `lm_head`,
# which the official model ties to the embedding (checked, then dropped).
IGNORED_KEY_SUFFIXES = (".rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
TIED_HEAD_KEY = "lm_head.weight"


def tensor_maps(config: GLMConfig) -> list[TensorMap]:
    """Every official key of `config`'s family, in the official state-dict order."""
    if config.family not in _TABLES:
        raise ValueError(f"no checkpoint layout for family {config.family!r}")
    return _TABLES[config.family](config)


def ignored_keys(config: GLMConfig) -> list[str]:
    """Official keys written on export though they carry nothing new (buffers, the tied head copy)."""
    if config.family == "chatglm":
        keys = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(config.num_layers)]
        return keys + ([TIED_HEAD_KEY] if config.tie_word_embeddings else [])
    if config.family == "glm4_hf":
        return [TIED_HEAD_KEY] if config.tie_word_embeddings else []
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
