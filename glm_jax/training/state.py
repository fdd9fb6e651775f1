"""The train state (params, optimizer state, step, loss statistics) and its shardings on a mesh.

Shardings come from the logical axis names of the params (`glm_jax.sharding`): the optimizer
moments inherit them because optax maps over the boxed params, so FSDP / TP shard the Adam state
exactly like the weights. The state is created directly in its sharding (jit with out_shardings).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.sharding import logical_shardings


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32: steps taken, skipped ones included
    params: Any
    opt_state: Any
    loss_ema: jnp.ndarray  # float32 running mean of accepted losses (the spike guard's baseline)
    skipped: jnp.ndarray  # int32: steps whose update was dropped (non-finite or spiking loss)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    def init(rng: jax.Array) -> TrainState:
        ids = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(rng, ids)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            loss_ema=jnp.zeros((), jnp.float32), skipped=jnp.zeros((), jnp.int32),
        )

    return init


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh) -> Any:
    """NamedShardings of every leaf of the (unboxed) TrainState on `mesh`."""
    boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key(0))
    return logical_shardings(boxed, mesh)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into."""
    boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key(0))
    shardings = logical_shardings(boxed, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)


def create_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh, seed: int) -> TrainState:
    """A freshly initialised TrainState, laid out on `mesh` as it is created."""
    shardings = state_shardings(model, tx, seq_len, mesh)
    init = _init_fn(model, tx, seq_len)
    with jax.set_mesh(mesh):
        return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(seed))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over the data and fsdp axes (rule `activation_batch`), replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
