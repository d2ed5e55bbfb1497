"""GPT-NeoX / Pythia: parallel residual, partial rotary embeddings, LayerNorm, untied.

The Pythia suite (70M to 12B, one training corpus and data order) is the natural
base-model-size axis of a scaling sweep.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from imitax.models.config import (
    TransformerConfig,
    hf_activation,
    hf_config_object,
    rope_fields,
    rope_parameters,
    token_ids,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(TransformerConfig):
    family = "gpt_neox"

    model_type: str = "gpt_neox"
    max_position_embeddings: int = 2048
    norm: str = "layernorm"
    activation: str = "gelu"
    gated_mlp: bool = False
    rope_fraction: float = 0.25
    parallel_residual: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 0

    @classmethod
    def from_hf_config(cls, hf: Any) -> GPTNeoXConfig:
        """From a transformers ``GPTNeoXConfig`` or its ``config.json`` dict."""
        hf = hf_config_object(hf)
        heads = hf.num_attention_heads
        bias = bool(getattr(hf, "attention_bias", True))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hf.hidden_size // heads,
            mlp_dim=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.layer_norm_eps,
            activation=hf_activation(hf.hidden_act),
            parallel_residual=bool(hf.use_parallel_residual),
            qkv_bias=bias,
            out_bias=bias,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # hidden_dropout acts on the embeddings and on both residual branches.
            embed_dropout=float(hf.hidden_dropout),
            attention_dropout=float(hf.attention_dropout),
            residual_dropout=float(hf.hidden_dropout),
            **rope_fields(hf.rope_parameters),
            **token_ids(hf),
        )

    def to_hf_config(self):
        from transformers import GPTNeoXConfig as HFGPTNeoXConfig

        if self.qkv_bias != self.out_bias or not self.mlp_bias:
            raise ValueError("gpt_neox has one attention_bias for qkv and dense, and always an MLP bias")
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[self.activation]
        return HFGPTNeoXConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.mlp_dim,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.norm_eps,
            hidden_act=act,
            use_parallel_residual=self.parallel_residual,
            attention_bias=self.qkv_bias,
            tie_word_embeddings=self.tie_embeddings,
            # One field for both (a training setting: an exported model's outputs never depend on it).
            hidden_dropout=self.residual_dropout,
            attention_dropout=self.attention_dropout,
            rope_parameters=rope_parameters(self),
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            architectures=["GPTNeoXForCausalLM"],
            dtype=self.param_dtype,
        )


def _pythia(e: int, layers: int, heads: int, vocab: int = 50304) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=e,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=e // heads,
        mlp_dim=4 * e,
    )


PRESETS = {
    "pythia-70m": lambda: _pythia(512, 6, 8),
    "pythia-160m": lambda: _pythia(768, 12, 12),
    "pythia-410m": lambda: _pythia(1024, 24, 16),
    "pythia-1b": lambda: _pythia(2048, 16, 8),
    "pythia-1.4b": lambda: _pythia(2048, 24, 16),
    "pythia-2.8b": lambda: _pythia(2560, 32, 32),
    "pythia-6.9b": lambda: _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": lambda: _pythia(5120, 36, 40, vocab=50688),
}
