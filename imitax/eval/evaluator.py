"""Runs a set of tasks on one model and writes the results: the evaluator behind ``scripts/evaluate.py`` and the sweep.

>>> from imitax.eval import evaluator
>>> from imitax.eval.lm import LM
>>> tasks = {"mmlu": {"data_dir": "data/mmlu", "num_fewshot": 5}, "style": {"data_file": "heldout.jsonl"}}
>>> evaluator.validate_tasks(tasks)             # names and keywords only; raises ValueError
>>> out = evaluator.evaluate(LM.from_path("workdir"), tasks, "eval_out", model_info={"path": "workdir"})
>>> out["results"]["mmlu"]["metrics"]["acc"]

What ``evaluate`` does, in order:

1. validates every task name and keyword (:func:`validate_tasks`) and builds the tasks;
2. reads every task's data (its ``load()`` method, where it has one), so that
   a missing file fails before any model time is spent;
3. runs the tasks one after another;
4. writes ``output_dir/samples_<task>.jsonl`` (one record per example) as
   each task finishes, and ``output_dir/results.json`` last. Each file is
   written to a temporary name and renamed, so none is ever half-written, and
   the presence of ``results.json`` means the whole evaluation finished.

``results.json`` (and the returned dict)::

    {"results": {task: {"metrics": {...}, "stderr": {...}, "n": int, "num_fewshot": int, "info": {...}}},
     "config": {task: its keyword config},
     "model": model_info,
     "provenance": {"packages": {...}, "python": ..., "devices": {...}, "git": {...} | None,
                    "started": ISO time, "finished": ISO time, "seconds": float}}

``nan`` values (a standard error of one example, a correlation of constant
lengths) are written as ``null``: the file is strict JSON. In a multi-process
run every process evaluates, and only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from imitax.eval import tasks as task_registry

__all__ = ["RESULTS_FILE", "build_tasks", "evaluate", "provenance", "samples_file", "validate_tasks"]

RESULTS_FILE = "results.json"
_PACKAGES = ("imitax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "datasets")


def samples_file(output_dir: str | os.PathLike, task: str) -> pathlib.Path:
    """Where ``task``'s per-example records go: ``output_dir/samples_<task>.jsonl``."""
    return pathlib.Path(output_dir) / f"samples_{task}.jsonl"


# -- validation -----------------------------------------------------------------------------------


def _keywords(cls: type) -> tuple[list[str], list[str], bool]:
    """``(accepted keywords, required keywords, takes **kwargs)`` of a task class's constructor."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in named if p.default is p.empty]
    return [p.name for p in named], required, any(p.kind == p.VAR_KEYWORD for p in params)


def _plain(tasks: Any) -> Any:
    """An ``ml_collections`` ConfigDict (not a ``Mapping``) as nested dicts; anything else as it is."""
    return tasks.to_dict() if hasattr(tasks, "to_dict") and not isinstance(tasks, Mapping) else tasks


def validate_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> None:
    """Checks task names and their keywords without building the tasks or reading data.

    Args:
      tasks: task name (see :func:`imitax.eval.tasks.names`) -> keyword config of its class
        (dicts, or an ``ml_collections.ConfigDict``).

    Raises:
      ValueError: no tasks, an unknown task (the message lists the known ones),
        a keyword the task does not take or a required one missing (the message
        lists the accepted keywords). All problems are reported at once.
    """
    tasks = _plain(tasks)
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"no tasks to evaluate; known tasks: {', '.join(task_registry.names())}")
    problems = []
    unknown = [name for name in tasks if name not in task_registry.names()]
    if unknown:
        problems.append(
            f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(task_registry.names())}"
        )
    for name, config in tasks.items():
        if name in unknown:
            continue
        if not isinstance(config, Mapping):
            problems.append(f"task {name!r}: its config must be a mapping of keywords, got {type(config).__name__}")
            continue
        accepted, required, takes_any = _keywords(task_registry.get(name))
        bad = [k for k in config if k not in accepted] if not takes_any else []
        missing = [k for k in required if k not in config]
        if bad:
            problems.append(f"task {name!r} does not take {', '.join(bad)}; it accepts: {', '.join(accepted)}")
        if missing:
            problems.append(
                f"task {name!r} needs {', '.join(f'{k}=' for k in missing)} (it accepts: {', '.join(accepted)})"
            )
    if problems:
        raise ValueError("; ".join(problems))


def build_tasks(tasks: Mapping[str, Mapping[str, Any]], load: bool = True) -> dict[str, Any]:
    """Validates, builds every task and (with ``load``) reads its data, before anything runs.

    Returns:
      task name -> task object, in the order given.

    Raises:
      ValueError: see :func:`validate_tasks`; also a task's own check of its
        keyword values (prefixed with the task's name).
      FileNotFoundError: a task's data is missing (the message says how to supply it).
    """
    tasks = _plain(tasks)
    validate_tasks(tasks)
    built = {}
    for name, config in tasks.items():
        try:
            built[name] = task_registry.get(name)(**config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {name!r}: {e}") from e
    if load:
        for task in built.values():
            if hasattr(task, "load"):
                task.load()
    return built


def _check_generation_lengths(lm, built: Mapping[str, Any]) -> None:
    """Refuses, before anything runs, a generation task whose ``max_gen_toks`` leaves no room for a prompt."""
    max_length = getattr(lm, "max_length", None)
    if max_length is None:
        return
    for name, task in built.items():
        max_gen_toks = getattr(task, "max_gen_toks", None)
        if max_gen_toks is not None and max_gen_toks >= max_length:
            raise ValueError(
                f"task {name!r}: max_gen_toks={max_gen_toks} but the model reads at most {max_length} tokens; "
                f"give the task max_gen_toks < {max_length} (scripts/evaluate.py: --max_gen_toks)"
            )


# -- provenance -----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _git_revision() -> dict[str, Any] | None:
    """The commit of the imitax source tree and whether it has local changes (None outside a git checkout)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": head, "dirty": bool(status.strip())}


def provenance() -> dict[str, Any]:
    """Package versions, Python, the devices and the git revision of the code doing the evaluation."""
    import jax

    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    kinds: dict[str, int] = {}
    for device in jax.devices():
        kinds[device.device_kind] = kinds.get(device.device_kind, 0) + 1
    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": {
            "backend": jax.default_backend(),
            "count": jax.device_count(),
            "local_count": jax.local_device_count(),
            "process_count": jax.process_count(),
            "kinds": kinds,
        },
        "git": _git_revision(),
    }


