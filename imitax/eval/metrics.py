"""Aggregate metrics and their standard errors, computed as the lm-evaluation-harness computes them.

>>> mean([1, 0, 1, 1]), mean_stderr([1, 0, 1, 1])     # accuracy and its standard error
>>> pooled_stderr([0.05, 0.04], [100, 150])            # the stderr of a size-weighted group mean
>>> bits_per_byte(total_logprob=-1234.5, num_bytes=2000)

Standard errors are those of a mean: the sample standard deviation (``n - 1``
in the denominator) over ``sqrt(n)``, as the harness's ``mean_stderr``. Empty or
single-value inputs give ``nan``, never an exception, so a tiny run still
reports its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "bits_per_byte",
    "mean",
    "mean_stderr",
    "perplexity",
    "pooled_stderr",
    "unweighted_mean_stderr",
]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (``nan`` when empty)."""
    return math.fsum(values) / len(values) if len(values) else math.nan


def mean_stderr(values: Sequence[float]) -> float:
    """The standard error of the mean: sample standard deviation / sqrt(n) (``nan`` below 2 values)."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = mean(values)
    variance = math.fsum((x - mu) ** 2 for x in values) / (n - 1)
    return math.sqrt(variance / n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """The stderr of a size-weighted mean of group means, from each group's stderr (the harness's pooled variance).

    It ignores the spread *between* the group means, as the harness's
    ``pooled_sample_stderr`` does; :func:`mean_stderr` over all values is exact.
    """
    if len(stderrs) != len(sizes):
        raise ValueError(f"{len(stderrs)} stderrs but {len(sizes)} sizes")
    total = sum(sizes)
    if total - len(sizes) <= 0:
        return math.nan
    variance = math.fsum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes, strict=True)) / (total - len(sizes))
    return math.sqrt(variance / total)


def unweighted_mean_stderr(stderrs: Sequence[float]) -> float:
    """The stderr of the plain mean of ``k`` independent group means: ``sqrt(sum(se_i^2)) / k``."""
    if not len(stderrs):
        return math.nan
    return math.sqrt(math.fsum(se**2 for se in stderrs)) / len(stderrs)


def perplexity(total_logprob: float, count: int) -> float:
    """``exp(-total_logprob / count)``: per-token (or per-word, per-byte) perplexity."""
    return math.exp(-total_logprob / count) if count else math.nan


def bits_per_byte(total_logprob: float, num_bytes: int) -> float:
    """Negative log-likelihood in bits per UTF-8 byte: comparable across tokenizers."""
    return -total_logprob / (num_bytes * math.log(2)) if num_bytes else math.nan
