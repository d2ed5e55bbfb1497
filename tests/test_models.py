"""imitax models against transformers' PyTorch models, family by family, in float32.

Every exactness check uses one absolute tolerance on logits, :data:`ATOL`, which
is never loosened: a failure means a real difference in the model code.
The reference for a padded or packed row is each sequence run alone through
transformers, so padding and packing have to be invisible to pass. Every
weight, bias and norm parameter is random (tests/hf_models.py), and the
architecture options (``OPTION_KINDS``: linear RoPE scaling, LLaMA's biases,
Qwen2's per-layer sliding window) go through the same comparisons.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import FAMILIES, KINDS, OPTION_KINDS, VOCAB, hf_logits, tiny_hf_config, tiny_pair, to_imitax

from imitax import models
from imitax.convert import core
from imitax.models import layers, transformer

ATOL = 1e-4
BATCH, LENGTH = 3, 24
LENGTHS = (24, 17, 9)  # real tokens per row of the padded batches
# Sequence lengths packed into each row (row 1 ends with 5 padding slots).
PACKING = ((10, 8, 6), (12, 7), (5, 19))
PREFIX = 10  # tokens prefilled before the one-token-at-a-time decode
CACHE_LEN = 32  # longer than LENGTH: unused cache slots must stay invisible
ALL_KINDS = FAMILIES + OPTION_KINDS


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_bt, positions_bt, segment_ids_bt):
    return nnx.merge(graphdef, state)(tokens_bt, positions_bt, segment_ids_bt)


def forward(model, tokens_bt, positions_bt, segment_ids_bt) -> np.ndarray:
    """The model's logits, through one jitted program per config and shape."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, tokens_bt, positions_bt, segment_ids_bt))


