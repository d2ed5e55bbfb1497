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

A cell too big for one process (``--cell_processes=N``, N > 1) runs as one JAX job of N
processes: N Ray actors, one per bundle of a placement group of N bundles of ``--cell_resources``
(gang-scheduled: all of them or none). The group is ``STRICT_SPREAD`` (one process per node, as
on the hosts of a TPU slice or a GPU cluster) when N nodes of the cluster have the resources,
else ``PACK`` (several processes per node: one machine with several accelerators, or a test on
127.0.0.1). Process 0 picks a free port on its node, all N join it with
``jax.distributed.initialize`` and run the step together; process 0 writes the records. The
actors are new processes for each step (the JAX runtime is started once per process) and end
with it. If any of them dies, the others are killed and the whole group runs again (up to
``--retries`` times), resuming from the checkpoint; the placement group is released in every case.
"""

from __future__ import annotations

import os
import socket
import time
import types
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

    def __init__(self, address: str, resources: str, max_concurrent: int, retries: int, processes: int = 1):
        if max_concurrent < 1:
            raise SweepError(f"--max_concurrent_cells={max_concurrent}: must be at least 1")
        if retries < 0:
            raise SweepError(f"--retries={retries}: must be at least 0")
        if processes < 1:
            raise SweepError(f"--cell_processes={processes}: must be at least 1 (the processes of one cell's JAX job)")
        self.address, self.resources = address, parse_resources(resources)
        self.capacity, self.retries, self.processes = max_concurrent, retries, processes
        self.bundle = {"CPU": 1.0} | self.resources  # one process's share (Ray's default: 1 CPU per task)
        self._refs: dict[Any, Step | _Gang] = {}
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            self._connect(ray)
        self._check_resources(ray)
        if self.processes > 1:
            self.strategy = self._placement(ray)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for ref, owner in self._refs.items():
            if not isinstance(owner, _Gang):
                ray.cancel(ref, force=True)
        for gang in {id(o): o for o in self._refs.values() if isinstance(o, _Gang)}.values():
            gang.end()  # its actors are killed: Ray cancels no running actor task by force
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

    def _placement(self, ray) -> str:
        """The group's strategy: one process per node where N nodes can take one, else packed onto fewer nodes.

        Raises:
          SweepError: the cluster's nodes cannot hold N processes' resources even together.
        """
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [int(min(node.get(k, 0) // v for k, v in self.bundle.items())) for node in nodes]
        if sum(f > 0 for f in fits) >= self.processes:
            return "STRICT_SPREAD"
        if sum(fits) >= self.processes:
            return "PACK"
        wanted = ",".join(f"{k}:{v:g}" for k, v in self.bundle.items())
        raise SweepError(
            f"--cell_processes={self.processes}: the Ray cluster's {len(nodes)} nodes have room for {sum(fits)} "
            f"of {self.processes} processes of {wanted}; ask for fewer processes or resources, or add nodes"
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
        # A gang's processes: retried by the driver as a group, never one by one (the others would wait for it).
        self._actor = ray.remote(_CellProcess)
        self._actor_options = {k: v for k, v in options.items() if k not in ("max_retries", "retry_exceptions")}
        self._actor_options.update(max_restarts=0, max_task_retries=0)

    def has_room(self) -> bool:
        return len({id(owner) for owner in self._refs.values()}) < self.capacity  # a gang: N refs, one step

    def submit(self, step: Step) -> None:
        if self.processes > 1:
            self._launch(step, attempt=0)
        else:
            self._refs[self._task.remote(self.config, str(self.workdir), step)] = step

    def _launch(self, step: Step, attempt: int) -> None:
        gang = _Gang(self, step, attempt)
        self._refs.update(dict.fromkeys(gang.refs, gang))

    def wait(self, timeout: float) -> list[tuple[Step, dict[str, Any]]]:
        import ray

        if not self._refs:
            time.sleep(timeout)  # steps other drivers hold: look again in a while
            return []
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            owner = self._refs.pop(ref)
            if not isinstance(owner, _Gang):
                finished.append((owner, self._outcome(owner, ref)))
            elif (outcome := self._settle(owner, ref)) is not None:
                finished.append((owner.step, outcome))
        return finished

    def _outcome(self, step: Step, ref) -> dict[str, Any]:
        """A task's outcome, or the failed one of a step whose worker died more often than --retries allows."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0]
            outcome = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
            if step.cell is not None:
                outcome["record"] = _lost_record(self.config, self.workdir, step, outcome["error"])
            return outcome

    def _settle(self, gang: _Gang, ref) -> dict[str, Any] | None:
        """A gang's outcome once process 0 returns; None while it runs or when it runs again.

        Process 0's outcome is the step's (it wrote the records): the others, finished or not,
        are ended with it. A process that died (or could not join the job) ends the group, which
        runs again, all N processes anew, while retries are left.
        """
        import ray

        died = False
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError:
            died = True
        if not died and ref != gang.refs[0]:
            return None  # process 0 returns the outcome
        for other in gang.refs:
            self._refs.pop(other, None)
        gang.end()
        if not died:
            return outcome
        if gang.attempt < self.retries:
            self._launch(gang.step, gang.attempt + 1)
            return None
        return self._outcome(gang.step, ref)


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


class _CellProcess:
    """Process ``index`` of a cell's N-process JAX job: a Ray actor, a new worker process for each step."""

    def coordinator(self) -> str:
        """HOST:PORT for the job's coordinator on this node (process 0's): a port that is free now."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def run(self, coordinator: str, processes: int, index: int, config, workdir: str, step: Step) -> dict[str, Any]:
        """Joins the job (``jax.distributed.initialize``), then runs the step with the others."""
        from imitax import distributed
        from imitax.sweep import local

        job = types.SimpleNamespace(
            coordinator_address=coordinator, num_processes=processes, process_id=index, local_device_ids=""
        )
        distributed.initialize(job)
        return local.execute_in_worker(config, workdir, step)


class _Gang:
    """One step's N processes: N actors in a placement group of N bundles, started and ended together."""

    def __init__(self, executor: RayExecutor, step: Step, attempt: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.step, self.attempt = step, attempt
        n = executor.processes
        self.group = placement_group([executor.bundle] * n, strategy=executor.strategy)
        self.actors = [
            executor._actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i), **executor._actor_options
            ).remote()
            for i in range(n)
        ]
        address = self.actors[0].coordinator.remote()  # resolved by Ray before the processes start the step
        workdir = str(executor.workdir)
        self.refs = [
            actor.run.remote(address, n, i, executor.config, workdir, step) for i, actor in enumerate(self.actors)
        ]

    def end(self) -> None:
        """Kills the processes (a finished one, or one still waiting on a dead peer) and frees their resources."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)
