"""Declarative name maps between Hugging Face tensors and imitax parameters.

Each :class:`Rule` ties one HF tensor name (``{i}`` = layer index) to one or
more imitax parameter paths, with a pair of per-tensor transforms that are exact
inverses (transposes, reshapes, splits and concatenations only: no arithmetic,
so import -> export -> import is bitwise identical).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from imitax.models.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """``hf`` tensor <-> ``params`` (imitax paths, '/'-joined; ``layers/...`` are stacked).

    Attributes:
      hf: the HF tensor name; ``{i}`` marks a per-layer tensor.
      params: the imitax parameter paths it becomes (several for fused tensors).
      to_imitax: HF array -> tuple of imitax arrays (one layer's slice).
      to_hf: imitax arrays (one layer's slice) -> HF array.
    """

    hf: str
    params: tuple[str, ...]
    to_imitax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def same(hf: str, param: str) -> Rule:
    return Rule(hf, (param,), lambda w: (w,), lambda p: p)


def reshaped(hf: str, param: str, shape: tuple[int, ...]) -> Rule:
    """A vector (bias) reshaped, e.g. ``[heads * head_dim]`` -> ``[heads, head_dim]``."""
    return Rule(hf, (param,), lambda w: (w.reshape(shape),), lambda p: p.reshape(-1))


def linear(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """A ``torch.nn.Linear`` weight ``[out, in]`` -> kernel ``[*in_shape, *out_shape]``."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Rule(
        hf,
        (param,),
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda p: p.reshape(n_in, n_out).T,
    )


def conv1d(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """A GPT-2 ``Conv1D`` weight, stored ``[in, out]`` already."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Rule(hf, (param,), lambda w: (w.reshape(*in_shape, *out_shape),), lambda p: p.reshape(n_in, n_out))


def _contiguous(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(a) for a in arrays)


def gpt2_rules(cfg: TransformerConfig) -> list[Rule]:
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    a = "layers/attn"

    def split_qkv_weight(w):  # [e, 3 * h * d], q|k|v along the output
        return _contiguous(*(x.reshape(e, h, d) for x in np.split(w, 3, axis=1)))

    def join_qkv_weight(q, k, v):
        return np.concatenate([x.reshape(e, h * d) for x in (q, k, v)], axis=1)

    def split_qkv_bias(b):
        return _contiguous(*(x.reshape(h, d) for x in np.split(b, 3)))

    def join_qkv_bias(q, k, v):
        return np.concatenate([x.reshape(-1) for x in (q, k, v)])

    qkv = (f"{a}/q_proj/kernel", f"{a}/k_proj/kernel", f"{a}/v_proj/kernel")
    qkv_b = (f"{a}/q_proj/bias", f"{a}/k_proj/bias", f"{a}/v_proj/bias")
    p = "transformer.h.{i}"
    rules = [
        same("transformer.wte.weight", "embed"),
        same("transformer.wpe.weight", "pos_embed"),
        same(f"{p}.ln_1.weight", "layers/attn_norm/scale"),
        same(f"{p}.ln_1.bias", "layers/attn_norm/bias"),
        Rule(f"{p}.attn.c_attn.weight", qkv, split_qkv_weight, join_qkv_weight),
        Rule(f"{p}.attn.c_attn.bias", qkv_b, split_qkv_bias, join_qkv_bias),
        conv1d(f"{p}.attn.c_proj.weight", f"{a}/o_proj/kernel", (h, d), (e,)),
        same(f"{p}.attn.c_proj.bias", f"{a}/o_proj/bias"),
        same(f"{p}.ln_2.weight", "layers/mlp_norm/scale"),
        same(f"{p}.ln_2.bias", "layers/mlp_norm/bias"),
        conv1d(f"{p}.mlp.c_fc.weight", "layers/mlp/up_proj/kernel", (e,), (cfg.mlp_dim,)),
        same(f"{p}.mlp.c_fc.bias", "layers/mlp/up_proj/bias"),
        conv1d(f"{p}.mlp.c_proj.weight", "layers/mlp/down_proj/kernel", (cfg.mlp_dim,), (e,)),
        same(f"{p}.mlp.c_proj.bias", "layers/mlp/down_proj/bias"),
        same("transformer.ln_f.weight", "final_norm/scale"),
        same("transformer.ln_f.bias", "final_norm/bias"),
    ]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.weight", "lm_head", (e,), (cfg.vocab_size,)))
    return rules


def llama_rules(cfg: TransformerConfig) -> list[Rule]:
    e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    p, a = "model.layers.{i}", "layers/attn"
    rules = [
        same("model.embed_tokens.weight", "embed"),
        same(f"{p}.input_layernorm.weight", "layers/attn_norm/scale"),
        linear(f"{p}.self_attn.q_proj.weight", f"{a}/q_proj/kernel", (e,), (h, d)),
        linear(f"{p}.self_attn.k_proj.weight", f"{a}/k_proj/kernel", (e,), (k, d)),
        linear(f"{p}.self_attn.v_proj.weight", f"{a}/v_proj/kernel", (e,), (k, d)),
        linear(f"{p}.self_attn.o_proj.weight", f"{a}/o_proj/kernel", (h, d), (e,)),
        same(f"{p}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
        linear(f"{p}.mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", (e,), (m,)),
        linear(f"{p}.mlp.up_proj.weight", "layers/mlp/up_proj/kernel", (e,), (m,)),
        linear(f"{p}.mlp.down_proj.weight", "layers/mlp/down_proj/kernel", (m,), (e,)),
        same("model.norm.weight", "final_norm/scale"),
    ]
    if cfg.qkv_bias:
        rules += [
            reshaped(f"{p}.self_attn.q_proj.bias", f"{a}/q_proj/bias", (h, d)),
            reshaped(f"{p}.self_attn.k_proj.bias", f"{a}/k_proj/bias", (k, d)),
            reshaped(f"{p}.self_attn.v_proj.bias", f"{a}/v_proj/bias", (k, d)),
        ]
    if cfg.out_bias:
        rules.append(same(f"{p}.self_attn.o_proj.bias", f"{a}/o_proj/bias"))
    if cfg.mlp_bias:
        rules += [same(f"{p}.mlp.{n}.bias", f"layers/mlp/{n}/bias") for n in ("gate_proj", "up_proj", "down_proj")]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.weight", "lm_head", (e,), (cfg.vocab_size,)))
    return rules


def gpt_neox_rules(cfg: TransformerConfig) -> list[Rule]:
    e, h, d, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    p, a = "gpt_neox.layers.{i}", "layers/attn"

    # query_key_value rows are laid out [heads, (q|k|v), head_dim].
    def split_qkv_weight(w):  # [h * 3 * d, e]
        w = w.reshape(h, 3, d, e)
        return _contiguous(*(w[:, j].transpose(2, 0, 1) for j in range(3)))

    def join_qkv_weight(q, k, v):
        return np.stack([x.transpose(1, 2, 0) for x in (q, k, v)], axis=1).reshape(h * 3 * d, e)

    def split_qkv_bias(b):
        b = b.reshape(h, 3, d)
        return _contiguous(*(b[:, j] for j in range(3)))

    def join_qkv_bias(q, k, v):
        return np.stack([q, k, v], axis=1).reshape(-1)

    rules = [
        same("gpt_neox.embed_in.weight", "embed"),
        same(f"{p}.input_layernorm.weight", "layers/attn_norm/scale"),
        same(f"{p}.input_layernorm.bias", "layers/attn_norm/bias"),
        Rule(
            f"{p}.attention.query_key_value.weight",
            (f"{a}/q_proj/kernel", f"{a}/k_proj/kernel", f"{a}/v_proj/kernel"),
            split_qkv_weight,
            join_qkv_weight,
        ),
        linear(f"{p}.attention.dense.weight", f"{a}/o_proj/kernel", (h, d), (e,)),
        same(f"{p}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
        same(f"{p}.post_attention_layernorm.bias", "layers/mlp_norm/bias"),
        linear(f"{p}.mlp.dense_h_to_4h.weight", "layers/mlp/up_proj/kernel", (e,), (m,)),
        same(f"{p}.mlp.dense_h_to_4h.bias", "layers/mlp/up_proj/bias"),
        linear(f"{p}.mlp.dense_4h_to_h.weight", "layers/mlp/down_proj/kernel", (m,), (e,)),
        same(f"{p}.mlp.dense_4h_to_h.bias", "layers/mlp/down_proj/bias"),
        same("gpt_neox.final_layer_norm.weight", "final_norm/scale"),
        same("gpt_neox.final_layer_norm.bias", "final_norm/bias"),
    ]
    if cfg.qkv_bias:
        rules += [
            Rule(
                f"{p}.attention.query_key_value.bias",
                (f"{a}/q_proj/bias", f"{a}/k_proj/bias", f"{a}/v_proj/bias"),
                split_qkv_bias,
                join_qkv_bias,
            ),
            same(f"{p}.attention.dense.bias", f"{a}/o_proj/bias"),
        ]
    if not cfg.tie_embeddings:
        rules.append(linear("embed_out.weight", "lm_head", (e,), (cfg.vocab_size,)))
    return rules


_RULES = {"gpt2": gpt2_rules, "llama": llama_rules, "gpt_neox": gpt_neox_rules}

# HF tensors that are buffers, not parameters (old checkpoints saved them).
IGNORED_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    ".attention.bias",
    ".attention.masked_bias",
    "rotary_emb.inv_freq",
)

# Other names the same tensor has had: transformers 5 saves Pythia's output
# projection as lm_head.weight; hub checkpoints (and our exports) use embed_out.weight.
ALIASES = {"embed_out.weight": ("lm_head.weight",)}

# Checkpoints saved from the base model (no LM head) drop this prefix.
OPTIONAL_PREFIXES = {"gpt2": "transformer.", "llama": "model.", "gpt_neox": "gpt_neox."}


def rules_for(cfg: TransformerConfig) -> list[Rule]:
    """The name map of ``cfg``'s family."""
    return _RULES[cfg.family](cfg)
