"""Attention implementations (``TransformerConfig.attention_impl``) against today's XLA path and transformers.

The cuDNN and splash paths need a GPU and a TPU to run as such. On CPU their
plumbing runs anyway: the cuDNN path's ``jax.nn.dot_product_attention`` call
with ``implementation='xla'`` (the same masks, GQA and scaling, jax.nn's
reference computation instead of cuDNN's kernel) and the splash kernel in
Pallas' interpreter (the kernel's own code, its masks, segment ids and block
skipping). The tests stand in for the platform by patching ``layers._platform``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import hf_logits, tiny_hf_model, to_imitax

from imitax.models import layers
from imitax.models.config import ATTENTION_IMPLS

ATOL_ATTN = 1e-5  # attention outputs (float32, values of order 1)
ATOL_LOGITS = 1e-4  # logits against transformers, as tests/test_models.py
NO_WINDOW = 2**30  # the transformer's window for layers without one


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend to be on a GPU, with cuDNN's call computed by jax.nn's XLA implementation."""
    monkeypatch.setattr(layers, "_platform", lambda: "gpu")
    monkeypatch.setattr(layers, "_CUDNN_IMPLEMENTATION", "xla")


@pytest.fixture
def on_tpu(monkeypatch):
    """Pretend to be on a TPU, with the splash kernel in Pallas' interpreter."""
    monkeypatch.setattr(layers, "_platform", lambda: "tpu")
    monkeypatch.setattr(layers, "_SPLASH_INTERPRET", True)
    monkeypatch.setattr(layers, "_device_count", lambda: 1)


# -- (a) the attention functions on packed rows ---------------------------------------------

T = 256  # two splash blocks and two causal blocks of the XLA path
# Segment lengths per row; what is left of T is padding (segment 0) at the end.
ROWS = ((100, 60, 70), (T,), (30, 129, 40))


