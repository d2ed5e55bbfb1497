#!/bin/bash
# One shard of a sweep per SLURM array task (docs/launch.md). Each task runs the I-th of N shards
# of the grid (--cells=I/N, I = SLURM_ARRAY_TASK_ID, N = SLURM_ARRAY_TASK_COUNT); the cells'
# leases keep two tasks (a resubmitted array, overlapping shards) from running the same cell.
#
#   WORKDIR=/shared/sweeps/demo sbatch --array=0-7 configs/slurm/sweep_array.sh
#   WORKDIR=/shared/sweeps/demo CONFIG=configs/paper/sweep.py:models=llama_7b \
#       sbatch --array=0-31 configs/slurm/sweep_array.sh --config.base_models.llama_7b.init_from=/weights/llama-7b
#   # when all tasks have finished (or: sbatch --dependency=afterany:JOBID ...):
#   python scripts/sweep.py --report_only --workdir=/shared/sweeps/demo
#
# Extra arguments go to scripts/sweep.py (config overrides, --dry_run). Run from the repository
# root; WORKDIR must be on a file system every node shares.
#SBATCH --job-name=imitax-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus=1
#SBATCH --time=24:00:00
#SBATCH --output=imitax-sweep-%A_%a.out
set -euo pipefail

: "${WORKDIR:?set WORKDIR to the sweep directory, on a file system every node shares}"
CONFIG="${CONFIG:-configs/demo.py}"
SHARD="${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}"

exec python scripts/sweep.py --config="$CONFIG" --workdir="$WORKDIR" --cells="$SHARD" "$@"
