"""The pure train step: ``train_step(state, batch) -> (state, metrics)``.

One function, compiled once with explicit shardings and a donated state. The
loss is the mean next-token cross-entropy over loss-bearing tokens of the whole
global batch (gradient accumulation sums over micro-batches and divides by the
total count, so it equals the un-accumulated step).

Dropout (the model config's rates) is on in the train step only. Its keys are a
pure function of the train state: ``fold_in(fold_in(state.rng, step), row)``
for each row of the global batch, so a resumed run draws the same masks as an
uninterrupted one, and a row's masks do not depend on micro-batching or sharding.

The cross-entropy goes through the vocabulary in chunks of the sequence
(:func:`chunked_cross_entropy`), so the ``[batch, length, vocab]`` float32
logits never exist at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from imitax import sharding
from imitax.models.transformer import project
from imitax.sharding import constrain
from imitax.train import distill, gkd
from imitax.train.state import TrainState

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# Parameters a step reads but does not train, passed beside the state (never donated, no optimizer
# state): ``{'base': a LoRA run's base weights, 'teacher': an online teacher's}``, either optional.
Frozen = dict[str, Any]
# A top-k teacher cache's arrays (imitax.train.teacher_cache): ids [b, t, k], log-probs [b, t, k + 1].
TEACHER_KEYS = ("teacher_ids", "teacher_logp")
# Sequence positions per chunk of the cross-entropy (see chunked_cross_entropy).
LOSS_CHUNK_LEN = 256


def loss_terms(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: Batch,
    *,
    dropout_rng: jax.Array | None = None,
    chunk_len: int = LOSS_CHUNK_LEN,
    frozen: Frozen | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy over loss-bearing tokens, and the counts to normalize it.

    Args:
      graphdef, params: the model (``params``: what the state trains; a LoRA run's adapters).
      batch: ``BATCH_KEYS`` arrays ``[batch, length]``.
      dropout_rng: ``None`` (no dropout: validation, tests) or keys for the
        model's dropout (one key, or one per row).
      chunk_len: sequence positions per cross-entropy chunk; ``0`` (or at least
        the length) computes all logits at once.
      frozen: the parameters the step does not train (:data:`Frozen`), or None.

    Returns:
      ``(loss_sum, {'loss_sum', 'tokens', 'correct'})``: float32 scalars.
    """
    model = _student(graphdef, params, frozen)
    h_bte, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng)
    w, w_axes = model.output_weight()
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    loss_sum, correct = chunked_cross_entropy(h_bte, w, w_axes, batch["targets"], mask_bt, chunk_len)
    return loss_sum, {"loss_sum": loss_sum, "tokens": jnp.sum(mask_bt), "correct": correct}


