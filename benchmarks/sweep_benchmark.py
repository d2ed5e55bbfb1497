r"""The tiny demo sweep with the local executor and with Ray at 2 cells at a time, in one run.

  python benchmarks/sweep_benchmark.py                     # configs/demo.py:tiny, 10 cells
  python benchmarks/sweep_benchmark.py --out=benchmarks/results/sweep.md

Each executor runs ``scripts/sweep.py --config=configs/demo.py:tiny`` in a fresh workdir (its
own world, pretraining, compilation cache: a first run, as a user's), one after the other:
``--executor=local`` and ``--executor=ray --ray_address=local --max_concurrent_cells=2
--cell_resources=CPU:1``. Reported: wall time of the whole command, cells per minute (the
grid's cells over the wall time, pretraining included in the time), and whether the two
``results.csv`` are identical. Ray's own cost per cell is measured apart, on a local Ray cluster
started here: an empty task's round trip (submit, run in a warm worker, return), and the first
task of a new worker with a cell's environment (worker start-up, which each of the executor's
worker processes pays once, before it imports JAX). The load average is printed: the machine
may be shared.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

flags.DEFINE_string("config", "configs/demo.py:tiny", "The sweep config to run.")
flags.DEFINE_string("out", "", "Also write the Markdown table here.")
flags.DEFINE_integer("round_trips", 20, "Empty Ray tasks timed for the per-cell overhead.")
FLAGS = flags.FLAGS


def _sweep(workdir: pathlib.Path, *extra: str) -> tuple[float, str]:
    args = [sys.executable, "scripts/sweep.py", f"--config={FLAGS.config}", f"--workdir={workdir}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"error: {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, (workdir / "results" / "results.csv").read_text()


def _noop() -> int:
    return os.getpid()


def _ray_overhead(round_trips: int) -> tuple[float, float]:
    """Seconds of an empty task's round trip in a warm worker, and of a new worker's first task."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        env = {"env_vars": {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}}  # as the executor gives CPU cells
        task = ray.remote(_noop).options(num_cpus=1, max_retries=2, runtime_env=env)
        start = time.perf_counter()
        ray.get(task.remote())
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(round_trips):
            ray.get(task.remote())
        return (time.perf_counter() - start) / round_trips, first
    finally:
        ray.shutdown()


def main(argv):
    del argv
    import common

    cells = None
    rows, tables = [], {}
    with tempfile.TemporaryDirectory(prefix="sweep_benchmark_") as tmp:
        runs = {
            "local": (),
            "ray, 2 at a time": (
                "--executor=ray",
                "--ray_address=local",
                "--max_concurrent_cells=2",
                "--cell_resources=CPU:1",
            ),
        }
        for name, extra in runs.items():
            workdir = pathlib.Path(tmp) / name.split(",")[0]
            load_before = os.getloadavg()[0]
            seconds, tables[name] = _sweep(workdir, *extra)
            cells = len(list((workdir / "cells").rglob("cell.json")))
            rows.append([name, f"{seconds:.1f}", f"{cells / (seconds / 60):.1f}", f"{load_before:.1f}"])
    round_trip, first = _ray_overhead(FLAGS.round_trips)
    same = len(set(tables.values())) == 1
    table = common.format_table(["executor", "wall s", "cells / min", "load before"], rows)
    lines = [
        f"Sweep of {FLAGS.config} ({cells} cells, pretraining included), {os.cpu_count()} CPUs.",
        "",
        table,
        "",
        f"results.csv identical: {'yes' if same else 'NO'}",
        f"Ray per cell: empty task round trip {round_trip * 1e3:.1f} ms (warm worker, mean of "
        f"{FLAGS.round_trips}); a new worker's first task {first:.2f} s (start-up, once per worker process)",
        "",
        common.environment(),
    ]
    text = "\n".join(lines)
    print(text)
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
    app.run(main)