@functools.partial(jax.jit, static_argnums=0)
def _decode_stepwise(graphdef, state, tokens_bt, positions_bt, segment_ids_bt):
    """Logits of a prefill of ``PREFIX`` tokens into the KV cache, then of one token per step."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens_bt.shape[0], CACHE_LEN)
    head = slice(None, PREFIX)
    prefix_btv, cache = model.extend(tokens_bt[:, head], cache, positions_bt[:, head], segment_ids_bt[:, head])

    def step(cache, xs_b):
        token_b, position_b, segment_b = xs_b
        logits_b1v, cache = model.extend(token_b[:, None], cache, position_b[:, None], segment_b[:, None])
        return cache, logits_b1v[:, 0]

    tail = (tokens_bt[:, PREFIX:].T, positions_bt[:, PREFIX:].T, segment_ids_bt[:, PREFIX:].T)
    _, steps_tbv = jax.lax.scan(step, cache, tail)
    return jnp.concatenate([prefix_btv, steps_tbv.transpose(1, 0, 2)], axis=1)


def random_tokens(seed: int, shape) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


def left_padded_batch(seed: int = 0):
    """``(tokens, positions, segment_ids, rows)`` of a left-padded batch; ``rows`` are the unpadded sequences."""
    rows = [random_tokens(seed + i, (n,)) for i, n in enumerate(LENGTHS)]
    tokens = np.zeros((BATCH, LENGTH), np.int32)
    positions = np.zeros((BATCH, LENGTH), np.int32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        tokens[i, LENGTH - n :], positions[i, LENGTH - n :], segments[i, LENGTH - n :] = row, np.arange(n), 1
    return tokens, positions, segments, rows


def assert_close(actual, desired, what: str):
    err = np.abs(np.asarray(actual) - np.asarray(desired)).max()
    assert err <= ATOL, f"{what}: max |logit difference| {err:.3g} > {ATOL}"


# -- (a) padded batches --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_right_padded_batch_matches_each_sequence_alone(kind):
    torch_model, model = tiny_pair(kind)
    rows = [random_tokens(i, (n,)) for i, n in enumerate(LENGTHS)]
    # Pad slots hold a real token id (7), not 0: their content must not matter either.
    tokens = np.full((BATCH, LENGTH), 7, np.int32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], segments[i, : len(row)] = row, 1
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH))
    out = forward(model, tokens, positions, segments)
    assert out.shape == (BATCH, LENGTH, VOCAB) and out.dtype == np.float32
    for i, row in enumerate(rows):
        assert_close(out[i, : len(row)], hf_logits(torch_model, row[None])[0], f"{kind} row {i}")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_left_padded_batch_matches_transformers(kind):
    torch_model, model = tiny_pair(kind)
    tokens, positions, segments, rows = left_padded_batch()
    out = forward(model, tokens, positions, segments)
    # transformers on the same left-padded batch, told the positions and the padding explicitly.
    ref = hf_logits(torch_model, tokens, attention_mask=segments.astype(np.int64), position_ids=positions)
    real = segments == 1
    assert_close(out[real], ref[real], f"{kind} left-padded batch")
    for i, row in enumerate(rows):
        assert_close(out[i, LENGTH - len(row) :], hf_logits(torch_model, row[None])[0], f"{kind} row {i} alone")


# -- (b) packed rows ---------------------------------------------------------------------------


def packed_batch(seed: int = 0):
    """``(tokens, positions, segment_ids, pieces)``; ``pieces`` lists ``(row, start, tokens)`` per sequence."""
    tokens = np.zeros((BATCH, LENGTH), np.int32)
    positions = np.zeros((BATCH, LENGTH), np.int32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    pieces = []
    for i, lengths in enumerate(PACKING):
        start = 0
        for segment, n in enumerate(lengths, start=1):
            seq = random_tokens(seed + 10 * i + segment, (n,))
            tokens[i, start : start + n] = seq
            positions[i, start : start + n] = np.arange(n)
            segments[i, start : start + n] = segment
            pieces.append((i, start, seq))
            start += n
    return tokens, positions, segments, pieces


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_packed_rows_match_each_sequence_alone(kind):
    torch_model, model = tiny_pair(kind)
    tokens, positions, segments, pieces = packed_batch()
    out = forward(model, tokens, positions, segments)
    for i, start, seq in pieces:
        ref = hf_logits(torch_model, seq[None])[0]
        assert_close(out[i, start : start + len(seq)], ref, f"{kind} row {i} segment at {start}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_packed_segments_do_not_see_each_other(kind):
    _, model = tiny_pair(kind)
    tokens, positions, segments, _ = packed_batch()
    out = forward(model, tokens, positions, segments)
    # Rewrite the first segment of every row; only that segment's logits may move.
    changed = np.where(segments == 1, (tokens + 1 + np.arange(LENGTH)) % VOCAB, tokens).astype(np.int32)
    out_changed = forward(model, changed, positions, segments)
    first, others = segments == 1, segments > 1
    assert np.abs(out_changed[first] - out[first]).max() > 1e-2, "the edit did not reach its own segment"
    np.testing.assert_allclose(out_changed[others], out[others], rtol=0, atol=1e-6)


# -- (c) KV-cache decoding ----------------------------------------------------------------------

VARIANTS = {"unrolled": {"scan_layers": False}, "remat_full": {"remat": "full"}}
# The layer loop is the same code for every family; these carry per-layer
# constants through it (GPT-2's attention scale, Mistral's window, Qwen2's per-layer window).
VARIANT_KINDS = ("gpt2", "mistral", "qwen2_sliding")
CACHE_CASES = [(kind, "scan") for kind in ALL_KINDS] + [(k, v) for k in VARIANT_KINDS for v in VARIANTS]


@pytest.mark.parametrize("kind,variant", CACHE_CASES)
def test_cached_decoding_matches_full_forward(kind, variant):
    torch_model, model = tiny_pair(kind)
    variant_model = model if variant == "scan" else to_imitax(torch_model, **VARIANTS[variant])
    # Left padding: row 2's first PREFIX slots are all padding, so its prefill sees no token at all.
    tokens, positions, segments, rows = left_padded_batch(seed=5)
    graphdef, state = nnx.split(variant_model)
    stepwise = np.asarray(_decode_stepwise(graphdef, state, tokens, positions, segments))
    # The full forward of the default config: the variants must not change the numbers.
    full = forward(model, tokens, positions, segments)
    real = segments == 1
    assert_close(stepwise[real], full[real], f"{kind}/{variant} cached vs full forward")
    for i, row in enumerate(rows):
        ref = hf_logits(torch_model, row[None])[0]
        assert_close(stepwise[i, LENGTH - len(row) :], ref, f"{kind}/{variant} row {i} vs transformers")


# -- the options are exercised ------------------------------------------------------------


def _zero_biases(model):
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    flat = {p: np.zeros_like(v) if p.endswith("/bias") else v for p, v in core.flatten(params).items()}
    assert any(p.endswith("/bias") for p in flat)
    return core.model_from_params(model.cfg, core.unflatten(flat))


# kind -> {what is wrong: the imitax model without it}. Each must move the logits far
# beyond ATOL, or the comparisons with transformers above would not test the option.
OPTIONS_OFF = {
    "llama_linear": {"plain RoPE": lambda m: to_imitax(m, rope_scaling=None)},
    "llama_bias": {"no biases": lambda m: _zero_biases(to_imitax(m))},
    "mistral": {"no window": lambda m: to_imitax(m, sliding_window=None)},
    "qwen2_sliding": {
        "no window": lambda m: to_imitax(m, sliding_window=None, sliding_layers=None),
        "window in every layer": lambda m: to_imitax(m, sliding_layers=None),
        "window in layer 0 instead": lambda m: to_imitax(m, sliding_layers=(True, False)),
    },
}


@pytest.mark.parametrize("kind", list(OPTIONS_OFF))
def test_options_change_the_logits(kind):
    torch_model, model = tiny_pair(kind)
    tokens, positions, segments, _ = left_padded_batch(seed=3)
    window = getattr(torch_model.config, "sliding_window", None)  # llama has none
    assert window is None or window < max(LENGTHS)  # the window cuts the longer rows
    ref = hf_logits(torch_model, tokens, attention_mask=segments.astype(np.int64), position_ids=positions)
    real = segments == 1
    assert_close(forward(model, tokens, positions, segments)[real], ref[real], kind)
    for what, without in OPTIONS_OFF[kind].items():
        err = np.abs(forward(without(torch_model), tokens, positions, segments)[real] - ref[real]).max()
        assert err > 100 * ATOL, f"{kind} with {what}: only {err:.3g} from transformers"


def test_qwen2_sliding_layers_follow_transformers_layer_types():
    """transformers 5 decides which layers slide (``layer_types``); imitax must read the same flags."""
    hf_config = tiny_hf_config("qwen2_sliding")
    assert hf_config.layer_types == ["full_attention", "sliding_attention"]
    _, model = tiny_pair("qwen2_sliding")
    assert model.cfg.layer_windows() == (None, 5)
    # use_sliding_window=False: transformers drops the window, and so must imitax.
    off = models.config_from_hf({**hf_config.to_dict(), "use_sliding_window": False, "layer_types": None})
    assert off.layer_windows() == (None, None)


# -- (d) bfloat16 compute -------------------------------------------------------------------


# One model per config class and norm kind (learned/rope positions, layernorm/rmsnorm, tied head).
@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2", "gpt_neox"])
def test_bfloat16_compute_is_close_to_float32(kind):
    """A sanity check, not an exactness test: bf16 keeps 8 bits of mantissa.

    It catches a bf16 path that is broken (NaNs, a wrong cast, a norm done in
    bf16 and blowing up), not small rounding differences; float32 is where the
    logits must equal transformers'.
    """
    torch_model, model = tiny_pair(kind)
    model_bf16 = to_imitax(torch_model, dtype="bfloat16")
    tokens, positions, segments, _ = left_padded_batch(seed=9)
    out32 = forward(model, tokens, positions, segments)
    out16 = forward(model_bf16, tokens, positions, segments)
    assert out16.dtype == np.float32  # logits come out in float32 whatever the compute dtype
    real = segments == 1
    assert np.isfinite(out16[real]).all()
    err = np.abs(out16[real] - out32[real])
    scale = np.abs(out32[real]).max()
    assert err.max() < 0.1 * scale, f"bf16 logits differ by {err.max():.3g} (logit scale {scale:.3g})"
    agree = (out16[real].argmax(-1) == out32[real].argmax(-1)).mean()
    assert agree >= 0.8, f"bf16 and f32 agree on the argmax of only {agree:.0%} of positions"


def test_transformers_reference_is_float32():
    torch_model, _ = tiny_pair("llama")
    assert all(p.dtype == torch.float32 for p in torch_model.parameters())


# -- (e) dropout ---------------------------------------------------------------------------------

RATE = 0.2
PROBE_LAYERS = 3


@pytest.fixture
def fast_compile():
    """XLA's optimizations off (as the trainer tests run): each of these tiny programs runs once or
    twice, and with the masks' random-bit generation compiling took 3x longer than running."""
    previous = jax.config._read("jax_disable_most_optimizations")  # a flag: no public getter
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


