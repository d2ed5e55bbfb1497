"""Optimizers and learning-rate schedules, all through Optax.

``make_optimizer(cfg)`` reads an ``ml_collections`` / dataclass-like config with
fields ``name``, ``lr``, ``schedule``, ``warmup_steps`` (or ``warmup_fraction``), ``weight_decay``,
``b1``, ``b2``, ``clip_norm`` and returns ``(optax transformation, schedule)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "paper", "lion")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(lr: float, schedule: str, warmup_steps: int, total_steps: int, final_fraction: float = 0.0):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then constant, cosine or linear decay.

    The decays reach ``final_fraction * lr`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_fraction)
    else:
        after = optax.linear_schedule(lr, lr * final_fraction, decay_steps)
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """The run's warm-up steps: ``warmup_fraction`` of ``total_steps`` when set (> 0), else ``warmup_steps``.

    A fraction keeps short runs from ending inside their warm-up: the study's 1,000 steps at 32 x
    2,048 tokens a step take 65M tokens, more than most of its budgets hold.
    """
    fraction = float(getattr(cfg, "warmup_fraction", 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"optimizer.warmup_fraction must be in [0, 1), got {fraction}")
    if fraction > 0:
        return max(1, round(fraction * total_steps))
    return int(cfg.warmup_steps)


def decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices and embeddings, not on biases or norm scales.

    Decided by name, not by ``ndim``: stacked layer parameters give every bias
    and norm scale an extra leading ``layers`` dimension.
    """

    def decays(path, _):
        last = path[-1]
        name = str(getattr(last, "key", getattr(last, "name", last)))
        return name not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def _scheduled_decoupled_weight_decay(schedule: Callable, rate: float) -> optax.GradientTransformation:
    """``update -= schedule(step) * rate * param`` (decoupled, scaled by the learning rate).

    Optax's adafactor applies ``weight_decay_rate`` before its learning-rate
    scaling, which makes it scale-dependent; the study's reference code (EasyLM)
    added this learning-rate-scheduled decay after the optimizer instead. Only
    the decay term is scaled: chaining ``add_decayed_weights`` and
    ``scale_by_schedule`` would also multiply the incoming Adafactor update by
    ``-lr`` (flipping its sign).
    """

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the paper optimizer's weight decay needs the params in update()")
        factor = -rate * schedule(state.count)
        updates = jax.tree.map(lambda u, p: u + (factor * p).astype(u.dtype), updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_weight_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """``update *= max(rms(weight), min_scale)``, with each layer's weight its own block.

    Adafactor's ``multiply_by_parameter_scale``, except for the blocks: the model
    stacks all layers' weights of one kind into one array with a leading
    ``layers`` axis (``params['layers'][...]``), where Optax's version would take
    one RMS over every layer together. The study's code held one array per layer
    and scaled each by its own RMS, which is what this does.
    """

    def scale(path, p):
        stacked = str(getattr(path[0], "key", path[0])) == "layers"
        axes = tuple(range(1, p.ndim)) if stacked else None
        return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p), axis=axes, keepdims=stacked)), min_scale)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the paper optimizer's parameter scaling needs the params in update()")
        scales = jax.tree_util.tree_map_with_path(scale, params)
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``, with the clipping applied as one factor per step.

    optax clips each gradient as ``(g / norm) * max_norm``. XLA counts an elementwise division as
    expensive and does not repeat it inside each of its consumers (Adam's two moments), so it writes
    a clipped copy of every gradient, one more pass over them (the LLaMA-1B shape's compiled train
    step at 2x512 tokens: 8.69 GiB of temporaries, 8.45 without the copy). Multiplying by
    ``max_norm / norm``, computed once, fuses into the moments' updates instead. Unclipped steps are
    bit-identical to optax's (a factor of exactly 1); clipped ones differ by at most one rounding
    per element.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.ClipByGlobalNormState(), update_fn)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer named by ``cfg.name`` and its learning-rate schedule.

    - ``adamw``: Adam with decoupled weight decay, global-norm clipping.
    - ``paper``: the study's optimizer, as its reference code built it: global-norm
      clipping, then unfactored Adafactor with momentum ``b1``, ``decay_rate=b2``
      (Optax reads it as the exponent of the second-moment decay schedule
      ``1 - t^-b2``, as EasyLM passed it) and ``multiply_by_parameter_scale``
      (updates scaled by each weight's RMS, each layer's on its own: "AdamW with
      gradients re-scaled by the magnitude of each weight"), then
      learning-rate-scheduled decoupled decay.
    - ``lion``: Lion with decoupled weight decay, global-norm clipping.
    """
    name = cfg.name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    schedule = make_schedule(
        cfg.lr, cfg.schedule, warmup_steps(cfg, total_steps), total_steps, getattr(cfg, "final_lr_fraction", 0.0)
    )
    clip = clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    mu_dtype = jnp.dtype(getattr(cfg, "mu_dtype", "float32"))
    if name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=getattr(cfg, "eps", 1e-8),
            mu_dtype=mu_dtype,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    elif name == "lion":
        opt = optax.lion(
            schedule, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    else:
        # optax.adafactor(learning_rate=schedule, multiply_by_parameter_scale=True, momentum=b1,
        # decay_rate=b2, factored=False, clipping_threshold=None), spelled out to scale by each
        # layer's weight RMS (see _scale_by_weight_rms).
        opt = optax.chain(
            optax.scale_by_factored_rms(factored=False, decay_rate=cfg.b2),
            optax.scale_by_learning_rate(schedule, flip_sign=False),
            _scale_by_weight_rms(),
            optax.ema(cfg.b1, debias=False, accumulator_dtype=mu_dtype),
            optax.scale(-1.0),
            optax.masked(_scheduled_decoupled_weight_decay(schedule, cfg.weight_decay), decay_mask),
        )
    return optax.chain(clip, opt), schedule
