"""Hugging Face model directories <-> imitax models, one tensor at a time.

Import reads ``config.json`` and safetensors weights with numpy (torch is never
needed, and pickled ``.bin`` weights are refused, never unpickled) and puts each
tensor straight into its shards; export gathers one tensor at a time and writes
sharded safetensors that ``transformers.AutoModelForCausalLM.from_pretrained``
loads, plus ``config.json`` and the tokenizer files.

imitax never imports torch here; transformers' config classes do whenever torch
is installed, which ``scripts/convert.py`` prevents (see there).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections import Counter
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from imitax import models
from imitax.convert import checkpoint, core, mappings
from imitax.convert.core import ConversionError

DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
_PICKLED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HOW_TO_SAFETENSORS = (
    "convert them to safetensors first, in an environment you trust (unpickling runs arbitrary code): "
    "python -c \"import transformers; m = transformers.AutoModelForCausalLM.from_pretrained('{dir}'); "
    "m.save_pretrained('{dir}', safe_serialization=True)\""
)


# -- reading a Hugging Face directory ----------------------------------------------------


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such Hugging Face model directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: a Hugging Face model directory needs its config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _open(path: pathlib.Path):
    """Opens a safetensors file, naming the file in the error if it is unreadable."""
    try:
        return safetensors.safe_open(str(path), framework="np")
    except (safetensors.SafetensorError, OSError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file; truncated or corrupt? ({e})") from None


class SafetensorsReader:
    """The tensors of ``model.safetensors`` or of a sharded ``model.safetensors.index.json``.

    Every :meth:`read` opens its file, copies one tensor out and closes the file
    again, so the memory-mapped pages of a multi-GB shard never pile up in the
    process's resident memory. (safetensors' numpy API returns bfloat16 arrays
    as ``ml_dtypes.bfloat16``, so no hand-written reader is needed.)
    """

    def __init__(self, hf_dir: str | pathlib.Path):
        self.hf_dir = pathlib.Path(hf_dir)
        index = self.hf_dir / huggingface_hub.constants.SAFETENSORS_INDEX_FILE
        single = self.hf_dir / huggingface_hub.constants.SAFETENSORS_SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index ({e!r})") from None
            files = {name: self.hf_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            files = None
        else:
            pickled = sorted(p.name for pattern in _PICKLED_PATTERNS for p in self.hf_dir.glob(pattern))
            if pickled:
                raise ConversionError(
                    f"{self.hf_dir} holds only pickled PyTorch weights ({', '.join(pickled)}), which imitax "
                    "never loads; " + _HOW_TO_SAFETENSORS.format(dir=self.hf_dir)
                )
            raise ConversionError(f"{self.hf_dir} has no {single.name} or {index.name}: no weights to convert")
        # Read every header once: it names the tensors and their dtypes, and a
        # truncated file fails here, before any work is done.
        self.files: dict[str, pathlib.Path] = {}
        self.dtypes: dict[str, str] = {}
        for path in sorted(set(files.values())) if files else [single]:
            if not path.is_file():
                raise ConversionError(f"{path} is listed in {index} but does not exist")
            with _open(path) as f:
                for name in f.keys():
                    self.files[name] = path
                    self.dtypes[name] = f.get_slice(name).get_dtype()
        if files:
            wrong = sorted(n for n, p in files.items() if self.files.get(n) != p)
            if wrong:
                raise ConversionError(f"{index} lists tensors that its files do not hold: {core._short_list(wrong)}")

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def dtype(self) -> str:
        """The checkpoint's parameter dtype: the most common floating dtype among its tensors."""
        counts = Counter(_SAFETENSORS_DTYPES[d] for d in self.dtypes.values() if d in _SAFETENSORS_DTYPES)
        return counts.most_common(1)[0][0] if counts else "float32"

    def read(self, name: str) -> np.ndarray:
        path = self.files[name]
        with _open(path) as f:
            try:
                return f.get_tensor(name)
            except safetensors.SafetensorError as e:
                raise ConversionError(f"{path}: cannot read tensor {name} ({e})") from None


# -- placing tensors into their shards --------------------------------------------------------