PROBE_SITES = 1 + 2 * PROBE_LAYERS  # the embeddings, then each layer's attention and MLP outputs


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """How far a fraction of ``n`` independent Bernoulli(``p``) draws may stray from ``p`` (5 sigma)."""
    return sigmas * np.sqrt(p * (1 - p) / n)


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


@functools.cache
def site_probe(kind: str) -> nnx.GraphDef | tuple:
    """``(graphdef, state)`` of a model whose residual stream spells out every dropout mask.

    The embeddings are all 1 and each layer's attention and MLP outputs are the constants 2, 4
    (layer 0), 8, 16 (layer 1)... (their kernels zero, their biases set), and the final norm is
    the identity. Without dropout every entry of ``hidden`` is ``2**PROBE_SITES - 1``; with dropout
    at ``RATE`` everywhere, ``entry * (1 - RATE)`` is an integer whose bit ``k`` says whether site
    ``k`` kept that entry. Dropout anywhere else (e.g. on the residual stream itself) would scale
    some terms twice and break the integers.
    """
    cls = {"gpt2": models.GPT2Config, "gpt_neox": models.GPTNeoXConfig}[kind]
    cfg = cls(
        vocab_size=16,
        hidden_size=32,
        num_layers=PROBE_LAYERS,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        mlp_dim=64,
        max_position_embeddings=64,
        embed_dropout=RATE,
        attention_dropout=RATE,
        residual_dropout=RATE,
    )
    # Weights drawn with numpy into the abstract model: no init program to compile.
    rng = np.random.default_rng(0)
    shapes = nnx.state(models.abstract_model(cfg), nnx.Param).to_pure_dict()
    params = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), shapes)
    params["embed"] = np.ones_like(params["embed"])
    if "pos_embed" in params:
        params["pos_embed"] = np.zeros_like(params["pos_embed"])
    for i, (branch, proj) in enumerate([("attn", "o_proj"), ("mlp", "down_proj")]):
        weights = params["layers"][branch][proj]
        weights["kernel"] = np.zeros_like(weights["kernel"])
        codes = 2.0 ** (1 + i + 2 * np.arange(PROBE_LAYERS))  # this branch's bit in each layer
        weights["bias"] = np.broadcast_to(codes[:, None], weights["bias"].shape).astype(np.float32)
    model = core.model_from_params(cfg, params)
    model.final_norm = _Identity()
    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=0)
