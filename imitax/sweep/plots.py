"""The sweep's figures, mirroring the study's: score against imitation tokens and against model size.

Every point is drawn with an error bar: its 95% interval from :mod:`imitax.sweep.report` (a
t-interval over seeds, or ± 1.96 standard errors for one seed; no bar where there is none).
Every PNG is written with the data behind it beside it (same name, ``.csv``: one row per point,
``figure, panel, series, x, y, y_lo, y_hi``; ``y_lo``/``y_hi`` empty where a point has no
interval, as for the teacher's line), so a figure can be checked or redrawn elsewhere. Rows come
from :func:`imitax.sweep.table_rows` (one per model x source x budget, averaged over seeds, with
``METRIC_lo``/``METRIC_hi``; the base model is the source ``(base)`` at zero tokens). A source
trained by another method or with LoRA is its own series (``broad (kd)``, ``broad (sft, lora 4)``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed (or present on servers)
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["draw_all", "score_vs_size", "score_vs_tokens", "style_vs_tokens", "summary"]

BASE = "(base)"


def _models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Model names, smallest first."""
    params = {}
    for r in rows:
        params.setdefault(r["model"], r.get("params") or 0)
    return sorted(params, key=lambda m: (params[m], m))


def _line(row: Mapping[str, Any]) -> str:
    """The series a row belongs to: its source, with its method and LoRA rank when not plain ``sft``.

    ``broad``, ``broad (kd)``, ``broad (sft, lora 4)``; the base model's row is :data:`BASE`, the
    start of every series of its model.
    """
    method, lora = row.get("method") or "sft", int(row.get("lora") or 0)
    if row["source"] == BASE or (method == "sft" and not lora):
        return row["source"]
    return f"{row['source']} ({method}{f', lora {lora}' if lora else ''})"


def _sources(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every series but the base: one per source, method and LoRA rank."""
    return sorted({_line(r) for r in rows if r["source"] != BASE})


def _interval(row: Mapping[str, Any], metric: str) -> tuple[float | None, float | None]:
    """``metric``'s 95% interval in a table row (None, None where it has none)."""
    return row.get(f"{metric}_lo"), row.get(f"{metric}_hi")


def _series(rows, model: str, source: str, metric: str) -> list[tuple]:
    """(tokens, value, lo, hi) of one model on one source, starting at the base model's zero tokens."""
    points = [
        (r["tokens"], r[metric], *_interval(r, metric))
        for r in rows
        if r["model"] == model and _line(r) in (source, BASE) and r.get(metric) is not None
    ]
    points.sort(key=lambda p: p[0])
    return points


def _draw(ax, points: Sequence[tuple], **style) -> None:
    """A line through (x, y, lo, hi) points with vertical 95% error bars (none where lo/hi is None)."""
    x = [p[0] for p in points]
    y = [p[1] for p in points]
    # errorbar wants distances below and above the point; nan draws no bar for that point.
    below = [math.nan if p[2] is None else p[1] - p[2] for p in points]
    above = [math.nan if p[3] is None else p[3] - p[1] for p in points]
    ax.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, elinewidth=1, **style)


def _label(model: str, rows) -> str:
    params = next((r.get("params") for r in rows if r["model"] == model), None)
    return f"{model} ({_human(params)})" if params else model


def _human(n: float | None) -> str:
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _token_axis(ax, rows) -> None:
    positive = sorted({r["tokens"] for r in rows if r["tokens"] > 0})
    if positive:
        # symlog: the base model (0 tokens) sits at the left end of an otherwise log axis.
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
        ax.set_xlim(left=0)
        ticks = [0, *positive]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["base", *(_human(t) for t in positive)], rotation=30)
    ax.set_xlabel("imitation tokens")


def _teacher(ax, teacher: Mapping[str, float], metric: str) -> list[tuple]:
    """The teacher's dashed line; its data row (name, x, y, lo, hi), without x or an interval."""
    if metric in teacher:
        ax.axhline(teacher[metric], color="black", linestyle="--", linewidth=1, label="teacher")
        return [("teacher", None, teacher[metric], None, None)]
    return []


