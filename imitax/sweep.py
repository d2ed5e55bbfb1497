r"""Data-scaling sweeps: base models x imitation-data sources x token budgets x seeds.

A sweep config (``configs/paper/sweep.py``, ``configs/demo.py``; start from :func:`default_config`)
names the base models, the imitation-data sources, the token budgets,
the seeds, the trainer's settings (``train``: the ``configs/finetune.py`` config every cell
starts from) and the evaluation tasks. Each cell finetunes one base model on one source's first
``budget`` tokens (the trainer's nested budgets: a smaller budget is a subset of a larger one)
and then evaluates the result; the budget ``0`` evaluates the base model itself, once per model.
A base model is a Hugging Face directory, an imitax checkpoint or training workdir, or a trainer
config that trains it from scratch first (``pretrain``).

The sweep workdir::

    sweep_config.json          the config this workdir belongs to (a different one is refused)
    world/                     the demo's generated data (when the config has a ``world``)
    base/<model>/              a pretrained base model's training workdir
    cells/<cell id>/           cell.json (status, metrics, timings, error), train/ (trainer
                               workdir), eval/<task>/ (results.json, samples_<task>.jsonl)
    results/                   results.csv, results.md, provenance.json, plots/*.png + *.csv
    jax_cache/                 the persistent compilation cache shared by every cell

Rerunning the same command skips finished cells (whose settings are unchanged) and resumes an
interrupted cell: training from its newest checkpoint (bitwise as if uninterrupted), evaluation
from the start. A failed cell is recorded in its ``cell.json`` with the error and the sweep goes
on. On several hosts every process runs the same command: all of them train and evaluate each
cell together on the global mesh, and process 0 writes the records.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from imitax import convert, records
from imitax.train import config as train_config

__all__ = [
    "Cell",
    "SweepError",
    "default_config",
    "expand",
    "report",
    "run",
    "validate",
]

# Top-level config fields that do not change what any cell computes (a rerun may change them).
UNGUARDED_FIELDS = ("report", "teacher", "teacher_file", "compilation_cache")
CELL_FILE = "cell.json"
BASE_MODEL_FIELDS = ("init_from", "pretrain", "size", "train")


class SweepError(ValueError):
    """A sweep config or workdir that cannot be run; the message names the field and the fix."""


# -- config ------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """The fields of a sweep config, with their defaults (config files fill them in).

    Lists may be written as comma-separated strings (``token_budgets='0,300K,1M'``), which is
    also what a command-line override takes.
    """
    c = ml_collections.ConfigDict()
    c.name = "sweep"
    # name -> ConfigDict(init_from=PATH) or ConfigDict(pretrain=<trainer config>); optional
    # `size` (parameters, for the size axis; default: counted from the model's config) and
    # `train` (trainer fields this model's cells change, e.g. seq_len=1024 for GPT-2).
    c.base_models = ml_collections.ConfigDict()
    # name -> ConfigDict(train=PATHS, format='auto', template='koala'): the trainer's data fields;
    # optional token_budgets (this source's own list, replacing the sweep's).
    c.data_sources = ml_collections.ConfigDict()
    c.token_budgets = "0"  # '0' = the base model itself
    c.seeds = "0"
    c.train = train_config.default_config()
    c.train.progress = False  # the sweep prints one progress line per cell instead
    c.eval = ml_collections.ConfigDict()
    # alias -> ConfigDict(task=REGISTRY NAME (default: the alias), **the task's keyword config).
    c.eval.tasks = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.mesh = "data=1,fsdp=-1,tensor=1"
    # The teacher's scores, 'alias/metric' -> value, drawn as dashed reference lines; and/or a
    # JSON file of the same mapping.
    c.teacher = ml_collections.ConfigDict()
    c.teacher_file = ""
    c.report = ml_collections.ConfigDict()
    c.report.metrics = ""  # 'alias/metric,...' to plot; '' = each task's headline metrics
    c.report.style_task = "style"  # the alias whose metrics go in the style figure
    # scripts/sweep.py keeps a persistent compilation cache in WORKDIR/jax_cache for every cell
    # (process set-up: library callers set their own with imitax.distributed.use_compilation_cache).
    c.compilation_cache = True
    c.world = ml_collections.ConfigDict()  # the demo's synthetic world (imitax.demo.world); empty = none
    return c


def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def _budget_tokens(budget: str) -> int:
    from imitax.data.budget import parse_token_budget

    if budget.strip() in ("0", "0K", "0M"):
        return 0
    return parse_token_budget(budget)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid. ``source is None``: the base model itself (budget 0)."""

    model: str
    source: str | None
    budget: str
    tokens: int
    seed: int

    @property
    def id(self) -> str:
        if self.source is None:
            return f"{self.model}/base"
        return f"{self.model}/{self.source}/{self.budget}/seed{self.seed}"


