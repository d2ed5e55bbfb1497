"""Building blocks shared by every family: projections, norms, RoPE, attention, MLP.

Dimension letters used in names and einsum strings: b batch, t query length,
s key length, e embed, h query heads, k kv heads, g query heads per kv head,
d head dim, m mlp, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imitax.models.config import ATTENTION_IMPLS, TransformerConfig
from imitax.sharding import constrain

INIT_STD = 0.02


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = jax.random.normal(rngs.params(), shape, dtype) * INIT_STD
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(init)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


class Proj(nnx.Module):
    """A projection ``x . kernel + bias`` (the kernel's leading dims contracted) with logically named axes.

    Args:
      shape, axes: kernel shape and its logical names.
      out_ndim: how many trailing kernel dims are outputs (the bias shape).
      bias: whether to add a bias.
    """

    def __init__(
        self, shape: Sequence[int], axes: Sequence[str], *, out_ndim: int, bias: bool, param_dtype, rngs: nnx.Rngs
    ):
        self.kernel = _param(rngs, tuple(shape), axes, param_dtype)
        self.out_ndim = out_ndim
        self.bias = _param(rngs, tuple(shape[-out_ndim:]), axes[-out_ndim:], param_dtype, "zeros") if bias else None
        # Low-rank adapters, added by imitax.models.lora.add_adapters (None: a plain projection).
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.lora_scale = self.lora_dropout = 0.0

    def __call__(self, x: jax.Array, lora_rng_b: jax.Array | None = None) -> jax.Array:
        """Contracts ``x``'s trailing input dims with the kernel's leading ones, in order.

        ``tensordot``, not ``einsum``: ``einsum`` lists two contracted axes (the output
        projection's heads and head_dim) in the order its path search picks, head_dim first,
        and XLA then transposes the whole ``[heads, head_dim, embed]`` kernel at every call
        to match (a copy of the weight per layer and token when decoding).

        ``lora_rng_b``: one key per row for the adapters' input dropout (``None``: no dropout).
        """
        y = jnp.tensordot(x, self.kernel[...].astype(x.dtype), axes=self.kernel.ndim - self.out_ndim)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            # LoRA (Hu et al., 2021): y += scale * dropout(x) A B, A [*in, r], B [r, *out].
            x_in = dropout(x, self.lora_dropout, lora_rng_b)
            low = jnp.tensordot(x_in, self.lora_a[...].astype(x.dtype), axes=self.lora_a.ndim - 1)
            y = y + jnp.tensordot(low, self.lora_b[...].astype(x.dtype), axes=1) * jnp.asarray(self.lora_scale, x.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale), computed in float32."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        e = cfg.hidden_size
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _param(rngs, (e,), ("norm",), cfg.param_dtype, "ones")
        self.bias = _param(rngs, (e,), ("norm",), cfg.param_dtype, "zeros") if cfg.norm == "layernorm" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            # Like transformers' LlamaRMSNorm: cast back before the scale multiplies.
            return self.scale[...].astype(dtype) * x.astype(dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        x = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


def dropout(x: jax.Array, rate: float, rng_b: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeroes each entry with probability ``rate``, scales the rest by ``1 / (1 - rate)``.

    Written out (not ``nnx.Dropout``) because the keys are explicit: one per batch
    row, passed down through ``lax.scan`` and ``jax.checkpoint``, so that a row's
    mask depends only on its own key, whatever the micro-batching or sharding.

    Args:
      x: activations with the batch as the leading axis.
      rate: the drop probability, a Python float in ``[0, 1)``.
      rng_b: one typed PRNG key per row of ``x``, or ``None`` (then, or with
        ``rate == 0``, ``x`` is returned untouched).
    """
    if rng_b is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    keep_mask = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(rng_b)
    return jnp.where(keep_mask, x / keep, jnp.zeros((), x.dtype))


def fold_in(rng_b: jax.Array | None, data: int | jax.Array) -> jax.Array | None:
    """``jax.random.fold_in`` of every row's key (``None`` stays ``None``)."""
    if rng_b is None:
        return None
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng_b, data)


# Sub-keys of one layer's row keys, one per dropout site (LoRA's: of the attention and the MLP adapters).
ATTN_PROBS, ATTN_OUT, MLP_OUT, LORA_ATTN, LORA_MLP = 0, 1, 2, 3, 4


# Recomputed from its input in the backward pass: autodiff would otherwise keep the activation's
# elementwise intermediates, several [batch, length, mlp] arrays per layer (576 MiB of a GPT-2-124M
# step on 2 x 512 tokens in float32), to save a few elementwise operations.
@functools.partial(jax.checkpoint, static_argnums=(0,))
def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


# -- rotary position embeddings ----------------------------------------------------


def rope_inv_freq(cfg: TransformerConfig) -> np.ndarray:
    """Inverse frequencies of the rotary dims, with llama3 or linear scaling applied.

    The float32 values of transformers' ``modeling_rope_utils``, operation by
    operation, because the angle ``position * inv_freq`` multiplies any error
    in a frequency by the position: one ulp of a frequency near 0.66 turns
    the angle by 1.2e-4 radians at position 2,048, which moved a LLaMA's
    log-probabilities by 1.8e-3. Every step but one is a single float32
    division, product or difference, which IEEE rounding makes the same in
    NumPy and torch; the exception, ``theta ** exponent``, is computed in
    float64 and rounded once (the correctly rounded float32 power). NumPy's float32 power missed it by 1-2
    ulp for 7 of the 32 exponents of head_dim 64 and theta 5e5; torch's (SLEEF,
    under 1 ulp) agreed with it on about 99% of exponents in a sweep of head
    dims and thetas, and is itself not the same on every platform.

    Args:
      cfg: the model config (``rotary_dim``, ``rope_theta``, ``rope_scaling``).

    Returns:
      A float32 array of ``rotary_dim // 2`` inverse frequencies.
    """
    f32 = np.float32
    dim = cfg.rotary_dim
    exponent = np.arange(0, dim, 2).astype(f32) / f32(dim)
    # torch casts the Python base to the tensor's float32 before the power.
    power = (np.float64(f32(cfg.rope_theta)) ** exponent.astype(np.float64)).astype(f32)
    inv_freq = f32(1) / power
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / f32(scaling["factor"])
    elif kind == "llama3":
        factor, low = f32(scaling["factor"]), f32(scaling["low_freq_factor"])
        old_len = scaling["original_max_position_embeddings"]
        # Python scalars enter torch's float32 arithmetic as float32, after any
        # Python-level arithmetic between them.
        low_wavelen = f32(old_len / scaling["low_freq_factor"])
        high_wavelen = f32(old_len / scaling["high_freq_factor"])
        smooth_range = f32(scaling["high_freq_factor"] - scaling["low_freq_factor"])
        # torch evaluates ``scalar / tensor`` as ``reciprocal(tensor) * scalar``.
        wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = ((f32(1) / wavelen) * f32(old_len) - low) / smooth_range
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.astype(f32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: Sequence[float]) -> jax.Array:
    """Rotate-half RoPE on the first ``2 * len(inv_freq)`` dims of each head."""
    inv_freq = np.asarray(inv_freq, np.float32)
    rot = 2 * inv_freq.shape[0]
    # float32 angles, as transformers computes them (in its float64 models too).
    # XLA CPU's cos/sin of float32 angles up to 2**24 were within 3.3e-8 of
    # float64's (correctly rounded), so large positions need no range reduction here.
    freqs_btf = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb_btr = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    cos = jnp.cos(emb_btr)[:, :, None, :].astype(x_bthd.dtype)
    sin = jnp.sin(emb_btr)[:, :, None, :].astype(x_bthd.dtype)
    x_rot, x_pass = x_bthd[..., :rot], x_bthd[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


# -- attention -------------------------------------------------------------------


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with an optional KV cache."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Proj((e, h, d), ("embed", "heads", "head_dim"), out_ndim=2, bias=cfg.qkv_bias, **common)
        self.k_proj = Proj((e, k, d), ("embed", "kv_heads", "head_dim"), out_ndim=2, bias=cfg.qkv_bias, **common)
        self.v_proj = Proj((e, k, d), ("embed", "kv_heads", "head_dim"), out_ndim=2, bias=cfg.qkv_bias, **common)
        self.o_proj = Proj((h, d, e), ("heads", "head_dim", "embed"), out_ndim=1, bias=cfg.out_bias, **common)
        # A tuple, not an array: NNX keeps plain Python values as static structure.
        self.inv_freq = tuple(rope_inv_freq(cfg).tolist()) if cfg.position == "rope" else None
        self.num_kv_heads = k
        self.attention_impl = cfg.attention_impl
        # The distinct windows of all layers (None = unlimited), static: the
        # splash kernel's masks are built at trace time, one per window, and a
        # layer picks its own by its (traced) window.
        self.windows = tuple(sorted(set(cfg.layer_windows()), key=lambda w: -1 if w is None else w))

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
        dropout_rate=0.0,
        rng_b=None,
        segment_ids_bt=None,
        window=None,
        lora_rng_b=None,
    ):
        """Attends ``x`` to itself (and to the cached keys when ``kv_cache`` is given).

        Args:
          x_bte: input activations.
          positions_bt: position of each query token (for RoPE).
          mask_bts: which keys each query may attend to (s = t without a cache,
            s = cache length with one).
          scale: the softmax scale (a traced scalar: GPT-2 scales per layer).
          kv_cache: ``(k_lbksd, v_lbksd, layer)``: every layer's cached keys and
            values (``[layers, batch, kv_heads, cache length, head_dim]``, as
            the layer loop carries them) and this layer's index; or
            ``(k_nsd, v_nsd, None)``: this layer's own keys and values, batch and
            KV heads merged (a decoding cache, :meth:`Transformer.init_decoding_cache`); or None.
          cache_index: the cache slot of the first new token; the new keys and
            values are written there, and attention reads only the slots
            before ``cache_index + t`` (:func:`cached_attention`; a decoding
            cache's arrays are read whole, ``mask_bts`` hiding the later slots).
          causal: without a cache, the caller promises that ``mask_bts`` never lets
            token i see a token after it; this lets attention skip those logits.
          dropout_rate, rng_b: dropout on the attention probabilities (as
            GPT-2's ``attn_pdrop``, LLaMA's and GPT-NeoX's ``attention_dropout``)
            with one key per row; ``rng_b=None`` is deterministic.
          segment_ids_bt, window: the tokens' segment ids (0 = padding) and this
            layer's window (a traced int; the transformer passes 2**30 for none): what the
            splash kernel needs instead of ``mask_bts`` (which already has both).
          lora_rng_b: row keys for the projections' LoRA dropout (``None``: none).

        Returns:
          ``(out_bte, new_kv_cache)``.
        """
        q_bthd = self.q_proj(x_bte, fold_in(lora_rng_b, 0))
        k_btkd = self.k_proj(x_bte, fold_in(lora_rng_b, 1))
        v_btkd = self.v_proj(x_bte, fold_in(lora_rng_b, 2))
        q_bthd = constrain(q_bthd, ("act_batch", "act_len", "act_heads", None))
        k_btkd = constrain(k_btkd, ("act_batch", "act_len", "act_kv_heads", None))
        v_btkd = constrain(v_btkd, ("act_batch", "act_len", "act_kv_heads", None))
        o_rng_b = fold_in(lora_rng_b, 3)
        if self.inv_freq is not None:
            q_bthd = apply_rope(q_bthd, positions_bt, self.inv_freq)
            k_btkd = apply_rope(k_btkd, positions_bt, self.inv_freq)
        if kv_cache is not None and kv_cache[2] is None:
            k_nsd, v_nsd, _ = kv_cache  # this layer's own (a decoding cache), batch and KV heads merged
            b, t, k, d = k_btkd.shape
            at = (0, cache_index, 0)
            k_nsd, v_nsd = (
                jax.lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).reshape(b * k, t, d).astype(c.dtype), at)
                for c, x in ((k_nsd, k_btkd), (v_nsd, v_btkd))
            )
            out_bthd = _attend_merged(q_bthd, k_nsd, v_nsd, mask_bts, scale, dropout_rate, rng_b)
            return self.o_proj(out_bthd, o_rng_b), (k_nsd, v_nsd, None)
        if kv_cache is not None:
            k_lbksd, v_lbksd, layer = kv_cache
            # Written in place into the stacked cache the layer loop carries: a
            # decode step changes one slot per layer, nothing else is copied.
            at = (layer, 0, 0, cache_index, 0)
            k_1bktd, v_1bktd = (x.transpose(0, 2, 1, 3)[None] for x in (k_btkd, v_btkd))
            k_lbksd = jax.lax.dynamic_update_slice(k_lbksd, k_1bktd.astype(k_lbksd.dtype), at)
            v_lbksd = jax.lax.dynamic_update_slice(v_lbksd, v_1bktd.astype(v_lbksd.dtype), at)
            length = cache_index + x_bte.shape[1]
            out_bthd = cached_attention(
                q_bthd, k_lbksd, v_lbksd, layer, mask_bts, scale, length, dropout_rate=dropout_rate, rng_b=rng_b
            )
            return self.o_proj(out_bthd, o_rng_b), (k_lbksd, v_lbksd, layer)
        impl = resolve_attention_impl(
            self.attention_impl,
            dtype=q_bthd.dtype,
            head_dim=q_bthd.shape[-1],
            length=q_bthd.shape[1],
            dropout=dropout_rate > 0 and rng_b is not None,
        )
        if impl == "cudnn":
            out_bthd = jax_nn_attention(q_bthd, k_btkd, v_btkd, mask_bts, scale, causal=causal)
        elif impl == "splash":
            if not causal or segment_ids_bt is None:
                raise ValueError("splash attention needs causal self-attention with segment ids")
            out_bthd = splash_attention(
                q_bthd, k_btkd, v_btkd, segment_ids_bt, scale, window=window, windows=self.windows
            )
        else:
            out_bthd = dot_product_attention(
                q_bthd, k_btkd, v_btkd, mask_bts, scale, causal=causal, dropout_rate=dropout_rate, rng_b=rng_b
            )
        return self.o_proj(out_bthd, o_rng_b), None


