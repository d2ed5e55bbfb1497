r"""The report: the results table (CSV, Markdown) with 95% intervals, provenance and the plots.

Every metric of a (model, source, budget, method, LoRA rank) row is reported as a mean with a 95% interval:

- Several seeds (``n >= 2`` finished cells holding the metric): the mean of the seeds' values
  and a t-interval on them, mean ± t_{0.975, n-1} · sd / sqrt(n), with sd the sample standard
  deviation (ddof=1). It measures how much the result moves with the finetuning seed (the
  trainer's ``seed``: which examples fill the budget and their order; the base model is fixed),
  not the evaluation's sampling error: every seed answers the same questions.
- One seed: the value ± 1.96 · the evaluator's standard error of that metric (the cell
  record's ``stderr``), a normal interval for the evaluation's sampling error alone.
- One seed and no (finite) standard error (e.g. ``style/length_corr``): no interval.

The base model's row is evaluated once per model (it has no finetuning seed), so its interval
is always the standard-error one.

A finetuned row is marked against its base model's row when they differ beyond the intervals:
with d = (finetuned row's mean) − (base row's mean) and h = sqrt(a² + b²), where a and b are the
two rows' 95% half-widths, the difference's 95% interval is d ± h; the mark is ``+`` (``↑`` in
Markdown) when d − h > 0 and ``−`` (``-`` in the CSV, ``↓`` in Markdown) when d + h < 0; no mark
when the interval contains 0, when either row has no interval, or when there is no base row.
Combining half-widths in quadrature treats the two rows as independent and mixes a t and a
normal interval: a rough screen, not a test, and not corrected for the many comparisons.

``results.csv`` has, for each metric ``M``, the columns ``M`` (the mean), ``M_lo`` and ``M_hi``
(the 95% interval's ends; empty where there is none) and ``M_vs_base`` (``+``, ``-`` or empty).
``results.md`` writes ``mean ± half-width`` and the mark, and repeats these definitions below the
table.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from imitax import records
from imitax.sweep.config import CELL_FILE, STYLE_METRICS, SweepError, default_config, items, resolved


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
    wanted = items(config.report.metrics) if config.get("report") else []
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


# -- intervals ----------------------------------------------------------------------------------------

Z_95 = 1.96  # the normal 97.5% quantile: the one-seed interval is ± 1.96 standard errors
MARK_UP, MARK_DOWN = "+", "-"  # the CSV's marks (ASCII); the Markdown writes ↑ and ↓


@functools.lru_cache
def t_quantile(df: int) -> float:
    """t_{0.975, df}: the 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    # scipy is always installed with imitax: jax and jaxlib depend on it. Imported here, not at
    # the top, because every sweep imports this module and most never write a report.
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(cells: Sequence[Mapping[str, Any]], metric: str) -> tuple[float | None, float | None]:
    """The mean of ``metric`` over ``cells`` (the seeds of one row) and its 95% half-width.

    Several cells hold the metric (n >= 2): the half-width is t_{0.975, n-1} · sd / sqrt(n), sd
    the sample standard deviation of their values (ddof=1). One cell: 1.96 · its ``stderr`` of
    the metric. One cell without a finite standard error: no interval.

    Args:
      cells: cell records (``metrics`` and ``stderr``: 'alias/metric' -> value).
      metric: an 'alias/metric' name.

    Returns:
      ``(mean, half_width)``; ``(None, None)`` when no cell holds the metric, ``(mean, None)``
      when there is no interval.
    """
    values = [float(c["metrics"][metric]) for c in cells if c.get("metrics", {}).get(metric) is not None]
    if not values:
        return None, None
    mean = float(np.mean(values))
    n = len(values)
    if n >= 2:
        return mean, t_quantile(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)
    (cell,) = [c for c in cells if c.get("metrics", {}).get(metric) is not None]
    stderr = (cell.get("stderr") or {}).get(metric)
    # A non-finite standard error (the evaluator's nan for an undefined one) gives no interval.
    if stderr is None or not math.isfinite(float(stderr)):
        return mean, None
    return mean, Z_95 * float(stderr)


def difference_mark(
    mean: float | None, half_width: float | None, base_mean: float | None, base_half_width: float | None
) -> str:
    """``+``/``-`` when a row's mean differs from its base row's beyond the 95% intervals, else ``''``.

    With d = mean − base_mean and h = sqrt(half_width² + base_half_width²), the difference's 95%
    interval is d ± h: ``+`` when d − h > 0, ``-`` when d + h < 0. No mark when either row has no
    mean or no interval (or a nan): nothing to compare.
    """
    parts = (mean, half_width, base_mean, base_half_width)
    if any(p is None or not math.isfinite(p) for p in parts):
        return ""
    d = mean - base_mean
    h = math.hypot(half_width, base_half_width)
    if d - h > 0:
        return MARK_UP
    if d + h < 0:
        return MARK_DOWN
    return ""


# -- the table ----------------------------------------------------------------------------------------


def interval_columns(metric: str) -> tuple[str, str, str]:
    """The CSV columns next to ``metric``'s mean: the interval's ends and the mark against the base."""
    return f"{metric}_lo", f"{metric}_hi", f"{metric}_vs_base"