def _parse_budgets(value: Any, where: str) -> list[tuple[str, int]]:
    budgets = []
    for b in _items(value):
        try:
            budgets.append((b, _budget_tokens(b)))
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
    return budgets


def expand(config: ml_collections.ConfigDict) -> list[Cell]:
    """The grid's cells in run order: per base model, its base cell, then sources x budgets x seeds.

    A source's own ``token_budgets`` replaces the sweep's for that source (a small dataset
    cannot fill the large budgets); a budget of 0 anywhere adds the base model's cell.

    Raises:
      SweepError: a budget that does not parse, or a seed that is not an integer.
    """
    budgets = _parse_budgets(config.token_budgets, "token_budgets")
    per_source = {
        name: _parse_budgets(spec.token_budgets, f"data_sources.{name}.token_budgets")
        if isinstance(spec, ml_collections.ConfigDict) and spec.get("token_budgets")
        else budgets
        for name, spec in config.data_sources.items()
    }
    try:
        seeds = [int(s) for s in _items(config.seeds)]
    except ValueError:
        raise SweepError(f"seeds: expected integers, got {config.seeds!r}") from None
    with_base = any(t == 0 for bs in [budgets, *per_source.values()] for _, t in bs)
    cells = []
    for model in config.base_models:
        if with_base:
            cells.append(Cell(model, None, "0", 0, seeds[0] if seeds else 0))
        for source, source_budgets in per_source.items():
            for budget, tokens in sorted((b for b in source_budgets if b[1] > 0), key=lambda b: b[1]):
                for seed in seeds:
                    cells.append(Cell(model, source, budget, tokens, seed))
    return cells


# -- paths and placeholders ---------------------------------------------------------------------------


def _substitute(value: Any, names: Mapping[str, str]) -> Any:
    """``{workdir}`` and ``{world}`` in every string of a (nested) config value."""
    if isinstance(value, str):
        for key, path in names.items():
            value = value.replace("{" + key + "}", path)
        return value
    if isinstance(value, ml_collections.ConfigDict):
        out = ml_collections.ConfigDict()
        for k, v in value.items():
            out[k] = _substitute(v, names)
        return out
    if isinstance(value, list | tuple):
        return type(value)(_substitute(v, names) for v in value)
    return value


