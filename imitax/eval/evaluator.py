"""Runs a set of tasks on one model and writes the results: the evaluator behind ``scripts/evaluate.py`` and the sweep.

>>> from imitax.eval import evaluator
>>> from imitax.eval.lm import LM
>>> tasks = {"mmlu": {"data_dir": "data/mmlu", "num_fewshot": 5}, "style": {"data_file": "heldout.jsonl"}}
>>> evaluator.validate_tasks(tasks)             # names and keywords only; raises ValueError
>>> out = evaluator.evaluate(LM.from_path("workdir"), tasks, "eval_out", model_info={"path": "workdir"})
>>> out["results"]["mmlu"]["metrics"]["acc"]

Tasks are named: the key is an alias and ``task`` in its config names the registered task when
the two differ, so one task can run twice with different data (``{"facts_a": {"task":
"multiple_choice", "data_file": "a.jsonl"}, "facts_b": {...}}``). :func:`build_tasks` builds
and loads them once; a caller that evaluates many models (the sweep) passes the built tasks to
every :func:`evaluate` call instead of reading the data again.

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

import inspect
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

from imitax import records
from imitax.eval import tasks as task_registry

__all__ = ["RESULTS_FILE", "build_tasks", "evaluate", "samples_file", "validate_tasks"]

RESULTS_FILE = "results.json"


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


def task_spec(alias: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registered task name, its keywords)`` of a named task: ``config['task']``, else the alias."""
    kwargs = dict(config)
    return kwargs.pop("task", alias), kwargs


def validate_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> None:
    """Checks task names and their keywords without building the tasks or reading data.

    Args:
      tasks: alias -> keyword config of its task class, with ``task=NAME`` (see
        :func:`imitax.eval.tasks.names`) when the alias is not the task's name (dicts, or an
        ``ml_collections.ConfigDict``).

    Raises:
      ValueError: no tasks, an unknown task (the message lists the known ones),
        a keyword the task does not take or a required one missing (the message
        lists the accepted keywords). All problems are reported at once.
    """
    tasks = _plain(tasks)
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"no tasks to evaluate; known tasks: {', '.join(task_registry.names())}")
    problems = []
    for alias, config in tasks.items():
        if not isinstance(config, Mapping):
            problems.append(f"task {alias!r}: its config must be a mapping of keywords, got {type(config).__name__}")
    names = {a: task_spec(a, c)[0] for a, c in tasks.items() if isinstance(c, Mapping)}
    unknown = [name for name in names.values() if name not in task_registry.names()]
    if unknown:
        problems.append(
            f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(task_registry.names())}"
        )
    for alias, config in tasks.items():
        if alias not in names or names[alias] in unknown:
            continue
        name, config = task_spec(alias, config)
        label = repr(alias) if alias == name else f"{alias!r} ({name})"
        accepted, required, takes_any = _keywords(task_registry.get(name))
        bad = [k for k in config if k not in accepted] if not takes_any else []
        missing = [k for k in required if k not in config]
        if bad:
            problems.append(f"task {label} does not take {', '.join(bad)}; it accepts: {', '.join(accepted)}")
        if missing:
            problems.append(
                f"task {label} needs {', '.join(f'{k}=' for k in missing)} (it accepts: {', '.join(accepted)})"
            )
    if problems:
        raise ValueError("; ".join(problems))


def build_tasks(tasks: Mapping[str, Mapping[str, Any]], load: bool = True) -> dict[str, Any]:
    """Validates, builds every task and (with ``load``) reads its data, before anything runs.

    Returns:
      alias -> task object, in the order given.

    Raises:
      ValueError: see :func:`validate_tasks`; also a task's own check of its
        keyword values (prefixed with the task's name).
      FileNotFoundError: a task's data is missing (the message says how to supply it).
    """
    tasks = _plain(tasks)
    validate_tasks(tasks)
    built = {}
    for alias, config in tasks.items():
        name, kwargs = task_spec(alias, config)
        try:
            built[alias] = task_registry.get(name)(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {alias!r}: {e}") from e
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


# -- the evaluation -------------------------------------------------------------------------------


def evaluate(
    lm,
    tasks: Mapping[str, Mapping[str, Any]],
    output_dir: str | os.PathLike | None = None,
    *,
    model_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    built: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates ``lm`` on ``tasks``; writes ``results.json`` and the samples files when ``output_dir`` is given.

    Args:
      lm: an :class:`imitax.eval.lm.LM`, or any object with the methods the tasks call.
      tasks: alias -> keyword config of its task class (``task=NAME`` when the alias is not the
        task's name), e.g. ``{"mmlu": {"data_dir": "data/mmlu", "num_fewshot": 5}}``.
      output_dir: where the files go (created if needed); None writes nothing.
      model_info: what was evaluated (path, step, ...), stored as ``model``.
      progress: progress bars and one line per task on stderr.
      built: ``build_tasks(tasks)`` made earlier (tasks hold no per-model state, so one build
        serves every model); None builds and loads them here.

    Returns:
      The JSON-able dict written to ``results.json`` (see the module docstring).

    Raises:
      ValueError: bad task names or keywords, or a generation length the
        model cannot hold (before anything runs).
      FileNotFoundError: a task's data is missing (before anything runs).
    """
    import jax

    started, start = records.now(), time.perf_counter()
    tasks = _plain(tasks)
    if built is None:
        built = build_tasks(tasks)
    elif list(built) != list(tasks):
        raise ValueError(f"built tasks {list(built)} are not the tasks {list(tasks)}")
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
        results[name] = records.jsonable(entry)
        if writer:
            records.write_lines(samples_file(out_dir, name), (records.dumps(s) + "\n" for s in result.samples))
        if progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(result.metrics.items())[:6])
            print(f"[{i}/{len(built)}] {name}: {shown} (n={result.n}, {seconds:.1f} s)", file=sys.stderr, flush=True)
    output = {
        "results": results,
        "config": records.jsonable({name: dict(config) for name, config in tasks.items()}),
        "model": records.jsonable(dict(model_info) if model_info is not None else None),
        "provenance": records.jsonable(
            {
                **records.provenance(),
                "started": started,
                "finished": records.now(),
                "seconds": time.perf_counter() - start,
            }
        ),
    }
    if writer:
        records.write_lines(out_dir / RESULTS_FILE, [records.dumps(output, indent=2) + "\n"])
    return output
