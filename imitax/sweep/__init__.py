r"""Data-scaling sweeps: base models x imitation-data sources x token budgets x seeds (x methods x LoRA ranks).

A sweep config (``configs/paper/sweep.py``, ``configs/demo.py``; start from :func:`default_config`)
names the base models, the imitation-data sources, the token budgets,
the seeds, the trainer's settings (``train``: the ``configs/finetune.py`` config every cell
starts from) and the evaluation tasks. Each cell finetunes one base model on one source's first
``budget`` tokens (the trainer's nested budgets: a smaller budget is a subset of a larger one)
and then evaluates the result; the budget ``0`` evaluates the base model itself, once per model.
A base model is a Hugging Face directory, an imitax checkpoint or training workdir, or a trainer
config that trains it from scratch first (``pretrain``), optionally finetuned before use
(``finetune``). ``methods`` (``sft``, ``kd``, ``gkd``) and ``lora_ranks`` add the training
method and the LoRA rank as axes inside each (source, budget, seed); ``kd``/``gkd`` cells learn
from ``teacher_model`` (a path, or a base model whose step they wait for).

The package's parts, one job each: :mod:`~imitax.sweep.config` (the fields and their defaults),
:mod:`~imitax.sweep.plan` (the grid's cells, each one's trainer config and fingerprinted
settings, the plan as a graph of steps, shards, size estimates), :mod:`~imitax.sweep.checks`
(the whole grid checked before anything runs, through each layer's own check),
:mod:`~imitax.sweep.driver` (:func:`run`: checks, plans, schedules the steps, reports),
:mod:`~imitax.sweep.lease` (one driver per cell), the executors :mod:`~imitax.sweep.local`
(the steps in this process) and :mod:`~imitax.sweep.ray_executor` (each step a Ray task, or a
placement group of ``--cell_processes`` processes), and :mod:`~imitax.sweep.report` (the
table, provenance and :mod:`~imitax.sweep.plots`).
``docs/launch.md`` has the recipes for Ray clusters and SLURM arrays.

The sweep workdir::

    sweep_config.json          the config this workdir belongs to (a different one is refused)
    world/                     the demo's generated data (when the config has a ``world``)
    base/<model>/              a pretrained base model's training workdir
    base/<model>-finetuned/    a base model's ``finetune`` workdir (its weights from then on)
    cells/<cell id>/           cell.json (status, metrics, timings, error, worker), train/ (trainer
                               workdir), eval/<task>/ (results.json, samples_<task>.jsonl),
                               lease.json (while a driver runs it)
    results/                   results.csv, results.md, provenance.json, plots/*.png + *.csv
    jax_cache/                 the persistent compilation cache shared by every cell

Rerunning the same command skips finished cells (whose settings are unchanged) and resumes an
interrupted cell: training from its newest checkpoint (bitwise as if uninterrupted), evaluation
from the start. A failed cell is recorded in its ``cell.json`` with the error and the sweep goes
on. On several hosts every process runs the same command: all of them train and evaluate each
cell together on the global mesh, and process 0 writes the records.
"""

from imitax.sweep.checks import validate
from imitax.sweep.config import STYLE_METRICS, SweepError, default_config, resolved
from imitax.sweep.driver import run
from imitax.sweep.plan import Cell, Step, cell_train_config, expand, graph
from imitax.sweep.report import load_records, report, table_rows

__all__ = [
    "STYLE_METRICS",
    "Cell",
    "Step",
    "SweepError",
    "cell_train_config",
    "default_config",
    "expand",
    "graph",
    "load_records",
    "report",
    "resolved",
    "run",
    "table_rows",
    "validate",
]
