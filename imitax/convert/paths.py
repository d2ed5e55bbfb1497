"""What a model path is: the one answer the trainer, the evaluator and the sweep all ask for.

A model path is one of three kinds, recognized in this order (the first that matches wins):

1. ``'checkpoint'``: an imitax checkpoint (``params/`` and ``model_config/``), as written by
   ``scripts/convert.py`` or as one step directory of a training run;
2. ``'workdir'``: a training workdir (``checkpoints/<step>/``), standing for its newest step;
3. ``'hf'``: a Hugging Face model directory (``config.json`` and safetensors).

imitax's own directories come first because an export directory of imitax is an ``'hf'``
directory and nothing else, while a directory holding both ``params/`` and a ``config.json``
(written by hand, say) is read the way imitax wrote its parameters.
"""

from __future__ import annotations

import json

from etils import epath

from imitax import models
from imitax.convert.checkpoint import load_config
from imitax.convert.core import ConversionError

KINDS = ("checkpoint", "workdir", "hf")
ACCEPTED = (
    "an imitax checkpoint (params/ and model_config/), a training workdir (checkpoints/<step>/ written by "
    "scripts/train.py) or a Hugging Face model directory (config.json and model.safetensors)"
)


def model_kind(path: epath.PathLike) -> str | None:
    """``'checkpoint'``, ``'workdir'``, ``'hf'`` or None (not a model directory; see the module doc)."""
    path = epath.Path(path)
    if (path / "params").is_dir() and (path / "model_config").is_dir():
        return "checkpoint"
    if (path / "checkpoints").is_dir():
        return "workdir"
    if (path / "config.json").is_file():
        return "hf"
    return None


def require_model_kind(path: epath.PathLike, where: str = "model path") -> str:
    """:func:`model_kind`, raising a message that names ``where`` and the accepted kinds."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist")
    kind = model_kind(path)
    if kind is None:
        raise ConversionError(f"{where}: {path} is not a model directory; expected {ACCEPTED}")
    return kind


def model_config(path: epath.PathLike, where: str = "model path") -> models.TransformerConfig:
    """The architecture of the model at ``path``, read without loading any weights."""
    path = epath.Path(path)
    if require_model_kind(path, where) == "hf":
        try:
            data = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{where}: {path / 'config.json'} is not valid JSON ({e.msg})") from None
        return models.config_from_hf(data)
    return load_config(path)
