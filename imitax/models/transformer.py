"""The decoder-only transformer that runs every supported family.

Layer parameters are always stacked along a leading ``layers`` axis (created
with ``nnx.vmap``), so checkpoints and conversion see one layout whether the
forward pass scans over the layers (``scan_layers=True``, one compiled layer)
or unrolls them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imitax.models import layers
from imitax.models.config import TransformerConfig
from imitax.models.layers import MLP, Attention, Norm, _param
from imitax.sharding import constrain

Cache = dict[str, Any]


_KV_AXES = ("layers", "act_batch", "act_kv_heads", None, None)


def constrain_cache(cache: Cache) -> Cache:
    """Pins a KV cache (:meth:`Transformer.init_cache`'s layout) to its logical sharding inside jit.

    A decoding cache's per-layer arrays (:meth:`Transformer.init_decoding_cache`) live on one
    device and are left as they are.
    """
    stacked = not isinstance(cache["k"], tuple)
    return {
        **cache,
        "k": constrain(cache["k"], _KV_AXES) if stacked else cache["k"],
        "v": constrain(cache["v"], _KV_AXES) if stacked else cache["v"],
        "segment_ids": constrain(cache["segment_ids"], ("act_batch", None)),
        "positions": constrain(cache["positions"], ("act_batch", None)),
    }


_NO_WINDOW = 2**30

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """One pre-norm decoder layer (sequential or GPT-NeoX parallel residual)."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.parallel_residual = cfg.parallel_residual

    def __call__(
        self,
        x_bte,
        positions_bt,
        mask_bts,
        scale,
        kv_cache=None,
        cache_index=None,
        causal=False,
        *,
        dropout_rates=(0.0, 0.0),
        rng_b=None,
        segment_ids_bt=None,
        window=None,
    ):
        """One layer; ``dropout_rates`` are (attention probabilities, residual branches).

        Residual dropout applies to the attention and the MLP outputs before they
        join the residual stream, as GPT-2's ``resid_pdrop`` and GPT-NeoX's
        ``hidden_dropout`` do; ``rng_b`` (one key per row, or ``None`` for no
        dropout) is this layer's own.
        """
        attn_rate, resid_rate = dropout_rates
        attn_bte, kv_cache = self.attn(
            self.attn_norm(x_bte),
            positions_bt,
            mask_bts,
            scale,
            kv_cache,
            cache_index,
            causal,
            dropout_rate=attn_rate,
            rng_b=layers.fold_in(rng_b, layers.ATTN_PROBS),
            segment_ids_bt=segment_ids_bt,
            window=window,
            lora_rng_b=layers.fold_in(rng_b, layers.LORA_ATTN),
        )
        attn_bte = layers.dropout(attn_bte, resid_rate, layers.fold_in(rng_b, layers.ATTN_OUT))
        if self.parallel_residual:
            mlp_bte = self.mlp(self.mlp_norm(x_bte), layers.fold_in(rng_b, layers.LORA_MLP))
            x_bte = x_bte + attn_bte + layers.dropout(mlp_bte, resid_rate, layers.fold_in(rng_b, layers.MLP_OUT))
        else:
            x_bte = x_bte + attn_bte
            mlp_bte = self.mlp(self.mlp_norm(x_bte), layers.fold_in(rng_b, layers.LORA_MLP))
            x_bte = x_bte + layers.dropout(mlp_bte, resid_rate, layers.fold_in(rng_b, layers.MLP_OUT))
        return constrain(x_bte, ("act_batch", "act_len", "act_embed")), kv_cache


class Transformer(nnx.Module):
    """A decoder-only language model described by a :class:`TransformerConfig`.

    Call it as ``model(tokens_bt, positions=..., segment_ids=...)`` for logits;
    ``model.extend(tokens_bt, cache, ...)`` runs the same network against a KV
    cache (prefill and decode). Segment ids mark packed examples: a token
    attends only to earlier tokens of its own segment, and segment 0 is padding.

    Dropout (the config's ``*_dropout`` rates) is applied only when a
    ``dropout_rng`` is passed (training); without one the model is deterministic.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = cfg.param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), ("positions", "embed"), pdt)
        else:
            self.pos_embed = None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(r: nnx.Rngs) -> Block:
            return Block(cfg, r)

        self.layers = make_layers(rngs)
        for _, v in nnx.iter_graph(self.layers):
            if isinstance(v, nnx.Variable) and v.has_metadata("axes"):
                v.set_metadata(axes=("layers",) + tuple(v.get_metadata("axes")))
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
        )

    # -- public API --------------------------------------------------------------

    def __call__(self, tokens_bt, positions=None, segment_ids=None, *, dropout_rng=None) -> jax.Array:
        """Float32 logits ``[batch, length, vocab]`` (``dropout_rng``: see :meth:`hidden`)."""
        h_bte, _ = self.hidden(tokens_bt, positions, segment_ids, dropout_rng=dropout_rng)
        return self.logits(h_bte)

    def extend(
        self,
        tokens_bt,
        cache: Cache,
        positions=None,
        segment_ids=None,
        *,
        layer_params: tuple | None = None,
        head: tuple[jax.Array, str] | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Appends ``tokens_bt`` to ``cache``; returns their logits and the new cache.

        ``layer_params``: see :meth:`hidden`; ``head``: :meth:`decoding_head`'s output weight
        (None: :meth:`output_weight`).
        """
        h_bte, cache = self.hidden(tokens_bt, positions, segment_ids, cache, layer_params=layer_params)
        return project(h_bte, *(head or self.output_weight())), cache

    def decoding_layers(self) -> tuple | None:
        """What a decoding loop passes as every step's ``layer_params`` (see :meth:`hidden`), computed once.

        The model keeps its layers stacked (``[layers, ...]`` arrays, scanned over). A loop over
        them reads layer ``i`` with a slice, and XLA's CPU backend copies that slice into a
        buffer of its own before each matmul reads it: decoding one token then moves every layer
        weight three times (read, write, read) instead of once, and decoding is bound by exactly
        that traffic (GPT-2-124M at batch 1: 64 tokens took 2.6x longer). On the CPU this returns
        each layer's parameters as arrays of their own (one copy of the layers' weights, made
        once, outside the loop); elsewhere None (the stack is read as it is: on an accelerator
        the copy would double the weights' memory, and it has not been measured there).
        """
        if jax.default_backend() != "cpu":
            return None
        _, state = nnx.split(self.layers)
        return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.cfg.num_layers))

    def decoding_head(self) -> tuple[jax.Array, str]:
        """The output weight a decoding loop passes to :meth:`extend` as ``head``, computed once.

        A tied output layer is the ``[vocab, embed]`` embedding, contracted over its minor
        axis. On the CPU that matmul at a few rows runs slower than one with the weight laid
        out ``[embed, vocab]`` (GPT-2-124M at 8 rows: 8.2 against 5.6 ms, about equal at one
        row), so there this returns a transposed copy of it (one more copy of the embedding,
        made once, outside the loop); otherwise :meth:`output_weight`.
        """
        w, w_axes = self.output_weight()
        if jax.default_backend() != "cpu" or w_axes == "ev":
            return w, w_axes
        return w.T, "ev"

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> Cache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens.

        Keys and values are ``[layers, batch, kv_heads, max_length, head_dim]``:
        stacked over the layers, so the layer loop carries them and writes each
        layer's new slots in place; slots inside heads, so that attention's dots
        read a layer's cache (batch and kv heads their batch dimensions) without
        transposing it first. ``segment_ids`` and ``positions`` (``[batch,
        max_length]``) describe the slots, ``index`` is the next free slot.
        """
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        return _empty_cache(lambda: jnp.zeros(shape, dtype or cfg.dtype), batch_size, max_length)

    def init_decoding_cache(self, batch_size: int, max_length: int, dtype=None) -> Cache:
        """The empty KV cache a decoding loop carries: on one CPU device, one key and one value array per layer.

        Like :meth:`init_cache`, but on a single CPU device ``k`` and ``v`` are tuples of
        ``[batch * kv_heads, max_length, head_dim]`` arrays, one per layer, which :meth:`hidden`
        runs through its layers unrolled and attention reads whole. A layer's part of the stacked
        arrays is a slice, and XLA's CPU backend copies a slice into a buffer of its own before a
        matmul reads it: every decoded token moved the filled cache twice more (GPT-2-124M at
        batch 8 and 192 slots: 6.6 of 37.3 ms a step). Batch and KV heads are merged for the
        reason :func:`layers._attend_merged` gives. Elsewhere (an accelerator, a mesh of several
        devices) the stacked cache, as it is.
        """
        if jax.default_backend() != "cpu" or jax.sharding.get_abstract_mesh().size > 1:
            return self.init_cache(batch_size, max_length, dtype)
        cfg = self.cfg
        shape = (batch_size * cfg.num_kv_heads, max_length, cfg.head_dim)
        per_layer = lambda: tuple(jnp.zeros(shape, dtype or cfg.dtype) for _ in range(cfg.num_layers))
        return _empty_cache(per_layer, batch_size, max_length)

    def output_weight(self) -> tuple[jax.Array, str]:
        """The output projection and its einsum string: ``(embed [v, e], 've')`` if tied, else ``(lm_head, 'ev')``."""
        if self.lm_head is None:
            return self.embed[...], "ve"
        return self.lm_head[...], "ev"

    def logits(self, h_bte) -> jax.Array:
        """Projects final hidden states onto the vocabulary (float32)."""
        return project(h_bte, *self.output_weight())

    def hidden(
        self,
        tokens_bt,
        positions=None,
        segment_ids=None,
        cache: Cache | None = None,
        *,
        dropout_rng=None,
        layer_params=None,
    ):
        """Final-norm hidden states ``[batch, length, embed]`` and the updated cache.

        Args:
          tokens_bt, positions, segment_ids: the tokens, their positions (default
            ``0..t-1`` after the cache) and segment ids (default all 1).
          cache: a KV cache from :meth:`init_cache` or :meth:`init_decoding_cache` to extend, or ``None``.
          dropout_rng: ``None`` (deterministic: evaluation, scoring, generation),
            a typed PRNG key, or one key per row (``[batch]``; the train step
            derives them from the global row index, so a row's masks do not
            depend on micro-batching). Each layer and each site draws its own mask.
          layer_params: the layers' parameters from :meth:`decoding_layers` (the same values as
            the model's own), to run the layers unrolled on them instead of slicing the stack; None:
            the stack.
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        start = 0 if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        # Keys: this call's tokens, or the whole cache with them written in.
        if cache is None:
            k_seg_bs, k_pos_bs, k_slot = segment_ids, positions, jnp.arange(t)
        else:
            k_seg_bs = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))
            k_pos_bs = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, start))
            k_slot = jnp.arange(k_seg_bs.shape[1])
        q_slot = start + jnp.arange(t)
        mask_bts = (
            (segment_ids[:, :, None] == k_seg_bs[:, None, :])
            & (k_seg_bs[:, None, :] != 0)
            & (k_slot[None, None, :] <= q_slot[None, :, None])
        )
        distance_bts = positions[:, :, None] - k_pos_bs[:, None, :]

        rng_b = _row_keys(dropout_rng, b)
        x_bte = jnp.take(self.embed[...], tokens_bt, axis=0).astype(cfg.dtype)
        if self.pos_embed is not None:
            x_bte = x_bte + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.dtype)
        # Embedding dropout draws from the row keys themselves; layer i from fold_in(row key, i + 1).
        x_bte = layers.dropout(x_bte, cfg.embed_dropout, rng_b)
        x_bte = constrain(x_bte, ("act_batch", "act_len", "act_embed"))

        windows = jnp.asarray([w or _NO_WINDOW for w in cfg.layer_windows()], jnp.int32)
        scales = jnp.asarray(
            [1 / math.sqrt(cfg.head_dim) / ((i + 1) if cfg.scale_attn_by_layer else 1) for i in range(cfg.num_layers)],
            jnp.float32,
        )
        graphdef, layer_state = nnx.split(self.layers)
        rates = (cfg.attention_dropout, cfg.residual_dropout)
        # [layers, b] keys: scanned over like the layer parameters, so each layer draws its own masks.
        layer_rng = None
        if rng_b is not None:
            layer_rng = jax.vmap(lambda i: layers.fold_in(rng_b, i + 1))(jnp.arange(cfg.num_layers))

        # The carry: the activations, and the whole stacked cache when there is
        # one. Each layer writes its new keys and values into the carried cache
        # in place (dynamic_update_slice at its layer index); scanning over the
        # cache as xs and stacking per-layer outputs would instead build a new
        # cache every call (a zero-filled buffer, each layer's copy written
        # into it, then copied into the loop carry).
        def layer(carry, xs):
            state, window, scale, rng, index = xs
            x_bte, kv = (carry, None) if cache is None else (carry[0], (*carry[1:], index))
            mask = mask_bts & (distance_bts < window)
            # Without a cache the keys are these tokens and the mask is causal by construction.
            x_bte, kv = nnx.merge(graphdef, state)(
                x_bte,
                positions,
                mask,
                scale,
                kv,
                start,
                causal=cache is None,
                dropout_rates=rates,
                rng_b=rng,
                segment_ids_bt=segment_ids,
                window=window,
            )
            if kv is None:
                return x_bte, None
            if index is None:  # a decoding cache's own arrays (one device: nothing to pin)
                return (x_bte, *kv[:2]), None
            return (x_bte, constrain(kv[0], _KV_AXES), constrain(kv[1], _KV_AXES)), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        xs = (layer_state, windows, scales, layer_rng, jnp.arange(cfg.num_layers, dtype=jnp.int32))

        def layer_xs(i: int) -> tuple:
            """Layer ``i``'s slice of ``xs``, its parameters from ``layer_params`` when given."""
            params = jax.tree.map(lambda a: a[i], xs[0]) if layer_params is None else layer_params[i]
            return (params, *jax.tree.map(lambda a: a[i], xs[1:]))

        if cache is not None and isinstance(cache["k"], tuple):
            # A decoding cache: unrolled, each layer reads and writes its own arrays (index None).
            ks, vs = list(cache["k"]), list(cache["v"])
            for i in range(cfg.num_layers):
                (x_bte, ks[i], vs[i]), _ = layer((x_bte, ks[i], vs[i]), (*layer_xs(i)[:-1], None))
            carry = (x_bte, tuple(ks), tuple(vs))
        else:
            carry = x_bte
            if cache is not None:
                carry = (x_bte, constrain(cache["k"], _KV_AXES), constrain(cache["v"], _KV_AXES))
            if cfg.scan_layers and layer_params is None:
                carry, _ = jax.lax.scan(layer, carry, xs)
            else:
                for i in range(cfg.num_layers):
                    carry, _ = layer(carry, layer_xs(i))
        x_bte = carry if cache is None else carry[0]

        h_bte = self.final_norm(x_bte)
        if cache is not None:
            cache = {
                "k": carry[1],
                "v": carry[2],
                "segment_ids": k_seg_bs,
                "positions": k_pos_bs,
                "index": start + t,
            }
        return h_bte, cache


