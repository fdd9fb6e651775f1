"""The GLM transformer: one block, the scanned stack, and the language model.

One module serves training, prefill and decode (`decode=True` switches on the KV cache). Layers
are stacked with `nn.scan` (params `layers/...` with a leading layer axis) so compile time and HLO
size do not grow with depth; `scan_layers=False` unrolls them into `layers_0 … layers_{L-1}`, the
faster layout for decoding (see `glm_jax.modeling.layer_stack`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import GLMConfig
from glm_jax.modeling.layers import (
    MLP, Attention, Linear, Norm, PrefixEncoder, QuantizedEmbed, as_dtype, rotary_angles, tied_logits,
)
from glm_jax.positions import positions_and_mask

Array = jnp.ndarray

# Names of the per-layer blocks when the stack is not scanned: `layers_0`, `layers_1`, ...
LAYER_PREFIX = "layers_"

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class GLMBlock(nn.Module):
    """One transformer layer; the residual form follows `config.residual_style`."""

    config: GLMConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: Array, layer_index: Array, prefix_kv: tuple[Array, Array] | None,
        rope: tuple[Array, Array], allowed: Array,
    ) -> tuple[Array, Array]:
        cfg = self.config
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        normed = Norm(cfg, name="input_norm")(x)
        attn = Attention(cfg, decode=self.decode, deterministic=self.deterministic, name="attention")(
            normed, *rope, allowed, layer_index, prefix_kv)
        if cfg.residual_style == "deepnorm":
            hidden = normed * cfg.residual_alpha + attn
        else:
            hidden = x + attn
        normed = Norm(cfg, name="post_attention_norm")(hidden)
        mlp = MLP(cfg, deterministic=self.deterministic, name="mlp")(normed)
        out = normed * cfg.residual_alpha + mlp if cfg.residual_style == "deepnorm" else hidden + mlp
        # The layer input is returned as a scan output so hidden states can be inspected layer by layer.
        return out.astype(x.dtype), x


def block_class(config: GLMConfig) -> type[nn.Module]:
    """GLMBlock wrapped in `nn.remat` according to `config.remat_policy`."""
    if config.remat_policy == "none":
        return GLMBlock
    return nn.remat(GLMBlock, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)


class GLMForCausalLM(nn.Module):
    """GLM language model: `apply({"params": p}, input_ids, position_ids, attention_mask) -> logits`.

    `position_ids` is `[B, 2, L]` for 2D-position models and `[B, L]` otherwise; `attention_mask` is a
    padding mask `[B, L]` (1 = token) or a bool `[B, 1, L, Lk]` (True = may attend). Omitted, both are
    derived from `input_ids` as the official implementation does. In decode mode both are required
    (the mask has one column per cache slot).
    """

    config: GLMConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        position_ids: Array | None = None,
        attention_mask: Array | None = None,
        *,
        decode: bool = False,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> Any:
        cfg = self.config
        batch, length = input_ids.shape
        position_ids, allowed = self._positions_and_mask(input_ids, position_ids, attention_mask, decode)

        if cfg.quantize_embeddings:
            embed = QuantizedEmbed(cfg, name="word_embeddings")
        else:
            # Looked up in the param dtype, the rows then converted: nn.Embed would convert the whole
            # table to the compute dtype first (every decode step, for float16 params).
            embed = nn.Embed(
                cfg.vocab_size, cfg.hidden_size, dtype=as_dtype(cfg.param_dtype), param_dtype=as_dtype(cfg.param_dtype),
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                name="word_embeddings",
            )
        x = embed(input_ids).astype(as_dtype(cfg.dtype))
        if cfg.position_embedding == "learned_2d":
            x = x + self._learned_position_embeddings(position_ids)
        prefix_kv = PrefixEncoder(cfg, name="prefix_encoder")(batch, deterministic) if cfg.pre_seq_len else None

        rope = rotary_angles(cfg, position_ids)
        if cfg.scan_layers:
            stack = nn.scan(
                block_class(cfg),
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, decode=decode, deterministic=deterministic, name="layers")
            x, layer_inputs = stack(x, jnp.arange(cfg.num_layers), prefix_kv, rope, allowed)
        else:
            x, layer_inputs = self._unrolled_layers(x, prefix_kv, rope, allowed, decode, deterministic)

        x = Norm(cfg, name="final_norm")(x)
        if cfg.quantize_embeddings:
            logits = embed.attend(x).astype(as_dtype(cfg.dtype))
        elif cfg.tie_word_embeddings:
            logits = tied_logits(x, embed.embedding, as_dtype(cfg.dtype))
        else:
            logits = Linear((cfg.vocab_size,), ("embed", "vocab"), use_bias=False, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name="output_layer")(x)
        logits = logits.astype(as_dtype(cfg.logits_dtype))
        if output_hidden_states:
            return logits, jnp.concatenate([layer_inputs, x[None]], axis=0)
        return logits

    def _unrolled_layers(
        self, x: Array, prefix_kv: tuple[Array, Array] | None, rope: tuple[Array, Array], allowed: Array,
        decode: bool, deterministic: bool,
    ) -> tuple[Array, Array]:
        """The stack as `num_layers` separate blocks `layers_0 … layers_{L-1}` (`scan_layers=False`).

        Each layer's weights are then their own arrays: XLA reads them in place, where the scan
        dynamic-slices the stacked weights and (on CPU) copies every layer's weights at every step.
        """
        cfg = self.config
        layer_inputs = []
        for i in range(cfg.num_layers):
            layer_prefix = None if prefix_kv is None else jax.tree.map(lambda kv: kv[i], prefix_kv)
            block = block_class(cfg)(cfg, decode=decode, deterministic=deterministic, name=f"{LAYER_PREFIX}{i}")
            x, layer_input = block(x, jnp.asarray(i), layer_prefix, rope, allowed)
            layer_inputs.append(layer_input)
        return x, jnp.stack(layer_inputs)

    def _learned_position_embeddings(self, position_ids: Array) -> Array:
        """Original GLM: position and block position tables (max_sequence_length + 1 rows) looked up with
        the two rows of `position_ids` and summed."""
        cfg = self.config
        tables = []
        for row, name in enumerate(("position_embeddings", "block_position_embeddings")):
            table = nn.Embed(
                cfg.max_sequence_length + 1, cfg.hidden_size, dtype=as_dtype(cfg.dtype),
                param_dtype=as_dtype(cfg.param_dtype),
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")), name=name,
            )
            tables.append(table(position_ids[:, row]))
        return tables[0] + tables[1]

    def _positions_and_mask(
        self, input_ids: Array, position_ids: Array | None, attention_mask: Array | None, decode: bool
    ) -> tuple[Array, Array]:
        cfg = self.config
        if decode and (position_ids is None or attention_mask is None or attention_mask.ndim != 4):
            raise ValueError("decode mode needs explicit position_ids and a [B, 1, L, cache_len] attention_mask")
        padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        if attention_mask is not None and attention_mask.ndim not in (2, 4):
            raise ValueError(f"attention_mask must be [B, L] or [B, 1, L, Lk], got shape {attention_mask.shape}")
        if position_ids is None or attention_mask is None or padding is not None:
            derived_positions, derived_mask = positions_and_mask(cfg, input_ids, padding)
            position_ids = derived_positions if position_ids is None else position_ids
            attention_mask = derived_mask if attention_mask is None or padding is not None else attention_mask
        if position_ids.ndim == 2:
            position_ids = position_ids[:, None, :]
        if position_ids.shape[1] != cfg.num_position_rows:
            raise ValueError(
                f"position_ids must have {cfg.num_position_rows} row(s) per sequence for this model, "
                f"got shape {position_ids.shape}"
            )
        return position_ids, attention_mask.astype(bool)
