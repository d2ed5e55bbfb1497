"""RoPE models at 2,048 positions against transformers in float32 and in float64.

Rounding differences in the rotary frequencies grow with the position (the
angle is ``position * inv_freq``), so the short sequences of tests/test_models.py
cannot see them: a frequency one ulp off transformers' moved a LLaMA's
log-probabilities by 1.8e-3 at position 2,048 and by under 1e-4 below 256.

Each model is compared three ways on one 2,048-token sequence, per token: imitax
in float32 against transformers in float64 (``model.double()``), whose error
may be at most :data:`F64_FACTOR` times transformers' own float32 error against
the same float64 run, and imitax against transformers in float32, within
:data:`ATOL`. transformers' float64 run computes its rotary angles and their
cos/sin in float32 (its rotary embedding casts to float), so it is the exact
model *with transformers' float32 angles*; what it measures is everything else.
"""

from __future__ import annotations

import copy
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import randomize, to_imitax

from imitax import models
from imitax.eval.scoring import Scorer
from imitax.models import layers

LENGTH = 2048
VOCAB = 128
ATOL = 1e-4  # imitax vs transformers, both float32: the one tolerance of tests/test_models.py
F64_FACTOR = 2.0  # imitax's float32 error may be this many times transformers' own
PREFIX = 2000  # tokens of the scorer's shared prefix

torch.set_num_threads(1)  # tiny models on a small shared CPU (see tests/hf_models.py)

# head_dim 64 (hidden 128, 2 heads): the frequencies of most LLaMA-family models,
# and one of the shapes whose NumPy float32 powers were off.
_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    vocab_size=VOCAB,
    max_position_embeddings=LENGTH,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
_DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)
KINDS = {
    # The reported model's RoPE (theta 5e5), with every bias LLaMA can have, so they are random too.
    "llama": (
        transformers.LlamaConfig,
        dict(
            _SHAPE,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        ),
    ),
    # Original length 256: wavelengths above 256 are scaled, 64..256 smoothed, below 64 kept.
    "llama3": (
        transformers.LlamaConfig,
        dict(
            _SHAPE,
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
        ),
    ),
    "llama_linear": (
        transformers.LlamaConfig,
        dict(_SHAPE, num_key_value_heads=1, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    # A window of 1,024: it cuts for the second half of the sequence.
    "mistral": (
        transformers.MistralConfig,
        dict(_SHAPE, num_key_value_heads=1, sliding_window=1024, rope_parameters=_DEFAULT_ROPE),
    ),
    # Qwen2's query/key/value biases, and Qwen2.5's theta.
    "qwen2": (
        transformers.Qwen2Config,
        dict(_SHAPE, num_key_value_heads=1, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # Pythia's partial rotary: 16 of each head's 64 dims rotate.
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        dict(_SHAPE, rope_parameters=dict(_DEFAULT_ROPE, partial_rotary_factor=0.25)),
    ),
}


@functools.cache
def long_models(kind: str):
    """``(torch float32, torch float64, imitax float32)`` models of ``kind``, built once (do not mutate)."""
    cls, kwargs = KINDS[kind]
    torch.manual_seed(0)
    torch32 = transformers.AutoModelForCausalLM.from_config(
        cls(**kwargs), attn_implementation="eager", dtype=torch.float32
    ).eval()
    randomize(torch32, seed=0)  # biases and norm scales too: transformers starts them at 0 and 1
    return torch32, copy.deepcopy(torch32).double(), to_imitax(torch32)


def tokens() -> np.ndarray:
    return np.random.RandomState(0).randint(0, VOCAB, LENGTH).astype(np.int32)


def torch_logprobs(torch_model: torch.nn.Module, tokens_t: np.ndarray) -> np.ndarray:
    """Float64 copy of ``log p(token t+1 | tokens <= t)`` for every t of one sequence."""
    ids = torch.as_tensor(tokens_t[None].astype(np.int64))
    with torch.no_grad():
        logprobs = torch.log_softmax(torch_model(ids).logits[0, :-1], dim=-1)
        return logprobs.gather(-1, ids[0, 1:, None])[:, 0].double().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _imitax_logprobs(graphdef, state, tokens_t):
    logits = nnx.merge(graphdef, state)(tokens_t[None])[0, :-1]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens_t[1:, None], axis=-1)[:, 0]


def imitax_logprobs(model: models.Transformer, tokens_t: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_imitax_logprobs(graphdef, state, tokens_t)).astype(np.float64)


def torch_inv_freq(torch_model: torch.nn.Module) -> np.ndarray:
    (rotary,) = [m for m in torch_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    return rotary.inv_freq.float().numpy()


def error_bands(a: np.ndarray, b: np.ndarray) -> str:
    """Max |a - b| over growing spans of positions, to show whether an error grows with them."""
    err = np.abs(a - b)
    spans = [n for n in (256, 1024) if n < len(err)] + [len(err)]
    return ", ".join(f"<{n}: {err[:n].max():.2e}" for n in spans)


def check_errors(what: str, got: np.ndarray, torch32: np.ndarray, torch64: np.ndarray):
    """The two comparisons of the module docstring, with every figure in the message."""
    own, ours, vs_torch = (np.abs(x - y).max() for x, y in ((torch32, torch64), (got, torch64), (got, torch32)))
    figures = (
        f"{what}: imitax vs f64 [{error_bands(got, torch64)}], torch f32 vs f64 [{error_bands(torch32, torch64)}], "
        f"imitax vs torch f32 [{error_bands(got, torch32)}]"
    )
    print(figures)  # pytest -s shows the measured errors of passing tests too
    assert ours <= F64_FACTOR * own, figures
    assert vs_torch <= ATOL, figures


# -- the rotary frequencies ----------------------------------------------------------------------


def test_rope_inv_freq_is_transformers_float32_where_its_power_is_correctly_rounded():
    """Bit for bit transformers' frequencies, except where torch's float32 power misses by an ulp.

    imitax rounds ``theta ** exponent`` correctly (float64, rounded once);
    torch's float32 power (SLEEF on CPU, under 1 ulp) does not always, and is
    not the same on every platform, so those frequencies are left out (they
    are under 1% of them).
    """
    thetas = (1e4, 2.5e4, 1e5, 5e5, 1e6, 1e7)
    llama3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)
    scalings = (
        dict(rope_type="default"),
        dict(rope_type="linear", factor=4.0),
        dict(rope_type="linear", factor=3.0),
        *(
            dict(llama3, factor=factor, original_max_position_embeddings=length)
            for factor, length in ((8.0, 256), (32.0, 1024), (8.0, 16))
        ),
    )
    checked = skipped = 0
    for theta, head_dim, scaling in itertools.product(thetas, (16, 32, 64, 80, 128), scalings):
        rope = dict(scaling, rope_theta=theta)
        hf_config = transformers.LlamaConfig(
            hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=LENGTH, rope_parameters=rope
        )
        ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq.numpy()
        got = layers.rope_inv_freq(models.config_from_hf(hf_config.to_dict()))
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        exact = (np.float64(np.float32(theta)) ** exponent.numpy().astype(np.float64)).astype(np.float32)
        power_exact = (theta**exponent).numpy() == exact
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_array_equal(got[power_exact], ref[power_exact], err_msg=f"{rope}, head_dim {head_dim}")
        checked += int(power_exact.sum())
        skipped += int((~power_exact).sum())
    assert skipped < 0.02 * checked, f"torch's float32 power missed {skipped} of {checked + skipped}"


# -- whole models at 2,048 positions ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_long_sequence_matches_transformers_float64(kind):
    torch32, torch64, model = long_models(kind)
    # The premise of comparing angles: the same float32 frequencies (see the test above).
    np.testing.assert_array_equal(layers.rope_inv_freq(model.cfg), torch_inv_freq(torch32))
    x = tokens()
    check_errors(kind, imitax_logprobs(model, x), torch_logprobs(torch32, x), torch_logprobs(torch64, x))


def test_scorer_shared_prefix_at_long_positions_matches_transformers_float64():
    """The scorer's prefix-cache path: a 1,999-token prefix computed once, suffixes scored after it.

    Request ``j`` asks for token ``PREFIX + j`` after the ``PREFIX + j`` before
    it, so every request is one token's log-probability and the reference is
    one forward pass over the whole sequence.
    """
    torch32, torch64, model = long_models("llama")
    x = tokens()
    requests = [(x[: PREFIX + j].tolist(), [int(x[PREFIX + j])]) for j in range(LENGTH - PREFIX)]
    scorer = Scorer(model, batch_size=8)
    got = np.array([logprob for logprob, _ in scorer.loglikelihood_tokens(requests)])
    # Every row shares its first PREFIX - 1 tokens (all but the scored last token of the shortest).
    assert scorer.stats.prefix_groups == 1 and scorer.stats.shared_prefix_tokens == PREFIX - 1
    scored = slice(PREFIX - 1, LENGTH - 1)  # the positions whose next token the requests ask for
    check_errors("scorer", got, torch_logprobs(torch32, x)[scored], torch_logprobs(torch64, x)[scored])
