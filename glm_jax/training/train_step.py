"""One jitted optimisation step: blank-infilling loss, gradient accumulation, guarded update.

The loss is the mean cross-entropy over Part B targets of the *whole* global batch (micro-batches
add token sums; the division happens once), so accumulation and any mesh give the same numbers as
one big batch on one device. A step whose loss or gradient norm is not finite, or whose loss jumps
above `spike_factor` × its running mean, leaves params and optimizer state untouched and is
reported as skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.data.blank_infilling import attention_mask
from glm_jax.sharding import DEFAULT_RULES
from glm_jax.training.state import TrainState, batch_sharding

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "part_a", "position_ids")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1
    # GLM-130B's embedding gradient shrink: the word-embedding output is `α·e + (1−α)·stop_grad(e)`,
    # so gradients reaching the embedding through the input path are scaled by α. 1 disables it.
    embedding_grad_shrink: float = 1.0
    spike_factor: float = 0.0  # 0 disables the spike test (non-finite steps are always skipped)
    spike_warmup_steps: int = 20  # accepted steps before the spike test starts
    ema_decay: float = 0.99
    # Train-mode dropout (P-Tuning prefix, LoRA); per-step keys come from `dropout_seed` and the step.
    dropout: bool = False
    dropout_seed: int = 0



def shrink_embedding_gradient(alpha: float) -> Callable:
    """A flax method interceptor applying the embedding gradient shrink to `word_embeddings(ids)` only
    (the tied output projection `attend` is left alone)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Embed) \
                and context.module.name == "word_embeddings":
            out = out * alpha + jax.lax.stop_gradient(out) * (1.0 - alpha)
        return out

    return interceptor


Trainable = Callable[[tuple[str, ...]], bool]


def partition_params(params: Any, trainable: Trainable | None) -> tuple[Any, Any]:
    """(trainable, frozen) sub-trees of a param dict, split by a predicate on each leaf's path
    (e.g. `("layers", "attention", "query", "lora_b")`); everything is trainable without one."""
    if trainable is None:
        return params, {}
    flat = traverse_util.flatten_dict(params)
    chosen = {k: v for k, v in flat.items() if trainable(k)}
    if not chosen:
        raise ValueError("the trainable-parameter predicate selects no parameter")
    frozen = {k: v for k, v in flat.items() if k not in chosen}
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(frozen)


def combine_params(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition_params`."""
    if not frozen:
        return trainable
    flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
    return traverse_util.unflatten_dict(flat)


def loss_sums(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], shrink: float = 1.0, dropout_rng: jax.Array | None = None
):
    """(Σ masked token loss, (Σ correct, Σ mask)) of one (micro-)batch; with `dropout_rng`, in train mode."""
    mask = attention_mask(batch["segment_ids"], batch["part_a"])

    def forward():
        if dropout_rng is None:
            return model.apply({"params": params}, batch["input_ids"], batch["position_ids"], mask)
        return model.apply({"params": params}, batch["input_ids"], batch["position_ids"], mask,
                           deterministic=False, rngs={"dropout": dropout_rng})

    if shrink != 1.0:
        with nn.intercept_methods(shrink_embedding_gradient(shrink)):
            logits = forward()
    else:
        logits = forward()
    logits = logits.astype(jnp.float32)
    weights = batch["loss_mask"].astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    loss = jnp.sum((log_z - target_logit) * weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * weights)
    return loss, (correct, jnp.sum(weights))


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule, config: StepConfig,
    mesh: Mesh, state_shardings: Any, trainable: Trainable | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jitted with the state's and the batch's shardings.

    The state argument is donated. `batch` holds `[global_batch, ...]` arrays (see `BATCH_KEYS`).
    With `trainable` (a predicate on param paths, see `partition_params`) only those params get
    gradients and updates, and `state.opt_state` must be `tx.init` of that sub-tree alone; the frozen
    rest (which may be integer, e.g. an INT4 base) is passed through untouched.
    """
    def normalized_loss(params, frozen, batch, rng, denom):
        # Dividing the loss (not the gradients) by the step's token count: the gradients come out
        # normalised, with no extra pass over a parameter-sized tree.
        loss, aux = loss_sums(model, combine_params(params, frozen), batch, config.embedding_grad_shrink, rng)
        return loss / denom, aux

    value_and_grad = jax.value_and_grad(normalized_loss, has_aux=True)

    def accumulate(params, frozen, batch, rng, denom):
        if config.grad_accum == 1:
            (loss, (correct, count)), grads = value_and_grad(params, frozen, batch, rng, denom)
            return loss, correct, count, grads
        micro = jax.tree.map(lambda x: x.reshape(config.grad_accum, -1, *x.shape[1:]), batch)

        def body(carry, mb):
            index, mb = mb
            micro_rng = None if rng is None else jax.random.fold_in(rng, index)
            (loss, (correct, count)), grads = value_and_grad(params, frozen, mb, micro_rng, denom)
            sums = (carry[0] + loss, carry[1] + correct, carry[2] + count)
            return (*sums, jax.tree.map(jnp.add, carry[3], grads)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, zero, jax.tree.map(jnp.zeros_like, params))
        (loss, correct, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(config.grad_accum), micro))
        return loss, correct, count, grads

    def step(state: TrainState, batch: dict[str, jax.Array]):
        train_params, frozen = partition_params(state.params, trainable)
        rng = jax.random.fold_in(jax.random.key(config.dropout_seed), state.step) if config.dropout else None
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)  # scored tokens of the step
        loss, correct, count, grads = accumulate(train_params, frozen, batch, rng, denom)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        accepted = state.step - state.skipped
        spike = (config.spike_factor > 0) & (accepted >= config.spike_warmup_steps) & (
            loss > config.spike_factor * state.loss_ema)
        ok = finite & ~spike
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        params = optax.apply_updates(train_params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        ema = jnp.where(accepted == 0, loss, config.ema_decay * state.loss_ema + (1 - config.ema_decay) * loss)
        new_state = TrainState(
            step=state.step + 1, params=combine_params(keep(params, train_params), frozen),
            opt_state=keep(opt_state, state.opt_state),
            loss_ema=jnp.where(ok, ema, state.loss_ema), skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm,
            "learning_rate": schedule(accepted), "scored_tokens": count, "skipped": (~ok).astype(jnp.int32),
        }
        return new_state, metrics

    data = batch_sharding(mesh)
    batch_shardings = {k: data for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def run(state: TrainState, batch: dict[str, jax.Array]):
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            return jitted(state, batch)

    run.jitted = jitted  # for AOT lowering (compile-time benchmarks)
    return run


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp) (`jax.make_array_from_process_local_data`)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in BATCH_KEYS}
