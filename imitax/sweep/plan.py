"""The plan: a grid becomes cells, each with its trainer config, its settings and where it lives."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
from etils import epath

from imitax.sweep.config import SweepError, budget_tokens, items


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid. ``source is None``: the base model itself (budget 0).

    ``method`` (``sft``, ``kd``, ``gkd``) and ``lora`` (the adapters' rank, 0 = full finetuning)
    enter the id only when they are not the defaults, so that the cells of a sweep without these
    axes keep their ids (and a finished sweep's workdir its cells).
    """

    model: str
    source: str | None
    budget: str
    tokens: int
    seed: int
    method: str = "sft"
    lora: int = 0

    @property
    def arm(self) -> str:
        """``''`` for plain finetuning, else e.g. ``kd``, ``lora4``, ``gkd-lora4``."""
        parts = ([self.method] if self.method != "sft" else []) + ([f"lora{self.lora}"] if self.lora else [])
        return "-".join(parts)

    @property
    def id(self) -> str:
        if self.source is None:
            return f"{self.model}/base"
        arm = f"{self.arm}/" if self.arm else ""
        return f"{self.model}/{self.source}/{self.budget}/{arm}seed{self.seed}"


def _parse_budgets(value: Any, where: str) -> list[tuple[str, int]]:
    budgets = []
    for b in items(value):
        try:
            budgets.append((b, budget_tokens(b)))
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
    return budgets


def methods(config: ml_collections.ConfigDict) -> list[str]:
    """The ``methods`` axis (the trainer checks each name; see :func:`imitax.train.config.check`)."""
    return items(config.methods)


def lora_ranks(config: ml_collections.ConfigDict) -> list[int]:
    """The ``lora_ranks`` axis: 0 (full finetuning) or an adapter rank.

    Raises:
      SweepError: a rank that is not a non-negative integer.
    """
    try:
        ranks = [int(r) for r in items(config.lora_ranks)]
    except ValueError:
        raise SweepError(f"lora_ranks: expected integers (0 = off), got {config.lora_ranks!r}") from None
    if any(r < 0 for r in ranks):
        raise SweepError(f"lora_ranks: expected ranks >= 0 (0 = off), got {config.lora_ranks!r}")
    return ranks


def expand(config: ml_collections.ConfigDict) -> list[Cell]:
    """The grid's cells in run order: per base model, its base cell, then sources x budgets x seeds x arms.

    The arms are methods x LoRA ranks (``Cell.arm``), innermost, so that a seed's arms run together.

    A source's own ``token_budgets`` replaces the sweep's for that source (a small dataset
    cannot fill the large budgets); a budget of 0 anywhere adds the base model's cell. A base
    model with ``teacher_only`` gets its base cell alone (it is evaluated, never finetuned).

    Raises:
      SweepError: a budget that does not parse, or a seed or LoRA rank that is not an integer.
    """
    budgets = _parse_budgets(config.token_budgets, "token_budgets")
    per_source = {
        name: _parse_budgets(spec.token_budgets, f"data_sources.{name}.token_budgets")
        if isinstance(spec, ml_collections.ConfigDict) and spec.get("token_budgets")
        else budgets
        for name, spec in config.data_sources.items()
    }
    try:
        seeds = [int(s) for s in items(config.seeds)]
    except ValueError:
        raise SweepError(f"seeds: expected integers, got {config.seeds!r}") from None
    arms = [(m, r) for m in methods(config) for r in lora_ranks(config)]
    with_base = any(t == 0 for bs in [budgets, *per_source.values()] for _, t in bs)
    cells = []
    for model in config.base_models:
        if with_base:
            cells.append(Cell(model, None, "0", 0, seeds[0] if seeds else 0))
        if config.base_models[model].get("teacher_only"):
            continue
        for source, source_budgets in per_source.items():
            for budget, tokens in sorted((b for b in source_budgets if b[1] > 0), key=lambda b: b[1]):
                for seed in seeds:
                    cells += [Cell(model, source, budget, tokens, seed, m, r) for m, r in arms]
    return cells


def cell_path(workdir: epath.Path, cell: Cell) -> epath.Path:
    return workdir / "cells" / cell.id


def base_path(config, workdir: epath.Path, model: str) -> epath.Path:
    """The base model's weights: its ``init_from``, its pretraining workdir, or that model finetuned (``finetune``)."""
    spec = config.base_models[model]
    if spec.get("finetune"):
        return finetune_path(workdir, model)
    return epath.Path(spec.init_from) if spec.get("init_from") else workdir / "base" / model


def finetune_path(workdir: epath.Path, model: str) -> epath.Path:
    """Where a base model's own ``finetune`` step trains (after its pretraining, if any)."""
    return workdir / "base" / f"{model}-finetuned"


def base_finetune_config(config, workdir: epath.Path, model: str) -> ml_collections.ConfigDict:
    """The trainer config of a base model's ``finetune`` step: the sweep's ``train`` with its fields."""
    spec = config.base_models[model]
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.update(spec.finetune.to_dict())
    train.init_from = spec.init_from if spec.get("init_from") else str(workdir / "base" / model)
    if not train.data.cache_dir:
        train.data.cache_dir = str(workdir / "token_cache")
    return train


