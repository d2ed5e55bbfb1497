"""The sweep report's intervals, marks, table columns and plot data, on hand-made cell records.

Every expected number is computed by hand here (t quantiles from a printed table), not by the
functions under test.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from imitax import sweep  # noqa: E402
from imitax.sweep import plots  # noqa: E402

# The module, not the function imitax.sweep.report that the package exports under the same name.
report = importlib.import_module("imitax.sweep.report")

ACC, CORR = "facts/acc", "style/length_corr"
T_2 = 4.302652729749462  # t_{0.975, 2}: 4.303 in printed tables (checked in the first test)


def cell(model, source, budget, tokens, seed, metrics, stderr=None, status="done"):
    """A cell.json record as the sweep writes it (only the fields the report reads, plus id)."""
    cell_id = f"{model}/base" if source is None else f"{model}/{source}/{budget}/seed{seed}"
    return {
        "id": cell_id,
        "model": model,
        "source": source,
        "budget": budget,
        "tokens": tokens,
        "seed": seed,
        "status": status,
        "params": 1000,
        "metrics": metrics,
        "stderr": stderr or {},
    }


# m1's base model: accuracy 0.50 with stderr 0.02 (± 0.0392); length_corr has no stderr.
BASE = cell("m1", None, "0", 0, 0, {ACC: 0.50, CORR: 0.10}, {ACC: 0.02})
# 4K: three seeds far above the base (0.72 ± 4.303 * 0.02 / sqrt(3) = ± 0.0497).
UP = [
    cell("m1", "broad", "4K", 4000, s, {ACC: v, CORR: c}, {ACC: 0.5})
    for s, v, c in ((0, 0.70, 0.2), (1, 0.72, 0.3), (2, 0.74, 0.4))
]
# 2K: three seeds around the base (0.51 ± 4.303 * 0.05 / sqrt(3) = ± 0.124): within.
WITHIN = [cell("m1", "broad", "2K", 2000, s, {ACC: v}) for s, v in ((0, 0.46), (1, 0.56), (2, 0.51))]
# task 1K: one seed, below the base beyond the intervals.
DOWN = [cell("m1", "task", "1K", 1000, 0, {ACC: 0.30, CORR: 0.5}, {ACC: 0.02})]
FAILED = cell("m1", "task", "1K", 1000, 1, {}, status="failed")
RECORDS = [BASE, *UP, *WITHIN, *DOWN, FAILED]


def test_t_quantiles_match_a_printed_table():
    for df, printed in ((1, 12.706), (2, 4.303), (9, 2.262), (30, 2.042)):
        assert report.t_quantile(df) == pytest.approx(printed, abs=6e-4)
    assert report.t_quantile(2) == pytest.approx(T_2, rel=1e-9)


def test_interval_over_three_seeds_is_a_t_interval_on_the_seed_values():
    mean, half = report.interval(UP, ACC)
    # sd of (0.70, 0.72, 0.74) with ddof=1: sqrt((0.02² + 0 + 0.02²) / 2) = 0.02.
    assert mean == pytest.approx(0.72, abs=1e-12)
    assert half == pytest.approx(T_2 * 0.02 / math.sqrt(3), rel=1e-9)
    assert half == pytest.approx(0.049683, abs=1e-6)
    # The seeds' own stderrs (0.5 each) are not used when there are several seeds.
    mean, half = report.interval(UP, CORR)
    assert (mean, half) == pytest.approx((0.3, T_2 * 0.1 / math.sqrt(3)), rel=1e-9)


def test_interval_of_one_seed_is_1_96_standard_errors_or_none():
    assert report.interval([BASE], ACC) == pytest.approx((0.50, 1.96 * 0.02), rel=1e-12)
    assert report.interval([BASE], CORR) == (0.10, None)  # no stderr: no interval
    nan_stderr = cell("m1", None, "0", 0, 0, {ACC: 0.5}, {ACC: float("nan")})
    assert report.interval([nan_stderr], ACC) == (0.5, None)
    assert report.interval([BASE], "style/unigram_f1") == (None, None)  # no cell holds it


def test_interval_counts_only_the_seeds_that_hold_the_metric():
    # Two of three seeds report the metric: n = 2, t_{0.975, 1} = 12.706.
    mean, half = report.interval(WITHIN[:2] + [cell("m1", "broad", "2K", 2000, 2, {})], ACC)
    assert mean == pytest.approx(0.51, abs=1e-12)
    sd = math.sqrt(2 * 0.05**2)  # of (0.46, 0.56), ddof=1
    assert half == pytest.approx(12.706 * sd / math.sqrt(2), rel=1e-4)


def test_difference_mark_combines_half_widths_in_quadrature():
    # Clearly beyond, either way.
    assert report.difference_mark(0.72, 0.05, 0.50, 0.04) == "+"
    assert report.difference_mark(0.30, 0.04, 0.50, 0.04) == "-"
    # Within: d = 0.01, h = 0.13.
    assert report.difference_mark(0.51, 0.124, 0.50, 0.0392) == ""
    # The two intervals overlap (0.46-0.54 and 0.52-0.60) but d = 0.06 > h = sqrt(2) * 0.04 = 0.0566:
    # marked (summing the half-widths, 0.08, would not mark it).
    assert report.difference_mark(0.56, 0.04, 0.50, 0.04) == "+"
    # d = 0.05 < h = 0.0566: not marked.
    assert report.difference_mark(0.55, 0.04, 0.50, 0.04) == ""
    # No interval on either side, or no value: no mark.
    assert report.difference_mark(0.90, None, 0.50, 0.04) == ""
    assert report.difference_mark(0.90, 0.01, 0.50, None) == ""
    assert report.difference_mark(float("nan"), 0.01, 0.50, 0.01) == ""


def test_table_rows_hold_means_intervals_and_marks():
    rows = sweep.table_rows(RECORDS, [ACC, CORR])
    by = {(r["source"], r["budget"]): r for r in rows}
    assert list(by) == [("(base)", "0"), ("broad", "2K"), ("broad", "4K"), ("task", "1K")]
    base, within, up, down = (by[k] for k in by)
    assert [r["seeds"] for r in (base, within, up, down)] == [1, 3, 3, 1]  # the failed seed is left out

    assert (base[ACC], base[f"{ACC}_lo"], base[f"{ACC}_hi"]) == pytest.approx((0.50, 0.4608, 0.5392), abs=1e-12)
    assert base[f"{ACC}_vs_base"] == ""  # the base row itself
    assert base[f"{CORR}_lo"] is None and base[f"{CORR}_hi"] is None

    half = T_2 * 0.02 / math.sqrt(3)
    assert (up[ACC], up[f"{ACC}_lo"], up[f"{ACC}_hi"]) == pytest.approx((0.72, 0.72 - half, 0.72 + half), abs=1e-12)
    # d = 0.22, h = sqrt(0.0392² + 0.0497²) = 0.063: beyond.
    assert up[f"{ACC}_vs_base"] == "+"
    # d = 0.01, h = sqrt(0.0392² + 0.124²) = 0.130: within.
    assert within[f"{ACC}_vs_base"] == ""
    # d = -0.20, h = sqrt(2) * 0.0392: below.
    assert down[f"{ACC}_vs_base"] == "-"
    # length_corr: the finetuned rows differ a lot, but the base row has no interval: no mark.
    assert up[f"{CORR}_vs_base"] == "" and down[f"{CORR}_vs_base"] == ""
    assert up[f"{CORR}_lo"] is not None and down[f"{CORR}_lo"] is None
    assert within[CORR] is None  # no seed holds it


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """report() over RECORDS written as a sweep workdir's cell.json files."""
    workdir = tmp_path_factory.mktemp("report") / "sweep"
    for r in RECORDS:
        path = workdir / "cells" / r["id"] / "cell.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
    config = sweep.default_config()
    config.name = "fake"
    config.report.metrics = f"{ACC},{CORR}"
    config.teacher = {ACC: 1.0}
    paths = report.report(workdir, config)
    return workdir, paths