def _resolved(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    names = {"workdir": str(workdir), "world": str(workdir / "world")}
    with config.unlocked():
        return _substitute(config, names)


# -- validation ---------------------------------------------------------------------------------------


# Fields whose keys are the user's names (checked by their own rules, not against the defaults).
_OPEN_FIELDS = ("config.base_models", "config.data_sources", "config.eval.tasks", "config.teacher", "config.world")


def _check_keys(given: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, where: str) -> None:
    """Every key of ``given`` exists in ``reference`` (recursively)."""
    if where in _OPEN_FIELDS:
        return
    for key, value in given.items():
        if key not in reference:
            raise SweepError(f"{where}.{key}: unknown field (known: {', '.join(sorted(reference.keys()))})")
        ref = reference[key]
        if isinstance(ref, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
            _check_keys(value, ref, f"{where}.{key}")


def _check_files(spec: str, where: str) -> None:
    from imitax.data import formats

    for part in _items(spec):
        if part.startswith("hf:"):
            continue
        try:
            formats.resolve_sources(part)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"{where}: {e}") from None


def validate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Cell]:
    """Checks the whole grid before anything runs; returns its cells.

    Paths may use ``{workdir}`` and ``{world}`` (the demo's generated data, built before this
    check). Checked: every base model (its path's kind, or its pretraining config and data),
    every data source (files exist, format and template known), budgets and seeds, every cell's
    trainer config through the trainer's own check (fields, row length against the base
    model's positions, batch against the mesh), each budget against the tokens its source
    holds (counted once per source and tokenizer, through the token cache the cells reuse),
    every evaluation task (registered name, accepted keywords, data files present), the
    teacher's metric names.

    Raises:
      SweepError: naming the first field that is wrong and what to do.
    """
    from imitax.data import formats, templates
    from imitax.eval import evaluator

    workdir = epath.Path(workdir)
    _check_keys(config, default_config(), "config")
    config = _resolved(config, workdir)
    if not config.base_models:
        raise SweepError("base_models: empty; name at least one, e.g. --config.base_models.NAME.init_from=PATH")
    trainer_defaults = train_config.default_config()
    architectures = {}  # base model -> its TransformerConfig (read without weights)
    for name, spec in config.base_models.items():
        where = f"base_models.{name}"
        if not isinstance(spec, ml_collections.ConfigDict):
            raise SweepError(f"{where}: expected a ConfigDict with init_from=PATH or pretrain=<trainer config>")
        unknown = set(spec.keys()) - set(BASE_MODEL_FIELDS)
        if unknown:
            raise SweepError(f"{where}: unknown fields {sorted(unknown)} (known: {', '.join(BASE_MODEL_FIELDS)})")
        if bool(spec.get("init_from")) == bool(spec.get("pretrain")):
            raise SweepError(f"{where}: set exactly one of init_from (a model path) and pretrain (a trainer config)")
        if spec.get("train"):
            _check_keys(spec.train, trainer_defaults, f"{where}.train")
        if spec.get("init_from"):
            try:
                architectures[name] = convert.model_config(spec.init_from, where=f"{where}.init_from")
            except (ValueError, FileNotFoundError) as e:
                raise SweepError(str(e)) from None
        else:
            pre = spec.pretrain
            _check_keys(pre, trainer_defaults, f"{where}.pretrain")
            _check_files(pre.data.train, f"{where}.pretrain.data.train")
            architectures[name] = _check_trainer(pre, f"{where}.pretrain")
    for name, spec in config.data_sources.items():
        where = f"data_sources.{name}"
        if not isinstance(spec, ml_collections.ConfigDict) or not spec.get("train"):
            raise SweepError(f"{where}: expected a ConfigDict with train=PATHS (and optionally format, template)")
        known = {"train", "format", "template", "skip_invalid", "token_budgets"}
        if set(spec.keys()) - known:
            raise SweepError(
                f"{where}: unknown fields {sorted(set(spec.keys()) - known)} (known: {', '.join(sorted(known))})"
            )
        _check_files(spec.train, f"{where}.train")
        fmt = spec.get("format", "auto")
        if fmt != "auto" and fmt not in formats.FORMATS:
            raise SweepError(f"{where}.format: unknown format {fmt!r} (known: auto, {', '.join(formats.FORMATS)})")
        template = spec.get("template", config.train.data.template)
        if template not in templates.TEMPLATES:
            raise SweepError(
                f"{where}.template: unknown template {template!r} (known: {', '.join(templates.TEMPLATES)})"
            )
    cells = expand(config)
    if not any(c.source for c in cells) and not config.data_sources and any(c.tokens for c in cells):
        raise SweepError("data_sources: empty, but token_budgets asks for finetuning")
    if not _items(config.seeds):
        raise SweepError("seeds: empty; give at least one, e.g. --config.seeds=0")
    if config.train.init_from:
        raise SweepError("train.init_from: set by the sweep for each cell (from base_models); leave it empty")
    checked = set()
    for cell in cells:
        if cell.source is None or (cell.model, cell.source) in checked:
            continue
        checked.add((cell.model, cell.source))
        train = _cell_train_config(config, workdir, cell)
        where = (
            f"train (with base_models.{cell.model}.train)" if config.base_models[cell.model].get("train") else "train"
        )
        _check_trainer(train, where, architectures[cell.model])
        batch_tokens = train.batch_size * train.seq_len
        small = [c for c in cells if (c.model, c.source) == (cell.model, cell.source) and c.tokens < batch_tokens]
        if small:
            raise SweepError(
                f"token_budgets: {small[0].budget} is less than one training batch ({where}.batch_size "
                f"{train.batch_size} x {where}.seq_len {train.seq_len} = {batch_tokens} tokens)"
            )
    _check_budgets_fit(config, workdir, cells)
    if not config.eval.tasks:
        raise SweepError("eval.tasks: empty; name at least one task, e.g. --config.eval.tasks.mmlu.data_dir=DIR")
    for alias, spec in config.eval.tasks.items():
        task, kwargs = _task_spec(alias, spec)
        try:  # builds the task and reads its data: a missing file fails now, not after training
            evaluator.build_tasks({task: kwargs}, load=True)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"eval.tasks.{alias}: {e}") from None
    for key in config.teacher:
        if key.split("/")[0] not in config.eval.tasks:
            raise SweepError(f"teacher: {key!r} names no evaluation task (tasks: {', '.join(config.eval.tasks)})")
    return cells


