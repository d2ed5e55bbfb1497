"""Device meshes and the one table that maps logical axis names onto them.

Model code names every parameter and activation dimension logically (``embed``,
``mlp``, ``heads``...). :data:`RULES` maps those names onto the three mesh axes
``data``, ``fsdp`` and ``tensor``; nothing else in imitax knows about mesh axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
# Parameters: FSDP shards the model dimension, tensor parallelism the wide ones.
# Activations ('act_*') shard their batch over data and fsdp, and the same wide
# dimensions over tensor, so each matmul's operands line up without a reshuffle.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("positions", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parses ``'data=1,fsdp=-1,tensor=1'`` (or a mapping) into axis sizes."""
    if isinstance(spec, Mapping):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' items, got {part!r}")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh spec names unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] = "fsdp=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh; one size may be -1 (the rest).

    Args:
      spec: axis sizes, as ``'data=2,fsdp=-1,tensor=1'`` or a mapping. Missing
        axes have size 1.
      devices: the devices to use (default: all of ``jax.devices()``).

    Returns:
      A mesh with ``Auto`` axis types, so that sharding constraints inside the
      model work GSPMD-style.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    wildcard = [axis for axis, size in sizes.items() if size == -1]
    if len(wildcard) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1, got {wildcard}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if wildcard:
        if len(devices) % known:
            raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices are not divisible by {known}")
        sizes[wildcard[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(
            f"mesh spec {spec!r} asks for {total} devices but {len(devices)} are available; "
            "use -1 for one axis to take the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = RULES,
) -> PartitionSpec:
    """Maps logical dimension names to a ``PartitionSpec``.

    A mesh axis is used at most once per array. When ``shape`` and ``mesh`` are
    given, a dimension whose size is not divisible by its mesh axes stays
    replicated (e.g. 2 KV heads on a tensor axis of 4) instead of failing.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                if shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                    axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    if variable.has_metadata("axes"):
        return tuple(variable.get_metadata("axes"))
    return (None,) * len(variable.shape)


def logical_axes(state: nnx.State) -> nnx.State:
    """The logical names of every variable in ``state`` (a tree of tuples)."""
    return jax.tree.map(_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """``NamedSharding`` for every variable of a (possibly abstract) NNX state."""

    def sharding(v: nnx.Variable):
        return NamedSharding(mesh, logical_to_spec(_axes_of(v), v.shape, mesh, rules))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input: batch over (data, fsdp)."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), mesh=mesh))