# Query rows per block of causal attention. The masked logits and the softmax are
# passes over [b, h, t, s] float32 arrays; with the two batched dots they were
# about a quarter of GPT-2-124M's forward time at 512 tokens on CPU. Blocks skip
# the keys after each block's last row (37% of that work at t=512, 47% at 2048)
# and keep the arrays small (benchmarks/README.md has the measurements).
CAUSAL_BLOCK = 128


def dot_product_attention(q_bthd, k_bskd, v_bskd, mask_bts, scale, *, causal=False, dropout_rate=0.0, rng_b=None):
    """Softmax attention with grouped KV heads; logits and softmax in float32.

    With ``causal=True`` (keys are the queries' own tokens, ``s = t``, and
    ``mask_bts`` is False wherever key slot > query slot), queries go in blocks
    of :data:`CAUSAL_BLOCK` rows that each see only the keys up to their last
    row. The skipped logits are masked anyway, so every row that attends to at
    least one key gets the same result; a fully masked row (padding) averages
    the values of the keys its block sees instead of all of them.

    With ``rng_b`` (one key per row), the probabilities go through
    :func:`dropout` at ``dropout_rate``; each query block draws its own mask.
    """
    t = q_bthd.shape[1]
    if not causal or k_bskd.shape[1] != t or t <= CAUSAL_BLOCK:
        return _attend(q_bthd, k_bskd, v_bskd, mask_bts, scale, dropout_rate, rng_b)
    outs = []
    for i, start in enumerate(range(0, t, CAUSAL_BLOCK)):
        end = min(start + CAUSAL_BLOCK, t)
        q_block, mask_block = q_bthd[:, start:end], mask_bts[:, start:end, :end]
        outs.append(
            _attend(q_block, k_bskd[:, :end], v_bskd[:, :end], mask_block, scale, dropout_rate, fold_in(rng_b, i))
        )
    return jnp.concatenate(outs, axis=1)


