"""imitax parameter checkpoints: Orbax params + the model config + the tokenizer.

A checkpoint directory holds::

    CKPT/
      params/        Orbax StandardCheckpointHandler (OCDBT/Zarr), restored onto any mesh
      model_config/  Orbax JsonCheckpointHandler: ``TransformerConfig.to_dict()``
      tokenizer/     the tokenizer files copied from the Hugging Face directory

Every writer here stages its output in a hidden sibling directory and renames it
into place only once it is complete, so an interrupted run never leaves a
half-written checkpoint (or half-replaced one) behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from imitax import models, sharding
from imitax.convert.core import ConversionError
from imitax.models.config import TransformerConfig

# Tokenizer-side files of a Hugging Face model directory (whatever exists is copied).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_SUBDIR = "tokenizer"


# -- placement ---------------------------------------------------------------------


def abstract_params(
    cfg: TransformerConfig, mesh: jax.sharding.Mesh | None
) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]]:
    """The model's graph, its abstract state, and a pure dict of sharded ShapeDtypeStructs.

    With ``mesh=None`` every parameter goes to this process's first device.
    """
    graphdef, state = nnx.split(models.abstract_model(cfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state.to_pure_dict())
    else:
        shardings = sharding.state_shardings(state, mesh).to_pure_dict()
    targets = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state.to_pure_dict(), shardings
    )
    return graphdef, state, targets


def merge_params(graphdef: nnx.GraphDef, state: nnx.State, params: dict[str, Any]) -> models.Transformer:
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state)


# -- staged output ---------------------------------------------------------------------


def check_output(out: epath.PathLike, overwrite: bool) -> None:
    """Refuses an existing ``out`` unless ``overwrite`` (call it before any expensive work)."""
    out = epath.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def staged_directory(out: epath.PathLike, overwrite: bool) -> Iterator[epath.Path]:
    """Yields a not-yet-existing sibling path; on success it replaces ``out``.

    The caller creates and fills the yielded directory (collectively, on every
    process). Only process 0 moves things; an existing ``out`` is swapped out
    only after the new directory is complete, and on failure the staged
    directory is deleted.
    """
    out = epath.Path(out)
    check_output(out, overwrite)
    # The name is deterministic so that every process of a multi-host job agrees on it.
    staged = out.parent / f".{out.name}.imitax-partial"
    retired = out.parent / f".{out.name}.imitax-old"
    leader = jax.process_index() == 0
    if leader:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in (staged, retired):
            if stale.exists():
                stale.rmtree()
    _barrier("imitax:staged_directory:start")
    try:
        yield staged
        _barrier("imitax:staged_directory:written")
    except BaseException:
        if leader and staged.exists():
            staged.rmtree()
        raise
    if leader:
        check_output(out, overwrite)  # another writer may have created it meanwhile
        if out.exists():
            out.rename(retired)
        staged.rename(out)
        if retired.exists():
            retired.rmtree()
    _barrier("imitax:staged_directory:done")


def copy_tokenizer(src: epath.PathLike | None, dst: epath.PathLike) -> list[str]:
    """Copies the tokenizer files of ``src`` into ``dst`` (process 0); returns their names.

    A missing tokenizer is worth a warning, not an error: the weights are still usable.
    """
    if src is None or not epath.Path(src).is_dir():
        logging.warning("no tokenizer directory (%s): the output will have no tokenizer files", src)
        return []
    src, dst = epath.Path(src), epath.Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        logging.warning("%s holds no tokenizer files (tokenizer.json, tokenizer.model, ...): none copied", src)
    if jax.process_index() == 0 and names:
        dst.mkdir(parents=True, exist_ok=True)
        for name in names:
            (src / name).copy(dst / name)
    return names


# -- save and restore ------------------------------------------------------------------------


# Orbax's defaults (one OCDBT database, whole-array chunks) hold compressed copies
# of all the arrays in flight until the database commits: on a CPU host, where
# device memory is host memory, that doubled peak memory (measured: +3.7 GB on a
# 4.4 GB model). Plain Zarr chunk files of at most 64 MiB are encoded and written
# one by one instead (+0.1 GB); see benchmarks/convert_benchmark.py.
_CHUNK_BYTES = 64 * 2**20


def _checkpointer() -> ocp.Checkpointer:
    params = ocp.StandardCheckpointHandler(use_ocdbt=False)
    config = ocp.JsonCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("params", ocp.args.StandardSave, params)
    registry.add("params", ocp.args.StandardRestore, params)
    registry.add("model_config", ocp.args.JsonSave, config)
    registry.add("model_config", ocp.args.JsonRestore, config)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def save_checkpoint(
    path: epath.PathLike,
    model: models.Transformer,
    *,
    tokenizer_dir: epath.PathLike | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes ``model``'s parameters, config and tokenizer as an imitax checkpoint.

    Args:
      path: the checkpoint directory to create.
      model: the model (its arrays may be sharded over any mesh; every process calls this).
      tokenizer_dir: where to copy tokenizer files from (a Hugging Face model directory);
        ``None`` writes no tokenizer and logs a warning.
      overwrite: replace an existing ``path`` (only once the new checkpoint is complete).

    Returns:
      The checkpoint path.
    """
    path = epath.Path(path)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with staged_directory(path, overwrite) as staged:
        _checkpointer().save(
            staged,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(
                    params, save_args=jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
                ),
                model_config=ocp.args.JsonSave(model.cfg.to_dict()),
            ),
        )
        copy_tokenizer(tokenizer_dir, staged / TOKENIZER_SUBDIR)
    return path


