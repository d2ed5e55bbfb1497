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
    chunk_len: int = LOSS_CHUNK_LEN,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed ``(1 - alpha) * divergence + alpha * cross-entropy`` over loss-bearing tokens.

    The teacher is the batch's top-k cache entries (:data:`TEACHER_KEYS`) when it has them, else
    ``frozen['teacher']`` run on the same batch (no dropout, no gradient). Both models' logits go
    through the vocabulary ``chunk_len`` positions at a time, as the plain cross-entropy's do
    (:func:`chunked_logit_sums`): the online teacher's final hidden states are computed whole
    (``[batch, length, embed]``), its logits one chunk at a time beside the student's.

    Returns:
      ``(loss_sum, {'loss_sum', 'kd_sum', 'ce_sum', 'tokens', 'correct'})``.
    """
    model = _student(graphdef, params, frozen)
    h_bte, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng)
    w, w_axes = model.output_weight()
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    xs, consts = (batch["targets"], mask_bt), ()
    if "teacher_ids" in batch:
        xs, teacher_axes = xs + (batch["teacher_ids"], batch["teacher_logp"]), None
    else:
        teacher = nnx.merge(teacher_graphdef, frozen["teacher"])
        teacher_h, _ = teacher.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        teacher_w, teacher_axes = teacher.output_weight()
        xs, consts = xs + (jax.lax.stop_gradient(teacher_h),), (jax.lax.stop_gradient(teacher_w),)
    per_position = functools.partial(_kd_per_position, kd, teacher_axes)
    sums = chunked_logit_sums(per_position, h_bte, w, w_axes, xs, consts, chunk_len)
    return sums["loss"], {
        "loss_sum": sums["loss"],
        "kd_sum": sums["kd"],
        "ce_sum": sums["ce"],
        "tokens": jnp.sum(mask_bt),
        "correct": sums["correct"],
    }


def _kd_per_position(kd: distill.KDConfig, teacher_axes: str | None, logits, xs, consts) -> dict[str, jax.Array]:
    """KD's masked per-position terms (``teacher_axes``: the online teacher's output layout; None: a cache)."""
    targets, mask, *teacher = xs
    if teacher_axes is None:
        kd_ = distill.topk_token_divergence(logits, *teacher, kd.loss, kd.beta, kd.temperature)
    else:
        teacher_logits = _project(teacher[0], consts[0], teacher_axes)
        kd_ = distill.token_divergence(logits, teacher_logits, kd.loss, kd.beta, kd.temperature)
    kd_, ce = kd_ * mask, _ce_per_position(logits, xs, ())
    return {"loss": (1.0 - kd.alpha) * kd_ + kd.alpha * ce["loss"], "kd": kd_, "ce": ce["loss"]} | {
        "correct": ce["correct"]
    }


def _student(graphdef: nnx.GraphDef, params: Any, frozen: Frozen | None) -> nnx.Module:
    """The trained model: ``params`` alone, or a LoRA run's adapters over their frozen base."""
    if frozen is None or "base" not in frozen:
        return nnx.merge(graphdef, params)
    return nnx.merge(graphdef, frozen["base"], params)


# -- losses on the logits, chunked ----------------------------------------------------------------


def chunked_cross_entropy(h_bte, w, w_axes: str, targets_bt, mask_bt, chunk_len: int = LOSS_CHUNK_LEN):
    """``(sum of masked cross-entropy, count of masked correct argmaxes)`` of ``project(h, w)``.

    Through :func:`chunked_logit_sums`: with ``chunk_len < length`` peak memory holds one chunk's
    logits, not ``[batch, length, vocab]`` of them.

    Args:
      h_bte: final hidden states (compute dtype).
      w, w_axes: the output projection and its layout (``Transformer.output_weight``).
      targets_bt: next-token ids; mask_bt: float32 weight of each position's loss.
      chunk_len: positions per chunk; ``0`` or ``>= length``: one pass, autodiff.
    """
    sums = chunked_logit_sums(_ce_per_position, h_bte, w, w_axes, (targets_bt, mask_bt), (), chunk_len)
    return sums["loss"], sums["correct"]


