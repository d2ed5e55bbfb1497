"""The sweep's plan and executors: Ray against local, a killed worker, two drivers, shards, leases, bad input.

One small grid (a base model pretrained from scratch, its own cell and two finetuning seeds)
runs once with the local executor in this process: the reference every other run's
``results.csv`` must equal (training resumes bitwise, so a run interrupted anywhere gives the
same table). The Ray runs use one local Ray cluster of 2 CPUs started by this module; their
workers get this process's JAX settings through the executor's environment for CPU cells.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import sweep_helpers
import train_helpers as th

from imitax import sweep
from imitax.sweep import lease, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = ROOT / "scripts" / "sweep.py"
CELLS = ["p/base", "p/broad/2K/seed0", "p/broad/2K/seed1"]
KILLED = "p/broad/2K/seed1"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, compile_cache):
    """A config file: base model ``p`` pretrained for 4 steps, its own cell, 2K tokens x 2 seeds."""
    root = tmp_path_factory.mktemp("ray_assets")
    vocab = sweep_helpers.link_tiny_world(tmp_path_factory, root / "world")
    w = root / "world"
    text = f"""
import ml_collections as mlc
from imitax import sweep
from imitax.train import config as train_config

def get_config():
    c = sweep.default_config()
    c.name = 'test-ray'
    pre = train_config.default_config()
    pre.model_overrides.update(dict(vocab_size={vocab}, hidden_size=32, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=16, mlp_dim=64, max_position_embeddings=128))
    pre.tokenizer = '{w}/tokenizer'
    pre.data.train = '{w}/corpus.jsonl'
    pre.data.format = 'text'
    pre.dtype = 'float32'
    pre.seq_len = 64
    pre.batch_size = 8
    pre.total_steps = 4
    pre.optimizer.name = 'adamw'
    pre.optimizer.lr = 3e-3
    pre.optimizer.warmup_steps = 1
    pre.checkpoint_every = 4
    c.base_models.p = mlc.ConfigDict({{'pretrain': pre}})
    c.data_sources.broad = mlc.ConfigDict({{'train': '{w}/imitation_broad.json'}})
    c.token_budgets = '0,2K'
    c.seeds = '0,1'
    c.train.seq_len = 64
    c.train.batch_size = 8
    c.train.dtype = 'float32'
    c.train.optimizer.name = 'adamw'
    c.train.optimizer.lr = 1e-2
    c.train.optimizer.warmup_steps = 1
    c.train.checkpoint_every = 1
    c.eval.batch_size = 8
    c.eval.tasks.facts = mlc.ConfigDict({{'task': 'multiple_choice', 'scoring': 'cloze',
        'data_file': '{w}/facts_heldout.jsonl', 'limit': 40}})
    return c
