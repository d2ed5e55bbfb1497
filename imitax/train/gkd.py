"""On-policy distillation (GKD, Agarwal et al., 2024): the student's own samples, scored by the teacher.

With probability ``gkd.lambda_`` a step's batch is on-policy: every teacher-turn token (every
target the loss mask selects) is replaced by the student's own sample at ``gkd.temperature``,
drawn left to right with the model's KV cache, each sample conditioned on the prompt and on the
samples before it; the loss is then the divergence to the teacher on those sampled tokens only
(the same mask). Otherwise the batch is trained as ``kd`` trains it. A sampled turn keeps the
length of the turn it replaces, so the packed rows (segments, positions, masks) are unchanged
and the step compiles once; a turn in which the student samples its end-of-text early goes on
sampling to that length (TRL's trainer generates up to ``max_new_tokens`` and pads instead).

Randomness: the coin and every sample derive from ``fold_in(fold_in(state rng, step), STREAM)``,
one key per row of the global batch and per position, so a resumed run (kill -9, then the same
command) draws the same samples, and a row's samples do not depend on the sharding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Separates GKD's keys from dropout's, which fold the row index into the same step key.
STREAM = 0x6B64


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    """The ``gkd`` section of a config: the on-policy fraction and the sampling temperature."""

    lambda_: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"gkd.lambda_ must be in [0, 1] (the share of on-policy batches), got {self.lambda_}")
        if not self.temperature > 0:
            raise ValueError(f"gkd.temperature must be > 0, got {self.temperature}")


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The step's GKD key from the train state's raw key data and step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), STREAM)


def on_policy(key: jax.Array, lambda_: float) -> jax.Array:
    """Whether this step's batch is the student's own samples (probability ``lambda_``)."""
    return jax.random.uniform(jax.random.fold_in(key, 0)) < lambda_


def sample_teacher_turns(model, batch: dict, key: jax.Array, temperature: float) -> dict:
    """``batch`` with every masked target (and the input after it) replaced by the student's sample.

    Args:
      model: the student (no dropout).
      batch: ``inputs``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions`` ``[b, t]``.
      key: :func:`step_key`'s key; row ``r``, position ``i`` samples with
        ``fold_in(fold_in(fold_in(key, 1), r), i)``.
    """
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"] > 0
    b, t = inputs.shape
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(key, 1), jnp.arange(b))
    following = jnp.concatenate([inputs[:, 1:], jnp.zeros((b, 1), inputs.dtype)], axis=1)

    def position(carry, xs):
        cache, token_b = carry
        i, pos_b, seg_b, replace_b, target_b, following_b = xs
        logits, cache = model.extend(token_b[:, None], cache, pos_b[:, None], seg_b[:, None])
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i)
        sampled = jax.vmap(jax.random.categorical)(keys, logits[:, 0] / temperature).astype(inputs.dtype)
        new_target = jnp.where(replace_b, sampled, target_b)
        return (cache, jnp.where(replace_b, sampled, following_b)), new_target

    time_major = (batch["positions"], batch["segment_ids"], mask, targets, following)
    xs = (jnp.arange(t), *(x.T for x in time_major))
    _, new_targets = jax.lax.scan(position, (model.init_cache(b, t), inputs[:, 0]), xs)
    new_targets = new_targets.T
    new_inputs = jnp.concatenate([inputs[:, :1], jnp.where(mask[:, :-1], new_targets[:, :-1], inputs[:, 1:])], axis=1)
    return {**batch, "inputs": new_inputs, "targets": new_targets}