def _save(fig, path: str, points: list[tuple]) -> None:
    """``path``.png and ``path``.csv (figure, panel, series, x, y, y_lo, y_hi)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)
    plt.close(fig)
    with open(path + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["figure", "panel", "series", "x", "y", "y_lo", "y_hi"])
        writer.writerows((os.path.basename(path), *p) for p in points)


def _panel_vs_tokens(ax, rows, metric, teacher, source, points, panel) -> None:
    for model in _models(rows):
        series = _series(rows, model, source, metric)
        if series:
            _draw(ax, series, label=_label(model, rows))
            points += [(panel, model, *p) for p in series]
    points += [(panel, *t) for t in _teacher(ax, teacher, metric)]
    _token_axis(ax, rows)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def score_vs_tokens(rows, metric: str, teacher: Mapping[str, float], path: str) -> None:
    """One panel per imitation source: ``metric`` against tokens, one line per base model."""
    sources = _sources(rows) or [BASE]
    fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.6), squeeze=False)
    points: list[tuple] = []
    for ax, source in zip(axes[0], sources, strict=True):
        _panel_vs_tokens(ax, rows, metric, teacher, source, points, source)
        ax.set_title(f"imitation data: {source}")
    axes[0][0].legend(fontsize=8)
    _save(fig, path, points)


def score_vs_size(rows, metric: str, teacher: Mapping[str, float], path: str) -> None:
    """``metric`` against base-model parameters: the base models, and each source at its largest budget."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    points: list[tuple] = []
    for source in [BASE, *_sources(rows)]:
        series = []
        for model in _models(rows):
            mine = [r for r in rows if r["model"] == model and _line(r) == source and r.get(metric) is not None]
            if mine and mine[0].get("params"):
                best = max(mine, key=lambda r: r["tokens"])
                series.append((best["params"], best[metric], *_interval(best, metric)))
        if series:
            label = "base model" if source == BASE else f"{source} (largest budget)"
            _draw(ax, series, label=label)
            points += [("size", label, *p) for p in series]
    points += [("size", *t) for t in _teacher(ax, teacher, metric)]
    ax.set_xscale("log")
    ax.set_xlabel("base-model parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, points)


def style_vs_tokens(rows, metrics: Sequence[str], teacher: Mapping[str, float], path: str) -> None:
    """A grid: one row per source, one column per style metric, one line per base model."""
    sources = _sources(rows) or [BASE]
    fig, axes = plt.subplots(
        len(sources), len(metrics), figsize=(3.8 * len(metrics), 3.2 * len(sources)), squeeze=False
    )
    points: list[tuple] = []
    for i, source in enumerate(sources):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            _panel_vs_tokens(ax, rows, metric, teacher, source, points, f"{source}:{metric}")
            ax.set_title(f"{source}: {metric.split('/', 1)[-1]}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    _save(fig, path, points)


def summary(rows, capability: str, style: str | None, teacher: Mapping[str, float], path: str) -> None:
    """The headline figure: capability and style against tokens, every source (line style) and model."""
    panels = [capability] + ([style] if style else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    points: list[tuple] = []
    styles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes[0], panels, strict=True):
        for k, source in enumerate(_sources(rows) or [BASE]):
            for c, model in enumerate(_models(rows)):
                series = _series(rows, model, source, metric)
                if series:
                    _draw(ax, series, color=f"C{c}", linestyle=styles[k % 4], label=f"{model} / {source}")
                    points += [(metric, f"{model} / {source}", *p) for p in series]
        points += [(metric, *t) for t in _teacher(ax, teacher, metric)]
        _token_axis(ax, rows)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(fig, path, points)


def _slug(metric: str) -> str:
    return metric.replace("/", "_").replace("@", "at")


def draw_all(
    rows, metrics: Sequence[str], teacher: Mapping[str, float], out_dir: str, *, style_task: str = "style"
) -> list[str]:
    """Every figure for the sweep's rows; returns the PNG paths."""
    if not rows:
        return []
    os.makedirs(out_dir, exist_ok=True)
    style = [m for m in metrics if m.split("/")[0] == style_task]
    other = [m for m in metrics if m not in style]
    paths = []
    for metric in other:
        base = os.path.join(out_dir, _slug(metric))
        score_vs_tokens(rows, metric, teacher, base + "_vs_tokens")
        score_vs_size(rows, metric, teacher, base + "_vs_size")
        paths += [base + "_vs_tokens.png", base + "_vs_size.png"]
    if style:
        style_vs_tokens(rows, style, teacher, os.path.join(out_dir, "style_vs_tokens"))
        paths.append(os.path.join(out_dir, "style_vs_tokens.png"))
    if other:
        summary(rows, other[0], style[0] if style else None, teacher, os.path.join(out_dir, "summary"))
        paths.append(os.path.join(out_dir, "summary.png"))
    return paths
