"""Running a sweep in this process (every host of a multi-host job runs the same command)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import traceback
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from imitax import convert, records
from imitax.sweep.checks import check_keys, validate_and_build
from imitax.sweep.config import CELL_FILE, UNGUARDED_FIELDS, SweepError, default_config, eval_tasks, items, resolved
from imitax.sweep.plan import Cell, base_path, cell_path, cell_settings, cell_train_config
from imitax.sweep.report import format_value, report

# -- the workdir's records ----------------------------------------------------------------------------


def _guarded(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in UNGUARDED_FIELDS}


def _check_workdir(config, workdir: epath.Path, allow_config_change: bool) -> None:
    """Refuses a workdir that belongs to a sweep with a different config (unless allowed)."""
    saved = records.read_json(workdir / "sweep_config.json")
    current = json.loads(config.to_json_best_effort())
    if saved is not None:
        old, new = _guarded(saved), _guarded(current)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and not allow_config_change:
            raise SweepError(
                f"{workdir} holds a sweep with a different config (differing fields: {', '.join(changed)}). "
                "Use another --workdir, or --allow_config_change to keep the finished cells whose settings "
                "are unchanged and run the others"
            )
    if jax.process_index() == 0:
        records.write_json(workdir / "sweep_config.json", current)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _pretrain(config, workdir: epath.Path, model: str, log) -> None:
    """Trains a ``pretrain`` base model (resumes it when interrupted; skips it when done)."""
    from imitax.train import loop

    path = workdir / "base" / model
    done = path / "pretrained.json"
    spec = config.base_models[model].pretrain
    fingerprint = records.fingerprint(spec.to_dict())
    record = records.read_json(done)
    if record is not None and record.get("fingerprint") == fingerprint:
        return
    train = ml_collections.ConfigDict(spec.to_dict())
    train.progress = False
    train.overwrite = record is not None  # its settings changed (allowed): start it over
    log(f"pretraining base model {model} ({train.total_steps} steps)")
    start = time.perf_counter()
    result = loop.run(train, str(path))
    if result.get("preempted"):
        raise _Preempted()
    if jax.process_index() == 0:
        records.write_json(done, {"fingerprint": fingerprint, "seconds": time.perf_counter() - start, "result": result})
    _barrier(f"imitax_pretrained_{model}")
    log(f"pretrained {model} in {time.perf_counter() - start:.0f} s (loss {result.get('loss', float('nan')):.3f})")


class _Preempted(Exception):
    """The trainer saved and stopped on SIGTERM: the sweep stops too (a rerun resumes)."""


@functools.lru_cache
def _count_params(model_path: str) -> int:
    """Parameters of the model at ``model_path`` (read once per base model: finetuning keeps the shapes)."""
    return convert.model_config(model_path).num_params()


def _evaluate(config, tasks: dict, cell: Cell, model_path: epath.Path, out: epath.Path) -> dict[str, Any]:
    """Evaluates the model at ``model_path`` on every task (built once per sweep); returns metrics, stderrs, counts."""
    from imitax import sharding
    from imitax.eval import evaluator
    from imitax.eval.lm import LM

    mesh = sharding.make_mesh(config.eval.mesh)
    with jax.set_mesh(mesh):
        lm = LM.from_path(str(model_path), mesh=mesh, batch_size=config.eval.batch_size)
        metrics, stderr, counts = {}, {}, {}
        for alias, spec in eval_tasks(config).items():
            task_out = out / alias if jax.process_index() == 0 else None
            results = evaluator.evaluate(
                lm,
                {alias: spec},
                None if task_out is None else str(task_out),
                model_info={"path": str(model_path), "cell": cell.id},
                progress=False,
                built={alias: tasks[alias]},
            )
            r = results["results"][alias]
            metrics.update({f"{alias}/{k}": v for k, v in r["metrics"].items()})
            stderr.update({f"{alias}/{k}": v for k, v in r.get("stderr", {}).items()})
            counts[alias] = r["n"]
    return {"metrics": metrics, "stderr": stderr, "n": counts}


def _new_record(cell: Cell, fingerprint: str, **fields) -> dict[str, Any]:
    """A cell's ``cell.json``: what the cell is, then ``fields`` (status, timings, metrics or error)."""
    record = {"id": cell.id, "fingerprint": fingerprint, **dataclasses.asdict(cell)}
    return record | fields


