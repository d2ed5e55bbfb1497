"""The task registry and what every task shares: :func:`register`, :func:`get`, :class:`TaskResult`.

Task modules import from here, not from their package's ``__init__`` (which imports them in turn to
register them), so importing any one task module works on its own and the import graph has no cycle.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["TaskResult", "generate_until", "get", "names", "register"]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: makes the task class available as ``get(name)``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorate


def get(name: str) -> type:
    """The task class registered as ``name``.

    Raises:
      ValueError: no such task (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_REGISTRY)


@dataclasses.dataclass
class TaskResult:
    """What a task's ``run`` returns.

    Attributes:
      metrics: metric name -> value (e.g. ``{'acc': 0.43, 'acc/anatomy': 0.5}``).
      stderr: metric name -> standard error, for the metrics that have one.
      n: how many examples were evaluated.
      num_fewshot: the number of in-context examples each prompt held.
      samples: one JSON-able record per example (inputs, scores, correctness).
      info: provenance (data source, files, subjects) and how the run went.
    """

    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    num_fewshot: int
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """A JSON-able dict (``nan`` stderrs become ``None``); ``samples=False`` leaves the records out."""

        def clean(d):
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

        out = dataclasses.asdict(self)
        out["metrics"], out["stderr"] = clean(self.metrics), clean(self.stderr)
        if not samples:
            del out["samples"]
        return out


def generate_until(lm, requests: Sequence[tuple[str, dict[str, Any]]], progress: bool = False) -> list[str]:
    """``lm.generate_until(requests)``, with a progress bar when the LM offers one (test doubles need not)."""
    if progress and "progress" in inspect.signature(lm.generate_until).parameters:
        return lm.generate_until(requests, progress=True)
    return lm.generate_until(requests)
