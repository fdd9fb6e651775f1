"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

Schedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 1000  # steps from 0 to the end of the decay (warmup included)
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1  # final learning rate / peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    decay_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; expected cosine, linear or constant")
        if self.decay_steps < self.warmup_steps:
            raise ValueError(f"decay_steps={self.decay_steps} is shorter than warmup_steps={self.warmup_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay to `min_lr_ratio · peak`."""
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    decay_length = max(config.decay_steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_length, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_length)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def weight_decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True for matrices (kernels, embeddings), False for biases and norm scales.

    Stacked layers add a leading axis, so the test is on the leaf's name, not its rank.
    """
    def decide(path: tuple[Any, ...], _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("bias", "scale"):
            return False
        if name == "embedding" and not decay_embeddings:
            return False
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def computed_in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its arithmetic in float32, its state stored in the dtypes `inner.init` chose.

    With half-precision params optax rounds after every elementwise operation of the update (a bf16
    round trip per operation, slow on CPU, and less precise). Here gradients, params and state are
    read once into float32, each leaf's update is one float32 expression, and only the stored state
    is rounded, once; the float32 updates are rounded to the params' dtype when applied. Float32
    training is unchanged.
    """
    def widen(tree: Any) -> Any:
        return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, new_state = inner.update(widen(grads), widen(state), None if params is None else widen(params))
        return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformation(inner.init, update)


def make_optimizer(config: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
    parts.append(optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
        mask=lambda p: weight_decay_mask(p, config.decay_embeddings), mu_dtype=jnp.float32,
    ))
    return computed_in_float32(optax.chain(*parts)), schedule
