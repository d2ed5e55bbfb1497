"""GPT-2 (124M to 1.5B XL): learned positions, LayerNorm, GELU, tied embeddings."""

from __future__ import annotations

import dataclasses
from typing import Any

from imitax.models.config import TransformerConfig, hf_activation, hf_config_object, token_ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(TransformerConfig):
    family = "gpt2"

    model_type: str = "gpt2"
    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    norm: str = "layernorm"
    activation: str = "gelu_tanh"
    gated_mlp: bool = False
    position: str = "learned"
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256

    @classmethod
    def from_hf_config(cls, hf: Any) -> GPT2Config:
        """From a transformers ``GPT2Config`` or its ``config.json`` dict."""
        hf = hf_config_object(hf)
        if not getattr(hf, "scale_attn_weights", True):
            raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported")
        if getattr(hf, "add_cross_attention", False):
            raise ValueError("GPT-2 configs with cross-attention are not decoder-only LMs")
        e = hf.n_embd
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=e,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            num_kv_heads=hf.n_head,
            head_dim=e // hf.n_head,
            mlp_dim=hf.n_inner or 4 * e,
            max_position_embeddings=hf.n_positions,
            norm_eps=hf.layer_norm_epsilon,
            activation=hf_activation(hf.activation_function),
            scale_attn_by_layer=bool(hf.scale_attn_by_inverse_layer_idx),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            embed_dropout=float(hf.embd_pdrop),
            attention_dropout=float(hf.attn_pdrop),
            residual_dropout=float(hf.resid_pdrop),
            **token_ids(hf),
        )

    def to_hf_config(self):
        from transformers import GPT2Config as HFGPT2Config

        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[self.activation]
        return HFGPT2Config(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_layers,
            n_head=self.num_heads,
            n_inner=self.mlp_dim,
            n_positions=self.max_position_embeddings,
            layer_norm_epsilon=self.norm_eps,
            activation_function=act,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_layer,
            tie_word_embeddings=self.tie_embeddings,
            embd_pdrop=self.embed_dropout,
            attn_pdrop=self.attention_dropout,
            resid_pdrop=self.residual_dropout,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            architectures=["GPT2LMHeadModel"],
            dtype=self.param_dtype,
        )


def _gpt2(e: int, layers: int, heads: int) -> GPT2Config:
    return GPT2Config(
        hidden_size=e, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=e // heads, mlp_dim=4 * e
    )


PRESETS = {
    "gpt2": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    "gpt2-xl": lambda: _gpt2(1600, 48, 25),
}
# Published sizes: the study's GPT-2 1.5B is gpt2-xl.
PRESETS["gpt2-124m"] = PRESETS["gpt2"]
PRESETS["gpt2-1.5b"] = PRESETS["gpt2-xl"]
