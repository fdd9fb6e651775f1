"""Building blocks of every GLM variant: linear maps, norms, rotary embeddings, attention with a
KV cache, MLPs and the P-Tuning v2 prefix encoder.

Each parameter carries logical axis names (see `glm_jax.sharding`) so that one rules table decides
how it is laid out on a `(data, fsdp, tensor)` mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from glm_jax import quantization
from glm_jax.config import GLMConfig
from glm_jax.modeling.accumulating_dot import accumulating_dot, bf16_backward_applies

Array = jnp.ndarray


def as_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _init(stddev: float, axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(axes))


class Linear(nn.Module):
    """`y = x · W + b` contracting the last `in_dims` axes of `x` with the leading axes of `W`.

    Multi-axis kernels (e.g. `[embed, heads, head_dim]`) keep the head axis visible to the sharding
    rules. Matmuls accumulate in float32 (`preferred_element_type`): faster than bf16 output on CPU
    and exact enough for parity.

    With `quantization_bit` 8 or 4 the weight is stored as `qkernel` (int8, INT4 packed in pairs
    along the last input axis) plus a per-output-feature `qscale`, and dequantized inside the matmul
    (`glm_jax.quantization`, the official ChatGLM scheme); `quantization_group_size` > 0 gives every
    group of that many values of the last input axis its own scale (`qscale [*in[:-1], groups, *out]`).

    With `output_major` a float kernel is stored `[*out, *in]` (PyTorch's order) instead of
    `[*in, *out]`: the layout of the per-layer (decoding) blocks, because a matrix-vector product
    that reads each output's weights as one contiguous run streams faster than one that scatters
    every input row across the outputs (about 13% more bandwidth on XLA:CPU over a model's
    worth of weights). Quantized kernels keep their layout.

    With `lora_rank` > 0 it owns a LoRA `lora_b [rank, *features]` (zeros) and adds
    `lora_scale · lora_x · lora_b`, where `lora_x` is the output of the adapter's `LoRADown`, which
    the caller computes once and may share between Linears (fused official modules).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = True
    in_dims: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_stddev: float = 0.02
    quantization_bit: int = 0
    quantization_group_size: int = 0
    lora_rank: int = 0
    lora_scale: float = 1.0
    output_major: bool = False

    @nn.compact
    def __call__(self, x: Array, lora_x: Array | None = None) -> Array:
        in_shape = x.shape[-self.in_dims:]
        dtype = as_dtype(self.dtype)
        if self.quantization_bit:
            bits = self.quantization_bit
            packed = (*in_shape[:-1], quantization.packed_size(in_shape[-1], bits))
            qkernel = self.param(quantization.QKERNEL, nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                                 (*packed, *self.features), jnp.int8)
            group = quantization.check_group_size(in_shape[-1], self.quantization_group_size, bits)
            scale_shape, scale_axes = self.features, self.axes[self.in_dims:]
            if group:  # the groups axis takes the place (and the sharding) of the last input axis
                scale_shape, scale_axes = (*in_shape[:-1], in_shape[-1] // group, *scale_shape), self.axes
            scale_init = nn.with_logical_partitioning(nn.initializers.ones, scale_axes)
            qscale = self.param(quantization.QSCALE, scale_init, scale_shape, as_dtype(self.param_dtype))
            y = quantization.quantized_dot(x, qkernel, qscale, bits, self.in_dims, dtype)
        else:
            if self.output_major:
                in_axes, out_axes = self.axes[:self.in_dims], self.axes[self.in_dims:]
                kernel = self.param("kernel", _init(self.init_stddev, (*out_axes, *in_axes)),
                                    (*self.features, *in_shape), as_dtype(self.param_dtype))
                # As one [out, in] matrix: given several output or input axes, XLA:CPU copies the
                # kernel into a transposed buffer before the dot.
                lead, width = x.shape[:x.ndim - self.in_dims], math.prod(in_shape)
                y = accumulating_dot(x.reshape(*lead, width), kernel.reshape(-1, width),
                                     ((len(lead),), (1,)), dtype).reshape(*lead, *self.features)
            else:
                kernel = self.param("kernel", _init(self.init_stddev, self.axes), (*in_shape, *self.features),
                                    as_dtype(self.param_dtype))
                contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
                y = accumulating_dot(x, kernel, contract, dtype)
        if self.lora_rank:
            if lora_x is None:
                raise ValueError(f"Linear {self.name!r} has a LoRA adapter but was called without its lora_x")
            b_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.axes[self.in_dims:]))
            lora_b = self.param("lora_b", b_init, (self.lora_rank, *self.features), jnp.float32)
            delta = accumulating_dot(lora_x, lora_b, ((lora_x.ndim - 1,), (0,)), dtype)
            y = y + self.lora_scale * delta
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims:]),
                self.features, as_dtype(self.param_dtype),
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype)


