"""HF tensors <-> imitax parameters, one tensor at a time.

The functions here know names and layouts, not files: :func:`iter_import` pulls
HF tensors through a ``read(name)`` callback and yields imitax tensors one layer
slice at a time, so that file readers (safetensors, torch state dicts in tests)
and placement strategies (numpy in memory, sharded device buffers) plug in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from imitax import models
from imitax.convert.mappings import ALIASES, IGNORED_SUFFIXES, OPTIONAL_PREFIXES, rules_for
from imitax.models.config import TransformerConfig


class ConversionError(ValueError):
    """A checkpoint does not match the model it claims to be."""


def param_shapes(cfg: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """``'/'``-joined parameter path -> abstract array, from ``eval_shape``."""
    state = nnx.state(models.abstract_model(cfg), nnx.Param)
    flat = {}
    for path, leaf in jax.tree.leaves_with_path(state.to_pure_dict()):
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def resolve_names(cfg: TransformerConfig, available: Collection[str]) -> dict[str, str]:
    """Maps each expected HF tensor name to the name it has in ``available``.

    Raises:
      ConversionError: naming every missing tensor and every unexpected one.
    """
    available = set(available)
    prefix = OPTIONAL_PREFIXES[cfg.family]
    expected = []
    for rule in rules_for(cfg):
        layers = range(cfg.num_layers) if rule.per_layer else [None]
        expected += [rule.hf.format(i=i) for i in layers]
    found, missing = {}, []
    for name in expected:
        candidates = [name, *ALIASES.get(name, ())]
        if name.startswith(prefix):
            candidates.append(name[len(prefix) :])
        hit = next((c for c in candidates if c in available), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    used = set(found.values())
    # Some checkpoints store the tied output projection too; it is the embedding.
    tied_head = {"lm_head.weight", "embed_out.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in available - used if not n.endswith(IGNORED_SUFFIXES) and n not in tied_head)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short_list(unexpected)}")
    if problems:
        raise ConversionError(
            f"the checkpoint does not match its config ({cfg.model_type}, {cfg.num_layers} layers): "
            + "; ".join(problems)
        )
    return found


def _short_list(names: list[str], limit: int = 8) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def iter_import(
    cfg: TransformerConfig, read: Callable[[str], np.ndarray], available: Collection[str]
) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """Yields ``(param_path, layer_index_or_None, array)`` for every imitax tensor.

    Per-layer parameters come one layer slice at a time; shapes are checked
    against the model's before anything is yielded for a tensor.
    """
    names = resolve_names(cfg, available)
    shapes = param_shapes(cfg)
    for rule in rules_for(cfg):
        for i in range(cfg.num_layers) if rule.per_layer else [None]:
            hf_name = rule.hf.format(i=i)
            array = read(names[hf_name])
            shape = tuple(array.shape)
            outs = _apply(rule.to_imitax, array, hf_name)
            # Drop this frame's reference before yielding: where the outputs are copies
            # (split fused tensors), the original can then be freed while they are placed.
            del array
            for path, out in zip(rule.params, outs, strict=True):
                want = shapes[path].shape[1:] if rule.per_layer else shapes[path].shape
                if tuple(out.shape) != tuple(want):
                    raise ConversionError(
                        f"tensor {hf_name} has shape {shape}, which does not fit "
                        f"{path} of shape {tuple(want)} for this config"
                    )
                yield path, i, out
            del outs


def _apply(fn, array: np.ndarray, hf_name: str):
    try:
        return fn(array)
    except ValueError as e:
        raise ConversionError(
            f"tensor {hf_name} has shape {tuple(array.shape)}, which does not fit the config: {e}"
        ) from None


def iter_export(
    cfg: TransformerConfig, get: Callable[[str, int | None], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` for every HF tensor; ``get(path, layer)`` reads imitax ones."""
    for rule in rules_for(cfg):
        for i in range(cfg.num_layers) if rule.per_layer else [None]:
            yield rule.hf.format(i=i), np.ascontiguousarray(rule.to_hf(*(get(p, i) for p in rule.params)))


# -- in-memory helpers (small models, tests) ------------------------------------


def params_from_hf(cfg: TransformerConfig, tensors: Mapping[str, Any]) -> dict:
    """A nested dict of numpy parameters from an in-memory HF state dict."""
    shapes = param_shapes(cfg)
    flat: dict[str, Any] = {}
    for path, i, array in iter_import(cfg, lambda n: np.asarray(tensors[n]), tensors.keys()):
        if i is None:
            flat[path] = array
        else:
            if path not in flat:
                flat[path] = np.empty(shapes[path].shape, array.dtype)
            flat[path][i] = array
    return unflatten(flat)


def params_to_hf(cfg: TransformerConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The HF state dict (numpy) of a nested imitax parameter dict."""
    flat = flatten(params)

    def get(path, i):
        value = np.asarray(flat[path])
        return value if i is None else value[i]

    return dict(iter_export(cfg, get))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def model_from_params(cfg: TransformerConfig, params: Mapping[str, Any]) -> models.Transformer:
    """An imitax model holding ``params`` (a nested dict as made by :func:`params_from_hf`)."""
    model = models.abstract_model(cfg)
    graphdef, state = nnx.split(model)
    state.replace_by_pure_dict(jax.tree.map(lambda a: jax.numpy.asarray(a), dict(params)))
    return nnx.merge(graphdef, state)
