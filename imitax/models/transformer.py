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

from imitax.models.config import TransformerConfig
from imitax.models.layers import MLP, Attention, Norm, _param
from imitax.sharding import constrain

Cache = dict[str, Any]
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

    def __call__(self, x_bte, positions_bt, mask_bts, scale, kv_cache=None, cache_index=None, causal=False):
        attn_bte, kv_cache = self.attn(
            self.attn_norm(x_bte), positions_bt, mask_bts, scale, kv_cache, cache_index, causal
        )
        if self.parallel_residual:
            x_bte = x_bte + attn_bte + self.mlp(self.mlp_norm(x_bte))
        else:
            x_bte = x_bte + attn_bte
            x_bte = x_bte + self.mlp(self.mlp_norm(x_bte))
        return constrain(x_bte, ("act_batch", "act_len", "act_embed")), kv_cache


class Transformer(nnx.Module):
    """A decoder-only language model described by a :class:`TransformerConfig`.

    Call it as ``model(tokens_bt, positions=..., segment_ids=...)`` for logits;
    ``model.extend(tokens_bt, cache, ...)`` runs the same network against a KV
    cache (prefill and decode). Segment ids mark packed examples: a token
    attends only to earlier tokens of its own segment, and segment 0 is padding.
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

    def __call__(self, tokens_bt, positions=None, segment_ids=None) -> jax.Array:
        """Float32 logits ``[batch, length, vocab]``."""
        h_bte, _ = self.hidden(tokens_bt, positions, segment_ids)
        return self.logits(h_bte)

    def extend(self, tokens_bt, cache: Cache, positions=None, segment_ids=None) -> tuple[jax.Array, Cache]:
        """Appends ``tokens_bt`` to ``cache``; returns their logits and the new cache."""
        h_bte, cache = self.hidden(tokens_bt, positions, segment_ids, cache)
        return self.logits(h_bte), cache

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> Cache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.dtype
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
            "positions": jnp.zeros((batch_size, max_length), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def logits(self, h_bte) -> jax.Array:
        """Projects final hidden states onto the vocabulary (float32)."""
        if self.lm_head is None:
            w = self.embed[...].astype(h_bte.dtype)
            out = jnp.einsum("bte,ve->btv", h_bte, w, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head[...].astype(h_bte.dtype)
            out = jnp.einsum("bte,ev->btv", h_bte, w, preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_len", "act_vocab"))

    def hidden(self, tokens_bt, positions=None, segment_ids=None, cache: Cache | None = None):
        """Final-norm hidden states ``[batch, length, embed]`` and the updated cache."""
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

        x_bte = jnp.take(self.embed[...], tokens_bt, axis=0).astype(cfg.dtype)
        if self.pos_embed is not None:
            x_bte = x_bte + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.dtype)
        x_bte = constrain(x_bte, ("act_batch", "act_len", "act_embed"))

        windows = jnp.asarray([w or _NO_WINDOW for w in cfg.layer_windows()], jnp.int32)
        scales = jnp.asarray(
            [1 / math.sqrt(cfg.head_dim) / ((i + 1) if cfg.scale_attn_by_layer else 1) for i in range(cfg.num_layers)],
            jnp.float32,
        )
        graphdef, layer_state = nnx.split(self.layers)

        def layer(x_bte, xs):
            state, window, scale, kv = xs
            mask = mask_bts & (distance_bts < window)
            # Without a cache the keys are these tokens and the mask is causal by construction.
            x_bte, kv = nnx.merge(graphdef, state)(x_bte, positions, mask, scale, kv, start, causal=cache is None)
            return x_bte, kv

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        kv = None if cache is None else (cache["k"], cache["v"])
        xs = (layer_state, windows, scales, kv)
        if cfg.scan_layers:
            x_bte, kv = jax.lax.scan(layer, x_bte, xs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                x_bte, kv_i = layer(x_bte, jax.tree.map(lambda a, i=i: a[i], xs))
                outs.append(kv_i)
            kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        h_bte = self.final_norm(x_bte)
        if cache is not None:
            cache = {
                "k": kv[0],
                "v": kv[1],
                "segment_ids": k_seg_bs,
                "positions": k_pos_bs,
                "index": start + t,
            }
        return h_bte, cache