# Rows of the tied output table converted per chunk on CPU (see `tied_logits`).
HEAD_CHUNK_ROWS = 16384


def tied_logits(x: Array, table: Array, dtype: jnp.dtype) -> Array:
    """`x · tableᵀ` in `dtype` with float32 accumulation: the tied output layer.

    Not `nn.Embed.attend`: its bf16/fp16-output dot is ~5x slower on CPU than accumulating in
    float32. Where XLA:CPU has no half-precision kernel for a dot (float16, or bf16 outside
    `accumulating_dot`'s own backward pass) it converts the operands to float32 copies first, which
    for a vocabulary-sized table (2 GiB for ChatGLM-6B) would be the largest buffer of a fine-tuning
    step; there the table is projected in chunks of rows, so only one chunk is converted at a time
    (each logit is the same dot either way).
    """
    def project(rows: Array) -> Array:
        return accumulating_dot(x, rows, ((x.ndim - 1,), (1,)), dtype)

    vocab, width = table.shape
    chunk = max(d for d in range(1, min(vocab, HEAD_CHUNK_ROWS) + 1) if vocab % d == 0)
    upcast_on_cpu = jax.default_backend() == "cpu" and dtype != jnp.float32 and not bf16_backward_applies(dtype)
    if not upcast_on_cpu or chunk == vocab or chunk < HEAD_CHUNK_ROWS // 16:
        return project(table).astype(dtype)
    chunks = lax.map(project, table.reshape(vocab // chunk, chunk, width))  # [n, *lead, chunk]
    return jnp.moveaxis(chunks, 0, -2).reshape(*x.shape[:-1], vocab).astype(dtype)


class QuantizedEmbed(nn.Module):
    """Word embedding stored quantized per token row (`qembedding` int8 `[vocab, hidden * bits / 8]`,
    `qscale [vocab]`), the official `-qe` scheme; `attend` is the tied output layer reading the same
    bytes (`glm_jax.quantization.quantized_dot_rows`)."""

    config: GLMConfig

    def setup(self) -> None:
        cfg = self.config
        width = quantization.packed_size(cfg.hidden_size, cfg.quantization_bit)
        self.qembedding = self.param(quantization.QEMBEDDING, nn.with_logical_partitioning(
            nn.initializers.zeros, ("vocab", "embed")), (cfg.vocab_size, width), jnp.int8)
        self.qscale = self.param(quantization.QSCALE, nn.with_logical_partitioning(nn.initializers.ones, ("vocab",)),
                                 (cfg.vocab_size,), as_dtype(cfg.param_dtype))

    def __call__(self, ids: Array) -> Array:
        cfg = self.config
        return quantization.quantized_embedding_lookup(ids, self.qembedding, self.qscale, cfg.quantization_bit,
                                                       as_dtype(cfg.dtype))

    def attend(self, x: Array) -> Array:
        cfg = self.config
        return quantization.quantized_dot_rows(x, self.qembedding, self.qscale, cfg.quantization_bit,
                                               as_dtype(cfg.dtype))


class LoRADown(nn.Module):
    """The shared half of a LoRA adapter: `dropout(x) · A`, `A [*in, rank]` (PEFT's `lora_A`, same
    init: uniform ±1/sqrt(fan_in)). Kept in float32 like every trainable adapter."""

    rank: int
    in_axes: tuple[str, ...]
    dropout: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        in_dims = len(self.in_axes)
        init = nn.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(in_dims)), out_axis=-1)
        a = self.param("kernel", nn.with_logical_partitioning(init, (*self.in_axes, None)),
                       (*x.shape[-in_dims:], self.rank), jnp.float32)
        dtype = as_dtype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic or self.dropout == 0.0)
        contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
        return accumulating_dot(x, a, contract, dtype).astype(dtype)