def _to_device(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    # Each process supplies only the shards its own devices hold (multi-host safe).
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _layer_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of one layer slice of a stacked ``[layers, ...]`` array."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return sharding


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _writer(sharding: jax.sharding.Sharding):
    """``stacked[i] = layer`` in place: the stacked buffer is donated, never copied."""

    def write(stacked_l, layer, i):
        return jax.lax.dynamic_update_index_in_dim(stacked_l, layer.astype(stacked_l.dtype), i, axis=0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def load_hf(
    hf_dir: str | pathlib.Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str | None = None,
    **config_overrides,
) -> models.Transformer:
    """Loads a Hugging Face model directory as an imitax model, sharded on ``mesh``.

    Tensors are read one at a time and put straight into their shards: a stacked
    per-layer parameter is allocated once, sharded, and each layer is written
    into it in place, so the host never holds the model twice.

    Args:
      hf_dir: holds ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``).
      mesh: the device mesh (``None``: this process's first device).
      dtype: parameter dtype, one of :data:`DTYPES`; ``None`` keeps the checkpoint's.
      **config_overrides: other :class:`~imitax.models.TransformerConfig` fields
        (e.g. ``remat='full'``).

    Raises:
      ConversionError: unsupported or malformed config, pickled-only or corrupt
        weights, or tensors that do not match the config (all named).
    """
    hf_dir = pathlib.Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")
    reader = SafetensorsReader(hf_dir)
    config_overrides.setdefault("param_dtype", dtype or reader.dtype())
    try:
        cfg = models.config_from_hf(hf_config, **config_overrides)
    except ValueError as e:
        raise ConversionError(f"{hf_dir / 'config.json'}: {e}") from None

    graphdef, state, targets = checkpoint.abstract_params(cfg, mesh)
    targets = core.flatten(targets)
    params: dict[str, jax.Array] = {}
    for path, i, array in core.iter_import(cfg, reader.read, reader.names):
        target = targets[path]
        array = np.asarray(array, dtype=target.dtype)  # no copy when the dtype already matches
        if i is None:
            params[path] = _to_device(array, target.sharding)
        else:
            if path not in params:
                params[path] = _zeros(target.shape, target.dtype, target.sharding)()
            layer = _to_device(array, _layer_sharding(target.sharding, array.ndim))
            params[path] = _writer(target.sharding)(params[path], layer, i)
            del layer
        del array  # before the next tensor is read: at most one tensor in flight on the host
    return checkpoint.merge_params(graphdef, state, core.unflatten(params))


def convert_hf_to_checkpoint(
    hf_dir: str | pathlib.Path,
    out: epath.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> epath.Path:
    """Hugging Face directory -> imitax checkpoint (params, config and tokenizer files)."""
    checkpoint.check_output(out, overwrite)  # fail before the expensive part
    model = load_hf(hf_dir, mesh=mesh, dtype=dtype)
    return checkpoint.save_checkpoint(out, model, tokenizer_dir=hf_dir, overwrite=overwrite)


# -- export ---------------------------------------------------------------------------------------


@jax.jit
def _take_layer(stacked_l, i):
    return jax.lax.dynamic_index_in_dim(stacked_l, i, axis=0, keepdims=False)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)  # collective: every process calls it


def _hf_sizes(cfg: models.TransformerConfig) -> dict[str, int]:
    """Bytes of every exported HF tensor, in export order (the transforms only move elements)."""
    shapes = core.param_shapes(cfg)
    sizes = {}
    for rule in mappings.rules_for(cfg):
        for i in range(cfg.num_layers) if rule.per_layer else [None]:
            numel = [int(np.prod(shapes[p].shape[1:] if rule.per_layer else shapes[p].shape)) for p in rule.params]
            sizes[rule.hf.format(i=i)] = sum(numel) * jnp.dtype(cfg.param_dtype).itemsize
    return sizes


def export_hf(
    ckpt_dir_or_model: epath.PathLike | models.Transformer,
    out: str | pathlib.Path,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    tokenizer_dir: epath.PathLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> pathlib.Path:
    """Writes a Hugging Face model directory that transformers loads.

    Tensors are gathered to the host one at a time; process 0 holds at most one
    safetensors shard of them before writing it.

    Args:
      ckpt_dir_or_model: an imitax checkpoint directory or a model.
      out: the directory to create (on process 0; every process must call this).
      max_shard_size: safetensors shard size limit (``'5GB'``, ``'500MB'`` or bytes);
        the shards are named as transformers names them, with an index when there
        is more than one.
      overwrite: replace an existing ``out`` (only once the new one is complete).
      tokenizer_dir: tokenizer files to copy; defaults to the checkpoint's.
      mesh: where to restore a checkpoint's parameters (``None``: first device).

    Returns:
      The output directory.
    """
    out = pathlib.Path(out)
    checkpoint.check_output(out, overwrite)
    if isinstance(ckpt_dir_or_model, nnx.Module):
        model = ckpt_dir_or_model
    else:
        model = checkpoint.load_checkpoint(ckpt_dir_or_model, mesh=mesh)
        tokenizer_dir = tokenizer_dir or checkpoint.tokenizer_dir(ckpt_dir_or_model)
    cfg = model.cfg
    try:
        hf_config = cfg.to_hf_config()
        split = huggingface_hub.split_state_dict_into_shards_factory(
            _hf_sizes(cfg),
            get_storage_size=lambda nbytes: nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as e:
        raise ConversionError(f"cannot export to {out}: {e}") from None

    params = core.flatten(nnx.state(model, nnx.Param).to_pure_dict())

    def get(path: str, i: int | None) -> np.ndarray:
        return _to_host(params[path] if i is None else _take_layer(params[path], i))

    leader = jax.process_index() == 0
    with checkpoint.staged_directory(out, overwrite) as staged:
        staged = pathlib.Path(staged)
        if leader:
            staged.mkdir()
            hf_config.save_pretrained(staged)
        # Tensors arrive in the order the split planned them; write each file when it is complete.
        shard, shard_file = {}, None
        for name, array in core.iter_export(cfg, get):
            file = split.tensor_to_filename[name]
            if shard and file != shard_file and leader:
                save_file(shard, staged / shard_file, metadata={"format": "pt"})
                shard = {}
            shard_file = file
            if leader:
                shard[name] = array
        if leader:
            save_file(shard, staged / shard_file, metadata={"format": "pt"})
            if split.is_sharded:
                index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
                (staged / huggingface_hub.constants.SAFETENSORS_INDEX_FILE).write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n"
                )
        checkpoint.copy_tokenizer(tokenizer_dir, staged)
    return out