def table_rows(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per finished (model, source, budget, method, LoRA rank): each metric's mean over seeds, interval, mark.

    For each metric ``M`` a row holds ``M`` (the mean over the row's seeds), ``M_lo`` and ``M_hi``
    (its 95% interval, see :func:`interval`; None where there is none) and ``M_vs_base`` (see
    :func:`difference_mark`: the row against its model's base row, whatever the row's method
    and rank; ``''`` on base rows). Records from before the method and LoRA axes read as ``sft``, 0.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") != "done":
            continue
        key = (r["model"], r["source"], r["tokens"], r.get("method", "sft"), r.get("lora", 0))
        groups.setdefault(key, []).append(r)
    rows, half_widths = [], {}  # id(row) -> metric -> 95% half-width (None: no interval)
    for (model, source, tokens, method, lora), rs in groups.items():
        row = {
            "model": model,
            "params": rs[0].get("params"),
            "source": source or "(base)",
            "budget": rs[0]["budget"],
            "tokens": tokens,
            "method": method,
            "lora": lora,
            "seeds": len(rs),
        }
        for m in metrics:
            mean, half = interval(rs, m)
            lo, hi, _ = interval_columns(m)
            row[m] = mean
            row[lo], row[hi] = (None, None) if half is None else (mean - half, mean + half)
            half_widths.setdefault(id(row), {})[m] = half
        rows.append(row)
    base = {r["model"]: r for r in rows if r["source"] == "(base)"}
    for row in rows:
        ref = base.get(row["model"]) if row["source"] != "(base)" else None
        for m in metrics:
            mark = ""
            if ref is not None:
                mark = difference_mark(
                    row[m],
                    half_widths[id(row)][m],
                    ref[m],
                    half_widths[id(ref)][m],
                )
            row[interval_columns(m)[2]] = mark
    rows.sort(
        key=lambda r: (
            r["params"] or 0,
            r["model"],
            r["source"] != "(base)",
            r["source"],
            r["tokens"],
            METHOD_ORDER.get(r["method"], len(METHOD_ORDER)),
            r["method"],
            r["lora"],
        )
    )
    return rows


METHOD_ORDER = {"sft": 0, "kd": 1, "gkd": 2}  # the table lists a budget's methods in this order


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_interval(row: Mapping[str, Any], metric: str) -> str:
    """A Markdown cell: ``0.425 ± 0.031 ↑`` (mean ± 95% half-width, then the mark against the base)."""
    mean = row.get(metric)
    if mean is None:
        return ""
    lo, hi, vs = interval_columns(metric)
    text = "nan" if math.isnan(mean) else f"{mean:.3f}"
    if row.get(lo) is not None and row.get(hi) is not None:
        text += f" ± {(row[hi] - row[lo]) / 2:.3f}"
    mark = {MARK_UP: "↑", MARK_DOWN: "↓"}.get(row.get(vs, ""), "")
    return f"{text} {mark}" if mark else text


MARKDOWN_FOOTER = (
    "Each metric: mean ± half-width of its 95% interval. A row with several seeds (n): the mean over "
    "seeds ± t_{0.975, n-1} · sd / sqrt(n) (sd over the seeds, ddof=1). One seed: the value ± 1.96 · the "
    "evaluator's standard error. No ±: one seed and no standard error. "
    "↑/↓: the finetuned row differs from its base model's row beyond the intervals: with d = (row's "
    "mean) − (base row's mean) and h = sqrt(a² + b²), a and b the two rows' 95% half-widths, the "
    "difference's 95% interval d ± h excludes 0 (↑: d − h > 0, ↓: d + h < 0). Half-widths combined in "
    "quadrature assume independent rows; the marks are a screen, not corrected for multiple comparisons."
)


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
        config = resolved(config, workdir)
    cell_records = load_records(workdir)
    metrics = _metric_names(cell_records, config)
    rows = table_rows(cell_records, metrics)
    out = workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    # The method and LoRA columns appear when the sweep uses those axes, so a plain sweep's table
    # (every row sft, rank 0) keeps its columns.
    axes = [k for k, default in (("method", "sft"), ("lora", 0)) if any(r[k] != default for r in rows)]
    keys = ["model", "params", "source", "budget", "tokens", *axes, "seeds"]
    columns = keys + [c for m in metrics for c in (m, *interval_columns(m))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buffer.getvalue())
    failed = [r for r in cell_records if r.get("status") == "failed"]
    lines = [
        f"# Sweep {config.name!r}",
        "",
        "| " + " | ".join([*keys, *metrics]) + " |",
        "|" + "---|" * (len(keys) + len(metrics)),
        *(
            "| " + " | ".join([*(format_value(r[c]) for c in keys), *(format_interval(r, m) for m in metrics)]) + " |"
            for r in rows
        ),
        "",
        MARKDOWN_FOOTER,
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
    from imitax.sweep import plots

    plot_dir = out / "plots"
    # matplotlib writes local files: draw into a temporary directory, then copy (also to gs://).
    with tempfile.TemporaryDirectory() as tmp:
        plots.draw_all(rows, metrics, teacher, tmp, style_task=config.report.style_task)
        plot_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            (plot_dir / name).write_bytes(pathlib.Path(tmp, name).read_bytes())
    return {"csv": str(out / "results.csv"), "markdown": str(out / "results.md"), "plots": str(plot_dir)}
