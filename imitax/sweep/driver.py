"""The sweep's driver: checks, plans, hands the steps to an executor as their dependencies allow, reports.

One driver runs a sweep (or one shard of it, ``cells='I/N'``): it checks the whole grid before
anything runs, builds the plan (:func:`~imitax.sweep.plan.graph`: pretraining before the cells
that finetune its model), then walks the plan, giving each step whose dependencies have finished
to its executor (:class:`~imitax.sweep.local.LocalExecutor`, one step at a time in this process;
:class:`~imitax.sweep.ray_executor.RayExecutor`, several at once in Ray workers) once it holds the
step's lease (:mod:`~imitax.sweep.lease`). A step another live driver holds is left to it and
waited for; if that driver dies, its lease expires and this one runs (resumes) the step.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from imitax.sweep import lease, local
from imitax.sweep.checks import check_keys, validate_and_build
from imitax.sweep.config import SweepError, default_config, items, resolved
from imitax.sweep.plan import Step, cell_path, expand, graph, parse_shard, shard
from imitax.sweep.report import format_value, report


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_on_error: bool = False,
    allow_config_change: bool = False,
    log=None,
    executor: str = "local",
    cells: str = "",
    ray_address: str = "local",
    cell_resources: str = "CPU:1",
    max_concurrent_cells: int = 2,
    retries: int = 2,
    cell_processes: int = 1,
    lease_timeout: float = lease.TIMEOUT_S,
) -> dict[str, Any]:
    """Runs (or resumes) the sweep, or its shard ``cells='I/N'``; writes the records and the report.

    ``executor='ray'`` runs the cells as Ray tasks (see :mod:`~imitax.sweep.ray_executor` for
    ``ray_address``, ``cell_resources``, ``max_concurrent_cells``, ``retries`` and
    ``cell_processes``, the processes of each cell's JAX job). A shard
    writes no report (``scripts/sweep.py --report_only`` collects every shard's cells).

    Raises:
      SweepError: a bad config, shard spec or executor setting, a workdir of another sweep, a
        shard cell leased by a live driver (all before any cell's record is touched), or, with
        ``stop_on_error``, the first failed cell.
    """
    log = log or (lambda msg: logging.info("%s", msg))
    workdir = epath.Path(workdir).resolve() if not str(workdir).startswith("gs://") else epath.Path(workdir)
    check_keys(config, default_config(), "config")
    if executor not in ("local", "ray"):
        raise SweepError(f"--executor={executor}: unknown executor; use local or ray")
    grid = expand(resolved(config, workdir))
    chosen = shard(grid, *parse_shard(cells)) if cells else grid
    # One lease-holding driver per process; a multi-host job is one driver whose hosts run every step
    # together. Object stores (gs://) have no exclusive create: one driver (or one per shard) there.
    single = jax.process_count() == 1 and "://" not in str(workdir)
    leases = lease.Leases(timeout=lease_timeout) if single else None
    if cells and leases is not None:
        _refuse_leased(resolved(config, workdir), workdir, chosen, leases, cells)
    with contextlib.ExitStack() as stack:
        if leases is not None:  # entered first, left last: no lease is given up while its cell still runs
            stack.enter_context(leases)
        runner = stack.enter_context(
            _executor(executor, ray_address, cell_resources, max_concurrent_cells, retries, cell_processes)
        )
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        local.check_workdir(config, workdir, allow_config_change)
        if config.world:
            local.build_world(config, workdir, log, leases)
        _, tasks = validate_and_build(config, workdir)
        config = resolved(config, workdir)
        runner.prepare(config, workdir, tasks, log)
        steps = graph(config, chosen)
        where = f" (shard {cells}: {len(chosen)} of {len(grid)} cells)" if cells else ""
        models = len(config.base_models)
        log(f"sweep {config.name!r}: {len(grid)} cells, {models} base models, workdir {workdir}{where}")
        summary = _Schedule(config, workdir, steps, len(grid), runner, leases, log, stop_on_error).run()
    if summary.get("preempted"):
        return summary
    if cells:
        log(f"shard {cells} finished; when every shard has: scripts/sweep.py --report_only --workdir={workdir}")
    elif jax.process_index() == 0:
        paths = report(workdir, config)
        summary["report"] = paths
        log(f"results: {paths['markdown']}; plots in {paths['plots']}")
    local.barrier("imitax_sweep_done")
    return summary


def _executor(name: str, address: str, resources: str, max_concurrent: int, retries: int, processes: int):
    if name == "ray":
        from imitax.sweep import ray_executor

        return ray_executor.RayExecutor(address, resources, max_concurrent, retries, processes)
    if processes != 1:
        raise SweepError(
            f"--cell_processes={processes}: only with --executor=ray; with the local executor, run the same "
            "command in each of the job's processes (docs/launch.md)"
        )
    return local.LocalExecutor()


def _refuse_leased(config, workdir: epath.Path, cells, leases: lease.Leases, spec: str) -> None:
    """A shard is one scheduler task's: a cell of it that a live driver holds means two tasks were given it."""
    for step in graph(config, cells):
        if step.cell is None:
            continue  # several shards share a base model's pretraining: one of them runs it, the others wait
        holder = leases.holder(local.lease_path(workdir, step))
        if holder is not None:
            raise SweepError(
                f"--cells={spec}: cell {step.id} in {workdir} is leased by a live driver, {holder.describe()}; "
                f"wait for it to finish, or stop it (its lease expires {leases.timeout:.0f} s after its last "
                "heartbeat), then rerun"
            )


class _Schedule:
    """Walks the plan: each step once its dependencies are done, its lease held and its executor has room."""

    def __init__(self, config, workdir, steps: list[Step], total: int, runner, leases, log, stop_on_error: bool):
        self.config, self.workdir, self.runner, self.leases, self.log = config, workdir, runner, leases, log
        self.pending = list(steps)
        self.total, self.stop_on_error = total, stop_on_error
        self.done: set[str] = set()
        self.watched: set[str] = set()  # steps seen leased by another driver: their outcome is theirs
        self.running: dict[str, float] = {}  # step id -> start time
        self.failed: list[str] = []
        self.seconds: list[float] = []
        self.ran = 0
        self.most_at_once = 0  # the most steps in flight together
        self.start = time.perf_counter()

    def _tag(self, step: Step) -> str:
        return f"[{step.index}/{self.total}] {step.id}" if step.cell is not None else step.id

    def run(self) -> dict[str, Any]:
        while self.pending or self.running:
            started = self._start_ready()
            for step, outcome in self.runner.wait(timeout=0.0 if started else 1.0):
                if self.leases is not None:
                    self.leases.release(local.lease_path(self.workdir, step))
                seconds = time.perf_counter() - self.running.pop(step.id)
                if outcome["status"] == "preempted":
                    self.log(f"{self._tag(step)}: preempted (SIGTERM); rerun the same command to resume")
                    return {"preempted": True, "cells": self.total}
                self._finished(step, outcome, seconds)
        return {"cells": self.total, "ran": self.ran, "failed": self.failed, "most_at_once": self.most_at_once}

    def _start_ready(self) -> bool:
        started = False
        for step in list(self.pending):
            if not self.runner.has_room():
                break
            if any(need not in self.done for need in step.needs):
                continue
            status = local.step_status(self.config, self.workdir, step)
            if status == "done" or (status == "failed" and step.id in self.watched):
                self.pending.remove(step)
                self.done.add(step.id)
                if status == "failed":
                    self.failed.append(step.id)
                if step.cell is not None:
                    by = "by another driver" if step.id in self.watched else "earlier, kept"
                    self.log(f"{self._tag(step)}: {'finished' if status == 'done' else 'failed'} {by}")
                continue
            if self.leases is not None and not self.leases.acquire(local.lease_path(self.workdir, step)):
                self.watched.add(step.id)
                continue
            self.pending.remove(step)
            if step.cell is not None:
                resuming = (cell_path(self.workdir, step.cell) / "train" / "checkpoints").exists()
                action = "evaluating" if step.cell.source is None else "training"
                self.log(f"{self._tag(step)}: {action}{' (resuming)' if resuming else ''}")
            self.running[step.id] = time.perf_counter()
            self.runner.submit(step)
            self.most_at_once = max(self.most_at_once, len(self.running))
            started = True
        return started

    def _finished(self, step: Step, outcome: dict[str, Any], seconds: float) -> None:
        self.done.add(step.id)
        if step.cell is None:
            if outcome["status"] != "done":
                raise SweepError(f"pretraining base model {step.model} failed: {outcome.get('error')}")
            return
        record = outcome["record"]
        if outcome["status"] == "failed":
            self.failed.append(step.id)
            self.log(f"{self._tag(step)}: FAILED: {record['error']}")
            if self.stop_on_error:
                where = cell_path(self.workdir, step.cell) / "cell.json"
                raise SweepError(f"cell {step.id} failed: {record['error']} (details in {where})")
            return
        local.barrier(f"imitax_cell_{step.index}")
        self.ran += 1
        self.seconds.append(seconds)
        left = sum(1 for s in self.pending if s.cell is not None) + len(self.running)
        eta = left * float(np.mean(self.seconds)) / self.runner.capacity
        shown = [m for m in items(self.config.report.metrics) if m in record["metrics"]] or list(record["metrics"])
        headline = ", ".join(f"{k} {format_value(record['metrics'][k])}" for k in shown[:4])
        self.log(
            f"{self._tag(step)}: done in {seconds:.0f} s ({headline}); "
            f"elapsed {_clock(time.perf_counter() - self.start)}, ~{_clock(eta)} left"
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
