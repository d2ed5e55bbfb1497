"""The model hyperparameters shared by every decoder family.

Each family (``gpt2.py``, ``llama.py``, ``gpt_neox.py``) subclasses
:class:`TransformerConfig` to add ``from_hf_config``/``to_hf_config`` and its
presets; the architecture itself is described entirely by the fields below, so
one :class:`~imitax.models.transformer.Transformer` runs every family.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp

# Remat policies by name; 'none' keeps every activation, 'full' recomputes each layer.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Attention implementations (imitax.models.layers.resolve_attention_impl): 'auto'
# picks cuDNN flash on GPU, splash on TPU and the blocked XLA path elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of a decoder-only transformer plus how to run it.

    Attributes:
      model_type: the Hugging Face ``model_type`` this config came from / exports to.
      vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
        mlp_dim, max_position_embeddings: the shapes.
      norm: ``'layernorm'`` (scale and bias) or ``'rmsnorm'`` (scale only).
      activation: ``'gelu'`` (erf), ``'gelu_tanh'`` or ``'silu'``.
      gated_mlp: SwiGLU-style ``down(act(gate(x)) * up(x))`` instead of ``down(act(up(x)))``.
      position: ``'learned'`` (absolute embeddings) or ``'rope'``.
      rope_theta, rope_fraction: RoPE base and the fraction of each head that rotates.
      rope_scaling: ``None`` or a tuple of (key, value) pairs, e.g. llama3 or linear scaling.
      parallel_residual: GPT-NeoX's ``x + attn(ln1(x)) + mlp(ln2(x))``.
      qkv_bias, out_bias, mlp_bias: which projections carry a bias.
      tie_embeddings: the output projection is the transposed input embedding.
      sliding_window: attend to at most this many past positions (``None`` = all),
        in the layers flagged by ``sliding_layers`` (``None`` = every layer).
      scale_attn_by_layer: GPT-2's ``scale_attn_by_inverse_layer_idx``.
      bos_token_id, eos_token_id, pad_token_id: special token ids (eos may be a tuple).
      embed_dropout, attention_dropout, residual_dropout: dropout rates (training
        only: the model drops nothing unless called with a ``dropout_rng``) on the
        input embeddings, on the attention probabilities, and on each attention
        and MLP output before it joins the residual stream. These are the three
        places GPT-2 (``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``), GPT-NeoX
        (``hidden_dropout`` for the first and last, ``attention_dropout``) and
        EasyLM's LLaMA, which the study trained with, put dropout; transformers'
        LLaMA family has ``attention_dropout`` only.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      remat: one of :data:`REMAT_POLICIES`; scan_layers: ``lax.scan`` over the
        (always stacked) layer parameters instead of a Python loop.
      attention_impl: one of :data:`ATTENTION_IMPLS`, how attention without a
        KV cache is computed (see ``imitax.models.layers.resolve_attention_impl``).
    """

    family: ClassVar[str] = "transformer"

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_position_embeddings: int
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    parallel_residual: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    scale_attn_by_layer: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")

        check(self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}")
        check(self.activation in ("gelu", "gelu_tanh", "silu"), f"unsupported activation {self.activation!r}")
        check(self.position in ("learned", "rope"), f"position must be learned or rope, got {self.position!r}")
        check(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
        for name in ("embed_dropout", "attention_dropout", "residual_dropout"):
            rate = getattr(self, name)
            check(0.0 <= rate < 1.0, f"{name} must be in [0, 1), got {rate!r}")
        check(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        check(
            self.attention_impl in ATTENTION_IMPLS,
            f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{type(self).__name__}: {name}={getattr(self, name)!r} is not a dtype") from None
        if self.sliding_layers is not None:
            check(len(self.sliding_layers) == self.num_layers, "sliding_layers needs one flag per layer")

    # -- derived ---------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_fraction)

    def layer_windows(self) -> tuple[int | None, ...]:
        """The attention window of each layer (``None`` = unlimited)."""
        if self.sliding_window is None:
            return (None,) * self.num_layers
        flags = self.sliding_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if f else None for f in flags)

    def check_length(self, length: int, *, what: str = "sequence length", fix: str = "") -> None:
        """Refuses (or warns about) ``length`` positions beyond what the model was trained for.

        A learned-position model (GPT-2) has an embedding row per position: position
        ``max_position_embeddings`` and beyond have none (``jnp.take`` would read NaN), so a
        longer ``length`` raises. A RoPE model can be run past its trained length, as
        transformers allows, with a warning: quality usually degrades there.

        Args:
          length: the number of positions a row will hold (prompt plus generated tokens).
          what: how the caller names ``length`` in the message (``'seq_len'``, ...).
          fix: what the user should change (``'--config.seq_len'``, ...).

        Raises:
          ValueError: ``length`` exceeds a learned-position model's table.
        """
        limit = self.max_position_embeddings
        if length <= limit:
            return
        change = f"; set {fix} to at most {limit}" if fix else ""
        if self.position == "learned":
            raise ValueError(
                f"{what} {length} is longer than the {limit} learned positions of this {self.model_type} "
                f"model (positions {limit}.. have no embedding){change}"
            )
        import warnings

        warnings.warn(
            f"{what} {length} is longer than this {self.model_type} model's max_position_embeddings "
            f"({limit}); RoPE runs there, but the model was not trained at that length{change}",
            stacklevel=2,
        )

    def num_params(self) -> int:
        """Parameter count computed from the shapes (matches the published counts)."""
        e, h, k, d, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        norm = e * (2 if self.norm == "layernorm" else 1)
        attn = e * d * (h + 2 * k) + h * d * e
        attn += d * (h + 2 * k) * self.qkv_bias + e * self.out_bias
        mlp = e * m * (3 if self.gated_mlp else 2) + (m + e) * self.mlp_bias
        if self.gated_mlp and self.mlp_bias:
            mlp += m
        layer = 2 * norm + attn + mlp
        total = self.num_layers * layer + norm + self.vocab_size * e
        total += 0 if self.tie_embeddings else self.vocab_size * e
        total += self.max_position_embeddings * e if self.position == "learned" else 0
        return total

    # -- serialization -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["family"] = self.family
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
        data = dict(data)
        data.pop("family", None)
        for key in ("rope_scaling",):
            if data.get(key) is not None:
                data[key] = tuple((k, v) for k, v in data[key])
        for key in ("sliding_layers", "eos_token_id"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)


def hf_config_object(hf: Any):
    """A ``transformers`` config from a ``config.json`` dict (or a config object).

    Going through transformers' own config classes normalizes both the v4 and the
    v5 spellings (``rope_theta``/``rope_scaling`` vs ``rope_parameters``) the same
    way the reference implementation reads them. Only configuration code is
    imported: no torch, and never ``trust_remote_code``.

    Raises:
      ValueError: an unknown ``model_type``, or per-layer overrides (transformers'
        ``per_layer_config``): imitax's stacked layers all share one config, and
        transformers refuses to read such a field globally with a RuntimeError.
    """
    if isinstance(hf, Mapping):
        from transformers import CONFIG_MAPPING

        data = dict(hf)
        model_type = data.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {model_type!r}")
        hf = CONFIG_MAPPING[model_type].from_dict(data)
    if getattr(hf, "is_heterogeneous", False):
        raise ValueError(
            "per-layer config overrides (per_layer_config) are not supported: every layer must have the same shape"
        )
    return hf


def hf_activation(name: str) -> str:
    """Maps a transformers ``hidden_act``/``activation_function`` name to ours."""
    table = {
        "gelu": "gelu",
        "gelu_python": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "silu": "silu",
        "swish": "silu",
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported (supported: {sorted(table)})")
    return table[name]


def rope_fields(rope: Mapping[str, Any] | None) -> dict[str, Any]:
    """``rope_theta``, ``rope_fraction`` and ``rope_scaling`` from transformers' ``rope_parameters``."""
    rope = dict(rope or {})
    theta = float(rope.pop("rope_theta", 10000.0))
    fraction = float(rope.pop("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    scaling = None if kind == "default" else tuple(sorted({**rope, "rope_type": kind}.items()))
    return {"rope_theta": theta, "rope_fraction": fraction, "rope_scaling": scaling}


def rope_parameters(cfg: TransformerConfig) -> dict[str, Any]:
    """The inverse of :func:`rope_fields`: transformers' ``rope_parameters`` dict."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    params.update(dict(cfg.rope_scaling or ()))
    if cfg.rope_fraction != 1.0:
        params["partial_rotary_factor"] = cfg.rope_fraction
    return params


def token_ids(hf) -> dict[str, Any]:
    eos = getattr(hf, "eos_token_id", None)
    return {
        "bos_token_id": getattr(hf, "bos_token_id", None),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
        "pad_token_id": getattr(hf, "pad_token_id", None),
    }