def _empty_cache(new_kv, batch_size: int, max_length: int) -> Cache:
    """A KV cache of fresh keys and values (``new_kv()``, called for each) and empty slot records."""
    return {
        "k": new_kv(),
        "v": new_kv(),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "positions": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def project(h_bte: jax.Array, w: jax.Array, w_axes: str) -> jax.Array:
    """Float32 logits ``h @ w`` for an output weight laid out as ``w_axes`` (``'ve'`` or ``'ev'``)."""
    out = jnp.einsum(f"bte,{w_axes}->btv", h_bte, w.astype(h_bte.dtype), preferred_element_type=jnp.float32)
    return constrain(out, ("act_batch", "act_len", "act_vocab"))


def _row_keys(dropout_rng: jax.Array | None, batch: int) -> jax.Array | None:
    """One typed key per row: ``fold_in(key, row)`` of a single key, or the given ``[batch]`` keys."""
    if dropout_rng is None:
        return None
    if not jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
        raise TypeError("dropout_rng must be a typed PRNG key (jax.random.key), not raw key data")
    if dropout_rng.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(dropout_rng, jnp.arange(batch))
    if dropout_rng.shape != (batch,):
        raise ValueError(f"dropout_rng must be one key or one key per row ({batch}), got shape {dropout_rng.shape}")
    return dropout_rng