def _attend(q_bthd, k_bskd, v_bskd, mask_bts, scale, dropout_rate=0.0, rng_b=None, kv="bskd"):
    """Softmax attention; ``kv`` names the key and value axes (``'bskd'``, or the cache's ``'bksd'``)."""
    b, t, h, d = q_bthd.shape
    k = k_bskd.shape[kv.index("k")]
    q_btkgd = q_bthd.reshape(b, t, k, h // k, d)
    logits = jnp.einsum(f"btkgd,{kv}->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
    logits = logits * scale
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
    probs = dropout(probs, dropout_rate, rng_b)
    out_btkgd = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v_bskd)
    return out_btkgd.reshape(b, t, h, v_bskd.shape[-1])


def _attend_merged(q_bthd, k_nsd, v_nsd, mask_bts, scale, dropout_rate=0.0, rng_b=None):
    """Softmax attention to one layer's decoding cache, whose keys and values merge batch and KV heads.

    The cache is ``[batch * kv_heads, slots, head_dim]`` (:meth:`Transformer.init_decoding_cache`),
    read whole. With batch and heads apart, XLA's CPU backend drops a batch of one from the
    dots' operands and fuses the cache's in-place update into that reshape, which copies every
    layer's whole cache at every token; merged, the dots read the updated array where it lies.
    """
    b, t, h, d = q_bthd.shape
    n, s = k_nsd.shape[:2]
    k = n // b
    g = h // k
    q_ncd = q_bthd.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(n, g * t, d)
    logits_ncs = jnp.einsum("ncd,nsd->ncs", q_ncd, k_nsd.astype(q_bthd.dtype), preferred_element_type=jnp.float32)
    logits = logits_ncs.reshape(b, k, g, t, s) * scale
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1).astype(q_bthd.dtype), dropout_rate, rng_b)
    out_ncd = jnp.einsum("ncs,nsd->ncd", probs.reshape(n, g * t, s), v_nsd.astype(q_bthd.dtype))
    return out_ncd.reshape(b, k, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# -- attention implementations (training and scoring: no KV cache) ----------------

# Query and key rows per splash kernel block (its default block sizes); 'auto'
# uses splash only for lengths that are a multiple of it.
SPLASH_BLOCK = 128

# How the cuDNN and splash paths run: 'cudnn' and compiled Mosaic kernels. Tests
# set them to 'xla' and True (jax.nn's reference implementation of the same
# call, the splash kernel in Pallas' interpreter) to run those paths' plumbing
# (masks, GQA, scaling, windows) on CPU.
_CUDNN_IMPLEMENTATION = "cudnn"
_SPLASH_INTERPRET = False


def _platform() -> str:
    """The backend being compiled for (a function, so that tests can stand in for a GPU or TPU)."""
    return jax.default_backend()


def _device_count() -> int:
    """Devices in use (a function, as :func:`_platform`)."""
    return jax.device_count()


def resolve_attention_impl(choice: str, *, dtype, head_dim: int, length: int, dropout: bool) -> str:
    """The attention implementation to run: ``'xla'``, ``'cudnn'`` or ``'splash'``.

    ``'auto'`` picks cuDNN flash attention on GPU when the inputs qualify
    (bfloat16 or float16, head dim a multiple of 8 and at most 128, which every
    cuDNN-capable GPU takes, up to 256 on Hopper; an even length, which cuDNN
    needs for a bias in training), the splash kernel on TPU when the length is a
    multiple of :data:`SPLASH_BLOCK` and there is one device, and
    :func:`dot_product_attention` (plain XLA, blocked over queries) otherwise,
    on CPU always.

    Attention dropout (``dropout=True``: a rate above 0 and row keys, i.e.
    training) always takes the XLA path, whatever the choice: jax.nn's cuDNN
    call has no dropout and the splash kernel none at all, and cuDNN's own
    dropout draws from its own seed, so a row's mask would no longer be a
    function of its row key (the same whatever the micro-batching or sharding).

    Args:
      choice: one of ``ATTENTION_IMPLS`` (the config's ``attention_impl``).
      dtype, head_dim, length: the queries' dtype, head dim and length.
      dropout: whether dropout is applied to the attention probabilities.

    Raises:
      ValueError: for ``'cudnn'`` off GPU or ``'splash'`` off TPU (naming the
        platform and the choices that run on it), or an unknown choice.
    """
    platform = _platform()
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {choice!r}")
    needs = {"cudnn": "gpu", "splash": "tpu"}
    if choice in needs and platform != needs[choice]:
        usable = ["auto", "xla"] + [name for name, plat in needs.items() if plat == platform]
        raise ValueError(
            f"attention_impl={choice!r} needs a {needs[choice].upper()}, but JAX is running on {platform!r}; "
            f"choose one of {tuple(usable)} here"
        )
    if dropout:
        return "xla"
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0:
        return "cudnn"
    # Over several devices the kernel would need a shard_map (XLA cannot split
    # a Mosaic call: it would gather every row onto each device); not written yet.
    if platform == "tpu" and length % SPLASH_BLOCK == 0 and _device_count() == 1:
        return "splash"
    return "xla"


def jax_nn_attention(q_bthd, k_bskd, v_bskd, mask_bts, scale, *, causal=True, implementation=None):
    """``jax.nn.dot_product_attention`` with cuDNN (``implementation``, default :data:`_CUDNN_IMPLEMENTATION`).

    GQA is native (``k`` heads dividing ``h``). The mask (segments, padding,
    windows, causality) goes in whole as ``[b, 1, t, s]``: cuDNN turns it into a
    bias broadcast over the heads, t * s elements of the compute dtype per row
    instead of the XLA path's float32 logits per head. ``is_causal`` lets cuDNN
    skip the blocks above the diagonal. The windows are in the mask only:
    cuDNN's ``local_window_size`` counts slots, the mask positions (the same
    only where positions go up by one per slot).

    cuDNN takes the scale as a compile-time attribute, but GPT-2 scales by layer
    (a traced scalar), so the scale multiplies the queries (in float32, rounded
    once to their dtype; exact for power-of-two scales as 1/sqrt(64)).
    """
    q_bthd = (q_bthd.astype(jnp.float32) * scale).astype(q_bthd.dtype)
    return jax.nn.dot_product_attention(
        q_bthd,
        k_bskd,
        v_bskd,
        mask=mask_bts[:, None],
        scale=1.0,
        is_causal=causal,
        implementation=implementation or _CUDNN_IMPLEMENTATION,
    )


def splash_attention(q_bthd, k_btkd, v_btkd, segment_ids_bt, scale, *, window=None, windows=(None,)):
    """Causal self-attention with the TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``).

    Splash takes static masks (built in NumPy at trace time; blocks that are
    all masked are skipped) and segment ids (a query sees keys of its own
    segment), not a dense mask. So this builds one kernel per distinct window
    of the model (``windows``, ``None`` = causal only; a window ``w`` keeps keys
    at most ``w - 1`` slots back, as ``distance < w`` does in positions) and
    runs the layer's own with ``lax.switch`` on ``window``. Segment ids stand
    for the mask's segment and padding terms: a real token never sees padding
    (segment 0); padding queries see padding keys, unlike the XLA path, where
    they see nothing; their outputs are ignored either way. Windows count
    slots, which equals positions where positions go up by one per slot within
    a segment (packing and left padding keep that).

    GQA: the MQA kernel per KV head (its ``g`` query heads share one key and
    value), vmapped over KV heads and rows. The scale multiplies the queries
    (the kernel has none). The call is not wrapped in a ``shard_map``: on a
    mesh of several devices XLA cannot split it (hence 'auto' uses it on one
    device only).

    Args:
      q_bthd, k_btkd, v_btkd: queries, keys and values of the same ``t`` tokens.
      segment_ids_bt: each token's segment (0 = padding).
      scale: the softmax scale.
      window: this layer's window, one of ``windows`` (a traced int; any
        value that is no int in ``windows``, as the transformer's 2**30,
        for ``None``). May be ``None`` when ``windows`` has one entry.
      windows: every window the model's layers use (static).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q_bthd.shape
    k = k_btkd.shape[2]
    g = h // k
    block = min(SPLASH_BLOCK, t)
    if t % block:
        raise ValueError(f"splash attention needs a length that is a multiple of {SPLASH_BLOCK}, got {t}")
    q_bkgtd = (q_bthd.astype(jnp.float32) * scale).astype(q_bthd.dtype)
    q_bkgtd = q_bkgtd.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4)
    k_bktd, v_bktd = (x.transpose(0, 2, 1, 3) for x in (k_btkd, v_btkd))
    segments = sa.SegmentIds(q=segment_ids_bt.astype(jnp.int32), kv=segment_ids_bt.astype(jnp.int32))
    sizes = sa.BlockSizes(**{f.name: block for f in dataclasses.fields(sa.BlockSizes) if f.name.startswith("block_")})

    def run(w):
        if w is None or w >= t:
            head_mask = sa.CausalMask((t, t))
        else:
            head_mask = sa.LocalMask((t, t), window_size=(w - 1, 0), offset=0)
        kernel = sa.make_splash_mqa_single_device(
            sa.MultiHeadMask([head_mask] * g), block_sizes=sizes, interpret=_SPLASH_INTERPRET
        )
        per_kv_head = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg), in_axes=(0, 0, 0, None))
        return jax.vmap(per_kv_head)(q_bkgtd, k_bktd, v_bktd, segments)

    if len(windows) == 1:
        out_bkgtd = run(windows[0])
    else:
        # Branch i runs windows[i]; a layer without a window (2**30) matches
        # no int window, so it gets index 0, which is None's when present.
        index = sum(i * (window == w) for i, w in enumerate(windows) if w is not None)
        out_bkgtd = jax.lax.switch(index, [lambda w=w: run(w) for w in windows])
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


# Cache slots per block when attention reads a KV cache on CPU. XLA:CPU copies
# any slice of the stacked cache that feeds a dot (a layer's whole cache, if
# read at once). A block's copy stays in the CPU's caches until the dots read
# it, and the loop over blocks stops at the last slot written, so a decode step
# reads the cache once and only as far as it is filled. On the LLaMA-style
# model of benchmarks/generate_benchmark.py (batch 1, loaded machine), blocks
# of 256 and 512 timed alike, ~83 ms/token with 2,048 of 2,112 slots filled,
# against ~105 for one read of the whole layer; with 128 of 2,048 filled, 67
# against 105.
CACHE_BLOCK = 256


def cached_attention(q_bthd, k_lbksd, v_lbksd, layer, mask_bts, scale, length, *, dropout_rate=0.0, rng_b=None):
    """Attention of ``q`` to one layer of a stacked KV cache, reading only its slots before ``length``.

    On CPU the slots go in blocks of :data:`CACHE_BLOCK` through a loop of
    ``ceil(length / CACHE_BLOCK)`` trips with an online softmax (running max and
    sum, float32), so a step's cost grows with the filled length, not with the
    cache's size. Elsewhere (and for caches of at most one block) the layer's
    cache is read at once: on GPU each trip of a loop whose trip count is known
    only at run time reads its condition back on the host.

    Like the blocked causal attention, a query row with no visible key at all
    (padding) averages the values of the slots read instead of all slots. The
    loop has a run-time trip count, so this path is not reverse-differentiable:
    it is for inference (training runs without a cache).

    Args:
      q_bthd: the queries.
      k_lbksd, v_lbksd: every layer's keys and values, ``[layers, b, k, s, d]``,
        this call's already written in.
      layer: which layer to read (a traced or Python int).
      mask_bts: which cache slots each query may attend to.
      scale: the softmax scale.
      length: slots at and after it are never read (a traced int, ``<= s``).
      dropout_rate, rng_b: dropout on the attention probabilities, as in
        :func:`dot_product_attention` (each block draws its own mask).
    """
    b, t, h, d = q_bthd.shape
    k, s = k_lbksd.shape[2], k_lbksd.shape[3]
    block = CACHE_BLOCK if jax.default_backend() == "cpu" else None

    def read(cache_lbksd, start, size):  # -> [b, k, size, d] of this layer
        slab = jax.lax.dynamic_slice(cache_lbksd, (layer, 0, 0, start, 0), (1, b, k, size, d))
        return slab[0].astype(q_bthd.dtype)

    if block is None or block >= s:
        return _attend(q_bthd, read(k_lbksd, 0, s), read(v_lbksd, 0, s), mask_bts, scale, dropout_rate, rng_b, "bksd")

    q_btkgd = q_bthd.reshape(b, t, k, h // k, d)
    min_logit = jnp.finfo(jnp.float32).min

    def step(i, carry):
        max_bkgt, sum_bkgt, acc_bkgtd = carry
        # The cache length need not be a multiple of the block: the last block
        # starts early enough to fit, and its slots before i * block (read by
        # the block before) are masked.
        start = jnp.minimum(i * block, s - block)
        seen_s = start + jnp.arange(block) >= i * block
        mask_blk = jax.lax.dynamic_slice_in_dim(mask_bts, start, block, axis=2) & seen_s
        k_bksd = read(k_lbksd, start, block)
        logits = jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_bksd, preferred_element_type=jnp.float32)
        logits = jnp.where(mask_blk[:, None, None], logits * scale, min_logit)
        new_max_bkgt = jnp.maximum(max_bkgt, logits.max(axis=-1))
        probs = jnp.exp(logits - new_max_bkgt[..., None])
        # Rescales what earlier blocks summed to the new running max (0 once a
        # real key is seen after masked ones: they drop out, as in a softmax).
        rescale_bkgt = jnp.exp(max_bkgt - new_max_bkgt)
        sum_bkgt = sum_bkgt * rescale_bkgt + probs.sum(axis=-1)
        probs = dropout(probs.astype(q_bthd.dtype), dropout_rate, fold_in(rng_b, i))
        acc_bkgtd = acc_bkgtd * rescale_bkgt[..., None] + jnp.einsum(
            "bkgts,bksd->bkgtd", probs, read(v_lbksd, start, block), preferred_element_type=jnp.float32
        )
        return new_max_bkgt, sum_bkgt, acc_bkgtd

    g = h // k
    init = (
        jnp.full((b, k, g, t), min_logit, jnp.float32),
        jnp.zeros((b, k, g, t), jnp.float32),
        jnp.zeros((b, k, g, t, d), jnp.float32),
    )
    _, sum_bkgt, acc_bkgtd = jax.lax.fori_loop(0, (length + block - 1) // block, step, init)
    out_bkgtd = (acc_bkgtd / sum_bkgt[..., None]).astype(q_bthd.dtype)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class MLP(nnx.Module):
    """``down(act(up(x)))``, or the gated ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.mlp_dim
        common = dict(out_ndim=1, bias=cfg.mlp_bias, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Proj((e, m), ("embed", "mlp"), **common) if cfg.gated_mlp else None
        self.up_proj = Proj((e, m), ("embed", "mlp"), **common)
        self.down_proj = Proj((m, e), ("mlp", "embed"), **common)
        self.activation = cfg.activation

    def __call__(self, x_bte, lora_rng_b=None):
        """``lora_rng_b``: row keys for the projections' LoRA dropout (``None``: none)."""
        h_btm = self.up_proj(x_bte, fold_in(lora_rng_b, 0))
        if self.gate_proj is not None:
            gate_btm = self.gate_proj(x_bte, fold_in(lora_rng_b, 1))
            h_btm = activation(self.activation, gate_btm) * h_btm
        else:
            h_btm = activation(self.activation, h_btm)
        h_btm = constrain(h_btm, ("act_batch", "act_len", "act_mlp"))
        return self.down_proj(h_btm, fold_in(lora_rng_b, 2))
