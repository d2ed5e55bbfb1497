"""Tiny random Hugging Face models, one per supported family, and their imitax twins.

Tests that compare imitax against transformers' PyTorch models import these
factories::

    torch_model, hf_config = tiny_hf_model("llama3")
    model = to_imitax(torch_model)

Every parameter is re-drawn at random (:func:`randomize`: norm scales around 1,
norm and projection biases non-zero), because transformers initializes biases
to 0 and norm scales to 1, and imitax's ``init_model`` does the same: a bias
joined in the wrong order on export (GPT-2's fused ``c_attn``, NeoX's
``query_key_value``) or a norm mapped to the wrong tensor would pass unnoticed.
Models built elsewhere (a test's own config, an imitax model before export)
go through :func:`randomize` or :func:`randomize_imitax` for the same reason.
The weights are larger than transformers' default ``initializer_range`` so that
logits are spread out and greedy decoding does not hinge on near-ties.

:data:`FAMILIES` are one model per supported family and variant; :data:`OPTION_KINDS`
add the architecture options that no family default exercises (linear RoPE
scaling, LLaMA's attention and MLP biases, Qwen2's per-layer sliding window).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from imitax import models
from imitax.convert import core

# One thread: these models are tiny, and on a small shared CPU torch's thread pool
# made each forward 20-30x slower than a single thread (measured with HF generate).
torch.set_num_threads(1)

VOCAB = 128
MAX_POSITIONS = 128

# kind -> (config class, keyword arguments). No bos/eos/pad ids: generation must
# not stop early, and GPT-2's default 50256 would not fit the tiny vocabulary.
_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
_LLAMA_SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POSITIONS,
)
_NEOX_SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POSITIONS,
    rotary_pct=0.5,
)
KINDS: dict[str, tuple[type, dict[str, Any]]] = {
    # Per-layer attention scaling exercises GPT-2's one optional attention quirk.
    "gpt2": (
        transformers.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, scale_attn_by_inverse_layer_idx=True),
    ),
    "llama": (transformers.LlamaConfig, dict(_LLAMA_SHAPE, num_key_value_heads=4)),
    # llama3 rope scaling (original length 16, so some frequencies are scaled and
    # some smoothed) and grouped-query attention (2 KV heads for 4 query heads).
    "llama3": (
        transformers.LlamaConfig,
        dict(
            _LLAMA_SHAPE,
            num_key_value_heads=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # A window of 6 is shorter than every test sequence, so it actually cuts.
    "mistral": (transformers.MistralConfig, dict(_LLAMA_SHAPE, num_key_value_heads=2, sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, dict(_LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=True)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(_NEOX_SHAPE, use_parallel_residual=True)),
    # Pythia-style checkpoints with the sequential residual (e.g. some fine-tunes).
    "gpt_neox_seq": (transformers.GPTNeoXConfig, dict(_NEOX_SHAPE, use_parallel_residual=False)),
    # -- architecture options (OPTION_KINDS) --
    # Linear RoPE scaling (positions divided by 4), in transformers 5's rope_parameters spelling.
    "llama_linear": (
        transformers.LlamaConfig,
        dict(
            _LLAMA_SHAPE,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        ),
    ),
    # One attention_bias for q, k, v and o, and biases on all three MLP projections.
    "llama_bias": (
        transformers.LlamaConfig,
        dict(_LLAMA_SHAPE, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    # transformers 5 makes layer i slide iff use_sliding_window and i >= max_window_layers
    # (Qwen2Config.layer_types): layer 0 full, layer 1 a window of 5 (shorter than the test sequences).
    "qwen2_sliding": (
        transformers.Qwen2Config,
        dict(_LLAMA_SHAPE, num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
}
OPTION_KINDS = ("llama_linear", "llama_bias", "qwen2_sliding")
FAMILIES = tuple(k for k in KINDS if k not in OPTION_KINDS)


def tiny_hf_config(kind: str) -> transformers.PretrainedConfig:
    """The transformers config of a tiny model of ``kind`` (a key of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {tuple(KINDS)}")
    cls, kwargs = KINDS[kind]
    return cls(**kwargs, **_NO_SPECIAL_TOKENS)


def tiny_hf_model(kind: str, seed: int = 0, std: float = 0.2) -> tuple[torch.nn.Module, transformers.PretrainedConfig]:
    """A float32 ``AutoModelForCausalLM`` of ``kind`` with random weights, in eval mode.

    Args:
      kind: a key of :data:`KINDS`.
      seed: torch seed for the weights.
      std: standard deviation of the weights (norm scales are ``1 + std * noise``).

    Returns:
      ``(torch_model, hf_config)``. The eager attention implementation is used:
      it is the plainest reference and it honours every mask and window.
    """
    hf_config = tiny_hf_config(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    return randomize(model, seed, std), hf_config


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draws every parameter of a transformers model in place (returns it).

    Norm scales become ``1 + std * noise``; every other parameter, biases and norm
    biases included, ``std * noise``, from a generator seeded with ``seed``.

    Raises:
      AssertionError: a bias or norm parameter is still constant afterwards (a
        parameter this function missed would leave its mapping untested).
    """
    norm_scales = {id(m.weight) for m in model.modules() if _is_norm(m)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            p.copy_(1 + noise if id(p) in norm_scales else noise)
    norm_names = {f"{name}.{n}" for name, m in model.named_modules() if _is_norm(m) for n, _ in m.named_parameters()}
    for name, p in model.named_parameters():
        if name.endswith("bias") or name in norm_names:
            assert p.numel() < 2 or p.std() > std / 2, f"{name} was not randomized"
    return model


def randomize_imitax(model: models.Transformer, seed: int = 0, std: float = 0.2) -> models.Transformer:
    """Re-draws every parameter of an imitax model in place (returns it), as :func:`randomize` does.

    ``models.init_model`` gives norms scale 1 and bias 0 and projections bias 0,
    like transformers; a model built that way and exported would not show a
    norm or bias exported to the wrong tensor. ``model`` may also be
    ``models.abstract_model(cfg)``, which this fills with concrete arrays.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)

    def draw(path, leaf):
        noise = rng.normal(0.0, std, leaf.shape)
        value = 1 + noise if str(getattr(path[-1], "key", path[-1])) == "scale" else noise
        return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    state.replace_by_pure_dict(jax.tree.map_with_path(draw, state.to_pure_dict()))
    nnx.update(model, state)
    return model


@functools.cache
def tiny_pair(kind: str) -> tuple[torch.nn.Module, models.Transformer]:
    """``(torch_model, imitax_model)`` of ``kind``, built once per test process (do not mutate)."""
    torch_model, _ = tiny_hf_model(kind)
    return torch_model, to_imitax(torch_model)


def to_imitax(torch_model: torch.nn.Module, **overrides) -> models.Transformer:
    """The imitax model with the weights of ``torch_model``; ``overrides`` change the config."""
    cfg = models.config_from_hf(torch_model.config.to_dict(), **overrides)
    state_dict = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    return core.model_from_params(cfg, core.params_from_hf(cfg, state_dict))


def hf_logits(torch_model: torch.nn.Module, tokens_bt, **kwargs) -> np.ndarray:
    """Float32 logits of the transformers model as numpy (``kwargs`` go to its forward)."""
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        return torch_model(torch.as_tensor(np.asarray(tokens_bt)), **kwargs).logits.float().numpy()