def _check_trainer(train: ml_collections.ConfigDict, where: str, model=None):
    """The trainer's own check of ``train`` (and the batch against the mesh); returns the architecture."""
    try:
        cfg = train_config.check(train, where=where, model=model)
    except train_config.ConfigError as e:
        raise SweepError(str(e)) from None
    except FileNotFoundError as e:
        raise SweepError(str(e)) from None
    _check_batch(train, where)
    return cfg


def _base_tokenizer(config, name: str) -> epath.Path:
    """The tokenizer directory a base model's cells use (the trainer's rule: see ``loop.tokenizer_dir``)."""
    from imitax.train import loop

    spec = config.base_models[name]
    if spec.get("pretrain"):
        train = spec.pretrain
    else:
        train = ml_collections.ConfigDict({"tokenizer": config.train.tokenizer, "init_from": spec.init_from})
    try:
        return loop.tokenizer_dir(train)
    except loop.TrainingError as e:
        raise SweepError(f"base_models.{name}: {e}") from None


def _check_budgets_fit(config, workdir: epath.Path, cells: Sequence[Cell]) -> None:
    """Each source holds at least its largest budget, counted with each base model's tokenizer.

    The count is the token cache's (every token of every example, as the budgets count them), so
    the cells that follow reopen the same cache instead of tokenizing again.
    """
    import transformers

    from imitax.data import build_token_cache

    largest: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        key = (cell.model, cell.source)
        if cell.source is not None and (key not in largest or cell.tokens > largest[key].tokens):
            largest[key] = cell
    counts: dict[tuple[str, str], int] = {}  # (tokenizer dir, source) -> tokens
    for (model, source), cell in largest.items():
        tok_dir = _base_tokenizer(config, model)
        if (str(tok_dir), source) not in counts:
            train = _cell_train_config(config, workdir, cell)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
            try:
                cache = build_token_cache(
                    [s for s in train.data.train.split(",") if s],
                    tokenizer,
                    format=train.data.format,
                    template=train.data.template,
                    skip_invalid=train.data.skip_invalid,
                    cache_dir=train.data.cache_dir,
                    progress=False,
                )
            except (ValueError, FileNotFoundError) as e:
                raise SweepError(f"data_sources.{source}: {e}") from None
            counts[(str(tok_dir), source)] = cache.num_tokens
        held = counts[(str(tok_dir), source)]
        if cell.tokens > held:
            field = (
                f"data_sources.{source}.token_budgets"
                if config.data_sources[source].get("token_budgets")
                else "token_budgets"
            )
            raise SweepError(
                f"{field}: {cell.budget} is more than data_sources.{source} holds ({held:,} tokens with "
                f"base model {model}'s tokenizer in {tok_dir}); lower the budget to at most {held:,} or add data"
            )