def _ce_per_position(logits, xs, consts) -> dict[str, jax.Array]:
    """The masked cross-entropy and correct argmax of each position (``xs = (targets, mask, ...)``)."""
    del consts
    targets, mask = xs[:2]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return {"loss": ce * mask, "correct": (jnp.argmax(logits, axis=-1) == targets) * mask}


def chunked_logit_sums(per_position, h_bte, w, w_axes: str, xs, consts=(), chunk_len: int = LOSS_CHUNK_LEN):
    """Sums over positions of ``per_position(logits, xs, consts)``, with the logits ``project(h, w)``.

    ``per_position`` maps float32 logits ``[..., vocab]`` and the matching positions of ``xs``
    (arrays ``[batch, length, ...]``) to a dict of float32 per-position terms ``[...]``, masked;
    its ``'loss'`` is what the gradient is of. ``consts`` are arrays it reads whole (an online
    teacher's output weight); ``xs`` and ``consts`` get no gradient.

    With ``chunk_len < length`` the logits are computed ``chunk_len`` positions at a time
    (``lax.scan``; the length is padded with zeros, so a padded position must have mask 0).
    Under differentiation each chunk also computes its gradients right away: ``dlogits`` by
    autodiff of the chunk's summed loss, ``dh = dlogits w^T``, ``dw += h^T dlogits`` (a
    ``jax.custom_vjp``; the same idea as Liger's fused linear cross-entropy), so the backward pass
    only scales them: peak memory holds one chunk's logits (and a teacher's) instead of ``[batch,
    length, vocab]`` of them, and nothing is computed twice (``jax.checkpoint`` of each chunk would
    redo the output projection: 10% more FLOPs for GPT-2-124M). The results equal the unchunked
    ones up to float32 summation order; in bfloat16 compute, the logits' gradient is rounded to
    bfloat16 before its two matmuls.

    Returns:
      the dict of ``per_position``'s keys, each summed to a float32 scalar.
    """
    t = h_bte.shape[1]
    if chunk_len <= 0 or chunk_len >= t:
        terms = per_position(_project(h_bte, w, w_axes), tuple(xs), tuple(consts))
        return {k: jnp.sum(v) for k, v in terms.items()}
    return _chunked_sums(per_position, w_axes, chunk_len, h_bte, w, tuple(xs), tuple(consts))


