"""Batched autoregressive generation with the KV cache: greedy, or sampled with temperature, top-k and top-p.

>>> new_tokens = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, eos_token_id=2)

Prompts are left-padded to one length so that every row's last prompt token sits
in the same cache slot; pad slots get segment id 0 (nothing attends to them) and
real tokens get positions ``0..n-1`` per row, so a row's numbers do not depend on
what it was batched with (greedy decoding is batch-invariant up to float
rounding). One jitted prefill fills the cache and returns the last prompt
slot's logits (it does not depend on the sampling settings, so greedy and
sampled runs share it); one jitted ``lax.while_loop`` picks every new token and
exits as soon as every row has finished. Prompt and cache lengths are rounded
up to ``bucket`` and the temperature, top-k, top-p and ``max_new_tokens`` are
traced values, so batches of similar lengths reuse the compiled programs; the
model's graph is a static argument of module-level jitted functions, so a
second call with the same model and shapes does not trace again.

The filters (:func:`top_k_filter`, :func:`top_p_filter`) are small pure
functions over ``[batch, vocab]`` logits, applied in the order transformers
applies them: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from imitax import sharding
from imitax.models import Transformer
from imitax.models.transformer import constrain_cache

__all__ = ["generate", "sample_logits", "top_k_filter", "top_p_filter"]


# -- sampling: pure functions over [batch, vocab] logits ----------------------------


def top_k_filter(logits_bv: jax.Array, k: int | jax.Array) -> jax.Array:
    """Sets every logit below the ``k``-th largest of its row to ``-inf``.

    Ties with the ``k``-th largest are kept (as transformers'
    ``TopKLogitsWarper`` does). ``k <= 0`` or ``k >= vocab`` keeps everything;
    ``k`` may be a traced scalar.
    """
    vocab = logits_bv.shape[-1]
    k = jnp.asarray(k, jnp.int32)
    sorted_bv = jnp.flip(jnp.sort(logits_bv, axis=-1), axis=-1)
    kth_b1 = jnp.take(sorted_bv, jnp.clip(k, 1, vocab) - 1, axis=-1)[..., None]
    keep_bv = (logits_bv >= kth_b1) | (k <= 0)
    return jnp.where(keep_bv, logits_bv, -jnp.inf)


def top_p_filter(logits_bv: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filtering: keeps the most likely tokens whose probabilities first reach ``p``.

    A token survives when the total probability of the tokens strictly more
    likely than it is below ``p``, so the most likely token always survives and
    the kept set is the smallest one with mass ``>= p``. Tokens tied with the
    least likely survivor survive too. ``p >= 1`` keeps everything (exactly, not
    up to rounding of the cumulative sum); ``p`` may be a traced scalar.
    """
    p = jnp.asarray(p, jnp.float32)
    sorted_bv = jnp.flip(jnp.sort(logits_bv, axis=-1), axis=-1)
    probs_bv = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_sorted_bv = mass_before_bv < p
    # The smallest surviving logit is the row's threshold.
    threshold_b1 = jnp.min(jnp.where(keep_sorted_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    keep_bv = (logits_bv >= threshold_b1) | (p >= 1.0)
    return jnp.where(keep_bv, logits_bv, -jnp.inf)


def sample_logits(key: jax.Array, logits_bv: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Draws one token per row after temperature scaling, top-k and top-p filtering."""
    logits_bv = logits_bv.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    logits_bv = top_p_filter(top_k_filter(logits_bv, top_k), top_p)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _next_token(key, logits_bv, sampling, greedy: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return sample_logits(key, logits_bv, *sampling)


# -- the two compiled programs -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens_bt, positions_bt, segment_ids_bt, *, cache_len):
    """Runs the (left-padded) prompts into a fresh cache; returns the last slot's logits and the cache."""
    model = nnx.merge(graphdef, state)
    cache = constrain_cache(model.init_decoding_cache(tokens_bt.shape[0], cache_len))
    h_bte, cache = model.hidden(tokens_bt, positions_bt, segment_ids_bt, cache)
    # Only the last slot's logits are needed: never project the whole prompt onto the vocabulary.
    return model.logits(h_bte[:, -1:])[:, 0], constrain_cache(cache)


# The cache (argument 3) is donated: the loop then updates the caller's buffer in
# place (it comes back as an output that aliases it) instead of copying it first.
@functools.partial(jax.jit, static_argnames=("graphdef", "num_out", "greedy"), donate_argnums=(3,))
def _decode(
    graphdef,
    state,
    logits_bv,
    cache,
    positions_b,
    real_b,
    sampling,
    key,
    max_new_tokens,
    eos_ids,
    pad_id,
    *,
    num_out,
    greedy,
):
    """Decodes up to ``max_new_tokens`` tokens, the first one from the prefill's ``logits_bv``.

    Returns:
      ``(tokens [batch, num_out], steps, cache)``: the tokens (padding after a
      row's eos), how many were decoded before every row had finished, and the
      final cache (returned so that the donated one is updated in place).
    """
    model = nnx.merge(graphdef, state)
    layer_params = model.decoding_layers()  # on the CPU: copied once here, not sliced out at every token
    head = model.decoding_head()  # on the CPU: a tied embedding transposed once here
    first_b = _next_token(jax.random.fold_in(key, 0), logits_bv, sampling, greedy)
    batch = first_b.shape[0]
    ones_b1 = jnp.ones((batch, 1), jnp.int32)
    out_bn = jnp.full((batch, num_out), pad_id, jnp.int32).at[:, 0].set(first_b)
    # Dummy rows (padding the batch to the mesh) count as finished, or they would keep the loop alive.
    done_b = jnp.isin(first_b, eos_ids) | ~real_b

    def cond(carry):
        step, _, _, _, done_b, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        step, token_b, cache, positions_b, done_b, out_bn = carry
        logits_b1v, cache = model.extend(
            token_b[:, None], cache, positions_b[:, None], ones_b1, layer_params=layer_params, head=head
        )
        token_b = _next_token(jax.random.fold_in(key, step), logits_b1v[:, 0], sampling, greedy)
        # Finished rows keep running (the batch moves together) but emit padding.
        token_b = jnp.where(done_b, pad_id, token_b)
        out_bn = jax.lax.dynamic_update_slice(out_bn, token_b[:, None], (0, step))
        done_b = done_b | jnp.isin(token_b, eos_ids)
        return step + 1, token_b, constrain_cache(cache), positions_b + 1, done_b, out_bn

    carry = (jnp.int32(1), first_b, constrain_cache(cache), positions_b, done_b, out_bn)
    steps, _, cache, _, _, out_bn = jax.lax.while_loop(cond, body, carry)
    return out_bn, steps, cache


# -- the entry point ----------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    bucket: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: the language model.
      prompts: token ids, one non-empty list per row (any lengths).
      max_new_tokens: how many tokens to add at most.
      temperature: 0 decodes greedily (``top_k`` and ``top_p`` are then
        ignored); above 0 samples from ``softmax(logits / temperature)``.
      top_k: sample only among the ``top_k`` most likely tokens (0 = all).
      top_p: sample only from the smallest set of most likely tokens whose
        probability reaches ``top_p`` (1.0 = all).
      eos_token_id: one id or several; a row stops after emitting one of them.
      pad_token_id: the id written into padding slots (never returned).
      seed: the random seed; the same seed and prompts give the same samples.
      bucket: prompt and cache lengths are rounded up to a multiple of this, so
        batches of similar lengths share compiled programs.
      mesh: shard the batch over this mesh's ``data`` and ``fsdp`` axes
        (default: the mesh set with ``jax.set_mesh``, if any; the model's
        parameters should already live on it).

    Returns:
      The new tokens of each row (the prompt excluded), ending with the eos
      token where one was produced.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompts = [list(map(int, p)) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    cfg = model.cfg
    if not all(0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    longest = max(map(len, prompts))
    # Before anything compiles: a learned-position model has no embedding past its
    # table (refused), a RoPE model was not trained there (a warning).
    cfg.check_length(
        longest + max_new_tokens,
        what=f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}):",
        fix="len(longest prompt) + max_new_tokens",
    )
    if mesh is None and not jax.sharding.get_mesh().empty:
        mesh = jax.sharding.get_mesh()

    # Left padding; the batch is padded with 1-token dummy rows to fill the batch shards.
    shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    batch = _round_up(len(prompts), shards)
    prompt_len = _round_up(longest, bucket)
    cache_len = _round_up(prompt_len + max_new_tokens, bucket)
    tokens_bt = np.full((batch, prompt_len), pad_token_id, np.int32)
    positions_bt = np.zeros((batch, prompt_len), np.int32)
    segment_ids_bt = np.zeros((batch, prompt_len), np.int32)
    lengths_b = np.ones((batch,), np.int32)
    real_b = np.arange(batch) < len(prompts)
    for i, prompt in enumerate(prompts + [[pad_token_id]] * (batch - len(prompts))):
        n = len(prompt)
        tokens_bt[i, prompt_len - n :] = prompt
        positions_bt[i, prompt_len - n :] = np.arange(n)
        segment_ids_bt[i, prompt_len - n :] = 1
        lengths_b[i] = n
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    # Padded with -1 (no token) to a multiple of 4, so the compiled program rarely depends on it.
    eos_ids = np.full((_round_up(max(len(eos), 1), 4),), -1, np.int32)
    eos_ids[: len(eos)] = eos

    greedy = temperature == 0.0
    sampling = (np.float32(temperature or 1.0), np.int32(top_k), np.float32(top_p))
    key = jax.random.key(seed)
    graphdef, state = nnx.split(model)
    if mesh is not None:
        put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh, 2))
        tokens_bt, positions_bt, segment_ids_bt = put(tokens_bt), put(positions_bt), put(segment_ids_bt)
        lengths_b, real_b = (jax.device_put(a, sharding.batch_sharding(mesh, 1)) for a in (lengths_b, real_b))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        logits_bv, cache = _prefill(graphdef, state, tokens_bt, positions_bt, segment_ids_bt, cache_len=cache_len)
        out_bn, _, _ = _decode(
            graphdef,
            state,
            logits_bv,
            cache,
            lengths_b,
            real_b,
            sampling,
            key,
            np.int32(max_new_tokens),
            eos_ids,
            np.int32(pad_token_id),
            num_out=cache_len - prompt_len,
            greedy=greedy,
        )
    if not out_bn.is_fully_addressable:  # multi-host: every process gets every row
        out_bn = multihost_utils.process_allgather(out_bn, tiled=True)
    out_bn = np.asarray(jax.device_get(out_bn))[: len(prompts), :max_new_tokens]

    results = []
    for row in out_bn.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        results.append(row if stop is None else row[: stop + 1])
    return results