def _check_batch(train: ml_collections.ConfigDict, where: str) -> None:
    """The global batch splits evenly over the mesh's batch axes and the accumulation steps."""
    from imitax import sharding

    try:
        mesh = sharding.make_mesh(train.mesh)
    except ValueError as e:
        raise SweepError(f"{where}.mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if train.batch_size % (shards * train.grad_accum_steps):
        raise SweepError(
            f"{where}.batch_size: {train.batch_size} is not divisible by the mesh's data x fsdp = {shards} "
            f"devices times grad_accum_steps = {train.grad_accum_steps}; change one of them"
        )


def _task_spec(alias: str, spec: Any) -> tuple[str, dict[str, Any]]:
    kwargs = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec or {})
    return kwargs.pop("task", alias), kwargs


def _teacher_scores(config: ml_collections.ConfigDict) -> dict[str, float]:
    scores = {}
    if config.get("teacher_file") and epath.Path(config.teacher_file).exists():
        # Flat {'alias/metric': value} or nested {alias: {metric: value}}.
        for key, value in json.loads(epath.Path(config.teacher_file).read_text()).items():
            if isinstance(value, dict):
                scores.update({f"{key}/{k}": float(v) for k, v in value.items() if v is not None})
            else:
                scores[key] = float(value)
    scores.update({k: float(v) for k, v in config.teacher.items()})
    return scores


# -- the workdir's records ----------------------------------------------------------------------------


def _guarded(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in UNGUARDED_FIELDS}


def _check_workdir(config, workdir: epath.Path, allow_config_change: bool) -> None:
    """Refuses a workdir that belongs to a sweep with a different config (unless allowed)."""
    saved = records.read_json(workdir / "sweep_config.json")
    current = json.loads(config.to_json_best_effort())
    if saved is not None:
        old, new = _guarded(saved), _guarded(current)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and not allow_config_change:
            raise SweepError(
                f"{workdir} holds a sweep with a different config (differing fields: {', '.join(changed)}). "
                "Use another --workdir, or --allow_config_change to keep the finished cells whose settings "
                "are unchanged and run the others"
            )
    if jax.process_index() == 0:
        records.write_json(workdir / "sweep_config.json", current)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# -- running ------------------------------------------------------------------------------------------


def _cell_dir(workdir: epath.Path, cell: Cell) -> epath.Path:
    return workdir / "cells" / cell.id


def _base_path(config, workdir: epath.Path, model: str) -> epath.Path:
    spec = config.base_models[model]
    return epath.Path(spec.init_from) if spec.get("init_from") else workdir / "base" / model


def _cell_train_config(config, workdir: epath.Path, cell: Cell) -> ml_collections.ConfigDict:
    source = config.data_sources[cell.source]
    train = ml_collections.ConfigDict(config.train.to_dict())
    overrides = config.base_models[cell.model].get("train")
    if overrides:
        train.update(overrides.to_dict())
    train.init_from = str(_base_path(config, workdir, cell.model))
    train.data.train = source.train
    train.data.format = source.get("format", "auto")
    train.data.template = source.get("template", train.data.template)
    train.data.skip_invalid = source.get("skip_invalid", train.data.skip_invalid)
    train.data.token_budget = str(cell.tokens)
    if not train.data.cache_dir:  # one token cache for every cell (entries are keyed by their inputs)
        train.data.cache_dir = str(workdir / "token_cache")
    train.seed = cell.seed
    return train


def _cell_settings(config, workdir: epath.Path, cell: Cell) -> dict[str, Any]:
    """Everything a cell's result depends on (its fingerprint decides whether a finished cell is kept)."""
    settings = {
        "base_model": config.base_models[cell.model].to_dict(),
        "eval": config.eval.to_dict(),
    }
    if cell.source is not None:
        settings["train"] = json.loads(_cell_train_config(config, workdir, cell).to_json_best_effort())
    return settings