def lora_down(config: GLMConfig, target: str, in_axes: tuple[str, ...], x: Array, deterministic: bool) -> Array | None:
    """`LoRADown(x)` of the official module `target` when the config adapts it, else None (a submodule
    named `lora_<target>` of the calling module)."""
    if target not in config.lora_targets:
        return None
    down = LoRADown(config.lora_rank, in_axes, config.lora_dropout, config.dtype, name=f"lora_{target}")
    return down(x, deterministic)


def lora_fields(config: GLMConfig, lora_x: Array | None) -> dict:
    """Linear keyword arguments giving it a LoRA `lora_b` when its module is adapted."""
    return dict(lora_rank=config.lora_rank, lora_scale=config.lora_scale) if lora_x is not None else {}


class Norm(nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight only); statistics in float32."""

    config: GLMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        pdtype = as_dtype(cfg.param_dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), pdtype)
        h = x.astype(jnp.float32)
        if cfg.norm_type == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + cfg.norm_eps)
        if cfg.norm_type == "rmsnorm":
            # The official RMSNorm casts back to the input dtype before applying the weight.
            return (scale.astype(x.dtype) * h.astype(x.dtype)).astype(as_dtype(cfg.dtype))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (x.shape[-1],), pdtype)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(as_dtype(cfg.dtype))


# ----------------------------------------------------------------------------------------- rotary


def rotary_dim(config: GLMConfig) -> int:
    """Width of one rotary section of a head (0 without rotary: the angle tables are then empty)."""
    if config.rotary == "none":
        return 0
    return config.head_dim if config.rotary == "full" else config.head_dim // 2


def rotary_inv_freq(config: GLMConfig) -> Array:
    """Inverse frequencies `base^(-2j/d)`; ChatGLM-6B rounds them to float16 even in fp32 runs."""
    dim = rotary_dim(config)
    base = config.rope_base * config.rope_ratio
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_fp16_inv_freq:
        inv_freq = inv_freq.astype(jnp.float16)
    return inv_freq


def rotary_angles(config: GLMConfig, position_ids: Array) -> tuple[Array, Array]:
    """cos/sin `[B, R, L, d/2]` for positions `[B, R, L]`, computed in `config.rope_dtype` as the
    reference does (float16 there means the angle itself is rounded to float16)."""
    rdtype = as_dtype(config.rope_dtype)
    angles = position_ids.astype(rdtype)[..., None] * rotary_inv_freq(config).astype(rdtype)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(config: GLMConfig, x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x [B, L, heads, head_dim]` section by section; section r uses position row r.

    "2d"/"full" pair feature j with j + d/2 (rotate-half); "half_adjacent" pairs 2j with 2j+1 and
    leaves the second half of the head untouched.
    """
    if config.rotary == "none":
        return x
    dim = rotary_dim(config)
    dtype = x.dtype
    pieces = []
    for row in range(cos.shape[1]):
        part = x[..., row * dim:(row + 1) * dim]
        c = cos[:, row, :, None, :].astype(dtype)
        s = sin[:, row, :, None, :].astype(dtype)
        if config.rotary == "half_adjacent":
            pairs = part.reshape(*part.shape[:-1], dim // 2, 2)
            even, odd = pairs[..., 0], pairs[..., 1]
            rotated = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1).reshape(part.shape)
        else:
            first, second = part[..., : dim // 2], part[..., dim // 2:]
            rotated = jnp.concatenate([first * c - second * s, second * c + first * s], axis=-1)
        pieces.append(rotated)
    rest = x[..., cos.shape[1] * dim:]
    if rest.shape[-1]:
        pieces.append(rest)
    return jnp.concatenate(pieces, axis=-1)


# -------------------------------------------------------------------------------------- attention


def attention_weights_and_values(
    config: GLMConfig, q: Array, k: Array, v: Array, allowed: Array, layer_index: Array
) -> Array:
    """Scaled dot-product attention with GQA, `allowed [B, 1, Lq, Lk]` (True = may attend).

    "layer_scaled" reproduces ChatGLM-6B bit-for-bit in spirit: scores scaled by 1/(sqrt(d)(l+1)),
    masked with -10000, multiplied back by (l+1) in float32, so a fully masked row becomes a uniform
    distribution rather than NaN.
    """
    batch, q_len, heads, head_dim = q.shape
    groups = k.shape[2]
    dtype = q.dtype
    if config.mask_fill == "layer_scaled":
        coeff = (layer_index + 1).astype(jnp.float32)
        fill = -10000.0
    elif config.mask_fill == "fp16_min":
        coeff = jnp.float32(1.0)
        fill = -65504.0
    else:
        coeff = jnp.float32(1.0)
        fill = float(jnp.finfo(jnp.float32).min)
    q = (q.astype(jnp.float32) / (math.sqrt(head_dim) * coeff)).astype(dtype)
    q = q.reshape(batch, q_len, groups, heads // groups, head_dim)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, :, None, :, :], scores, fill) * coeff
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(dtype)


class Attention(nn.Module):
    """Self-attention with rotary positions, optional P-Tuning v2 prefix and a decode KV cache.

    With `decode=True` the keys/values of the new tokens are written into a preallocated cache
    (keys `[B, kv_heads, max_len, head_dim]`, values `[B, kv_heads, head_dim, max_len]`, without the
    `B` axis at batch 1; sized by the first `init`) at `cache_index`, and the query attends the whole cache; the caller's mask then has
    `max_len` key columns.
    """

    config: GLMConfig
    decode: bool = False
    deterministic: bool = True  # False enables LoRA dropout (training)

    @nn.compact
    def __call__(
        self, x: Array, cos: Array, sin: Array, allowed: Array, layer_index: Array,
        prefix_kv: tuple[Array, Array] | None,
    ) -> Array:
        cfg = self.config
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, quantization_bit=cfg.quantization_bit,
                     quantization_group_size=cfg.quantization_group_size, output_major=not cfg.scan_layers)
        qkv_lora = lora_down(cfg, "query_key_value", ("embed",), x, self.deterministic)
        qkv = dict(dense, **lora_fields(cfg, qkv_lora))
        q_axes, kv_axes = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Linear((cfg.num_heads, cfg.head_dim), q_axes, cfg.qkv_bias, name="query", **qkv)(x, qkv_lora)
        k = Linear((cfg.num_kv_heads, cfg.head_dim), kv_axes, cfg.qkv_bias, name="key", **qkv)(x, qkv_lora)
        v = Linear((cfg.num_kv_heads, cfg.head_dim), kv_axes, cfg.qkv_bias, name="value", **qkv)(x, qkv_lora)
        q = apply_rotary(cfg, q, cos, sin)
        k = apply_rotary(cfg, k, cos, sin)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        if self.decode:
            k, v = self._update_cache(k, v)
        if prefix_kv is not None:
            prefix_k, prefix_v = prefix_kv
            k = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
            visible = jnp.ones((*allowed.shape[:3], prefix_k.shape[1]), bool)
            allowed = jnp.concatenate([visible, allowed], axis=-1)
        out = attention_weights_and_values(cfg, q, k, v, allowed, layer_index)
        out_lora = lora_down(cfg, "dense", ("heads", "head_dim"), out, self.deterministic)
        return Linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg.dense_bias, in_dims=2, name="dense",
                      **dense, **lora_fields(cfg, out_lora))(out, out_lora)

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array]:
        # Stored head-major, keys as [B, kv_heads, len, head_dim] and values as [B, kv_heads, head_dim,
        # len]: the layouts in which the attention dots read them directly (the contracted axis
        # last), instead of a transposed copy of the whole cache in every decode step.
        # At batch 1 the batch axis is left out: XLA drops size-1 axes from the dots' operands, and a
        # stored cache that differs from the operand by that reshape made XLA:CPU update it out of place,
        # copying every layer's whole cache several times per decode step.
        k_stored, v_stored = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
        # Logical names let a mesh shard the cache like the activations (batch / kv heads).
        k_axes = ("cache_batch", "cache_heads", "cache_sequence", "cache_head_dim")
        v_axes = ("cache_batch", "cache_heads", "cache_head_dim", "cache_sequence")
        single = k.shape[0] == 1
        if single:
            k_stored, v_stored, k_axes, v_axes = k_stored[0], v_stored[0], k_axes[1:], v_axes[1:]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k_stored.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v_stored.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if self.is_initializing():
            return k, v
        for cached, new, axes, sequence_axis in ((cached_k, k_stored, k_axes, -2), (cached_v, v_stored, v_axes, -1)):
            start = [0] * new.ndim
            start[sequence_axis] = index.value
            updated = lax.dynamic_update_slice(cached.value, new.astype(cached.value.dtype), start)
            cached.value = nn.with_logical_constraint(updated, axes)
        index.value = index.value + k.shape[1]
        keys, values = cached_k.value, cached_v.value
        if single:
            keys, values = keys[None], values[None]
        return keys.transpose(0, 2, 1, 3), values.transpose(0, 3, 1, 2)