def resolve(path: epath.PathLike) -> epath.Path:
    """The checkpoint directory ``path`` names: itself, or a training workdir's newest finished step.

    A training step directory (``WORKDIR/checkpoints/<step>/``) holds ``params/`` and
    ``model_config/`` like any imitax checkpoint; Orbax renames it into place only
    once complete, so listed steps are whole.
    """
    path = epath.Path(path)
    root = path / "checkpoints"
    if (path / "params").is_dir() or not root.is_dir():
        return path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir())
    if not steps:
        raise ConversionError(f"{path} is a training workdir without a finished checkpoint yet")
    return root / str(steps[-1])


def _require_checkpoint(path: epath.Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / "model_config").is_dir() or not (path / "params").is_dir():
        raise ConversionError(
            f"{path} is not an imitax checkpoint (it needs params/ and model_config/); "
            "create one with scripts/convert.py --hf_dir=... --out=..."
        )


def load_config(path: epath.PathLike) -> TransformerConfig:
    """The model config stored in a checkpoint (or a training workdir's newest one)."""
    path = resolve(path)
    _require_checkpoint(path)
    restored = _checkpointer().restore(path, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return models.config_from_dict(restored["model_config"])


def lora_info(path: epath.PathLike) -> dict | None:
    """A LoRA run's ``lora`` item (adapter settings, the base's path and fingerprint), or None."""
    path = resolve(path)
    if not (path / "lora").is_dir():
        return None
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("lora", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))
    return checkpointer.restore(path, args=ocp.args.Composite(lora=ocp.args.JsonRestore()))["lora"]


def load_adapted(path: epath.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> models.Transformer:
    """A LoRA run's checkpoint as its base model (in its training dtype) with the adapters on, not merged.

    The base is read from the path the checkpoint names and must have the fingerprint it recorded.

    Raises:
      ConversionError: ``path`` holds no adapters, or the base changed since the run.
    """
    from imitax.convert import paths  # paths imports this module
    from imitax.convert.hf import load_hf
    from imitax.models import lora

    path = resolve(path)
    info = lora_info(path)
    if info is None:
        raise ConversionError(f"{path} holds no LoRA adapters (no lora/ item): it is a plain checkpoint")
    base_path = epath.Path(info["base"])
    kind = paths.require_model_kind(base_path, where=f"the LoRA base of {path}")
    load = load_hf if kind == "hf" else load_checkpoint
    model = load(base_path, mesh=mesh, dtype=info["base_dtype"])
    found = lora.fingerprint(nnx.state(model, nnx.Param).to_pure_dict())
    if found != info["base_fingerprint"]:
        raise ConversionError(
            f"{path}: its LoRA base {base_path} changed since training (fingerprint {found}, the run recorded "
            f"{info['base_fingerprint']}); restore that base model"
        )
    cfg = lora.LoRAConfig(rank=info["rank"], alpha=info["alpha"], dropout=info["dropout"], targets=info["targets"])
    lora.add_adapters(model, cfg, mesh=mesh)
    targets = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        nnx.state(model, nnx.LoRAParam).to_pure_dict(),
    )
    restored = _checkpointer().restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))
    nnx.update(model, restored["params"])
    return model


def load_checkpoint(
    path: epath.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None
) -> models.Transformer:
    """Restores a checkpoint's model, each array directly into its shards on ``mesh``.

    A LoRA run's checkpoint (a ``lora/`` item) is its base with the adapters merged in
    (:func:`load_adapted`, then :func:`imitax.models.lora.merge_adapters`): a plain model.

    Args:
      path: a directory written by :func:`save_checkpoint`, a training step
        directory, or a training workdir (its newest checkpoint).
      mesh: the device mesh (``None``: this process's first device).
      dtype: ``'float32'``/``'bfloat16'`` to cast the parameters while restoring;
        ``None`` keeps the stored ``param_dtype``.
    """
    path = resolve(path)
    if (path / "lora").is_dir():
        from imitax.models import lora

        model = lora.merge_adapters(load_adapted(path, mesh=mesh))
        if dtype is not None:
            model.cfg = model.cfg.replace(param_dtype=dtype)
            nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
        return model
    cfg = load_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    graphdef, state, targets = abstract_params(cfg, mesh)
    restored = _checkpointer().restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))
    return merge_params(graphdef, state, restored["params"])


def tokenizer_dir(path: epath.PathLike) -> epath.Path | None:
    """The checkpoint's tokenizer directory (``AutoTokenizer.from_pretrained`` reads it), or None.

    For a training workdir or one of its step directories, the run's ``WORKDIR/tokenizer``.
    """
    step_dir = resolve(path)
    candidates = [step_dir / TOKENIZER_SUBDIR]
    if step_dir.parent.name == "checkpoints":
        candidates.append(step_dir.parent.parent / TOKENIZER_SUBDIR)
    for tok in candidates:
        if tok.is_dir():
            return tok
    return None
