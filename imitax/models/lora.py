"""Low-rank adapters (LoRA, Hu et al. 2021) on a transformer's projections.

``add_adapters(model, LoRAConfig(rank=16, alpha=32))`` gives every projection whose path
(``layers/attn/q_proj``, ``layers/mlp/down_proj``, ...) matches ``targets`` a pair
``A [*in, r]`` (uniform in +-1/sqrt(fan_in), PEFT's default) and ``B [r, *out]`` (zeros), so
the projection computes ``x W + b + (alpha / r) dropout(x) A B``: at initialization exactly the
base model. The adapters are ``nnx.LoRAParam`` variables, the base weights plain ``nnx.Param``:
:data:`BASE` and ``nnx.LoRAParam`` split the model into the frozen and the trained part. ``A``
takes the logical axes of the kernel's inputs and ``B`` of its outputs, so the adapters are
sharded like the weights they adapt (the rank axis is replicated).

>>> names = add_adapters(model, LoRAConfig(rank=16, alpha=32, dropout=0.05), mesh=mesh, seed=0)
>>> plain = merge_adapters(model)      # W + (alpha / r) A B, no adapters left
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imitax import sharding
from imitax.models.layers import Proj
from imitax.models.transformer import Transformer

# The attention and MLP projections of every family (re.search on the projection's path).
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
# The frozen part of an adapted model: every parameter but the adapters.
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank (0 = no adapters), ``alpha`` (the update is scaled by ``alpha / rank``), input dropout, targets."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets={self.targets!r} is not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projections(model: Transformer) -> dict[str, Proj]:
    """Every projection of the model by its '/'-joined path (``layers/attn/q_proj``...)."""
    return {"/".join(str(p) for p in path): node for path, node in nnx.iter_graph(model) if isinstance(node, Proj)}


def target_names(model: Transformer, targets: str) -> list[str]:
    """The projection paths ``targets`` matches (``re.search``).

    Raises:
      ValueError: it matches none; the message lists the paths there are.
    """
    every = projections(model)
    names = sorted(n for n in every if re.search(targets, n))
    if not names:
        raise ValueError(
            f"lora.targets={targets!r} matches no projection of this model; its projections are "
            f"{', '.join(sorted(every))} (e.g. --config.lora.targets='(q|v)_proj$')"
        )
    return names


def add_adapters(
    model: Transformer, cfg: LoRAConfig, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0
) -> list[str]:
    """Adds adapters to the projections ``cfg.targets`` matches, in place; returns their paths.

    ``A`` of the i-th path (sorted) is drawn from ``fold_in(key(seed), i)``; each array is created
    directly in its shards on ``mesh``.
    """
    names = target_names(model, cfg.targets)
    every = projections(model)
    specs = {}  # name -> (a shape, a axes, b shape, b axes, bound, dtype)
    for name in names:
        kernel = every[name].kernel
        axes = tuple(kernel.get_metadata("axes"))
        in_shape, out_shape, in_axes, out_axes = _split_dims(name, kernel.shape, axes)
        lead, lead_axes = (kernel.shape[:1], ("layers",)) if axes[0] == "layers" else ((), ())
        specs[name] = (
            ((*lead, *in_shape, cfg.rank), (*lead_axes, *in_axes, None)),
            ((*lead, cfg.rank, *out_shape), (*lead_axes, None, *out_axes)),
            1.0 / math.sqrt(math.prod(in_shape)),
            kernel.dtype,
        )

    def init():
        out = {}
        for i, (name, ((a_shape, _), (b_shape, _), bound, dtype)) in enumerate(specs.items()):
            key = jax.random.fold_in(jax.random.key(seed), i)
            a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
            out[name] = (a, jnp.zeros(b_shape, dtype))
        return out

    shardings = {n: (_sharding(mesh, *a), _sharding(mesh, *b)) for n, (a, b, _, _) in specs.items()}
    arrays = jax.jit(init, out_shardings=shardings if mesh is not None else None)()
    for name, (a, b) in arrays.items():
        proj = every[name]
        (_, a_axes), (_, b_axes) = specs[name][:2]
        proj.lora_a = nnx.LoRAParam(a, axes=a_axes)
        proj.lora_b = nnx.LoRAParam(b, axes=b_axes)
        proj.lora_scale, proj.lora_dropout = cfg.scale, cfg.dropout
    return names


# Output dims of each projection's kernel (the rest, after the layer axis, are inputs).
_OUT_NDIM = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 1, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def _split_dims(name: str, shape, axes):
    """``(in_shape, out_shape, in_axes, out_axes)`` of a projection's kernel (without the layer axis)."""
    if axes[0] == "layers":
        shape, axes = shape[1:], axes[1:]
    out_ndim = _OUT_NDIM[name.rsplit("/", 1)[-1]]
    k = len(shape) - out_ndim
    return tuple(shape[:k]), tuple(shape[k:]), tuple(axes[:k]), tuple(axes[k:])


def _sharding(mesh, shape, axes):
    if mesh is None:
        return None
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))


def adapter_names(model: Transformer) -> list[str]:
    """The paths of the projections that carry adapters."""
    return sorted(n for n, p in projections(model).items() if p.lora_a is not None)


def delta(proj: Proj) -> jax.Array:
    """``scale * A B`` in the kernel's shape (float32), stacked over the layers when the kernel is."""
    a, b = proj.lora_a[...].astype(jnp.float32), proj.lora_b[...].astype(jnp.float32)
    if proj.kernel.get_metadata("axes")[0] == "layers":  # per layer: a [l, *in, r] x b [l, r, *out]
        return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) * proj.lora_scale
    return jnp.tensordot(a, b, axes=1) * proj.lora_scale


def merge_adapters(model: Transformer) -> Transformer:
    """Folds every adapter into its kernel (``W + scale * A B``, in float32) and removes it; in place."""
    for proj in projections(model).values():
        if proj.lora_a is None:
            continue
        kernel = proj.kernel[...]
        merged = jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(w.dtype))(kernel, delta(proj))
        proj.kernel[...] = merged
        proj.lora_a, proj.lora_b = nnx.data(None), nnx.data(None)
        proj.lora_scale = proj.lora_dropout = 0.0
    return model


def fingerprint(params) -> str:
    """A short hash naming a set of base weights: each array's path, shape, dtype and first 4,096 values.

    Cheap on any model size (a few KB read per array) and exact: any finetuning moves the leading
    values of every weight, so a base that changed after a LoRA run started is told apart.
    """
    digest = hashlib.sha256()
    flat = sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))
    heads = jax.jit(lambda xs: [x.reshape(-1)[:4096].astype(jnp.float32) for x in xs])([x for _, x in flat])
    for (path, x), head in zip(flat, jax.device_get(heads), strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}".encode())
        digest.update(np.asarray(head).tobytes())
    return digest.hexdigest()[:16]
