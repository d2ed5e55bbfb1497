"""Decoder-only model families, their configs and presets.

>>> cfg = models.preset("pythia-70m")            # or models.config_from_hf(config_json)
>>> model = models.init_model(cfg, mesh=mesh)    # sharded, never whole on one host
>>> logits = model(tokens)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from imitax import sharding
from imitax.models import gpt2, gpt_neox, llama
from imitax.models.config import TransformerConfig
from imitax.models.gpt2 import GPT2Config
from imitax.models.gpt_neox import GPTNeoXConfig
from imitax.models.llama import LlamaConfig
from imitax.models.transformer import Cache, Transformer

__all__ = [
    "Cache",
    "GPT2Config",
    "GPTNeoXConfig",
    "LlamaConfig",
    "PRESETS",
    "Transformer",
    "TransformerConfig",
    "abstract_model",
    "config_from_dict",
    "config_from_hf",
    "init_model",
    "preset",
]

# Hugging Face model_type -> config class.
CONFIG_CLASSES: dict[str, type[TransformerConfig]] = {
    "gpt2": GPT2Config,
    "llama": LlamaConfig,
    "mistral": LlamaConfig,
    "qwen2": LlamaConfig,
    "gpt_neox": GPTNeoXConfig,
}
_FAMILIES = {cls.family: cls for cls in CONFIG_CLASSES.values()}
SUPPORTED_MODEL_TYPES = tuple(CONFIG_CLASSES)

PRESETS = {**gpt2.PRESETS, **llama.PRESETS, **gpt_neox.PRESETS}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named architecture (``gpt2-xl``, ``llama2-7b``, ``pythia-1b``...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]().replace(**overrides)


def config_from_hf(hf: Mapping[str, Any] | Any, **overrides) -> TransformerConfig:
    """The imitax config of a Hugging Face ``config.json`` dict or config object."""
    model_type = hf.get("model_type") if isinstance(hf, Mapping) else getattr(hf, "model_type", None)
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return CONFIG_CLASSES[model_type].from_hf_config(hf).replace(**overrides)


def config_from_dict(data: Mapping[str, Any]) -> TransformerConfig:
    """Inverse of ``TransformerConfig.to_dict`` (the ``family`` key picks the class)."""
    family = data.get("family")
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family].from_dict(data)


def abstract_model(cfg: TransformerConfig) -> Transformer:
    """The model with shapes and dtypes only (``jax.eval_shape``): no memory used."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def init_model(cfg: TransformerConfig, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Transformer:
    """A randomly initialized model, created directly in its shards on ``mesh``.

    Shapes come from ``eval_shape``, shardings from the logical-axis rules, and
    the initializer runs under ``jax.jit`` with those output shardings, so no
    host ever holds the full weights.
    """
    graphdef, abstract_state = nnx.split(abstract_model(cfg))

    # Jitted even without a mesh, so that a sharded and an unsharded init of the
    # same seed give bitwise-identical weights.
    def init():
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

    if mesh is None:
        return nnx.merge(graphdef, jax.jit(init)())
    shardings = sharding.state_shardings(abstract_state, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