def kd_loss_terms(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: Batch,
    *,
    kd: distill.KDConfig,
    teacher_graphdef: nnx.GraphDef | None,
    frozen: Frozen,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed ``(1 - alpha) * divergence + alpha * cross-entropy`` over loss-bearing tokens.

    The teacher is the batch's top-k cache entries (:data:`TEACHER_KEYS`) when it has them, else
    ``frozen['teacher']`` run on the same batch (no dropout, no gradient). The logits are computed
    whole (``[batch, length, vocab]`` float32, for the student and an online teacher), not in
    chunks as the plain cross-entropy is.

    Returns:
      ``(loss_sum, {'loss_sum', 'kd_sum', 'ce_sum', 'tokens', 'correct'})``.
    """
    model = _student(graphdef, params, frozen)
    h_bte, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng)
    logits_btv = model.logits(h_bte)
    if "teacher_ids" in batch:
        kd_bt = distill.topk_token_divergence(
            logits_btv, batch["teacher_ids"], batch["teacher_logp"], kd.loss, kd.beta, kd.temperature
        )
    else:
        teacher = nnx.merge(teacher_graphdef, frozen["teacher"])
        teacher_btv = jax.lax.stop_gradient(teacher(batch["inputs"], batch["positions"], batch["segment_ids"]))
        kd_bt = distill.token_divergence(logits_btv, teacher_btv, kd.loss, kd.beta, kd.temperature)
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == batch["targets"]).astype(jnp.float32)
    kd_sum, ce_sum = jnp.sum(kd_bt * mask_bt), jnp.sum(ce_bt * mask_bt)
    loss_sum = (1.0 - kd.alpha) * kd_sum + kd.alpha * ce_sum
    aux = {"loss_sum": loss_sum, "kd_sum": kd_sum, "ce_sum": ce_sum, "tokens": jnp.sum(mask_bt)}
    return loss_sum, aux | {"correct": jnp.sum(correct_bt * mask_bt)}


def _student(graphdef: nnx.GraphDef, params: Any, frozen: Frozen | None) -> nnx.Module:
    """The trained model: ``params`` alone, or a LoRA run's adapters over their frozen base."""
    if frozen is None or "base" not in frozen:
        return nnx.merge(graphdef, params)
    return nnx.merge(graphdef, frozen["base"], params)


# -- the cross-entropy, chunked ----------------------------------------------------------------


def chunked_cross_entropy(h_bte, w, w_axes: str, targets_bt, mask_bt, chunk_len: int = LOSS_CHUNK_LEN):
    """``(sum of masked cross-entropy, count of masked correct argmaxes)`` of ``project(h, w)``.

    With ``chunk_len < length`` the logits are computed ``chunk_len`` positions
    at a time (``lax.scan``; the length is padded with masked positions to a
    multiple). Under differentiation each chunk also computes its gradients
    right away, ``dlogits = mask * (softmax - onehot)``, ``dh = dlogits w^T``,
    ``dw += h^T dlogits`` (a ``jax.custom_vjp``; the same idea as Liger's fused
    linear cross-entropy), so the backward pass only scales them: peak memory
    holds one chunk's logits instead of ``[batch, length, vocab]`` of them, and
    nothing is computed twice (``jax.checkpoint`` of each chunk would redo the
    output projection: 10% more FLOPs for GPT-2-124M). The results equal the
    unchunked ones up to float32 summation order; in bfloat16 compute, the
    logits' gradient is rounded to bfloat16 before its two matmuls.

    Args:
      h_bte: final hidden states (compute dtype).
      w, w_axes: the output projection and its layout (``Transformer.output_weight``).
      targets_bt: next-token ids; mask_bt: float32 weight of each position's loss.
      chunk_len: positions per chunk; ``0`` or ``>= length``: one pass, autodiff.
    """
    t = h_bte.shape[1]
    if chunk_len <= 0 or chunk_len >= t:
        logits_btv = project(h_bte, w, w_axes)
        ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
        correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
        return jnp.sum(ce_bt * mask_bt), jnp.sum(correct_bt * mask_bt)
    return _chunked_ce(h_bte, w, targets_bt, mask_bt, w_axes, chunk_len)


def _batch_shards(b: int) -> int:
    """Over how many devices the current mesh splits a batch of ``b`` rows (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = sharding.logical_to_spec(("act_batch",), (b,), mesh)[0] or ()
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _chunks(x, n: int, d: int, c: int):
    """``[b, t, ...]`` -> ``[n, d, b / d, c, ...]``, padding ``t`` with zeros to ``n * c``."""
    b, t = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)
    return x.reshape(n, d, b // d, c, *x.shape[3:])


def _ce_scan(h_bte, w, targets_bt, mask_bt, w_axes: str, c: int, with_grads: bool):
    """The chunk loop: sums, and (``with_grads``) ``dloss_sum/dh`` and ``dloss_sum/dw``.

    Rows are grouped by the ``d`` devices the batch is split over (dimension letters
    ``d``, then ``p`` rows per device) and every sum is carried per group: each device
    adds up its own rows' share of ``dw`` and the single cross-device reduction comes
    after the loop. (Carried whole, ``dw`` was all-reduced once per chunk.)
    """
    b, t, e = h_bte.shape
    n, d = -(-t // c), _batch_shards(b)
    w_names = ("act_vocab", "act_embed") if w_axes == "ve" else ("act_embed", "act_vocab")
    # The output projection is gathered once here, not once per chunk inside the loop.
    w_c = constrain(w.astype(h_bte.dtype), w_names)

    def chunk(carry, xs):
        loss_d, correct_d, dw = carry
        h_dpce, targets_dpc, mask_dpc = xs
        logits = jnp.einsum(f"dpce,{w_axes}->dpcv", h_dpce, w_c, preferred_element_type=jnp.float32)
        logits_dpcv = constrain(logits, ("act_batch", None, "act_len", "act_vocab"))
        lse_dpc = jax.nn.logsumexp(logits_dpcv, axis=-1)
        onehot_dpcv = jax.nn.one_hot(targets_dpc, logits_dpcv.shape[-1], dtype=jnp.float32)
        target_logit_dpc = jnp.sum(logits_dpcv * onehot_dpcv, axis=-1)
        loss_d += jnp.sum((lse_dpc - target_logit_dpc) * mask_dpc, axis=(1, 2))
        correct_d += jnp.sum((jnp.argmax(logits_dpcv, axis=-1) == targets_dpc) * mask_dpc, axis=(1, 2))
        if not with_grads:
            return (loss_d, correct_d, dw), None
        dlogits = (jnp.exp(logits_dpcv - lse_dpc[..., None]) - onehot_dpcv) * mask_dpc[..., None]
        dlogits_dpcv = constrain(dlogits.astype(h_dpce.dtype), ("act_batch", None, "act_len", "act_vocab"))
        dh_dpce = jnp.einsum(f"dpcv,{w_axes}->dpce", dlogits_dpcv, w_c, preferred_element_type=jnp.float32)
        dw_d = jnp.einsum(f"dpce,dpcv->d{w_axes}", h_dpce, dlogits_dpcv, preferred_element_type=jnp.float32)
        dw = constrain(dw + dw_d, ("act_batch", *w_names))
        return (loss_d, correct_d, dw), dh_dpce.astype(h_dpce.dtype)

    zeros_d = constrain(jnp.zeros((d,), jnp.float32), ("act_batch",))
    dw0 = constrain(jnp.zeros((d, *w.shape), jnp.float32), ("act_batch", *w_names)) if with_grads else None
    xs = tuple(_chunks(x, n, d, c) for x in (h_bte, targets_bt, mask_bt))
    (loss_d, correct_d, dw), dh = jax.lax.scan(chunk, (zeros_d, zeros_d, dw0), xs)
    loss_sum, correct = jnp.sum(loss_d), jnp.sum(correct_d)
    if not with_grads:
        return loss_sum, correct, None, None
    dh_bte = jnp.moveaxis(dh.reshape(n, b, c, e), 0, 1).reshape(b, n * c, e)[:, :t]
    return loss_sum, correct, dh_bte, jnp.sum(dw, axis=0).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(h_bte, w, targets_bt, mask_bt, w_axes, c):
    loss_sum, correct, _, _ = _ce_scan(h_bte, w, targets_bt, mask_bt, w_axes, c, with_grads=False)
    return loss_sum, correct


def _chunked_ce_fwd(h_bte, w, targets_bt, mask_bt, w_axes, c):
    loss_sum, correct, dh_bte, dw = _ce_scan(h_bte, w, targets_bt, mask_bt, w_axes, c, with_grads=True)
    return (loss_sum, correct), (dh_bte, dw)


def _chunked_ce_bwd(w_axes, c, residuals, cotangents):
    del w_axes, c
    dh_bte, dw = residuals
    g = cotangents[0]  # of loss_sum; `correct` (an argmax count) has no gradient
    return (g.astype(dh_bte.dtype) * dh_bte, g.astype(dw.dtype) * dw, None, None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
    *,
    loss_chunk_len: int = LOSS_CHUNK_LEN,
    kd: distill.KDConfig | None = None,
    teacher_graphdef: nnx.GraphDef | None = None,
    on_policy: gkd.GKDConfig | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the (un-jitted) train step ``(state, batch, frozen=None)``; :func:`jit_train_step` compiles it.

    Args:
      graphdef: the model's graph definition (``nnx.split(model)[0]``); its
        config's dropout rates apply (keys: :func:`dropout_keys`).
      optimizer: the Optax transformation.
      schedule: the learning-rate schedule (for the metrics).
      grad_accum_steps: the global batch is split into this many micro-batches,
        run one after another (``lax.scan``) with their gradients summed.
      loss_chunk_len: sequence positions per cross-entropy chunk (0 = unchunked).
      kd: distill from the teacher in ``frozen['teacher']`` (:func:`kd_loss_terms`), or None (SFT).
      teacher_graphdef: the teacher's graph definition (with ``kd``).
      on_policy: GKD (with ``kd``): with probability ``lambda_`` the batch's teacher turns are
        first replaced by the student's samples (:func:`imitax.train.gkd.sample_teacher_turns`).
    """
    if kd is None:
        loss_fn = functools.partial(loss_terms, graphdef, chunk_len=loss_chunk_len)
    else:
        loss_fn = functools.partial(kd_loss_terms, graphdef, kd=kd, teacher_graphdef=teacher_graphdef)
    grad_fn = jax.grad(lambda p, b, rng, frozen: loss_fn(p, b, dropout_rng=rng, frozen=frozen), has_aux=True)

    def train_step(state: TrainState, batch: Batch, frozen: Frozen | None = None):
        batch = {k: batch[k] for k in BATCH_KEYS + TEACHER_KEYS if k in batch}
        extra = {}
        if on_policy is not None:
            key = gkd.step_key(state.rng, state.step)
            sampled = gkd.on_policy(key, on_policy.lambda_)
            student = _student(graphdef, jax.lax.stop_gradient(state.params), frozen)
            batch = jax.lax.cond(
                sampled,
                lambda b: gkd.sample_teacher_turns(student, b, key, on_policy.temperature),
                lambda b: b,
                batch,
            )
            extra["on_policy"] = sampled.astype(jnp.float32)
        # Unused (and compiled away) when every dropout rate is 0.
        rng_b = dropout_keys(state.rng, state.step, batch["inputs"].shape[0])
        if grad_accum_steps == 1:
            grads, aux = grad_fn(state.params, batch, rng_b, frozen)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), (batch, rng_b)
            )

            def accumulate(carry, mb):
                grads, aux = grad_fn(state.params, *mb, frozen)
                return jax.tree.map(jnp.add, carry, (grads, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            aux_shapes = jax.eval_shape(grad_fn, state.params, *jax.tree.map(lambda x: x[0], micro), frozen)[1]
            zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
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
        metrics |= {k.replace("_sum", "_loss"): aux[k] / tokens for k in ("kd_sum", "ce_sum") if k in aux} | extra
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def dropout_keys(rng: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
    """The step's dropout keys, one per row of the global batch: ``fold_in(fold_in(rng, step), row)``.

    Args:
      rng: the train state's raw key data (``TrainState.rng``).
      step: the train state's step.
      batch_size: rows in the global batch.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size))


def make_eval_step(
    graphdef: nnx.GraphDef, *, loss_chunk_len: int = LOSS_CHUNK_LEN
) -> Callable[..., dict[str, jax.Array]]:
    """``eval_step(params, batch, frozen=None) -> {'loss_sum', 'tokens', 'correct'}``: validation cross-entropy."""

    def eval_step(params, batch: Batch, frozen: Frozen | None = None):
        batch = {k: batch[k] for k in BATCH_KEYS}
        _, aux = loss_terms(graphdef, params, batch, chunk_len=loss_chunk_len, frozen=frozen)
        return aux

    return eval_step


def jit_train_step(
    train_step,
    state_shardings: TrainState,
    batch_sharding: jax.sharding.Sharding,
    frozen_shardings: Any = None,
    *,
    cached_teacher: bool = False,
):
    """Compiles the step with explicit shardings; the input state is donated.

    With ``frozen_shardings`` (those of a :data:`Frozen` dict) the step takes ``(state, batch,
    frozen)``; without, ``(state, batch)``. ``cached_teacher``: the batches carry :data:`TEACHER_KEYS`.
    """
    mesh = batch_sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    if cached_teacher:
        batch_shardings |= {k: sharding.batch_sharding(mesh, ndim=3) for k in TEACHER_KEYS}
    in_shardings = (state_shardings, batch_shardings)
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(train_step, in_shardings=in_shardings, out_shardings=(state_shardings, replicated), donate_argnums=0)
