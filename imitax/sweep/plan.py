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
    for b in items(value):
        try:
            budgets.append((b, budget_tokens(b)))
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
        seeds = [int(s) for s in items(config.seeds)]
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


def cell_path(workdir: epath.Path, cell: Cell) -> epath.Path:
    return workdir / "cells" / cell.id


def base_path(config, workdir: epath.Path, model: str) -> epath.Path:
    spec = config.base_models[model]
    return epath.Path(spec.init_from) if spec.get("init_from") else workdir / "base" / model


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
    """One node of the plan: a base model's pretraining (``cell is None``) or one cell.

    ``needs`` are the ids of the steps that must finish first (a cell needs its base model's
    pretraining); ``index`` is a cell's 1-based place in the grid's order (0 for pretraining).
    """

    id: str
    model: str
    cell: Cell | None
    needs: tuple[str, ...]
    index: int = 0


def pretrain_id(model: str) -> str:
    return f"{model}/pretrain"


def graph(config, cells: list[Cell]) -> list[Step]:
    """The steps that run ``cells``, in an order that respects their dependencies.

    Pretraining steps (one per ``pretrain`` base model that a cell uses) come first, in the
    order of ``base_models``; then the cells, in grid order, each needing its model's
    pretraining when the model has one.
    """
    index = {c.id: i for i, c in enumerate(expand(config), start=1)}
    used = {c.model for c in cells}
    pretrained = [m for m in config.base_models if m in used and config.base_models[m].get("pretrain")]
    steps = [Step(pretrain_id(m), m, None, ()) for m in pretrained]
    for cell in cells:
        needs = (pretrain_id(cell.model),) if cell.model in pretrained else ()
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
    left out); an evaluation-only step (a base model's own cell) counts none. Parameters come
    from the model's config: the pretraining config's architecture, or ``init_from``'s
    ``config.json`` (None when that is not there yet).
    """
    from imitax import convert
    from imitax.train import config as train_config

    spec = config.base_models[step.model]
    if spec.get("pretrain"):
        train = spec.pretrain
        params = train_config.model_config(train).num_params()
    else:
        try:
            params = convert.model_config(spec.init_from).num_params()
        except (ValueError, FileNotFoundError):
            params = None
    if step.cell is None:  # pretraining: total_steps rows of batch_size x seq_len
        tokens = train.total_steps * train.batch_size * train.seq_len
        steps, seq_len = train.total_steps, train.seq_len
    elif step.cell.source is None:
        tokens, steps, seq_len = 0, 0, None
    else:
        train = cell_train_config(config, workdir, step.cell)
        tokens, seq_len = step.cell.tokens, train.seq_len
        # One epoch of the budget, as packed rows (the trainer's count is within a row of this).
        steps = train.total_steps if train.total_steps > 0 else -(-tokens // (train.batch_size * train.seq_len))
    flops = None if params is None else 6 * params * tokens
    return {"steps": steps, "seq_len": seq_len, "tokens": tokens, "params": params, "flops": flops}


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