# -------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """GELU MLP (ChatGLM-6B, tanh GELU) or gated SwiGLU / GeGLU (gate = `gate`, multiplied with `up`)."""

    config: GLMConfig
    deterministic: bool = True  # False enables LoRA dropout (training)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.mlp_bias,
                     quantization_bit=cfg.quantization_bit, quantization_group_size=cfg.quantization_group_size,
                     output_major=not cfg.scan_layers)
        in_lora = lora_down(cfg, "dense_h_to_4h", ("embed",), x, self.deterministic)
        up = Linear((cfg.ffn_hidden_size,), ("embed", "mlp"), name="up", **dense, **lora_fields(cfg, in_lora))(x, in_lora)
        if cfg.mlp_type == "gelu":
            hidden = jax.nn.gelu(up, approximate=True)
        else:
            gate = Linear((cfg.ffn_hidden_size,), ("embed", "mlp"), name="gate", **dense,
                          **lora_fields(cfg, in_lora))(x, in_lora)
            act = jax.nn.silu(gate) if cfg.mlp_type == "swiglu" else jax.nn.gelu(gate, approximate=False)
            hidden = act * up
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        out_lora = lora_down(cfg, "dense_4h_to_h", ("mlp",), hidden, self.deterministic)
        down = Linear((cfg.hidden_size,), ("mlp", "embed"), name="down", **dense, **lora_fields(cfg, out_lora))
        return down(hidden, out_lora)


