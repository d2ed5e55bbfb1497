"""The pure train step: ``train_step(state, batch) -> (state, metrics)``.

One function, compiled once with explicit shardings and a donated state. The
loss is the mean next-token cross-entropy over loss-bearing tokens of the whole
global batch (gradient accumulation sums over micro-batches and divides by the
total count, so it equals the un-accumulated step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imitax.train.state import TrainState

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def loss_terms(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy over loss-bearing tokens, and the counts to normalize it.

    Returns:
      ``(loss_sum, {'loss_sum', 'tokens', 'correct'})``: float32 scalars.
    """
    model = nnx.merge(graphdef, params)
    logits_btv = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == batch["targets"]).astype(jnp.float32)
    loss_sum = jnp.sum(ce_bt * mask_bt)
    return loss_sum, {"loss_sum": loss_sum, "tokens": jnp.sum(mask_bt), "correct": jnp.sum(correct_bt * mask_bt)}


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the (un-jitted) train step; :func:`jit_train_step` compiles it.

    Args:
      graphdef: the model's graph definition (``nnx.split(model)[0]``).
      optimizer: the Optax transformation.
      schedule: the learning-rate schedule (for the metrics).
      grad_accum_steps: the global batch is split into this many micro-batches,
        run one after another (``lax.scan``) with their gradients summed.
    """
    grad_fn = jax.grad(lambda p, b: loss_terms(graphdef, p, b), has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        batch = {k: batch[k] for k in BATCH_KEYS}
        if grad_accum_steps == 1:
            grads, aux = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch
            )

            def accumulate(carry, mb):
                grads, aux = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (grads, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_aux = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "tokens", "correct")}
            (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux), micro)
        tokens = jnp.maximum(aux["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": aux["loss_sum"] / tokens,
            "accuracy": aux["correct"] / tokens,
            "loss_tokens": aux["tokens"],
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "learning_rate": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {'loss_sum', 'tokens', 'correct'}`` for validation."""

    def eval_step(params, batch: Batch):
        _, aux = loss_terms(graphdef, params, {k: batch[k] for k in BATCH_KEYS})
        return aux

    return eval_step


def jit_train_step(train_step, state_shardings: TrainState, batch_sharding: jax.sharding.Sharding):
    """Compiles the step with explicit shardings; the input state is donated."""
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
