"""Every preset instantiates abstractly (``jax.eval_shape``) with its published size."""

import jax
import pytest
import torch
import transformers
from flax import nnx

from imitax import models

# Parameter counts as published (model cards / safetensors metadata of the hub checkpoints).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
}


def test_every_preset_has_a_published_count():
    canonical = {name for name in models.PRESETS if name not in ("gpt2-124m", "gpt2-1.5b")}
    assert canonical == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    cfg = models.preset(name)
    abstract = models.abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert sum(x.size for x in leaves) == PUBLISHED[name] == cfg.num_params()


@pytest.mark.parametrize("name", ["gpt2-xl", "llama2-7b", "llama3.1-8b", "mistral-7b", "qwen2.5-1.5b", "pythia-1b"])
def test_preset_matches_transformers_architecture(name):
    """The exported HF config builds (on the meta device) a model of the same size."""
    cfg = models.preset(name)
    hf_config = cfg.to_hf_config()
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    count = sum(p.numel() for p in hf_model.parameters())  # tied weights are counted once
    assert count == cfg.num_params()
    # And the config survives the round trip through transformers.
    assert models.config_from_hf(hf_config.to_dict()) == cfg
