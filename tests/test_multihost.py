"""Multi-controller training on CPU: two processes of 4 devices each train like one of 8.

The two processes run ``scripts/train.py`` with ``--config.distributed.*`` flags against a
coordinator on 127.0.0.1 (cross-process collectives over gloo, JAX's CPU default), in one shared
workdir, as the hosts of a pod would on a shared file system. Their losses must equal those of
the same run in one process with 8 devices.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import train_helpers as th

from imitax.train.loop import run

STEPS = 6
TIMEOUT_S = 240  # a hung collective must not hang the test suite


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """This module's compile settings (``train_helpers.compile_settings``); yields the cache dir."""
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands, env, logs) -> list[int]:
    """Runs the commands side by side; if one fails, stops the others (they would wait forever)."""
    procs = [
        subprocess.Popen(cmd, env=env, cwd=th.ROOT, stdout=subprocess.DEVNULL, stderr=log)
        for cmd, log in zip(commands, logs, strict=True)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p in procs]


def test_two_processes_train_like_one(compile_cache, tmp_path):
    tok = th.make_tokenizer(tmp_path / "tokenizer")
    overrides = th.base_overrides(tok) | {"total_steps": STEPS, "checkpoint_every": 3}

    # One process, 8 devices (this one: tests/conftest.py makes 8).
    run(th.make_config(overrides), str(tmp_path / "one"))
    expected = th.losses(tmp_path / "one")
    assert sorted(expected) == list(range(1, STEPS + 1))

    # Two processes, 4 devices each, one workdir.
    address = f"127.0.0.1:{_free_port()}"
    workdir = tmp_path / "two"
    commands = [
        th.script_args(
            overrides
            | {
                "distributed.coordinator_address": address,
                "distributed.num_processes": 2,
                "distributed.process_id": i,
            },
            workdir,
        )
        for i in range(2)
    ]
    env = th.script_env(compile_cache, device_count=4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    log_paths = [tmp_path / f"process_{i}.log" for i in range(2)]
    logs = [open(p, "w") for p in log_paths]  # noqa: SIM115 - closed below, after the processes end
    try:
        codes = _run_processes(commands, env, logs)
    finally:
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n\n".join(p.read_text()[-3000:] for p in log_paths)
    text = log_paths[0].read_text()
    assert "over 8 devices (2 processes)" in text, text[-3000:]

    got = th.losses(workdir)  # written by process 0 only
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)
    assert th.checkpoint_steps(workdir)[-1] == STEPS
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
