"""Running a sweep's steps in this process: the workdir guard, the world, pretraining, one cell.

:func:`execute` runs one step of the plan (a base model's pretraining or a cell) and writes its
records; the local executor calls it in the driver's process, one step at a time, and the Ray
executor calls it in a worker (:func:`execute_in_worker`). Every host of a multi-host job runs
the same command, and all of them run each step together on the global mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import socket
import time
import traceback
from typing import Any

import jax
import ml_collections
from etils import epath

from imitax import convert, records
from imitax.sweep import lease
from imitax.sweep.config import CELL_FILE, UNGUARDED_FIELDS, SweepError, eval_tasks
from imitax.sweep.plan import (
    Cell,
    Step,
    base_finetune_config,
    base_path,
    cell_path,
    cell_settings,
    cell_train_config,
    finetune_path,
)

# -- the workdir's records ----------------------------------------------------------------------------


def check_workdir(config, workdir: epath.Path, allow_config_change: bool) -> None:
    """Refuses a workdir that belongs to a sweep with a different config (unless allowed)."""
    current = json.loads(config.to_json_best_effort())
    try:
        records.check_config_record(
            workdir / "sweep_config.json",
            current,
            ignore=UNGUARDED_FIELDS,
            allow=allow_config_change,
            what="a sweep",
            noun="fields",
            fix="Use another --workdir, or --allow_config_change to keep the finished cells whose settings "
            "are unchanged and run the others",
        )
    except records.ConfigMismatch as e:
        raise SweepError(str(e)) from None
    if jax.process_index() == 0:
        records.write_json(workdir / "sweep_config.json", current)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def pretrain_record(config, workdir: epath.Path, model: str) -> tuple[epath.Path, str, dict | None]:
    """Where a base model's step record goes, its settings' fingerprint, and the record (if any).

    A base model without ``finetune`` keeps the record (and fingerprint) of its pretraining alone.
    """
    spec = config.base_models[model]
    if not spec.get("finetune"):
        done = workdir / "base" / model / "pretrained.json"
        return done, records.fingerprint(spec.pretrain.to_dict()), records.read_json(done)
    done = workdir / "base" / f"{model}-finetuned.json"
    finetune = json.loads(base_finetune_config(config, workdir, model).to_json_best_effort())
    pretrain = spec.pretrain.to_dict() if spec.get("pretrain") else None
    fingerprint = records.fingerprint({"pretrain": pretrain, "finetune": finetune})
    return done, fingerprint, records.read_json(done)


def pretrain_done(config, workdir: epath.Path, model: str) -> bool:
    _, fingerprint, record = pretrain_record(config, workdir, model)
    return record is not None and record.get("fingerprint") == fingerprint


def _pretrain(config, workdir: epath.Path, model: str, log) -> dict[str, Any]:
    """Trains a base model: pretrains it and/or finetunes it (resumes when interrupted; skips it when done)."""
    from imitax.train import loop

    done, fingerprint, record = pretrain_record(config, workdir, model)
    if record is not None and record.get("fingerprint") == fingerprint:
        return {"status": "done"}
    spec = config.base_models[model]
    runs = []  # (what, trainer config, workdir)
    if spec.get("pretrain"):
        runs.append(("pretraining", ml_collections.ConfigDict(spec.pretrain.to_dict()), workdir / "base" / model))
    if spec.get("finetune"):
        runs.append(("finetuning", base_finetune_config(config, workdir, model), finetune_path(workdir, model)))
    start = time.perf_counter()
    result = {}
    for what, train, out in runs:
        train.progress = False
        train.overwrite = record is not None  # its settings changed (allowed): start it over
        log(f"{what} base model {model}" + (f" ({train.total_steps} steps)" if train.total_steps > 0 else ""))
        result = loop.run(train, str(out))
        if result.get("preempted"):
            return {"status": "preempted"}
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        records.write_json(done, {"fingerprint": fingerprint, "seconds": seconds, "result": result})
    barrier(f"imitax_pretrained_{model}")
    verb = "finetuned" if spec.get("finetune") else "pretrained"
    log(f"{verb} {model} in {seconds:.0f} s (loss {result.get('loss', float('nan')):.3f})")
    return {"status": "done", "seconds": seconds}


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


def new_record(cell: Cell, fingerprint: str, **fields) -> dict[str, Any]:
    """A cell's ``cell.json``: what the cell is, then ``fields`` (status, timings, metrics or error)."""
    record = {"id": cell.id, "fingerprint": fingerprint, **dataclasses.asdict(cell)}
    return record | fields


def _run_cell(config, tasks: dict, workdir: epath.Path, cell: Cell, fingerprint: str) -> dict[str, Any]:
    from imitax.train import loop

    cell_dir = cell_path(workdir, cell)
    # Who runs it (a killed Ray worker is found by its pid) and the checkpoint it resumes from.
    steps = [int(p.name) for p in (cell_dir / "train" / "checkpoints").glob("*") if p.name.isdigit()]
    record = new_record(
        cell,
        fingerprint,
        status="running",
        started=records.now(),
        worker={"host": socket.gethostname(), "pid": os.getpid()},
        resumed_from_step=max(steps, default=None),
    )
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


