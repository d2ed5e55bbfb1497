"""imitax models against transformers' PyTorch models, family by family, in float32.

Every exactness check uses one absolute tolerance on logits, :data:`ATOL`, which
is never loosened: a failure means a real difference in the model code.
The reference for a padded or packed row is each sequence run alone through
transformers, so padding and packing have to be invisible to pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import FAMILIES, VOCAB, hf_logits, tiny_pair, to_imitax

ATOL = 1e-4
BATCH, LENGTH = 3, 24
LENGTHS = (24, 17, 9)  # real tokens per row of the padded batches
# Sequence lengths packed into each row (row 1 ends with 5 padding slots).
PACKING = ((10, 8, 6), (12, 7), (5, 19))
PREFIX = 10  # tokens prefilled before the one-token-at-a-time decode
CACHE_LEN = 32  # longer than LENGTH: unused cache slots must stay invisible


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


@pytest.mark.parametrize("kind", FAMILIES)
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


@pytest.mark.parametrize("kind", FAMILIES)
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


@pytest.mark.parametrize("kind", FAMILIES)
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
# The layer loop is the same code for every family; these two carry per-layer
# constants through it (GPT-2's attention scale, Mistral's window).
VARIANT_KINDS = ("gpt2", "mistral")
CACHE_CASES = [(kind, "scan") for kind in FAMILIES] + [(k, v) for k in VARIANT_KINDS for v in VARIANTS]


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