def _run_cell(config, tasks: dict, workdir: epath.Path, cell: Cell, fingerprint: str) -> dict[str, Any]:
    from imitax.train import loop

    cell_dir = cell_path(workdir, cell)
    record = _new_record(cell, fingerprint, status="running", started=records.now())
    previous = records.read_json(cell_dir / CELL_FILE) or {}
    changed = previous.get("fingerprint") not in (None, fingerprint)
    if jax.process_index() == 0:
        records.write_json(cell_dir / CELL_FILE, record)
    if cell.source is None:
        model_path = base_path(config, workdir, cell.model)
        record["train"] = None
    else:
        train = cell_train_config(config, workdir, cell)
        train.overwrite = changed  # allowed config change: the old run is moved aside by the trainer
        start = time.perf_counter()
        result = loop.run(train, str(cell_dir / "train"))
        if result.get("preempted"):
            raise _Preempted()
        record["train"] = {"seconds": time.perf_counter() - start, **result}
        model_path = cell_dir / "train"
    start = time.perf_counter()
    record.update(_evaluate(config, tasks, cell, model_path, cell_dir / "eval"))
    record["eval_seconds"] = time.perf_counter() - start
    record["params"] = _count_params(str(base_path(config, workdir, cell.model)))
    record["status"] = "done"
    record["finished"] = records.now()
    return record


def _build_world(config, workdir: epath.Path, log) -> None:
    from imitax.demo import world

    out = workdir / "world"
    settings = config.world.to_dict()
    fingerprint = records.fingerprint(settings)
    record = records.read_json(out / "built.json")
    if record is not None and record.get("fingerprint") == fingerprint:
        return
    if jax.process_index() == 0:
        if out.exists():
            shutil.rmtree(str(out))
        try:
            world_config = world.WorldConfig(**settings)
        except (TypeError, ValueError) as e:
            raise SweepError(f"world: {e}") from None
        summary = world.build(world_config, str(out))
        records.write_json(out / "built.json", {"fingerprint": fingerprint, "summary": summary})
        log(f"generated the synthetic world in {out}")
    _barrier("imitax_world_built")


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_on_error: bool = False,
    allow_config_change: bool = False,
    log=None,
) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes the records and the report. Returns a summary.

    Raises:
      SweepError: a bad config or a workdir of another sweep (before anything runs), or, with
        ``stop_on_error``, the first failed cell.
    """
    log = log or (lambda msg: logging.info("%s", msg))
    workdir = epath.Path(workdir).resolve() if not str(workdir).startswith("gs://") else epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    check_keys(config, default_config(), "config")
    _check_workdir(config, workdir, allow_config_change)
    if config.world:
        _build_world(config, workdir, log)
    cells, tasks = validate_and_build(config, workdir)
    config = resolved(config, workdir)
    start = time.perf_counter()
    log(f"sweep {config.name!r}: {len(cells)} cells, {len(config.base_models)} base models, workdir {workdir}")

    for model, spec in config.base_models.items():
        if spec.get("pretrain"):
            _pretrain(config, workdir, model, log)

    done_seconds, failed, ran = [], [], 0
    for i, cell in enumerate(cells, start=1):
        cell_dir = cell_path(workdir, cell)
        fingerprint = records.fingerprint(cell_settings(config, workdir, cell))
        record = records.read_json(cell_dir / CELL_FILE)
        if record and record.get("status") == "done" and record.get("fingerprint") == fingerprint:
            log(f"[{i}/{len(cells)}] {cell.id}: finished earlier, kept")
            continue
        resumed = " (resuming)" if (cell_dir / "train" / "checkpoints").exists() else ""
        log(f"[{i}/{len(cells)}] {cell.id}: {'evaluating' if cell.source is None else 'training'}{resumed}")
        t0 = time.perf_counter()
        try:
            record = _run_cell(config, tasks, workdir, cell, fingerprint)
        except _Preempted:
            log(f"[{i}/{len(cells)}] {cell.id}: preempted (SIGTERM); rerun the same command to resume")
            return {"preempted": True, "cells": len(cells)}
        except Exception as e:  # noqa: BLE001 - a failed cell is recorded and the sweep goes on
            record = _new_record(
                cell, fingerprint, status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
            )
            if jax.process_index() == 0:
                records.write_json(cell_dir / CELL_FILE, record)
            failed.append(cell.id)
            log(f"[{i}/{len(cells)}] {cell.id}: FAILED: {record['error']}")
            if stop_on_error:
                raise SweepError(f"cell {cell.id} failed: {record['error']} (details in {cell_dir / CELL_FILE})") from e
            continue
        if jax.process_index() == 0:
            records.write_json(cell_dir / CELL_FILE, record)
        _barrier(f"imitax_cell_{i}")
        ran += 1
        seconds = time.perf_counter() - t0
        done_seconds.append(seconds)
        left = sum(1 for c in cells[i:])
        eta = left * float(np.mean(done_seconds))
        shown = [m for m in items(config.report.metrics) if m in record["metrics"]] or list(record["metrics"])
        headline = ", ".join(f"{k} {format_value(record['metrics'][k])}" for k in shown[:4])
        log(
            f"[{i}/{len(cells)}] {cell.id}: done in {seconds:.0f} s ({headline}); "
            f"elapsed {_clock(time.perf_counter() - start)}, ~{_clock(eta)} left"
        )
    summary = {"cells": len(cells), "ran": ran, "failed": failed}
    if jax.process_index() == 0:
        paths = report(workdir, config)
        summary["report"] = paths
        log(f"results: {paths['markdown']}; plots in {paths['plots']}")
    _barrier("imitax_sweep_done")
    return summary


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