def packed(seed: int, kv_heads: int, heads: int = 4, head_dim: int = 16):
    """Random q, k, v and the segment ids and positions of :data:`ROWS` (positions restart per segment)."""
    rng = np.random.default_rng(seed)
    b = len(ROWS)
    segments = np.zeros((b, T), np.int32)
    positions = np.zeros((b, T), np.int32)
    for i, lengths in enumerate(ROWS):
        start = 0
        for s, n in enumerate(lengths, start=1):
            segments[i, start : start + n], positions[i, start : start + n] = s, np.arange(n)
            start += n
    q = rng.normal(size=(b, T, heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(b, T, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return q, k, v, segments, positions


def transformer_mask(segments, positions, window):
    """The mask ``Transformer.hidden`` builds without a cache (segments, padding, causality, window)."""
    slot = np.arange(segments.shape[1])
    return (
        (segments[:, :, None] == segments[:, None, :])
        & (segments[:, None, :] != 0)
        & (slot[None, None, :] <= slot[None, :, None])
        & (positions[:, :, None] - positions[:, None, :] < (window or NO_WINDOW))
    )


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("window", [None, 7])
def test_paths_match_unblocked_attention(kv_heads, window, on_tpu):
    q, k, v, segments, positions = packed(kv_heads, kv_heads)
    mask = transformer_mask(segments, positions, window)
    scale = jnp.float32(0.3)
    # Today's attention in one block: every logit, masked.
    ref = np.asarray(layers._attend(q, k, v, mask, scale))
    real = segments != 0  # padding rows' outputs are unused and differ by design
    outs = {
        "xla (blocked)": layers.dot_product_attention(q, k, v, mask, scale, causal=True),
        "jax.nn xla": layers.jax_nn_attention(q, k, v, mask, scale, causal=True, implementation="xla"),
        "splash": layers.splash_attention(
            q, k, v, segments, scale, window=jnp.int32(window or NO_WINDOW), windows=(window,)
        ),
    }
    for name, out in outs.items():
        err = np.abs(np.asarray(out)[real] - ref[real]).max()
        assert err <= ATOL_ATTN, f"{name}: max |difference| {err:.3g} > {ATOL_ATTN}"


def test_splash_picks_each_layers_window(on_tpu):
    """With several windows in a model, the traced window selects the kernel (lax.switch)."""
    q, k, v, segments, positions = packed(3, 2)
    windows = (None, 5, 40)
    run = jax.jit(lambda w: layers.splash_attention(q, k, v, segments, jnp.float32(0.25), window=w, windows=windows))
    real = segments != 0
    for w in windows:
        ref = np.asarray(layers._attend(q, k, v, transformer_mask(segments, positions, w), jnp.float32(0.25)))
        err = np.abs(np.asarray(run(jnp.int32(w or NO_WINDOW)))[real] - ref[real]).max()
        assert err <= ATOL_ATTN, f"window {w}: max |difference| {err:.3g}"


# -- (b) whole models against transformers --------------------------------------------------

LENGTH = 128  # one splash block
PACKING = ((50, 40, 30), (LENGTH,), (70, 58))  # row 0 ends with 8 padding slots
LEFT_PAD = (LENGTH, 97, 40)  # real tokens per row of the left-padded batch


def packed_tokens(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens, positions, segments = (np.zeros((len(PACKING), LENGTH), np.int32) for _ in range(3))
    pieces = []
    for i, lengths in enumerate(PACKING):
        start = 0
        for s, n in enumerate(lengths, start=1):
            seq = rng.integers(0, 128, n).astype(np.int32)
            tokens[i, start : start + n], positions[i, start : start + n], segments[i, start : start + n] = (
                seq,
                np.arange(n),
                s,
            )
            pieces.append((i, start, seq))
            start += n
    return tokens, positions, segments, pieces


def left_padded_tokens(seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens, positions, segments = (np.zeros((len(LEFT_PAD), LENGTH), np.int32) for _ in range(3))
    for i, n in enumerate(LEFT_PAD):
        tokens[i, LENGTH - n :] = rng.integers(0, 128, n)
        positions[i, LENGTH - n :], segments[i, LENGTH - n :] = np.arange(n), 1
    return tokens, positions, segments


IMPLS = {"xla": None, "cudnn": "on_gpu", "splash": "on_tpu"}


# llama3: GQA (2 KV heads for 4); mistral: a window of 6 in every layer;
# qwen2_sliding: layer 0 full, layer 1 a window of 5 (two splash kernels).
@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2_sliding"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_model_matches_transformers(kind, impl, request):
    if IMPLS[impl]:
        request.getfixturevalue(IMPLS[impl])
    torch_model, _ = tiny_hf_model(kind)
    model = to_imitax(torch_model, attention_impl=impl)
    forward = jax.jit(lambda t, p, s: model(t, p, s))

    tokens, positions, segments, pieces = packed_tokens()
    out = np.asarray(forward(tokens, positions, segments))
    for i, start, seq in pieces:
        ref = hf_logits(torch_model, seq[None])[0]
        err = np.abs(out[i, start : start + len(seq)] - ref).max()
        assert err <= ATOL_LOGITS, f"{kind} {impl} packed row {i} at {start}: {err:.3g}"

    tokens, positions, segments = left_padded_tokens()
    out = np.asarray(forward(tokens, positions, segments))
    ref = hf_logits(torch_model, tokens, attention_mask=segments.astype(np.int64), position_ids=positions)
    real = segments == 1
    err = np.abs(out[real] - ref[real]).max()
    assert err <= ATOL_LOGITS, f"{kind} {impl} left-padded: {err:.3g}"


def test_gpt2_per_layer_scale_through_jax_nn(on_gpu):
    """GPT-2 scales logits by 1/layer (a traced scale): the cuDNN path folds it into the queries."""
    torch_model, _ = tiny_hf_model("gpt2")
    model = to_imitax(torch_model, attention_impl="cudnn")
    n = 64  # GPT-2's tiny n_positions
    tokens = np.random.default_rng(2).integers(0, 128, (2, n)).astype(np.int32)
    out = np.asarray(jax.jit(lambda t: model(t))(tokens))
    err = np.abs(out - hf_logits(torch_model, tokens)).max()
    assert err <= ATOL_LOGITS, f"gpt2 cudnn path: {err:.3g}"


# -- (c) choosing, and refusing ---------------------------------------------------------------


def choose(choice, dtype=jnp.bfloat16, head_dim=128, length=4096, dropout=False):
    return layers.resolve_attention_impl(choice, dtype=dtype, head_dim=head_dim, length=length, dropout=dropout)


def test_auto_on_cpu_is_xla():
    assert jax.default_backend() == "cpu"
    assert choose("auto") == "xla"
    assert choose("xla") == "xla"


@pytest.mark.parametrize("choice, platform", [("cudnn", "GPU"), ("splash", "TPU")])
def test_unavailable_choices_are_refused(choice, platform):
    message = (
        rf"attention_impl='{choice}' needs a {platform}, but JAX is running on 'cpu'; choose one of \('auto', 'xla'\)"
    )
    with pytest.raises(ValueError, match=message):
        choose(choice)
    # And from a model: the refusal comes when the forward pass is traced.
    torch_model, _ = tiny_hf_model("llama")
    model = to_imitax(torch_model, attention_impl=choice)
    with pytest.raises(ValueError, match=message):
        model(np.zeros((1, 8), np.int32))


def test_unknown_choice_is_refused():
    torch_model, _ = tiny_hf_model("llama")
    with pytest.raises(
        ValueError, match=rf"attention_impl must be one of {ATTENTION_IMPLS}".replace("(", r"\(").replace(")", r"\)")
    ):
        to_imitax(torch_model, attention_impl="flash")


def test_auto_on_gpu(on_gpu):
    assert choose("auto") == "cudnn"
    assert choose("auto", dtype=jnp.float16) == "cudnn"
    assert choose("auto", dtype=jnp.float32) == "xla"  # cuDNN flash takes half precision only
    assert choose("auto", head_dim=100) == "xla"  # not a multiple of 8
    assert choose("auto", head_dim=256) == "xla"  # over 128 needs Hopper; not assumed
    assert choose("auto", length=4095) == "xla"  # cuDNN with a bias in training needs even lengths
    with pytest.raises(ValueError, match="needs a TPU, but JAX is running on 'gpu'; choose one of .*'cudnn'"):
        choose("splash")


def test_auto_on_tpu(on_tpu, monkeypatch):
    assert choose("auto") == "splash"
    assert choose("auto", dtype=jnp.float32) == "splash"
    assert choose("auto", length=4000) == "xla"  # not a multiple of the splash block
    monkeypatch.setattr(layers, "_device_count", lambda: 8)
    assert choose("auto") == "xla"  # splash is not sharded over devices (yet)
    assert choose("splash") == "splash"
    with pytest.raises(ValueError, match="needs a GPU, but JAX is running on 'tpu'; choose one of .*'splash'"):
        choose("cudnn")


@pytest.mark.parametrize("choice", ["auto", "cudnn"])
def test_dropout_keeps_the_xla_path(choice, on_gpu):
    """Attention dropout is drawn from the row keys, which only the XLA path uses."""
    assert choose(choice, dropout=True) == "xla"
