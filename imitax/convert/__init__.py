"""Lossless Hugging Face <-> imitax conversion, and imitax parameter checkpoints.

>>> model = convert.load_hf("llama-dir", mesh=mesh)                  # straight into its shards
>>> convert.convert_hf_to_checkpoint("llama-dir", "ckpt")            # Orbax + config + tokenizer
>>> model = convert.load_checkpoint("ckpt", mesh=mesh, dtype="bfloat16")
>>> convert.export_hf("ckpt", "hf-out", max_shard_size="5GB")        # transformers loads it
"""

from imitax.convert.checkpoint import (
    TOKENIZER_FILES,
    load_adapted,
    load_checkpoint,
    load_config,
    lora_info,
    resolve,
    save_checkpoint,
    tokenizer_dir,
)
from imitax.convert.core import ConversionError, params_from_hf, params_to_hf
from imitax.convert.hf import DTYPES, SafetensorsReader, convert_hf_to_checkpoint, export_hf, load_hf, read_hf_config
from imitax.convert.paths import model_config, model_kind, require_model_kind

__all__ = [
    "DTYPES",
    "TOKENIZER_FILES",
    "ConversionError",
    "SafetensorsReader",
    "convert_hf_to_checkpoint",
    "export_hf",
    "load_adapted",
    "load_checkpoint",
    "load_config",
    "load_hf",
    "lora_info",
    "model_config",
    "model_kind",
    "params_from_hf",
    "params_to_hf",
    "read_hf_config",
    "require_model_kind",
    "resolve",
    "save_checkpoint",
    "tokenizer_dir",
]
