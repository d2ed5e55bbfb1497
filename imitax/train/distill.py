"""Knowledge distillation: divergences between a teacher's and the student's next-token distributions.

Both distributions are taken at ``temperature`` T: ``p = softmax(teacher_logits / T)`` (the
teacher's) and ``q = softmax(student_logits / T)`` (the student's). As in TRL's GKD trainer the
loss is not multiplied by T^2.

- ``forward_kl``: ``KL(p || q) = sum p (log p - log q)``, the usual (supervised) KD loss:
  mean-seeking, the student covers every token the teacher gives mass to.
- ``reverse_kl``: ``KL(q || p)``: mode-seeking, the student puts its mass where the teacher's is.
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), with
  ``beta`` as TRL's ``generalized_jsd_loss`` reads it: ``m = beta p + (1 - beta) q`` and
  ``beta KL(p || m) + (1 - beta) KL(q || m)`` for ``0 < beta < 1``; at the ends,
  ``beta = 0`` is the forward KL ``KL(p || q)`` and ``beta = 1`` the reverse KL ``KL(q || p)``
  (TRL special-cases them too: the mixture formula itself goes to 0 there). So ``beta`` is how
  far toward the reverse (student-weighted) end the loss sits.

The divergences are written for distributions over any set of buckets, so the same code scores
the full vocabulary (online teacher) and a top-k cache, whose buckets are the teacher's k most
likely tokens plus one bucket for the rest of its mass (:func:`topk_log_probs`). Coarsening a
distribution never increases an f-divergence, so the top-k loss is at most the full one; for the
forward KL the difference is exactly ``rest * KL(p_tail || q_tail)`` (the chain rule), with
``rest`` the teacher's mass outside its top k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """``KL(p || q)`` over the last axis, from log-probabilities; buckets where ``p = 0`` add 0."""
    p = jnp.exp(logp)
    present = p > 0
    # The inner where keeps -inf - -inf (nan) out of the discarded branch, and of its gradient.
    diff = jnp.where(present, jnp.where(present, logp, 0.0) - jnp.where(present, logq, 0.0), 0.0)
    return jnp.sum(p * diff, axis=-1)


def divergence(logq: jax.Array, logp: jax.Array, loss: str, beta: float = 0.5) -> jax.Array:
    """The divergence ``loss`` between student ``q`` and teacher ``p`` (log-probabilities, last axis).

    Args:
      logq, logp: the student's and the teacher's log-probabilities over the same buckets.
      loss: one of :data:`LOSSES`.
      beta: ``jsd``'s interpolation (see the module doc): 0 = forward KL, 1 = reverse KL.
    """
    if loss == "forward_kl":
        return kl(logp, logq)
    if loss == "reverse_kl":
        return kl(logq, logp)
    if loss != "jsd":
        raise ValueError(f"unknown distillation loss {loss!r}; known: {', '.join(LOSSES)}")
    if beta == 0.0:
        return kl(logp, logq)
    if beta == 1.0:
        return kl(logq, logp)
    logm = jnp.logaddexp(logp + jnp.log(beta), logq + jnp.log1p(-beta))
    return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)


def token_divergence(student_logits, teacher_logits, loss: str, beta: float, temperature: float) -> jax.Array:
    """Per-position divergence ``[..., ]`` of full-vocabulary logits (float32) at ``temperature``."""
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return divergence(logq, logp, loss, beta)


def topk_log_probs(logits: jax.Array, k: int, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """A teacher's top-k cache entry: ``(ids [..., k], log-probabilities [..., k + 1])``.

    The last bucket is the log of the mass outside the top k (``-inf`` when there is none).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    top, ids = jax.lax.top_k(logp, k)
    return ids.astype(jnp.int32), jnp.concatenate([top, _log_rest(logp, ids)[..., None]], axis=-1)


def _log_rest(logp: jax.Array, ids: jax.Array) -> jax.Array:
    """The log of the mass of ``logp`` outside ``ids`` (last axis); ``-inf`` when ``ids`` hold every token.

    Summed over the tokens outside (not ``1 - sum inside``, which rounds to 0 or below for a
    large k); the outer where keeps the gradient finite when nothing is outside.
    """
    inside = jnp.put_along_axis(jnp.zeros(logp.shape, bool), ids, True, axis=-1, inplace=False)
    some = ~jnp.all(inside, axis=-1)
    outside = jnp.where(some[..., None], jnp.where(inside, -jnp.inf, logp), 0.0)
    return jnp.where(some, jax.nn.logsumexp(outside, axis=-1), -jnp.inf)


def topk_token_divergence(student_logits, teacher_ids, teacher_logp, loss: str, beta: float, temperature: float):
    """Per-position divergence against a top-k cache (:func:`topk_log_probs` at the same temperature)."""
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    top = jnp.take_along_axis(logq, teacher_ids, axis=-1)
    logq_buckets = jnp.concatenate([top, _log_rest(logq, teacher_ids)[..., None]], axis=-1)
    return divergence(logq_buckets, teacher_logp, loss, beta)


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """The ``kd`` section of a config: the divergence, its ``beta``, the temperature, and ``alpha``.

    The step's loss is ``(1 - alpha) * divergence + alpha * cross-entropy`` on the text, both
    summed over the loss mask's positions (the teacher turns) and divided by their count.
    """

    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"kd.loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        for name in ("beta", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"kd.{name} must be in [0, 1] (see docs/distillation.md), got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")