# -- files ----------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: ``nan``/``inf`` -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def _write_atomic(path: pathlib.Path, lines: Iterable[str]) -> None:
    """Writes ``lines`` to a temporary file next to ``path``, flushes it to disk and renames it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(value: Any, **kwargs) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False, **kwargs)


# -- the evaluation -------------------------------------------------------------------------------


def evaluate(
    lm,
    tasks: Mapping[str, Mapping[str, Any]],
    output_dir: str | os.PathLike | None = None,
    *,
    model_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates ``lm`` on ``tasks``; writes ``results.json`` and the samples files when ``output_dir`` is given.

    Args:
      lm: an :class:`imitax.eval.lm.LM`, or any object with the methods the tasks call.
      tasks: task name -> keyword config of its class, e.g.
        ``{"mmlu": {"data_dir": "data/mmlu", "num_fewshot": 5}}``.
      output_dir: where the files go (created if needed); None writes nothing.
      model_info: what was evaluated (path, step, ...), stored as ``model``.
      progress: progress bars and one line per task on stderr.

    Returns:
      The JSON-able dict written to ``results.json`` (see the module docstring).

    Raises:
      ValueError: bad task names or keywords, or a generation length the
        model cannot hold (before anything runs).
      FileNotFoundError: a task's data is missing (before anything runs).
    """
    import jax

    started, start = _now(), time.perf_counter()
    tasks = _plain(tasks)
    built = build_tasks(tasks)
    _check_generation_lengths(lm, built)
    out_dir = pathlib.Path(output_dir) if output_dir is not None else None
    writer = out_dir is not None and jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (name, task) in enumerate(built.items(), start=1):
        if progress:
            print(f"[{i}/{len(built)}] {name} ...", file=sys.stderr, flush=True)
        task_start = time.perf_counter()
        result = task.run(lm, progress=progress)
        seconds = time.perf_counter() - task_start
        entry = result.to_dict(samples=False)
        entry["info"] = {**entry.get("info", {}), "seconds": seconds}
        results[name] = _jsonable(entry)
        if writer:
            _write_atomic(samples_file(out_dir, name), (_dumps(s) + "\n" for s in result.samples))
        if progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(result.metrics.items())[:6])
            print(f"[{i}/{len(built)}] {name}: {shown} (n={result.n}, {seconds:.1f} s)", file=sys.stderr, flush=True)
    output = {
        "results": results,
        "config": _jsonable({name: dict(config) for name, config in tasks.items()}),
        "model": _jsonable(dict(model_info) if model_info is not None else None),
        "provenance": _jsonable(
            {**provenance(), "started": started, "finished": _now(), "seconds": time.perf_counter() - start}
        ),
    }
    if writer:
        _write_atomic(out_dir / RESULTS_FILE, [_dumps(output, indent=2) + "\n"])
    return output