def teacher_path(config, workdir: epath.Path) -> str:
    """``teacher_model`` as a model path: a ``base_models`` name through :func:`base_path`, else itself."""
    name = config.teacher_model
    return str(base_path(config, workdir, name)) if name in config.base_models else name


def cell_train_config(config, workdir: epath.Path, cell: Cell) -> ml_collections.ConfigDict:
    source = config.data_sources[cell.source]
    train = ml_collections.ConfigDict(config.train.to_dict())
    overrides = config.base_models[cell.model].get("train")
    if overrides:
        train.update(overrides.to_dict())
    train.init_from = str(base_path(config, workdir, cell.model))
    train.data.train = source.train
    train.data.format = source.get("format", "auto")
    train.data.template = source.get("template", train.data.template)
    train.data.skip_invalid = source.get("skip_invalid", train.data.skip_invalid)
    train.data.token_budget = str(cell.tokens)
    if not train.data.cache_dir:  # one token cache for every cell (entries are keyed by their inputs)
        train.data.cache_dir = str(workdir / "token_cache")
    train.seed = cell.seed
    train.method = cell.method
    train.lora.rank = cell.lora
    if cell.method != "sft":
        train.teacher = teacher_path(config, workdir)
    return train


def cell_settings(config, workdir: epath.Path, cell: Cell) -> dict[str, Any]:
    """Everything a cell's result depends on (its fingerprint decides whether a finished cell is kept)."""
    settings = {
        "base_model": config.base_models[cell.model].to_dict(),
        "eval": config.eval.to_dict(),
    }
    if cell.source is not None:
        settings["train"] = json.loads(cell_train_config(config, workdir, cell).to_json_best_effort())
    return settings


# -- the plan as a graph --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One node of the plan: a base model's own training (``cell is None``) or one cell.

    A base model's step pretrains it (``pretrain``) and then finetunes it (``finetune``), either
    or both. ``needs`` are the ids of the steps that must finish first (a cell needs its base
    model's step, and a ``kd``/``gkd`` cell also the teacher's); ``index`` is a cell's 1-based
    place in the grid's order (0 for a base model's step).
    """

    id: str
    model: str
    cell: Cell | None
    needs: tuple[str, ...]
    index: int = 0


def pretrain_id(model: str) -> str:
    return f"{model}/pretrain"


def base_step_id(config, model: str) -> str | None:
    """The id of the step that trains a base model (None: nothing to train, it is a path)."""
    spec = config.base_models[model]
    if spec.get("pretrain"):
        return pretrain_id(model)
    return f"{model}/finetune" if spec.get("finetune") else None


def graph(config, cells: list[Cell]) -> list[Step]:
    """The steps that run ``cells``, in an order that respects their dependencies.

    The base models' own steps (one per base model that a cell uses, or that teaches a
    ``kd``/``gkd`` cell, and that has ``pretrain`` or ``finetune``) come first, in the order of
    ``base_models``; then the cells, in grid order, each needing its model's step and, for
    ``kd``/``gkd``, the teacher's.
    """
    index = {c.id: i for i, c in enumerate(expand(config), start=1)}
    used = {c.model for c in cells}
    teacher = config.get("teacher_model", "")
    teacher_step = base_step_id(config, teacher) if teacher in config.base_models else None
    if teacher_step and any(c.method != "sft" for c in cells):
        used.add(teacher)
    trained = {m: base_step_id(config, m) for m in config.base_models if m in used and base_step_id(config, m)}
    steps = [Step(step_id, m, None, ()) for m, step_id in trained.items()]
    for cell in cells:
        needs = (trained[cell.model],) if cell.model in trained else ()
        if cell.method != "sft" and teacher_step and teacher_step not in needs:
            needs += (teacher_step,)
        steps.append(Step(cell.id, cell.model, cell, needs, index.get(cell.id, 0)))
    return steps


def parse_shard(spec: str) -> tuple[int, int]:
    """``'I/N'`` -> ``(I, N)``, the I-th (from 0) of N shards.

    Raises:
      SweepError: not two integers with 0 <= I < N.
    """
    try:
        i, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise SweepError(f"--cells={spec}: expected I/N (run the I-th of N shards, e.g. --cells=0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise SweepError(f"--cells={spec}: shard {i} out of range for {n} shards; use 0 <= I < N, e.g. --cells=0/{n}")
    return i, n


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The ``index``-th of ``count`` shards: every ``count``-th cell of the grid's order from ``index``.

    Dealt round-robin so that each shard gets a share of every (model, source)'s budgets, small
    and large; the shards of one grid are disjoint and together hold every cell.
    """
    return cells[index::count]