def _pretrain(config, workdir: epath.Path, model: str, log) -> None:
    """Trains a ``pretrain`` base model (resumes it when interrupted; skips it when done)."""
    from imitax.train import loop

    path = workdir / "base" / model
    done = path / "pretrained.json"
    spec = config.base_models[model].pretrain
    fingerprint = records.fingerprint(spec.to_dict())
    record = records.read_json(done)
    if record is not None and record.get("fingerprint") == fingerprint:
        return
    train = ml_collections.ConfigDict(spec.to_dict())
    train.progress = False
    train.overwrite = record is not None  # its settings changed (allowed): start it over
    log(f"pretraining base model {model} ({train.total_steps} steps)")
    start = time.perf_counter()
    result = loop.run(train, str(path))
    if result.get("preempted"):
        raise _Preempted()
    if jax.process_index() == 0:
        records.write_json(done, {"fingerprint": fingerprint, "seconds": time.perf_counter() - start, "result": result})
    _barrier(f"imitax_pretrained_{model}")
    log(f"pretrained {model} in {time.perf_counter() - start:.0f} s (loss {result.get('loss', float('nan')):.3f})")


class _Preempted(Exception):
    """The trainer saved and stopped on SIGTERM: the sweep stops too (a rerun resumes)."""


@functools.lru_cache
def _count_params(model_path: str) -> int:
    """Parameters of the model at ``model_path`` (read once per base model: finetuning keeps the shapes)."""
    return convert.model_config(model_path).num_params()


def _evaluate(config, cell: Cell, model_path: epath.Path, out: epath.Path) -> dict[str, Any]:
    """Evaluates the model at ``model_path`` on every task; returns metrics, stderrs and counts."""
    from imitax import sharding
    from imitax.eval import evaluator
    from imitax.eval.lm import LM

    mesh = sharding.make_mesh(config.eval.mesh)
    with jax.set_mesh(mesh):
        lm = LM.from_path(str(model_path), mesh=mesh, batch_size=config.eval.batch_size)
        metrics, stderr, counts = {}, {}, {}
        for alias, spec in config.eval.tasks.items():
            task, kwargs = _task_spec(alias, spec)
            task_out = out / alias if jax.process_index() == 0 else None
            results = evaluator.evaluate(
                lm,
                {task: kwargs},
                None if task_out is None else str(task_out),
                model_info={"path": str(model_path), "cell": cell.id},
                progress=False,
            )
            r = results["results"][task]
            metrics.update({f"{alias}/{k}": v for k, v in r["metrics"].items()})
            stderr.update({f"{alias}/{k}": v for k, v in r.get("stderr", {}).items()})
            counts[alias] = r["n"]
    return {"metrics": metrics, "stderr": stderr, "n": counts}


def _new_record(cell: Cell, fingerprint: str, **fields) -> dict[str, Any]:
    """A cell's ``cell.json``: what the cell is, then ``fields`` (status, timings, metrics or error)."""
    record = {"id": cell.id, "fingerprint": fingerprint, **dataclasses.asdict(cell)}
    return record | fields


def _run_cell(config, workdir: epath.Path, cell: Cell, fingerprint: str) -> dict[str, Any]:
    from imitax.train import loop

    cell_dir = _cell_dir(workdir, cell)
    record = _new_record(cell, fingerprint, status="running", started=records.now())
    previous = records.read_json(cell_dir / CELL_FILE) or {}
    changed = previous.get("fingerprint") not in (None, fingerprint)
    if jax.process_index() == 0:
        records.write_json(cell_dir / CELL_FILE, record)
    if cell.source is None:
        model_path = _base_path(config, workdir, cell.model)
        record["train"] = None
    else:
        train = _cell_train_config(config, workdir, cell)
        train.overwrite = changed  # allowed config change: the old run is moved aside by the trainer
        start = time.perf_counter()
        result = loop.run(train, str(cell_dir / "train"))
        if result.get("preempted"):
            raise _Preempted()
        record["train"] = {"seconds": time.perf_counter() - start, **result}
        model_path = cell_dir / "train"
    start = time.perf_counter()
    record.update(_evaluate(config, cell, model_path, cell_dir / "eval"))
    record["eval_seconds"] = time.perf_counter() - start
    record["params"] = _count_params(str(_base_path(config, workdir, cell.model)))
    record["status"] = "done"
    record["finished"] = records.now()
    return record


