"""benchmarks/gpu_check.sh on a machine without a GPU: one line saying so, exit 1, nothing installed or created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
MESSAGE = (
    "error: benchmarks/gpu_check.sh needs an NVIDIA GPU, and nvidia-smi finds none on this machine: "
    "run it on a machine with an NVIDIA GPU and its driver installed"
)


def fake_nvidia_smi(bin_dir: Path) -> None:
    """An ``nvidia-smi`` as a machine with the tool but no usable GPU has it: it fails."""
    tool = bin_dir / "nvidia-smi"
    tool.write_text('#!/bin/sh\necho "NVIDIA-SMI has failed: it could not communicate with the driver"\nexit 9\n')
    tool.chmod(0o755)


@pytest.mark.parametrize("nvidia_smi", ["missing", "failing"])
def test_without_a_gpu_it_says_so_in_one_line_and_creates_nothing(tmp_path, nvidia_smi):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    script = repo / "benchmarks" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi == "failing":
        fake_nvidia_smi(bin_dir)
    # Only bin_dir on PATH: a real nvidia-smi elsewhere on this machine cannot be found, nor pip or python.
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "IMITAX_GPU_VENV": str(tmp_path / "venv")}
    bash = shutil.which("bash")
    out = subprocess.run([bash, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)

    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == MESSAGE + "\n"
    assert sorted(os.listdir(tmp_path)) == ["bin", "repo"]  # no venv, no home files
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == ["benchmarks", "benchmarks/gpu_check.sh"]


def test_the_driver_without_a_gpu_says_so_in_one_line(tmp_path):
    """benchmarks/gpu_check.py, run directly where JAX has no GPU: one line on stderr, exit 1, no report written."""
    driver = SCRIPT.with_name("gpu_check.py")
    out_file = tmp_path / "report.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # what JAX sees on a machine without a GPU
    command = [sys.executable, str(driver), f"--out={out_file}", f"--logs={tmp_path / 'logs'}"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: benchmarks/gpu_check.py found no GPU for JAX (jax.devices('gpu')): run it on a machine with an "
        "NVIDIA GPU, in an environment with imitax's gpu extra (pip install -e '.[gpu]'), or pass --smoke"
    ]
    assert os.listdir(tmp_path) == []