def _probe_hidden(graphdef, state, tokens_bt, dropout_rng):
    return nnx.merge(graphdef, state).hidden(tokens_bt, dropout_rng=dropout_rng)[0]


def probe_masks(kind: str, row_keys, **changes) -> np.ndarray:
    """``keep[site, b, t, e]`` read off :func:`site_probe`'s residual stream, 32 positions per row.

    Args:
      kind: the probe's family.
      row_keys: one key per row.
      **changes: config fields to change (run-time options such as ``scan_layers``).
    """
    graphdef, state = site_probe(kind)
    if changes:
        model = nnx.merge(graphdef, state)
        model.cfg = model.cfg.replace(**changes)
        graphdef, state = nnx.split(model)
    tokens_bt = jnp.zeros((row_keys.shape[0], 32), jnp.int32)
    codes = np.asarray(_probe_hidden(graphdef, state, tokens_bt, row_keys)) * (1 - RATE)
    assert np.abs(codes - np.round(codes)).max() < 1e-4, "a dropout site scaled by other than 1 / (1 - rate)"
    codes = np.round(codes).astype(np.int64)
    return np.stack([(codes >> k) & 1 for k in range(PROBE_SITES)]).astype(bool)


ROW_KEYS = jax.random.split(jax.random.key(0), 4)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])  # sequential and parallel residual
@pytest.mark.usefixtures("fast_compile")
def test_dropout_sites_draw_independent_masks(kind):
    keep = probe_masks(kind, ROW_KEYS)
    n = keep[0].size
    dropped = 1 - keep.reshape(PROBE_SITES, -1).mean(axis=1)
    assert np.all(np.abs(dropped - RATE) <= binomial_bound(n, RATE)), dropped
    # Every pair of sites (so every layer) draws its own mask: both dropped as often as independence says.
    for i in range(PROBE_SITES):
        for j in range(i):
            both = np.mean(~keep[i] & ~keep[j])
            assert abs(both - RATE**2) <= binomial_bound(n, RATE**2), (i, j, both)
    # Elementwise masks: they differ between rows, between positions and between features.
    embed = keep[0]
    assert not np.array_equal(embed[0], embed[1])
    assert not np.array_equal(embed[:, 0], embed[:, 1])
    assert not np.array_equal(embed[..., 0], embed[..., 1])
    # A row's masks are a function of its key alone (not of its place in the batch); other keys, other masks.
    order = np.array([2, 0, 3, 1])
    np.testing.assert_array_equal(probe_masks(kind, ROW_KEYS[order]), keep[:, order])
    other = probe_masks(kind, jax.random.split(jax.random.key(1), 4))
    assert abs(np.mean(other != keep) - 2 * RATE * (1 - RATE)) <= binomial_bound(keep.size, 2 * RATE * (1 - RATE))