"""
    path = root / "sweep_config.py"
    path.write_text(text)
    return path


def load(config_file):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_test_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def cell_record(workdir: pathlib.Path, cell: str) -> dict:
    return json.loads((workdir / "cells" / cell / "cell.json").read_text())


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """The whole grid, local executor, in this process."""
    workdir = tmp_path_factory.mktemp("reference") / "sweep"
    summary = sweep.run(load(config_file), workdir, log=quiet)
    assert summary["failed"] == [] and summary["ran"] == 3 and summary["most_at_once"] == 1
    return workdir


@pytest.fixture(scope="module")
def ray_cluster(compile_cache):
    """A local Ray cluster of 2 CPUs; CPU cells get this process's JAX settings (the executor passes JAX_* on)."""
    import ray

    env = {
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(config_file, reference, ray_cluster, tmp_path_factory):
    """The grid under Ray, 2 cells at a time, with one cell's worker killed (SIGKILL) after its first checkpoint."""
    workdir = tmp_path_factory.mktemp("ray") / "sweep"
    summary, killed = run_killing(config_file, workdir, KILLED, max_concurrent_cells=2, retries=2)
    return workdir, summary, killed


def run_killing(config_file, workdir, cell: str, **run_args) -> tuple[dict, int | None]:
    """``sweep.run`` under Ray in a thread, killing ``cell``'s worker (SIGKILL) once it has a checkpoint.

    Returns:
      the run's summary, and the pid killed (None if the cell never reached a checkpoint).
    """
    result = {}

    def drive():
        try:
            result["summary"] = sweep.run(load(config_file), workdir, log=quiet, executor="ray", **run_args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            result["error"] = e

    thread = threading.Thread(target=drive)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        if th.checkpoint_steps(workdir / "cells" / cell / "train")[-1:] >= [1]:
            killed = cell_record(workdir, cell)["worker"]["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    return result["summary"], killed


def test_ray_runs_the_grid_like_the_local_executor(ray_run, reference):
    workdir, summary, _ = ray_run
    assert summary["failed"] == [] and summary["cells"] == 3
    assert read_csv(workdir / "results" / "results.csv") == read_csv(reference / "results" / "results.csv")
    # Each cell ran in a Ray worker, not in this process; once the pretraining had finished, two
    # cells were in flight together (the local executor: one at a time).
    assert all(cell_record(workdir, c)["worker"]["pid"] != os.getpid() for c in CELLS)
    assert summary["most_at_once"] == 2


def test_a_killed_worker_is_retried_and_the_cell_resumes(ray_run):
    workdir, _, killed = ray_run
    assert killed is not None, "the cell finished before its worker could be killed"
    record = cell_record(workdir, KILLED)
    assert record["status"] == "done"
    assert record["worker"]["pid"] != killed  # run again, in another worker
    assert record["resumed_from_step"] >= 1  # from the checkpoint the killed worker saved
    assert not (workdir / "cells" / KILLED / lease.LEASE_FILE).exists()  # released


def test_the_plan_runs_pretraining_before_its_cells(config_file, ray_run):
    config = load(config_file)
    steps = sweep.graph(config, sweep.expand(config))
    assert [s.id for s in steps] == ["p/pretrain", *CELLS]
    assert steps[0].needs == () and all(s.needs == ("p/pretrain",) for s in steps[1:])
    assert [s.index for s in steps] == [0, 1, 2, 3]
    # Under Ray (2 at a time), no cell started before the pretraining's record was written.
    workdir, _, _ = ray_run
    pretrained = int((workdir / "base" / "p" / "pretrained.json").stat().st_mtime)  # records' times are to the second
    for cell in CELLS:
        assert datetime.datetime.fromisoformat(cell_record(workdir, cell)["started"]).timestamp() >= pretrained


def test_two_drivers_on_one_workdir_run_each_cell_once(config_file, reference, compile_cache, tmp_path):
    workdir = tmp_path / "sweep"
    args = [sys.executable, str(SWEEP_SCRIPT), f"--config={config_file}", f"--workdir={workdir}"]
    env = th.script_env(compile_cache)
    procs = [
        subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for cell in CELLS:
        started = [out.count(f"{cell}: training") + out.count(f"{cell}: evaluating") for out in outs]
        assert sorted(started) == [0, 1], (cell, outs)
    assert sum(out.count("pretrained p in") for out in outs) == 1
    assert sum(out.count(": done in") for out in outs) == 3
    for out in outs:  # both waited for the other's cells and wrote the whole table
        assert "results:" in out
    assert read_csv(workdir / "results" / "results.csv") == read_csv(reference / "results" / "results.csv")


def test_shards_then_report_only_equal_one_whole_run(config_file, reference, compile_cache, tmp_path):
    workdir = tmp_path / "sweep"
    config = load(config_file)
    first = sweep.run(config, workdir, log=quiet, cells="0/2")
    assert first["ran"] == 2 and not (workdir / "results").exists()  # a shard writes no report
    assert sorted(p.parent.name for p in (workdir / "cells").rglob("cell.json")) == ["base", "seed1"]
    second = sweep.run(config, workdir, log=quiet, cells="1/2")
    assert second["ran"] == 1
    sweep.report(workdir)  # what --report_only runs (test_sweep runs that script end to end)
    assert read_csv(workdir / "results" / "results.csv") == read_csv(reference / "results" / "results.csv")
    assert plan.shard(list(range(7)), 0, 3) + plan.shard(list(range(7)), 1, 3) + plan.shard(list(range(7)), 2, 3) == [
        0,
        3,
        6,
        1,
        4,
        2,
        5,
    ]


# -- a cell of several processes ------------------------------------------------------------------------


GANG = "p/broad/2K/seed0"  # shard 1/2 of the grid


@pytest.fixture(scope="module")
def gang_run(config_file, reference, ray_cluster, tmp_path_factory):
    """One finetuning cell under Ray as a JAX job of 2 processes with 4 CPU devices each (8 in all, as the reference).

    The workdir is the reference's without that cell and the report; the cell's shard runs (its
    base model's pretraining is kept), then the report is written from every cell's record.
    Process 0 is killed (SIGKILL) after the job's first checkpoint: the group must run again.
    """
    import shutil

    workdir = tmp_path_factory.mktemp("gang") / "sweep"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("results", "seed0"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # the workers' (passed on for CPU cells)
        summary, killed = run_killing(config_file, workdir, GANG, cells="1/2", cell_processes=2, retries=1)
    sweep.report(workdir)
    return workdir, summary, killed


def test_a_cell_of_two_processes_runs_like_one(gang_run, reference):
    workdir, summary, _ = gang_run
    assert summary["failed"] == [] and summary["ran"] == 1
    assert read_csv(workdir / "results" / "results.csv") == read_csv(reference / "results" / "results.csv")
    # One JAX job of 2 processes with 4 devices each ran the cell; process 0 (a Ray worker) wrote its records.
    results = json.loads((workdir / "cells" / GANG / "eval" / "facts" / "results.json").read_text())
    devices = results["provenance"]["devices"]
    assert (devices["process_count"], devices["count"], devices["local_count"]) == (2, 8, 4)
    assert not (workdir / "cells" / GANG / lease.LEASE_FILE).exists()  # the driver held and released its lease


def test_a_killed_process_reruns_its_whole_group(gang_run):
    workdir, _, killed = gang_run
    assert killed is not None, "the cell finished before its process 0 could be killed"
    record = cell_record(workdir, GANG)
    assert record["status"] == "done"
    assert record["worker"]["pid"] not in (killed, os.getpid())  # a new group's process 0
    assert record["resumed_from_step"] >= 1  # from the checkpoint the first group saved


def test_cell_processes_out_of_range(config_file, ray_cluster, tmp_path):
    workdir = tmp_path / "sweep"
    with pytest.raises(
        sweep.SweepError, match=r"--cell_processes=3: the Ray cluster's 1 nodes have room for 2 of 3 processes of CPU:1"
    ):
        sweep.run(load(config_file), workdir, log=quiet, executor="ray", cell_processes=3)
    with pytest.raises(sweep.SweepError, match=r"--cell_processes=0: must be at least 1"):
        sweep.run(load(config_file), workdir, log=quiet, executor="ray", cell_processes=0)
    with pytest.raises(sweep.SweepError, match=r"--cell_processes=2: only with --executor=ray"):
        sweep.run(load(config_file), workdir, log=quiet, cell_processes=2)
    assert _untouched(workdir)


def test_a_group_spreads_over_nodes_when_enough_have_room():
    from imitax.sweep import ray_executor

    def strategy(processes: int, resources: str, *nodes: dict) -> str:
        cluster = types.SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": n} for n in nodes])
        return ray_executor.RayExecutor("local", resources, 1, 0, processes)._placement(cluster)

    gpu_host = {"CPU": 32, "GPU": 8}
    assert strategy(2, "GPU:8", gpu_host, gpu_host) == "STRICT_SPREAD"  # one process per host
    assert strategy(2, "GPU:4", gpu_host) == "PACK"  # both on the one host
    assert strategy(3, "GPU:4", gpu_host, {"CPU": 8, "GPU": 4}) == "PACK"  # 2 + 1
    assert strategy(2, "CPU:1", {"CPU": 2}) == "PACK"  # the test cluster
    with pytest.raises(
        sweep.SweepError, match=r"cluster's 2 nodes have room for 1 of 2 processes of CPU:1,GPU:8; ask for fewer"
    ):
        strategy(2, "GPU:8", gpu_host, {"CPU": 8, "GPU": 4})


# -- leases --------------------------------------------------------------------------------------------


def test_a_lease_is_held_while_its_owner_lives_and_expires_when_it_dies(tmp_path):
    path = tmp_path / "cell" / lease.LEASE_FILE
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from imitax.sweep import lease\n"
            "with lease.Leases(heartbeat=0.2) as l:\n"
            f"    assert l.acquire({str(path)!r}); print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        first = lease.read(path)
        with lease.Leases() as other:
            assert not other.acquire(path)  # a live driver's
            assert other.holder(path).pid == holder.pid
            time.sleep(0.5)
            assert lease.read(path).heartbeat > first.heartbeat  # its thread keeps it fresh
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            assert other.holder(path) is None  # its process is gone: expired at once on this host
            assert other.acquire(path)
            assert lease.read(path).owner == other.owner
        assert not path.exists()  # released on exit
    finally:
        holder.kill()
        holder.wait()


def test_a_lease_of_another_host_expires_after_the_timeout(tmp_path):
    path = tmp_path / lease.LEASE_FILE
    record = {"owner": "elsewhere", "host": "no-such-host", "pid": 1, "heartbeat": time.time()}
    path.write_text(json.dumps(record))
    with lease.Leases(timeout=30) as leases:
        assert not leases.acquire(path)  # fresh heartbeat: alive as far as we can tell
        path.write_text(json.dumps(record | {"heartbeat": time.time() - 31}))
        assert leases.acquire(path)
        assert lease.read(path).owner == leases.owner


# -- bad input -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SWEEP_SCRIPT), *args],
        env=th.subprocess_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _untouched(workdir: pathlib.Path) -> bool:
    return not list(workdir.rglob("cell.json")) and not (workdir / "sweep_config.json").exists()


def test_a_ray_address_that_does_not_answer(config_file, tmp_path):
    workdir = tmp_path / "sweep"
    address = f"127.0.0.1:{_free_port()}"
    proc = _script([f"--config={config_file}", f"--workdir={workdir}", "--executor=ray", f"--ray_address={address}"])
    assert proc.returncode == 1
    assert f"error: --ray_address={address}: no Ray cluster answers there" in proc.stderr
    assert "Traceback" not in proc.stderr and _untouched(workdir)


def test_resources_no_node_has(config_file, ray_cluster, tmp_path):
    workdir = tmp_path / "sweep"
    with pytest.raises(sweep.SweepError, match=r"--cell_resources=GPU:1: no node of the Ray cluster has that"):
        sweep.run(load(config_file), workdir, log=quiet, executor="ray", cell_resources="GPU:1")
    assert _untouched(workdir)


def test_a_shard_out_of_range_and_a_shard_leased_by_a_live_driver(config_file, reference, tmp_path):
    workdir = tmp_path / "sweep"
    with pytest.raises(sweep.SweepError, match=r"--cells=2/2: shard 2 out of range for 2 shards"):
        sweep.run(load(config_file), workdir, log=quiet, cells="2/2")
    with pytest.raises(sweep.SweepError, match=r"--cells=1/x: expected I/N"):
        sweep.run(load(config_file), workdir, log=quiet, cells="1/x")
    assert _untouched(workdir)
    # Another driver (this process's pid: alive) holds a cell of shard 1/2.
    with lease.Leases(owner="other-driver") as other:
        assert other.acquire(workdir / "cells" / "p" / "broad" / "2K" / "seed0" / lease.LEASE_FILE)
        with pytest.raises(sweep.SweepError, match=r"cell p/broad/2K/seed0 in .* is leased by a live driver"):
            sweep.run(load(config_file), workdir, log=quiet, cells="1/2")
    assert _untouched(workdir)


def test_dry_run_prints_the_plan_and_runs_nothing(config_file, tmp_path):
    workdir = tmp_path / "sweep"
    proc = _script([f"--config={config_file}", f"--workdir={workdir}", "--dry_run", "--throughput=1e9"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| p/")]
    assert [r.split("|")[1].strip() for r in rows] == ["p/pretrain", *CELLS]
    # 2K tokens at 8 x 64 per step: 4 steps; FLOPs 6 N D with N from the pretraining config.
    cell = [c.strip() for c in rows[2].split("|")[1:-1]]
    config = load(config_file)
    from imitax.train import config as train_config

    n = train_config.model_config(config.base_models.p.pretrain).num_params()
    assert cell[1:5] == ["p/pretrain", "4", "64", "2K"]
    flops = 6 * n * 2000
    printed = float(cell[6][:-1]) * {"M": 1e6, "G": 1e9}[cell[6][-1]]
    assert printed == pytest.approx(flops, rel=1e-3)
    assert cell[7] == f"{flops / 1e9:.0f} s"  # at --throughput=1e9 FLOP/s
    assert not workdir.exists()


def test_the_workdir_guard_names_the_differing_keys(tmp_path):
    from imitax import records

    path = tmp_path / "run" / "run_config.json"
    assert records.check_config_record(path, {"a": 1}) == []  # no record yet: nothing differs
    records.write_json(path, {"a": 1, "b": {"c": 2}, "steps": 10})
    assert records.check_config_record(path, {"a": 1, "b": {"c": 2}, "steps": 20}, ignore=("steps",)) == []
    with pytest.raises(
        records.ConfigMismatch, match=r"run holds a run with a different config \(differing keys: b, d\)\. Do X"
    ) as e:
        records.check_config_record(path, {"a": 1, "b": {"c": 3}, "d": 0, "steps": 10}, fix="Do X")
    assert e.value.keys == ["b", "d"]
    assert records.check_config_record(path, {"a": 2, "b": {"c": 2}, "steps": 10}, allow=True) == ["a"]
