"""The LLaMA family: LLaMA 1/2/3/3.1, Mistral and Qwen2/2.5.

RMSNorm, RoPE (with llama3 or linear scaling), SwiGLU, grouped-query attention,
tied or untied embeddings; Mistral's sliding window; Qwen2's q/k/v biases.
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

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(TransformerConfig):
    family = "llama"

    model_type: str = "llama"

    @classmethod
    def from_hf_config(cls, hf: Any) -> LlamaConfig:
        """From a transformers Llama/Mistral/Qwen2 config or its ``config.json`` dict."""
        hf = hf_config_object(hf)
        mt = hf.model_type
        if mt not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig reads model_type {MODEL_TYPES}, got {mt!r}")
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        if mt == "llama":
            qkv_bias = out_bias = bool(hf.attention_bias)
            mlp_bias = bool(hf.mlp_bias)
        else:
            qkv_bias, out_bias, mlp_bias = mt == "qwen2", False, False
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        sliding_layers = None
        if window is not None and layer_types is not None:
            sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
            if not any(sliding_layers):
                window, sliding_layers = None, None
            elif all(sliding_layers):
                sliding_layers = None
        return cls(
            model_type=mt,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=hf.num_key_value_heads or heads,
            head_dim=head_dim,
            mlp_dim=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.rms_norm_eps,
            activation=hf_activation(hf.hidden_act),
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            mlp_bias=mlp_bias,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            attention_dropout=float(hf.attention_dropout or 0.0),
            **rope_fields(hf.rope_parameters),
            **token_ids(hf),
        )

    def to_hf_config(self):
        import transformers

        act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[self.activation]
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            hidden_act=act,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters=rope_parameters(self),
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            # transformers' llama family has no embedding or residual dropout; like every
            # dropout rate these only matter for training, so they are left out of the export.
            attention_dropout=self.attention_dropout,
            dtype=self.param_dtype,
        )

        def require(ok: bool, what: str):
            if not ok:
                raise ValueError(f"this config cannot be exported as model_type {self.model_type!r}: {what}")

        if self.model_type == "llama":
            require(self.qkv_bias == self.out_bias, "llama has one attention_bias for q, k, v and o")
            require(self.sliding_window is None, "llama has no sliding window")
            return transformers.LlamaConfig(
                head_dim=self.head_dim,
                attention_bias=self.qkv_bias,
                mlp_bias=self.mlp_bias,
                architectures=["LlamaForCausalLM"],
                **common,
            )
        require(not self.mlp_bias and not self.out_bias, "no MLP or output-projection bias")
        if self.model_type == "mistral":
            require(not self.qkv_bias, "mistral has no q/k/v bias")
            require(self.sliding_layers is None, "mistral's window applies to every layer")
            return transformers.MistralConfig(
                head_dim=self.head_dim,
                sliding_window=self.sliding_window,
                architectures=["MistralForCausalLM"],
                **common,
            )
        require(self.model_type == "qwen2", f"unknown model_type {self.model_type!r}")
        require(self.qkv_bias, "qwen2 has q/k/v biases")
        require(self.head_dim * self.num_heads == self.hidden_size, "qwen2 derives head_dim from hidden_size")
        layer_types, window_layers = None, {}
        if self.sliding_window is not None:
            flags = self.sliding_layers or (True,) * self.num_layers
            layer_types = ["sliding_attention" if f else "full_attention" for f in flags]
            # Readers that predate layer_types (older transformers, other engines) slide
            # layers i >= max_window_layers; say so where the flags have that form.
            first = flags.index(True) if any(flags) else len(flags)
            if all(flags[first:]):
                window_layers = {"max_window_layers": first}
        return transformers.Qwen2Config(
            use_sliding_window=self.sliding_window is not None,
            sliding_window=self.sliding_window,
            layer_types=layer_types,
            **window_layers,
            architectures=["Qwen2ForCausalLM"],
            **common,
        )


def _llama(e, m, layers, heads, kv, vocab, max_pos, eps, theta=10000.0, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=e,
        mlp_dim=m,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=e // heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        norm_eps=eps,
        rope_theta=theta,
        **kw,
    )


_LLAMA31_ROPE = (
    ("factor", 8.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)
_LLAMA_IDS = dict(bos_token_id=1, eos_token_id=2)
_LLAMA3_IDS = dict(bos_token_id=128000, eos_token_id=128001)
_QWEN_IDS = dict(bos_token_id=151643, eos_token_id=151643)


def _qwen(e, m, layers, heads, kv, tied, vocab=151936, eps=1e-6) -> LlamaConfig:
    return _llama(
        e,
        m,
        layers,
        heads,
        kv,
        vocab,
        32768,
        eps,
        1e6,
        model_type="qwen2",
        qkv_bias=True,
        tie_embeddings=tied,
        **_QWEN_IDS,
    )


PRESETS = {
    "llama-7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, 2048, 1e-6, **_LLAMA_IDS),
    "llama-13b": lambda: _llama(5120, 13824, 40, 40, 40, 32000, 2048, 1e-6, **_LLAMA_IDS),
    "llama2-7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, 4096, 1e-5, **_LLAMA_IDS),
    "llama2-13b": lambda: _llama(5120, 13824, 40, 40, 40, 32000, 4096, 1e-5, **_LLAMA_IDS),
    "llama3-8b": lambda: _llama(4096, 14336, 32, 32, 8, 128256, 8192, 1e-5, 500000.0, **_LLAMA3_IDS),
    "llama3.1-8b": lambda: _llama(
        4096, 14336, 32, 32, 8, 128256, 131072, 1e-5, 500000.0, rope_scaling=_LLAMA31_ROPE, **_LLAMA3_IDS
    ),
    "mistral-7b": lambda: _llama(
        4096, 14336, 32, 32, 8, 32000, 32768, 1e-5, model_type="mistral", sliding_window=4096, **_LLAMA_IDS
    ),
    "qwen2.5-0.5b": lambda: _qwen(896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": lambda: _qwen(1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": lambda: _qwen(2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": lambda: _qwen(3584, 18944, 28, 28, 4, False, vocab=152064),
    "qwen2.5-14b": lambda: _qwen(5120, 13824, 48, 40, 8, False, vocab=152064, eps=1e-5),
}