def _build_world(config, workdir: epath.Path, log) -> None:
    from imitax.demo import world

    out = workdir / "world"
    settings = config.world.to_dict()
    fingerprint = records.fingerprint(settings)
    record = records.read_json(out / "built.json")
    if record is not None and record.get("fingerprint") == fingerprint:
        return
    if jax.process_index() == 0:
        if out.exists():
            shutil.rmtree(str(out))
        try:
            world_config = world.WorldConfig(**settings)
        except (TypeError, ValueError) as e:
            raise SweepError(f"world: {e}") from None
        summary = world.build(world_config, str(out))
        records.write_json(out / "built.json", {"fingerprint": fingerprint, "summary": summary})
        log(f"generated the synthetic world in {out}")
    _barrier("imitax_world_built")


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_on_error: bool = False,
    allow_config_change: bool = False,
    log=None,
) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes the records and the report. Returns a summary.

    Raises:
      SweepError: a bad config or a workdir of another sweep (before anything runs), or, with
        ``stop_on_error``, the first failed cell.
    """
    log = log or (lambda msg: logging.info("%s", msg))
    workdir = epath.Path(workdir).resolve() if not str(workdir).startswith("gs://") else epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    _check_keys(config, default_config(), "config")
    _check_workdir(config, workdir, allow_config_change)
    if config.world:
        _build_world(config, workdir, log)
    cells = validate(config, workdir)
    config = _resolved(config, workdir)
    start = time.perf_counter()
    log(f"sweep {config.name!r}: {len(cells)} cells, {len(config.base_models)} base models, workdir {workdir}")

    for model, spec in config.base_models.items():
        if spec.get("pretrain"):
            _pretrain(config, workdir, model, log)

    done_seconds, failed, ran = [], [], 0
    for i, cell in enumerate(cells, start=1):
        cell_dir = _cell_dir(workdir, cell)
        fingerprint = records.fingerprint(_cell_settings(config, workdir, cell))
        record = records.read_json(cell_dir / CELL_FILE)
        if record and record.get("status") == "done" and record.get("fingerprint") == fingerprint:
            log(f"[{i}/{len(cells)}] {cell.id}: finished earlier, kept")
            continue
        resumed = " (resuming)" if (cell_dir / "train" / "checkpoints").exists() else ""
        log(f"[{i}/{len(cells)}] {cell.id}: {'evaluating' if cell.source is None else 'training'}{resumed}")
        t0 = time.perf_counter()
        try:
            record = _run_cell(config, workdir, cell, fingerprint)
        except _Preempted:
            log(f"[{i}/{len(cells)}] {cell.id}: preempted (SIGTERM); rerun the same command to resume")
            return {"preempted": True, "cells": len(cells)}
        except Exception as e:  # noqa: BLE001 - a failed cell is recorded and the sweep goes on
            record = _new_record(
                cell, fingerprint, status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
            )
            if jax.process_index() == 0:
                records.write_json(cell_dir / CELL_FILE, record)
            failed.append(cell.id)
            log(f"[{i}/{len(cells)}] {cell.id}: FAILED: {record['error']}")
            if stop_on_error:
                raise SweepError(f"cell {cell.id} failed: {record['error']} (details in {cell_dir / CELL_FILE})") from e
            continue
        if jax.process_index() == 0:
            records.write_json(cell_dir / CELL_FILE, record)
        _barrier(f"imitax_cell_{i}")
        ran += 1
        seconds = time.perf_counter() - t0
        done_seconds.append(seconds)
        left = sum(1 for c in cells[i:])
        eta = left * float(np.mean(done_seconds))
        shown = [m for m in _items(config.report.metrics) if m in record["metrics"]] or list(record["metrics"])
        headline = ", ".join(f"{k} {_format(record['metrics'][k])}" for k in shown[:4])
        log(
            f"[{i}/{len(cells)}] {cell.id}: done in {seconds:.0f} s ({headline}); "
            f"elapsed {_clock(time.perf_counter() - start)}, ~{_clock(eta)} left"
        )
    summary = {"cells": len(cells), "ran": ran, "failed": failed}
    if jax.process_index() == 0:
        paths = report(workdir, config)
        summary["report"] = paths
        log(f"results: {paths['markdown']}; plots in {paths['plots']}")
    _barrier("imitax_sweep_done")
    return summary


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# -- results ------------------------------------------------------------------------------------------


def load_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every cell's record under ``workdir/cells`` (any status), in path order."""

    def walk(path: epath.Path):
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            if child.name == CELL_FILE:
                yield child
            elif child.is_dir() and child.name not in ("train", "eval"):
                yield from walk(child)

    root = epath.Path(workdir) / "cells"
    if not root.exists():
        return []
    return [r for r in (records.read_json(p) for p in walk(root)) if r is not None]