def _project(h, w, w_axes: str) -> jax.Array:
    """Float32 logits of ``h [batch, length, e]`` or of a chunk ``h [devices, rows, positions, e]``."""
    names = ("act_batch", "act_len", "act_vocab") if h.ndim == 3 else ("act_batch", None, "act_len", "act_vocab")
    logits = jnp.einsum(f"...e,{w_axes}->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, names)


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


def _sums_scan(per_position, w_axes: str, c: int, with_grads: bool, h_bte, w, xs, consts, with_dw: bool = True):
    """The chunk loop: the sums, and (``with_grads``) ``dsum['loss']/dh`` and (``with_dw``) ``dsum['loss']/dw``.

    Rows are grouped by the ``d`` devices the batch is split over (dimension letters
    ``d``, then ``p`` rows per device) and every sum is kept per group: each device
    adds up its own rows' share of ``dw`` and the single cross-device reduction comes
    after the loop. (Carried whole, ``dw`` was all-reduced once per chunk.)
    """
    b, t, e = h_bte.shape
    n, d = -(-t // c), _batch_shards(b)
    w_names = ("act_vocab", "act_embed") if w_axes == "ve" else ("act_embed", "act_vocab")
    # The output projection is gathered once here, not once per chunk inside the loop.
    w_c = constrain(w.astype(h_bte.dtype), w_names)

    def chunk_loss(logits_dpcv, xs_c):
        terms = per_position(logits_dpcv, xs_c, consts)
        return jnp.sum(terms["loss"]), {k: jnp.sum(v, axis=(1, 2)) for k, v in terms.items()}

    def chunk(dw, chunk_xs):
        h_dpce, xs_c = chunk_xs
        logits_dpcv = _project(h_dpce, w_c, w_axes)
        if not with_grads:
            return dw, (chunk_loss(logits_dpcv, xs_c)[1], None)
        dlogits, sums_d = jax.grad(chunk_loss, has_aux=True)(logits_dpcv, xs_c)
        dlogits_dpcv = constrain(dlogits.astype(h_dpce.dtype), ("act_batch", None, "act_len", "act_vocab"))
        dh_dpce = jnp.einsum(f"dpcv,{w_axes}->dpce", dlogits_dpcv, w_c, preferred_element_type=jnp.float32)
        if with_dw:
            dw_d = jnp.einsum(f"dpce,dpcv->d{w_axes}", h_dpce, dlogits_dpcv, preferred_element_type=jnp.float32)
            dw = constrain(dw + dw_d, ("act_batch", *w_names))
        return dw, (sums_d, dh_dpce.astype(h_dpce.dtype))

    with_dw = with_grads and with_dw
    dw0 = constrain(jnp.zeros((d, *w.shape), jnp.float32), ("act_batch", *w_names)) if with_dw else None
    chunked = (_chunks(h_bte, n, d, c), tuple(_chunks(x, n, d, c) for x in xs))
    dw, (sums_nd, dh) = jax.lax.scan(chunk, dw0, chunked)
    sums = {k: jnp.sum(v) for k, v in sums_nd.items()}
    if not with_grads:
        return sums, None, None
    dh_bte = jnp.moveaxis(dh.reshape(n, b, c, e), 0, 1).reshape(b, n * c, e)[:, :t]
    return sums, dh_bte, jnp.sum(dw, axis=0).astype(w.dtype) if with_dw else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_sums(per_position, w_axes, c, h_bte, w, xs, consts):
    return _sums_scan(per_position, w_axes, c, False, h_bte, w, xs, consts)[0]


def _chunked_sums_fwd(per_position, w_axes, c, h_bte, w, xs, consts):
    """Primals come as ``CustomVJPPrimal`` (``symbolic_zeros``): an output weight that is not
    differentiated (a LoRA run's frozen embedding) gets no ``dw`` (a ``[vocab, embed]`` float32
    buffer per device and a third of the chunk loop's FLOPs), rather than leaving XLA to find it dead."""
    xs, consts = jax.tree.map(lambda x: x.value, (xs, consts))
    sums, dh_bte, dw = _sums_scan(per_position, w_axes, c, True, h_bte.value, w.value, xs, consts, w.perturbed)
    return sums, (dh_bte, dw)


def _chunked_sums_bwd(per_position, w_axes, c, residuals, cotangents):
    del per_position, w_axes, c
    dh_bte, dw = residuals
    g = cotangents["loss"]  # the other sums (counts, the loss's parts) are reported, not differentiated
    dw = None if dw is None else g.astype(dw.dtype) * dw
    return (g.astype(dh_bte.dtype) * dh_bte, dw, None, None)


_chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd, symbolic_zeros=True)


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
      loss_chunk_len: sequence positions per chunk of the logits' loss (cross-entropy or KD; 0 = unchunked).
      kd: distill from the teacher in ``frozen['teacher']`` (:func:`kd_loss_terms`), or None (SFT).
      teacher_graphdef: the teacher's graph definition (with ``kd``).
      on_policy: GKD (with ``kd``): with probability ``lambda_`` the batch's teacher turns are
        first replaced by the student's samples (:func:`imitax.train.gkd.sample_teacher_turns`).
    """
    if kd is None:
        loss_fn = functools.partial(loss_terms, graphdef, chunk_len=loss_chunk_len)
    else:
        loss_fn = functools.partial(
            kd_loss_terms, graphdef, kd=kd, teacher_graphdef=teacher_graphdef, chunk_len=loss_chunk_len
        )
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