def read_csv(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_results_csv_has_interval_and_mark_columns(written):
    _, paths = written
    rows = read_csv(paths["csv"])
    assert list(rows[0]) == [
        "model",
        "params",
        "source",
        "budget",
        "tokens",
        "seeds",
        ACC,
        f"{ACC}_lo",
        f"{ACC}_hi",
        f"{ACC}_vs_base",
        CORR,
        f"{CORR}_lo",
        f"{CORR}_hi",
        f"{CORR}_vs_base",
    ]
    by = {r["budget"]: r for r in rows}
    half = T_2 * 0.02 / math.sqrt(3)
    assert float(by["4K"][f"{ACC}_lo"]) == pytest.approx(0.72 - half, abs=1e-12)
    assert float(by["4K"][f"{ACC}_hi"]) == pytest.approx(0.72 + half, abs=1e-12)
    assert [by[b][f"{ACC}_vs_base"] for b in ("0", "2K", "4K", "1K")] == ["", "", "+", "-"]
    assert by["0"][CORR] == "0.1" and by["0"][f"{CORR}_lo"] == "" and by["0"][f"{CORR}_hi"] == ""


def test_results_markdown_writes_half_widths_marks_and_the_definition(written):
    _, paths = written
    text = pathlib.Path(paths["markdown"]).read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header == f"| model | params | source | budget | tokens | seeds | {ACC} | {CORR} |"
    row = {line.split(" | ")[3]: line for line in lines if line.startswith("| m1 |")}
    assert row["0"].endswith("| 0.500 ± 0.039 | 0.100 |")  # no stderr for length_corr: no ±
    assert row["4K"].endswith(f"| 0.720 ± {T_2 * 0.02 / math.sqrt(3):.3f} ↑ | 0.300 ± 0.248 |")
    assert row["2K"].endswith("| 0.510 ± 0.124 |  |")
    assert row["1K"].endswith("| 0.300 ± 0.039 ↓ | 0.500 |")
    assert "t_{0.975, n-1} · sd / sqrt(n)" in text and "1.96 · the evaluator's standard error" in text
    assert "h = sqrt(a² + b²)" in text and "d ± h excludes 0" in text
    assert "Teacher: facts/acc 1.0000" in text


def test_plot_data_has_the_intervals(written):
    workdir, _ = written
    rows = read_csv(workdir / "results" / "plots" / "facts_acc_vs_tokens.csv")
    assert list(rows[0]) == ["figure", "panel", "series", "x", "y", "y_lo", "y_hi"]
    points = {(r["panel"], r["series"], r["x"]): r for r in rows}
    half = T_2 * 0.02 / math.sqrt(3)
    p = points[("broad", "m1", "4000")]
    assert (float(p["y"]), float(p["y_lo"]), float(p["y_hi"])) == pytest.approx((0.72, 0.72 - half, 0.72 + half))
    p = points[("task", "m1", "0")]  # the base model starts every panel
    assert (float(p["y_lo"]), float(p["y_hi"])) == pytest.approx((0.4608, 0.5392))
    teacher = points[("broad", "teacher", "")]
    assert (teacher["y"], teacher["y_lo"], teacher["y_hi"]) == ("1.0", "", "")
    size = read_csv(workdir / "results" / "plots" / "facts_acc_vs_size.csv")
    largest = next(r for r in size if r["series"] == "broad (largest budget)")
    assert float(largest["y_lo"]) == pytest.approx(0.72 - half)
    style = read_csv(workdir / "results" / "plots" / "style_vs_tokens.csv")
    base_corr = next(r for r in style if r["panel"] == "broad:style/length_corr" and r["x"] == "0")
    assert base_corr["y"] == "0.1" and base_corr["y_lo"] == "" and base_corr["y_hi"] == ""


def test_error_bars_are_drawn_with_the_interval():
    rows = sweep.table_rows(RECORDS, [ACC])
    fig, ax = plt.subplots()
    points: list[tuple] = []
    plots._panel_vs_tokens(ax, rows, ACC, {}, "broad", points, "broad")
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    _, _, (vertical,) = bars.lines
    # One segment per point (base, 2K, 4K), from lo to hi.
    spans = sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in vertical.get_segments())
    expected = sorted((p[2], p[4], p[5]) for p in points)  # (panel, series, x, y, lo, hi)
    assert [s[0] for s in spans] == [p[0] for p in expected] == [0, 2000, 4000]
    assert [v for s in spans for v in s[1:]] == pytest.approx([v for p in expected for v in p[1:]])
    plt.close(fig)
