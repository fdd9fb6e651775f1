"""`computed_in_float32`: half-precision params and state get the float32 update, rounded once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glm_jax.training.optimizer import OptimizerConfig, computed_in_float32, make_optimizer


def _tree(rng: np.random.Generator, dtype) -> dict:
    return {"kernel": jnp.asarray(rng.standard_normal((8, 16)), dtype), "bias": jnp.asarray(rng.standard_normal(16), dtype)}


def test_bf16_update_is_the_float32_update_rounded_once():
    """Against plain optax run on float32 copies: the same float32 updates (up to XLA's fusion of
    the arithmetic), and every stored state leaf is that float32 state rounded to its own (bf16 or
    float32) dtype."""
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10)
    ours, _ = make_optimizer(config)
    rng = np.random.default_rng(0)
    params, grads = _tree(rng, jnp.bfloat16), _tree(rng, jnp.bfloat16)
    state = ours.init(params)
    widen = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)  # noqa: E731
    plain = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adamw(
        make_optimizer(config)[1], b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
        mask={"kernel": True, "bias": False}, mu_dtype=jnp.float32))
    for _ in range(3):  # a few steps, so the stored (rounded) state feeds the next update
        updates, new_state = jax.jit(ours.update)(grads, state, params)
        want_updates, want_state = jax.jit(plain.update)(widen(grads), widen(state), widen(params))
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates)):
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)
        for got, want, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(want_state), jax.tree.leaves(state)):
            assert got.dtype == old.dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(old.dtype), np.float32),
                                       rtol=2 ** -8 if old.dtype == jnp.bfloat16 else 1e-6)
        params, state = optax.apply_updates(params, updates), new_state
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))


def test_float32_training_is_unchanged():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10)
    ours, schedule = make_optimizer(config)
    plain = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
        mask={"kernel": True, "bias": False}, mu_dtype=jnp.float32))
    rng = np.random.default_rng(1)
    params, grads = _tree(rng, jnp.float32), _tree(rng, jnp.float32)
    got, _ = ours.update(grads, ours.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
