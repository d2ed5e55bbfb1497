"""A study's results: per pair of systems, win/tie/loss rates and the share as-good-or-better.

Definitions (docs/rating.md states them for readers of the numbers):

- For a pair X:Y each judgment is a *win* (X preferred), a *tie* or a *loss* (Y preferred),
  whichever side X was shown on. An item's rates are the shares over its judgments; the pair's
  rates are the mean over items, so every item weighs the same however many raters it kept.
- The study's measure is ``as_good_or_better = win + tie``: the share of items where X was rated
  as good as or better than Y.
- Intervals are 95% percentile bootstrap intervals over items (items resampled with replacement,
  all four rates from the same draws), from a seeded numpy generator, so they are reproducible.
- Agreement is Krippendorff's alpha, nominal, over the (X, tie, Y) codes of all regular items
  (the ``krippendorff`` package), with items judged once contributing nothing, as alpha defines.
- A rater who misses more than ``max_missed`` attention checks (a tie counts as a miss) is
  excluded by default, and listed.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import krippendorff
import numpy as np

RATES = ("win", "tie", "loss", "as_good_or_better")


def failed_attention(rows: Sequence[dict], max_missed: int = 0) -> dict[str, int]:
    """``{rater: attention checks missed}`` for the raters who missed more than ``max_missed``."""
    missed = collections.Counter(
        row["rater"] for row in rows if row["attention_check"] and row["choice"] != row["expected"]
    )
    return {rater: n for rater, n in sorted(missed.items()) if n > max_missed}


def _outcome(row: dict) -> int:
    """0: X preferred (win), 1: tie, 2: Y preferred (loss)."""
    return {row["system_x"]: 0, "tie": 1, row["system_y"]: 2}[row["preferred"]]


def pair_rates(rows: Sequence[dict], resamples: int = 10_000, seed: int = 0) -> dict:
    """Rates and bootstrap intervals of one pair's regular judgments (see the module docstring)."""
    by_item = collections.defaultdict(list)
    for row in rows:
        by_item[row["item_id"]].append(_outcome(row))
    # (items, 4): each item's shares of win, tie, loss and win + tie.
    shares = np.array([np.bincount(codes, minlength=3) / len(codes) for codes in by_item.values()])
    values = np.concatenate([shares, shares[:, :1] + shares[:, 1:2]], axis=1)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[draws].mean(axis=1), [2.5, 97.5], axis=0)
    means = values.mean(axis=0)
    return {
        "items": len(values),
        "judgments": len(rows),
        **{name: float(means[i]) for i, name in enumerate(RATES)},
        "interval_95": {name: [float(low[i]), float(high[i])] for i, name in enumerate(RATES)},
    }


def agreement(rows: Sequence[dict]) -> float | None:
    """Krippendorff's nominal alpha of the raters' outcome codes; None where it is undefined."""
    raters = sorted({row["rater"] for row in rows})
    items = sorted({row["item_id"] for row in rows})
    if len(raters) < 2 or not items:
        return None
    data = np.full((len(raters), len(items)), np.nan)
    rater_index, item_index = {r: i for i, r in enumerate(raters)}, {it: j for j, it in enumerate(items)}
    for row in rows:
        data[rater_index[row["rater"]], item_index[row["item_id"]]] = _outcome(row)
    if not (np.sum(~np.isnan(data), axis=0) >= 2).any():
        return None  # no item judged twice: nothing to agree on
    alpha = krippendorff.alpha(reliability_data=data, value_domain=[0, 1, 2], level_of_measurement="nominal")
    return None if math.isnan(alpha) else float(alpha)


def summarize(
    rows: Sequence[dict],
    include_failed: bool = False,
    max_missed: int = 0,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """The study's summary from its judgment rows (``store.judgments``)."""
    failed = failed_attention(rows, max_missed)
    excluded = set() if include_failed else set(failed)
    kept = [row for row in rows if not row["attention_check"] and row["rater"] not in excluded]
    pairs = collections.defaultdict(list)
    for row in kept:
        pairs[(row["system_x"], row["system_y"])].append(row)
    return {
        "judgments": len(kept),
        "raters": len({row["rater"] for row in kept}),
        "failed_attention": failed,
        "excluded_raters": sorted(excluded),
        "agreement_krippendorff_alpha": agreement(kept),
        "pairs": [
            {"system_x": x, "system_y": y, **pair_rates(pair_rows, resamples, seed)}
            for (x, y), pair_rows in pairs.items()
        ],
    }