@pytest.mark.usefixtures("fast_compile")
def test_unrolled_layers_draw_the_scanned_masks():
    np.testing.assert_array_equal(probe_masks("gpt2", ROW_KEYS, scan_layers=False), probe_masks("gpt2", ROW_KEYS))


def test_one_dropout_key_stands_for_a_key_per_row():
    key = jax.random.key(3)
    per_row = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(4))
    got = transformer._row_keys(key, 4)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(per_row))
    assert transformer._row_keys(per_row, 4) is per_row
    with pytest.raises(ValueError, match=r"one key or one key per row \(4\), got shape \(3,\)"):
        transformer._row_keys(per_row[:3], 4)
    with pytest.raises(TypeError, match="typed PRNG key"):
        transformer._row_keys(jax.random.key_data(key), 4)


@pytest.mark.parametrize("length", [40, 160])  # one block of queries, and the causal blocks
@pytest.mark.usefixtures("fast_compile")
def test_attention_dropout_drops_probabilities(length):
    """With one-hot values, attention's output is its (dropped-out) probability matrix itself."""
    b, h, k = 2, 4, 2
    rng = np.random.default_rng(0)
    q_bthd = rng.normal(size=(b, length, h, 8)).astype(np.float32)
    k_bskd = rng.normal(size=(b, length, k, 8)).astype(np.float32)
    v_bskd = np.broadcast_to(np.eye(length, dtype=np.float32)[None, :, None, :], (b, length, k, length))
    mask_bts = np.broadcast_to(np.tril(np.ones((length, length), bool)), (b, length, length))
    scale = 1 / np.sqrt(8)

    # The reference probabilities [b, t, h, s], in float64.
    logits = np.einsum("bthd,bshd->bths", q_bthd, np.repeat(k_bskd, h // k, axis=2)) * scale
    logits = np.where(mask_bts[:, :, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    attend = jax.jit(
        lambda rate, key: layers.dot_product_attention(
            q_bthd, k_bskd, v_bskd, mask_bts, scale, causal=True, dropout_rate=rate, rng_b=key
        ),
        static_argnums=0,
    )
    np.testing.assert_allclose(np.asarray(attend(0.0, None)), probs, atol=1e-6)
    out = np.asarray(attend(RATE, jax.random.split(jax.random.key(0), b)))
    visible = np.broadcast_to(mask_bts[:, :, None, :], out.shape)
    kept = out != 0
    np.testing.assert_allclose(out[kept], probs[kept] / (1 - RATE), rtol=1e-5, atol=1e-7)
    assert not kept[~visible].any()
    n = int(visible.sum())
    dropped = 1 - kept[visible].mean()
    assert abs(dropped - RATE) <= binomial_bound(n, RATE), dropped
    # Heads sharing a KV head, and rows, draw their own masks.
    assert not np.array_equal(kept[:, :, 0], kept[:, :, 1])
    assert not np.array_equal(kept[0], kept[1])


def test_zero_rates_with_a_key_are_bitwise_deterministic():
    _, model = tiny_pair("gpt2")  # transformers' GPT-2 config: dropout 0.1 at all three places
    assert (model.cfg.embed_dropout, model.cfg.attention_dropout, model.cfg.residual_dropout) == (0.1, 0.1, 0.1)
    tokens, positions, segments, _ = left_padded_batch(seed=4)
    plain = forward(model, tokens, positions, segments)
    off = nnx.merge(*nnx.split(model))
    off.cfg = off.cfg.replace(embed_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    graphdef, state = nnx.split(off)
    key = jax.random.key(0)
    run = jax.jit(lambda g, s, key: nnx.merge(g, s)(tokens, positions, segments, dropout_rng=key), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(run(graphdef, state, key)), plain)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_dropout_rates_map_to_transformers_configs(kind):
    cls, kwargs = KINDS[kind]
    fields = {
        "gpt2": dict(embd_pdrop=0.01, attn_pdrop=0.02, resid_pdrop=0.03),
        "llama": dict(attention_dropout=0.02),
        "gpt_neox": dict(hidden_dropout=0.03, attention_dropout=0.02),
    }[kind]
    want = {
        "gpt2": (0.01, 0.02, 0.03),
        "llama": (0.0, 0.02, 0.0),  # transformers' llama has attention dropout only
        "gpt_neox": (0.03, 0.02, 0.03),  # hidden_dropout: the embeddings and both residual branches
    }[kind]
    cfg = models.config_from_hf(cls(**kwargs, **fields).to_dict())
    assert (cfg.embed_dropout, cfg.attention_dropout, cfg.residual_dropout) == want
    exported = cfg.to_hf_config()
    assert {k: getattr(exported, k) for k in fields} == fields
    with pytest.raises(ValueError, match=r"residual_dropout must be in \[0, 1\), got 1.0"):
        cfg.replace(residual_dropout=1.0)


# -- (f) rematerialization -----------------------------------------------------------------------


@pytest.mark.usefixtures("fast_compile")
def test_remat_policies_save_less_memory_in_order():
    """The compiled backward pass's temporary memory (``memory_analysis``, compiled, not run).

    Saving nothing (``full``) < saving the weight matmuls' outputs (``dots_no_batch``) < saving
    every matmul's, attention's batched ones too (``dots``) < saving everything (``none``).
    """
    base = models.GPT2Config(
        vocab_size=64,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=256,
        max_position_embeddings=256,
    )
    params = nnx.state(models.abstract_model(base), nnx.Param).to_pure_dict()
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    temp = {}
    for remat in ("full", "dots_no_batch", "dots", "none"):
        graphdef = nnx.graphdef(models.abstract_model(base.replace(remat=remat)))
        grad = jax.jit(jax.grad(lambda p, t, g=graphdef: jnp.sum(nnx.merge(g, p).hidden(t)[0])))
        temp[remat] = grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    assert list(temp.values()) == sorted(set(temp.values())), temp  # strictly increasing
    assert temp["full"] < temp["none"] / 3, temp