def estimate(config, workdir: epath.Path, step: Step) -> dict[str, Any]:
    """A step's size before it runs: training steps, row length, tokens, parameters, training FLOPs.

    FLOPs are 6 · parameters · tokens (forward and backward of a dense transformer, attention
    left out), plus 2 · teacher parameters · tokens for a ``kd``/``gkd`` cell (the teacher's
    forward pass; GKD's sampling is left out); an evaluation-only step (a base model's own cell)
    counts none. A base model's step counts its pretraining's total_steps rows, and its
    ``finetune``'s budget (the data's size when it has none: unknown here, so left out).
    Parameters come from the model's config: the pretraining config's architecture, or
    ``init_from``'s ``config.json`` (None when that is not there yet).
    """
    params = _params(config, step.model)
    if step.cell is None:  # pretraining: total_steps rows of batch_size x seq_len
        spec = config.base_models[step.model]
        steps, tokens, seq_len = 0, 0, None
        if spec.get("pretrain"):
            train = spec.pretrain
            steps, seq_len = train.total_steps, train.seq_len
            tokens = steps * train.batch_size * seq_len
        if spec.get("finetune"):
            train = base_finetune_config(config, workdir, step.model)
            budget = budget_tokens(train.data.token_budget) if train.data.token_budget else 0
            tokens += budget
            steps += _epoch_steps(train, budget)
            seq_len = train.seq_len
    elif step.cell.source is None:
        tokens, steps, seq_len = 0, 0, None
    else:
        train = cell_train_config(config, workdir, step.cell)
        tokens, seq_len = step.cell.tokens, train.seq_len
        steps = _epoch_steps(train, tokens)
    flops = None if params is None else 6 * params * tokens
    if step.cell is not None and step.cell.method != "sft" and flops is not None:
        name = config.teacher_model
        teacher = _params(config, name) if name in config.base_models else _path_params(name)
        flops = None if teacher is None else flops + 2 * teacher * tokens
    return {"steps": steps, "seq_len": seq_len, "tokens": tokens, "params": params, "flops": flops}


def _epoch_steps(train, tokens: int) -> int:
    """One epoch of ``tokens`` as packed rows (the trainer's count is within a row of this)."""
    return train.total_steps if train.total_steps > 0 else -(-tokens // (train.batch_size * train.seq_len))


def _params(config, model: str) -> int | None:
    """A base model's parameters: its pretraining config's architecture, or ``init_from``'s config."""
    from imitax.train import config as train_config

    spec = config.base_models[model]
    if spec.get("pretrain"):
        return train_config.model_config(spec.pretrain).num_params()
    return _path_params(spec.init_from)


def _path_params(path: str) -> int | None:
    """The parameters of the model at ``path`` (None when it is not there yet)."""
    from imitax import convert

    try:
        return convert.model_config(path).num_params()
    except (ValueError, FileNotFoundError):
        return None


def measured_throughput(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Training FLOP/s (6 · parameters · tokens over training seconds) and mean evaluation seconds of finished cells."""
    done = [r for r in records if r.get("status") == "done"]
    trained = [r for r in done if r.get("train") and r.get("params") and r["train"].get("seconds")]
    flops = sum(6 * r["params"] * r["tokens"] for r in trained)
    seconds = sum(r["train"]["seconds"] for r in trained)
    evals = [r["eval_seconds"] for r in done if r.get("eval_seconds")]
    return (flops / seconds if seconds else None), (sum(evals) / len(evals) if evals else None)


def plan_table(config, workdir: epath.Path, steps: list[Step], flops_per_second: float | None, eval_s: float | None):
    """The plan as a Markdown table: each step's needs, size, FLOPs and estimated time; the totals."""

    def human(n: float | None, unit: str = "") -> str:
        if n is None:
            return "?"
        for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if abs(n) >= scale:
                return f"{n / scale:.3g}{suffix}{unit}"
        return f"{n:.3g}{unit}"

    lines = [
        "| step | needs | train steps | seq len | tokens | params | FLOPs (6·N·D) | est. time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    total_flops, total_s = 0.0, 0.0
    for step in steps:
        e = estimate(config, workdir, step)
        seconds = e["flops"] / flops_per_second if flops_per_second and e["flops"] else None
        if step.cell is not None and eval_s is not None:
            seconds = (seconds or 0.0) + eval_s
        total_flops += e["flops"] or 0
        total_s += seconds or 0.0
        lines.append(
            f"| {step.id} | {', '.join(step.needs) or '-'} | {e['steps']} | {e['seq_len'] or '-'} | "
            f"{human(e['tokens'])} | {human(e['params'])} | {human(e['flops'])} | "
            f"{'?' if seconds is None else f'{seconds:.0f} s'} |"
        )
    lines.append("")
    if not flops_per_second:
        lines.append(
            f"{len(steps)} steps, {human(total_flops)} training FLOPs. Times need a throughput: "
            "--throughput=FLOP/s per cell, or finished cells in this workdir (measured from them)."
        )
    else:
        evaluation = f" plus {eval_s:.0f} s of evaluation per cell" if eval_s is not None else ""
        lines.append(
            f"{len(steps)} steps, {human(total_flops)} training FLOPs; at {human(flops_per_second, 'FLOP/s')} "
            f"per cell{evaluation}: ~{total_s / 60:.1f} min one cell at a time (divide by the cells run at once)."
        )
    return "\n".join(lines)