# --------------------------------------------------------------------------------- P-Tuning v2


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: per layer keys/values `[layers, B, P, kv_heads, head_dim]` (no rotary).

    Without projection the prefix is a plain embedding of width `layers*2*kv_heads*head_dim`; with it,
    Embedding -> Linear -> tanh -> Linear. ChatGLM-6B embeds in `hidden_size`, ChatGLM2 in the kv size.
    """

    config: GLMConfig

    @nn.compact
    def __call__(self, batch: int, deterministic: bool = True) -> tuple[Array, Array]:
        cfg = self.config
        tokens = jnp.arange(cfg.pre_seq_len)
        if cfg.prefix_projection:
            width = cfg.prefix_kv_size if cfg.prefix_embed_in_kv_size else cfg.hidden_size
            h = nn.Embed(cfg.pre_seq_len, width, param_dtype=jnp.float32, name="embedding",
                         embedding_init=_init(1.0, (None, None)))(tokens)
            h = jnp.tanh(Linear((cfg.hidden_size,), (None, None), name="trans_0")(h))
            h = Linear((cfg.prefix_kv_size,), (None, None), name="trans_2")(h)
        else:
            h = nn.Embed(cfg.pre_seq_len, cfg.prefix_kv_size, param_dtype=jnp.float32, name="embedding",
                         embedding_init=_init(1.0, (None, None)))(tokens)
        h = jnp.broadcast_to(h, (batch, *h.shape))
        h = nn.Dropout(cfg.prefix_dropout)(h, deterministic=deterministic)
        h = h.reshape(batch, cfg.pre_seq_len, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
        h = h.transpose(2, 3, 0, 1, 4, 5).astype(as_dtype(cfg.dtype))
        return h[:, 0], h[:, 1]

