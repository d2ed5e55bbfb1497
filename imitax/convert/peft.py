"""A LoRA run's adapters as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

The directory holds ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors``
with PEFT's key names, ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), for the transformers module each imitax projection is:
LLaMA-style models (``llama``, ``mistral``, ``qwen2``) adapt ``model.layers.{i}.self_attn.q_proj``
and the like one for one. GPT-2 keeps its weights as ``Conv1D`` (``fan_in_fan_out``) and fuses q, k
and v into ``attn.c_attn``: the n adapted ones of them become one adapter of rank ``n * r``
(their ``A``s stacked, their ``B``s block-diagonal; ``rank_pattern`` and ``alpha_pattern`` keep
the scale ``alpha / r``), which computes exactly the same update.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from etils import epath
from safetensors.numpy import save_file

from imitax import models
from imitax.convert import checkpoint
from imitax.convert.core import ConversionError
from imitax.models import lora

_LLAMA_MODULES = {
    "attn/q_proj": "self_attn.q_proj",
    "attn/k_proj": "self_attn.k_proj",
    "attn/v_proj": "self_attn.v_proj",
    "attn/o_proj": "self_attn.o_proj",
    "mlp/gate_proj": "mlp.gate_proj",
    "mlp/up_proj": "mlp.up_proj",
    "mlp/down_proj": "mlp.down_proj",
}
_GPT2_MODULES = {
    "attn/q_proj": "attn.c_attn",
    "attn/k_proj": "attn.c_attn",
    "attn/v_proj": "attn.c_attn",
    "attn/o_proj": "attn.c_proj",
    "mlp/up_proj": "mlp.c_fc",
    "mlp/down_proj": "mlp.c_proj",
}
_FAMILIES = {
    "gpt2": ("transformer.h.{i}", _GPT2_MODULES),
    "llama": ("model.layers.{i}", _LLAMA_MODULES),
    "mistral": ("model.layers.{i}", _LLAMA_MODULES),
    "qwen2": ("model.layers.{i}", _LLAMA_MODULES),
}


def _flat(proj) -> tuple[np.ndarray, np.ndarray]:
    """A stacked projection's adapters as ``A [l, in, r]`` and ``B [l, r, out]`` (float32, on the host)."""
    a, b = (np.asarray(jax.device_get(x[...]), np.float32) for x in (proj.lora_a, proj.lora_b))
    return a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1)


def adapter_tensors(model: models.Transformer) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PEFT's tensors of ``model``'s adapters, and each HF module's rank (a fused module's is a multiple)."""
    cfg = model.cfg
    if cfg.model_type not in _FAMILIES:
        raise ConversionError(
            f"PEFT export supports {', '.join(_FAMILIES)} models, not {cfg.model_type!r}; "
            "export the merged model instead (scripts/convert.py --export without --peft)"
        )
    prefix, modules = _FAMILIES[cfg.model_type]
    every = lora.projections(model)
    groups: dict[str, list[str]] = {}
    for name in lora.adapter_names(model):
        groups.setdefault(modules[name.removeprefix("layers/")], []).append(name)
    tensors, ranks = {}, {}
    for module, names in groups.items():
        names = sorted(names, key=lambda n: "qkv".find(n.split("/")[-1][0]))  # q, k, v: c_attn's order
        pieces = [_flat(every[n]) for n in names]
        if module == "attn.c_attn":
            pieces = _fuse_qkv(pieces, names, cfg)
        ((a, b),) = pieces
        ranks[module] = a.shape[-1]
        for i in range(cfg.num_layers):
            key = f"base_model.model.{prefix.format(i=i)}.{module}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return tensors, ranks


def _fuse_qkv(pieces, names, cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    """GPT-2's c_attn: the adapted of q, k, v as one adapter (A stacked on the rank, B block-diagonal)."""
    width = cfg.num_heads * cfg.head_dim  # each of q, k, v along c_attn's output
    a = np.concatenate([p[0] for p in pieces], axis=-1)
    layers, r = a.shape[0], pieces[0][0].shape[-1]
    b = np.zeros((layers, r * len(pieces), 3 * width), np.float32)
    for j, (name, (_, b_j)) in enumerate(zip(names, pieces, strict=True)):
        slot = "qkv".index(name.split("/")[-1][0])
        b[:, j * r : (j + 1) * r, slot * width : (slot + 1) * width] = b_j
    return [(a, b)]


def save_adapter(
    model: models.Transformer,
    out: str | pathlib.Path,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base: str = "",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``model``'s adapters (rank ``rank``, scale ``alpha / rank``) as a PEFT adapter directory."""
    out = pathlib.Path(out)
    checkpoint.check_output(out, overwrite)
    tensors, ranks = adapter_tensors(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in ranks.items() if k != rank},
        "alpha_pattern": {m: alpha * k / rank for m, k in ranks.items() if k != rank},
        "fan_in_fan_out": model.cfg.model_type == "gpt2",
        "bias": "none",
        "inference_mode": True,
    }
    with checkpoint.staged_directory(out, overwrite) as staged:
        staged = pathlib.Path(staged)
        staged.mkdir()
        save_file(tensors, staged / "adapter_model.safetensors", metadata={"format": "pt"})
        (staged / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def export_peft(ckpt: epath.PathLike, out: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the PEFT adapter directory of a LoRA run (a workdir or one of its step directories)."""
    checkpoint.check_output(out, overwrite)
    info = checkpoint.lora_info(ckpt)
    if info is None:
        raise ConversionError(f"{ckpt} holds no LoRA adapters: --peft exports LoRA runs (lora.rank > 0)")
    model = checkpoint.load_adapted(ckpt)
    return save_adapter(
        model,
        out,
        rank=info["rank"],
        alpha=info["alpha"],
        dropout=info["dropout"],
        base=info["base"],
        overwrite=overwrite,
    )