def build_world(config, workdir: epath.Path, log, leases: lease.Leases | None) -> None:
    """Generates the demo's world once (with several drivers, the one holding its lease does; the others wait)."""
    from imitax.demo import world

    out = workdir / "world"
    settings = config.world.to_dict()
    fingerprint = records.fingerprint(settings)

    def built() -> bool:
        record = records.read_json(out / "built.json")
        return record is not None and record.get("fingerprint") == fingerprint

    lease_path = workdir / "world.lease.json"
    while not built():
        if leases is not None and not leases.acquire(lease_path):
            time.sleep(1.0)  # another driver is building it
            continue
        try:
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
            barrier("imitax_world_built")
        finally:
            if leases is not None:
                leases.release(lease_path)
        return


# -- one step ------------------------------------------------------------------------------------------


def lease_path(workdir: epath.Path, step: Step) -> epath.Path:
    """Where a step's lease lives: in its cell's directory, or beside its base model's training workdir."""
    if step.cell is None:
        return workdir / "base" / f"{step.model}.{lease.LEASE_FILE}"
    return cell_path(workdir, step.cell) / lease.LEASE_FILE


def step_status(config, workdir: epath.Path, step: Step) -> str | None:
    """``'done'`` (finished with the current settings), ``'failed'``, or None (not run, running, or stale)."""
    if step.cell is None:
        return "done" if pretrain_done(config, workdir, step.model) else None
    record = records.read_json(cell_path(workdir, step.cell) / CELL_FILE)
    if not record or record.get("fingerprint") != records.fingerprint(cell_settings(config, workdir, step.cell)):
        return None
    return record.get("status") if record.get("status") in ("done", "failed") else None


def execute(config, tasks: dict, workdir: epath.Path, step: Step, log) -> dict[str, Any]:
    """Runs one step here and writes its records; returns its outcome.

    The outcome's ``status`` is ``'done'``, ``'failed'`` (a cell's error, recorded in its
    ``cell.json``: the sweep goes on) or ``'preempted'`` (SIGTERM: the trainer saved; a rerun
    resumes); a cell's outcome also holds its ``record``. A failed pretraining raises: its cells
    cannot run.
    """
    if step.cell is None:
        return _pretrain(config, workdir, step.model, log)
    cell = step.cell
    cell_dir = cell_path(workdir, cell)
    fingerprint = records.fingerprint(cell_settings(config, workdir, cell))
    try:
        record = _run_cell(config, tasks, workdir, cell, fingerprint)
    except _Preempted:
        return {"status": "preempted"}
    except Exception as e:  # noqa: BLE001 - a failed cell is recorded and the sweep goes on
        record = new_record(
            cell, fingerprint, status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
    if jax.process_index() == 0:
        records.write_json(cell_dir / CELL_FILE, record)
    return {"status": record["status"], "record": record}


@functools.lru_cache(maxsize=1)
def _worker_tasks(eval_json: str) -> dict:
    """The evaluation tasks, built and loaded once per worker process (the same for every cell)."""
    from imitax.eval import evaluator

    return evaluator.build_tasks(json.loads(eval_json), load=True)


def execute_in_worker(config, workdir: str, step: Step) -> dict[str, Any]:
    """:func:`execute` in a Ray worker: sets up the compilation cache and the tasks once per process.

    A failed pretraining comes back as ``{'status': 'failed', 'error': ...}`` (the driver stops
    the sweep with it), so that Ray does not retry a step that fails the same way each time;
    Ray retries only what kills the worker.
    """
    from imitax import allocator, distributed

    allocator.keep_freed_memory()  # a Ray worker runs cells as scripts/sweep.py's process does
    workdir = epath.Path(workdir)
    if config.compilation_cache:
        distributed.use_compilation_cache(str(workdir / "jax_cache"))
    tasks = _worker_tasks(json.dumps(eval_tasks(config), sort_keys=True))
    try:
        return execute(config, tasks, workdir, step, log=lambda msg: print(f"[sweep] {msg}", flush=True))
    except Exception as e:  # noqa: BLE001 - sent back to the driver, which stops the sweep with it
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


class LocalExecutor:
    """Runs each step in this process, one at a time, as it is submitted (the default executor)."""

    capacity = 1

    def __init__(self):
        self._finished: list[tuple[Step, dict[str, Any]]] = []

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def prepare(self, config, workdir: epath.Path, tasks: dict, log) -> None:
        self.config, self.workdir, self.tasks, self.log = config, workdir, tasks, log

    def has_room(self) -> bool:
        return not self._finished

    def submit(self, step: Step) -> None:
        self._finished.append((step, execute(self.config, self.tasks, self.workdir, step, self.log)))

    def wait(self, timeout: float) -> list[tuple[Step, dict[str, Any]]]:
        finished, self._finished = self._finished, []
        if not finished:
            time.sleep(timeout)  # steps other drivers hold: look again in a while
        return finished