def _metric_names(records: Sequence[dict[str, Any]], config) -> list[str]:
    wanted = _items(config.report.metrics) if config.get("report") else []
    if wanted:
        return wanted
    seen: dict[str, None] = {}
    for r in records:
        for k in r.get("metrics", {}):
            seen.setdefault(k, None)
    names = list(seen)
    style = config.report.style_task if config.get("report") else "style"
    headline = []
    for alias in dict.fromkeys(n.split("/")[0] for n in names):
        mine = [n for n in names if n.split("/")[0] == alias and n.count("/") == 1]
        if alias == style:
            preferred = [f"{alias}/{m}" for m in STYLE_METRICS if f"{alias}/{m}" in mine]
        else:
            preferred = [n for n in mine if n.endswith("/acc") or n.endswith("/exact_match") or n.endswith("/pass@1")]
        headline += preferred or mine
    return headline


STYLE_METRICS = ("list_recall", "summary_recall", "unigram_f1", "length_corr")


def table_rows(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per finished (model, source, budget), metrics averaged over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") != "done":
            continue
        groups.setdefault((r["model"], r["source"], r["tokens"]), []).append(r)
    rows = []
    for (model, source, tokens), rs in groups.items():
        row = {
            "model": model,
            "params": rs[0].get("params"),
            "source": source or "(base)",
            "budget": rs[0]["budget"],
            "tokens": tokens,
            "seeds": len(rs),
        }
        for m in metrics:
            values = [r["metrics"][m] for r in rs if r["metrics"].get(m) is not None]
            row[m] = float(np.mean(values)) if values else None
        rows.append(row)
    rows.sort(key=lambda r: (r["params"] or 0, r["model"], r["source"] != "(base)", r["source"], r["tokens"]))
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def report(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> dict[str, str]:
    """Writes ``results/``: results.csv, results.md, provenance.json and the plots (with their data).

    ``config`` defaults to the one saved in the workdir (``--report_only`` redraws from it).
    """
    import csv

    workdir = epath.Path(workdir)
    if config is None:
        saved = records.read_json(workdir / "sweep_config.json")
        if saved is None:
            raise SweepError(f"{workdir} holds no sweep (no sweep_config.json): run the sweep first")
        config = default_config()
        with config.unlocked():
            config.update(ml_collections.ConfigDict(saved))
        config = _resolved(config, workdir)
    cell_records = load_records(workdir)
    metrics = _metric_names(cell_records, config)
    rows = table_rows(cell_records, metrics)
    out = workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    columns = ["model", "params", "source", "budget", "tokens", "seeds", *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buffer.getvalue())
    failed = [r for r in cell_records if r.get("status") == "failed"]
    lines = [
        f"# Sweep {config.name!r}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_format(r[c]) for c in columns) + " |" for r in rows),
    ]
    teacher = _teacher_scores(config)
    if teacher:
        lines += ["", "Teacher: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(teacher.items()) if k in metrics)]
    if failed:
        lines += ["", "Failed cells:", *(f"- {r['id']}: {r.get('error')}" for r in failed)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    records.write_json(
        out / "provenance.json", {"config": json.loads(config.to_json_best_effort()), **records.provenance()}
    )
    from imitax import plots

    plot_dir = out / "plots"
    # matplotlib writes local files: draw into a temporary directory, then copy (also to gs://).
    with tempfile.TemporaryDirectory() as tmp:
        plots.draw_all(rows, metrics, teacher, tmp, style_task=config.report.style_task)
        plot_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            (plot_dir / name).write_bytes(pathlib.Path(tmp, name).read_bytes())
    return {"csv": str(out / "results.csv"), "markdown": str(out / "results.md"), "plots": str(plot_dir)}
