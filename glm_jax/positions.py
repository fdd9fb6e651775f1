"""Position ids and attention masks, derived from token ids exactly as the official GLM code does.

Pure functions over arrays, shared by the model (when the caller passes nothing), the data pipelines
and the decoding loop. Masks here are boolean with **True = may attend** (Flax convention; the
official ChatGLM-6B code uses the complement).

GLM 2D scheme (ChatGLM-6B, spec §1.5): tokens before the first `<sop>` are the bidirectional context;
from `<sop>` on every token has position = the mask position ([gMASK] if present, else [MASK]) and
block position 1, 2, ...; those tokens are causal and see the whole context. Padding is handled the
way the official tokenizer does it: positions are computed on the unpadded sequence, pads get
position 0 and are masked as queries and keys.
"""

from __future__ import annotations

import jax.numpy as jnp

from glm_jax.config import GLMConfig


def _first_index(condition: jnp.ndarray, default: jnp.ndarray | int) -> jnp.ndarray:
    """Index of the first True along the last axis, or `default` where there is none."""
    found = jnp.any(condition, axis=-1)
    return jnp.where(found, jnp.argmax(condition, axis=-1), default)


def _take(values: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    return jnp.take_along_axis(values, index[:, None], axis=-1)[:, 0]


def glm_2d_positions_and_mask(
    input_ids: jnp.ndarray,
    *,
    bos_token_id: int,
    mask_token_id: int,
    gmask_token_id: int,
    padding_mask: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """GLM 2D `position_ids [B, 2, L]` and bool `mask [B, 1, L, L]` (True = may attend).

    Without `padding_mask` every token counts (the official model-side default, which indexes the raw
    sequence); with it, pads (0) are skipped as the official tokenizer's `_pad` does.
    """
    length = input_ids.shape[1]
    real, index = _real_and_index(input_ids, padding_mask)
    token = jnp.arange(length)[None, :]

    context_end = _first_index((input_ids == bos_token_id) & real, length)  # absolute index of <sop>
    has_gmask = jnp.any((input_ids == gmask_token_id) & real, axis=-1)
    mask_abs = jnp.where(
        has_gmask,
        _first_index((input_ids == gmask_token_id) & real, 0),
        _first_index((input_ids == mask_token_id) & real, -1),
    )
    has_mask = mask_abs >= 0
    in_block = token >= context_end[:, None]

    mask_position = _take(index, jnp.maximum(mask_abs, 0))
    block_start = _take(index, jnp.minimum(context_end, length - 1))
    position = jnp.where(in_block & has_mask[:, None], mask_position[:, None], index)
    block_position = jnp.where(in_block, index - block_start[:, None] + 1, 0)
    position_ids = jnp.stack([position, block_position], axis=1) * real[:, None, :]
    return position_ids.astype(jnp.int32), _prefix_lm_mask(context_end, real)


def glm130b_positions_and_mask(
    input_ids: jnp.ndarray,
    *,
    bos_token_id: int,
    mask_token_id: int,
    smask_token_id: int | None = None,
    padding_mask: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """GLM-130B 1D `position_ids [B, L]` and bool `mask [B, 1, L, L]` (True = may attend), spec 3.1.

    The blank being filled is the first [MASK], else the first [sMASK]; from `<sop>` on every token
    takes that mask's position. With only a [gMASK] (or no mask) positions just count on. The
    context before `<sop>` is bidirectional as in the 2D scheme; pads are handled the same way.
    """
    length = input_ids.shape[1]
    real, index = _real_and_index(input_ids, padding_mask)
    context_end = _first_index((input_ids == bos_token_id) & real, length)
    mask_abs = _first_index((input_ids == mask_token_id) & real, -1)
    if smask_token_id is not None:
        mask_abs = jnp.where(mask_abs >= 0, mask_abs, _first_index((input_ids == smask_token_id) & real, -1))
    reset = (mask_abs >= 0)[:, None] & (jnp.arange(length)[None, :] >= context_end[:, None])
    position = jnp.where(reset, _take(index, jnp.maximum(mask_abs, 0))[:, None], index) * real
    return position.astype(jnp.int32), _prefix_lm_mask(context_end, real)


def _real_and_index(input_ids: jnp.ndarray, padding_mask: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Which tokens are real (not padding), and each token's index among the real tokens."""
    real = jnp.ones(input_ids.shape, bool) if padding_mask is None else padding_mask.astype(bool)
    return real, jnp.cumsum(real, axis=-1) - 1


def _prefix_lm_mask(context_end: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
    """`[B, 1, L, L]`: query t may attend key j iff `j < context_end` or `j <= t`, both real tokens."""
    length = real.shape[-1]
    key = jnp.arange(length)[None, None, :]
    query = jnp.arange(length)[None, :, None]
    allowed = (key < context_end[:, None, None]) | (key <= query)
    allowed = allowed & real[:, :, None] & real[:, None, :]
    return allowed[:, None, :, :]


def causal_positions_and_mask(
    input_ids: jnp.ndarray,
    *,
    padding_mask: jnp.ndarray | None = None,
    unmask_pad_queries: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """1D `position_ids [B, L]` and causal bool `mask [B, 1, L, L]` (ChatGLM2/3, GLM-4).

    Pads get position 0 and are masked as keys. As in the official ChatGLM2 code, a pad *query* row is
    unmasked completely when no prefix precedes the prompt (`unmask_pad_queries`), which keeps its
    softmax finite; its output is never used.
    """
    batch, length = input_ids.shape
    real = jnp.ones((batch, length), bool) if padding_mask is None else padding_mask.astype(bool)
    position_ids = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0) * real
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    allowed = causal & real[:, None, :]
    if unmask_pad_queries:
        allowed = allowed | ~real[:, :, None]
    return position_ids.astype(jnp.int32), allowed[:, None, :, :]


def positions_and_mask(
    config: GLMConfig, input_ids: jnp.ndarray, padding_mask: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Positions `[B, R, L]` (R = `config.num_position_rows`) and mask `[B, 1, L, L]` for `config`."""
    if config.position_scheme == "glm_2d":
        return glm_2d_positions_and_mask(
            input_ids, bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
            gmask_token_id=config.gmask_token_id, padding_mask=padding_mask,
        )
    if config.position_scheme == "glm130b":
        positions, mask = glm130b_positions_and_mask(
            input_ids, bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
            smask_token_id=config.smask_token_id, padding_mask=padding_mask,
        )
        return positions[:, None, :], mask
    positions, mask = causal_positions_and_mask(
        input_ids, padding_mask=padding_mask, unmask_pad_queries=config.pre_seq_len == 0
    )
    return positions[:, None, :], mask


def next_position_ids(
    config: GLMConfig, last_position_ids: jnp.ndarray, last_index: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Positions `[B, R]` of the token fed right after the one at `last_position_ids` (spec §1.5.3).

    GLM 2D: the position stays at the mask position and the block position counts up (what the
    official `generate` does by copying the last column and incrementing row 1). Causal: the
    position counts up. GLM-130B (spec 3.1): with a [MASK]/[sMASK] blank every token from `<sop>` on
    sits at the mask position, with [gMASK] positions count on; which of the two applies is read off
    the last token, whose position equals its own index (`last_index` `[B]`, its index among the
    row's real tokens) only when they count on, since a blank's mask lies before `<sop>`.
    """
    if config.position_scheme == "glm_2d":
        return last_position_ids.at[:, 1].add(1)
    if config.position_scheme == "causal":
        return last_position_ids + 1
    if config.position_scheme == "glm130b":
        if last_index is None:
            raise ValueError("the glm130b position scheme needs last_index to decode")
        counting = last_position_ids == jnp.asarray(last_index)[:, None]
        return jnp.where(counting, last_position_ids + 1, last_position_ids)
    raise ValueError(f"no decode position rule for position_scheme {config.position_scheme!r}")
