#!/usr/bin/env bash
# The GPU check: on a fresh machine with an NVIDIA GPU and Python, install imitax with the `gpu`
# extra into a virtual environment, run the model tests on the GPU, and print one table of the
# GPU's figures (LLaMA-1B train-step MFU in bfloat16, forward and greedy-decoding throughput
# against transformers, MMLU scoring time). Runs from anywhere; at most 7.2 minutes of work on
# one H100/H200 (the sections' time limits), plus the install.
#
#   bash benchmarks/gpu_check.sh                          # synthetic MMLU questions
#   bash benchmarks/gpu_check.sh --mmlu_jsonl=mmlu.jsonl  # real ones (see benchmarks/mmlu_benchmark.py)
#
# Arguments go to benchmarks/gpu_check.py (its --help lists them). Environment: PYTHON (the
# interpreter that makes the venv, default python3), IMITAX_GPU_VENV (default .venv-gpu),
# IMITAX_GPU_PINS (default: the jax and torch versions the CPU test suite runs with).
# The table is also written to benchmarks/results/gpu_check.md.
set -euo pipefail

# Before anything is installed or created: is there a GPU at all?
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: benchmarks/gpu_check.sh needs an NVIDIA GPU, and nvidia-smi finds none on this machine:" \
    "run it on a machine with an NVIDIA GPU and its driver installed" >&2
  exit 1
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${IMITAX_GPU_VENV:-.venv-gpu}"
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
# The default PyPI torch wheel for Linux x86-64 is built with CUDA; jax[cuda12] brings CUDA's
# libraries as wheels, so only the NVIDIA driver has to be on the machine.
"$venv/bin/python" -m pip install --quiet --upgrade pip
pins=("jax[cuda12]==0.10.2" "torch==2.13.0")
if [[ -n "${IMITAX_GPU_PINS+set}" ]]; then
  read -ra pins <<<"$IMITAX_GPU_PINS"
fi
"$venv/bin/python" -m pip install --quiet -e ".[gpu,test]" "${pins[@]}"

exec "$venv/bin/python" benchmarks/gpu_check.py --out=benchmarks/results/gpu_check.md "$@"
