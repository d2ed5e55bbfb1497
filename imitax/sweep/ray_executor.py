"""The Ray executor: each cell a Ray task in its own worker process, several at once, retried when killed.

``scripts/sweep.py --executor=ray`` connects to a Ray cluster (``--ray_address``: ``local``
starts one on this machine, ``auto`` finds the one this machine belongs to, ``HOST:PORT`` is a
head node's GCS address) and runs every step of the plan (a base model's pretraining, a cell) as
one task asking for ``--cell_resources`` (``CPU:1``, ``GPU:1``, ``TPU:4``; several
comma-separated). Ray places the task on a node that has them and shows the worker only the
accelerators it was given (``CUDA_VISIBLE_DEVICES``, ``TPU_VISIBLE_CHIPS``), so on an 8-GPU node
with ``GPU:1`` eight cells train side by side, each on its own GPU. At most
``--max_concurrent_cells`` tasks run at once; a task whose worker dies (killed, out of memory,
a preempted node) is run again up to ``--retries`` times, and the cell resumes from its newest
checkpoint (the trainer resumes from its workdir). A cell that fails (bad data, a diverged loss)
is not retried: it is recorded failed, as with the local executor.

Every worker writes to the same sweep workdir, so the cluster's nodes must share it: a network
file system, or a ``gs://`` bucket. The driver holds each running cell's lease (its heartbeat
thread lives in the driver); the cell's records are written by the worker, exactly as the local
executor writes them, so the report is the same whichever executor ran the cells.

CPU cells get the driver's ``JAX_*`` and ``XLA_FLAGS`` environment (the same virtual devices,
compile options and platform as a local run) and ``OMP_NUM_THREADS`` of their CPUs. XLA's CPU
thread pool has no per-process limit: cells on one host share its cores.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from etils import epath

from imitax.sweep.config import SweepError
from imitax.sweep.plan import Step

_PASSED_ENV = ("XLA_FLAGS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY")


def parse_resources(spec: str) -> dict[str, float]:
    """``'CPU:2,GPU:1'`` -> ``{'CPU': 2.0, 'GPU': 1.0}``.

    Raises:
      SweepError: an entry that is not NAME:AMOUNT with a positive amount.
    """
    resources = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, amount = part.partition(":")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise SweepError(f"--cell_resources={spec}: expected NAME:AMOUNT entries, e.g. CPU:1, GPU:1 or TPU:4")
        resources[name] = value
    if not resources:
        raise SweepError(f"--cell_resources={spec!r}: empty; e.g. --cell_resources=CPU:1")
    return resources


def _answers(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class RayExecutor:
    """Runs steps as Ray tasks; ``wait`` returns the ones that finished."""

    def __init__(self, address: str, resources: str, max_concurrent: int, retries: int):
        if max_concurrent < 1:
            raise SweepError(f"--max_concurrent_cells={max_concurrent}: must be at least 1")
        if retries < 0:
            raise SweepError(f"--retries={retries}: must be at least 0")
        self.address, self.resources = address, parse_resources(resources)
        self.capacity, self.retries = max_concurrent, retries
        self._refs: dict[Any, Step] = {}
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            self._connect(ray)
        self._check_resources(ray)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for ref in self._refs:
            ray.cancel(ref, force=True)
        if self._started_ray:
            ray.shutdown()

    def _connect(self, ray) -> None:
        address = self.address
        if address not in ("local", "auto") and not _answers(address):
            raise SweepError(
                f"--ray_address={address}: no Ray cluster answers there; start one (ray start --head "
                "--port=PORT on the head node) or give the head's HOST:PORT, auto, or local"
            )
        try:
            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SweepError(
                f"--ray_address={address}: could not connect to Ray ({first}); start a cluster "
                "(ray start --head), or use --ray_address=local to start one here"
            ) from None
        self._started_ray = True

    def _check_resources(self, ray) -> None:
        """Some node has everything one cell asks for (else no cell could ever be placed)."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if any(all(node.get(k, 0) >= v for k, v in self.resources.items()) for node in nodes):
            return
        wanted = ",".join(f"{k}:{v:g}" for k, v in self.resources.items())
        shown = {"CPU", "GPU", "TPU", *self.resources}
        have = "; ".join(", ".join(f"{k}:{v:g}" for k, v in sorted(node.items()) if k in shown) for node in nodes)
        raise SweepError(
            f"--cell_resources={wanted}: no node of the Ray cluster has that (nodes have: {have or 'none'}); "
            "ask for what a node has, or add nodes that have it"
        )

    def prepare(self, config, workdir: epath.Path, tasks: dict, log) -> None:
        """The task each step runs as, with the cell's resources, retries and environment."""
        import ray

        from imitax.sweep import local

        del tasks, log  # workers build their own tasks (once each) and print their own lines
        self.config, self.workdir = config, workdir
        options = {"max_retries": self.retries, "retry_exceptions": False}
        extra = dict(self.resources)
        options["num_cpus"] = extra.pop("CPU", 1)
        if "GPU" in extra:
            options["num_gpus"] = extra.pop("GPU")
        if extra:
            options["resources"] = extra
        if set(self.resources) <= {"CPU"}:
            env = {k: v for k, v in os.environ.items() if k.startswith("JAX_") or k in _PASSED_ENV}
            env["OMP_NUM_THREADS"] = str(max(1, int(options["num_cpus"])))
            options["runtime_env"] = {"env_vars": env}
        self._task = ray.remote(local.execute_in_worker).options(**options)

    def has_room(self) -> bool:
        return len(self._refs) < self.capacity

    def submit(self, step: Step) -> None:
        self._refs[self._task.remote(self.config, str(self.workdir), step)] = step

    def wait(self, timeout: float) -> list[tuple[Step, dict[str, Any]]]:
        import ray

        if not self._refs:
            time.sleep(timeout)  # steps other drivers hold: look again in a while
            return []
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            step = self._refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died more often than --retries allows
                first = str(e).strip().splitlines()[0]
                outcome = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
                if step.cell is not None:
                    outcome["record"] = _lost_record(self.config, self.workdir, step, outcome["error"])
            finished.append((step, outcome))
        return finished


def _lost_record(config, workdir: epath.Path, step: Step, error: str) -> dict[str, Any]:
    """The failed record of a cell whose worker kept dying (written by the driver: the worker could not)."""
    from imitax import records
    from imitax.sweep import local
    from imitax.sweep.config import CELL_FILE
    from imitax.sweep.plan import cell_path, cell_settings

    fingerprint = records.fingerprint(cell_settings(config, workdir, step.cell))
    record = local.new_record(step.cell, fingerprint, status="failed", error=error)
    records.write_json(cell_path(workdir, step.cell) / CELL_FILE, record)
    return record
