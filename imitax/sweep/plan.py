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
