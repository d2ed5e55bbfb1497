"""The report: the results table (CSV, Markdown), provenance and the plots."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Sequence
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


def format_value(value: Any) -> str:
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
        config = resolved(config, workdir)
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
        *("| " + " | ".join(format_value(r[c]) for c in columns) + " |" for r in rows),
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
