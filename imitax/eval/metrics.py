"""Aggregate metrics and their standard errors, computed as the lm-evaluation-harness computes them.

>>> mean([1, 0, 1, 1]), mean_stderr([1, 0, 1, 1])     # accuracy and its standard error
>>> pooled_stderr([0.05, 0.04], [100, 150])            # the stderr of a size-weighted group mean
>>> bits_per_byte(total_logprob=-1234.5, num_bytes=2000)
>>> exact_match("The Eiffel Tower.", ["eiffel tower"])   # 1.0 after SQuAD normalization
>>> unigram_f1("Paris is the capital", "the capital is Paris")

Standard errors are those of a mean: the sample standard deviation (``n - 1``
in the denominator) over ``sqrt(n)``, as the harness's ``mean_stderr``. Empty or
single-value inputs give ``nan``, never an exception, so a tiny run still
reports its metrics.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

__all__ = [
    "bits_per_byte",
    "exact_match",
    "mean",
    "mean_stderr",
    "normalize_answer",
    "pearson",
    "perplexity",
    "pooled_stderr",
    "unigram_overlap",
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


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient; ``nan`` below 2 pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = mean(x), mean(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = math.fsum((a - mx) ** 2 for a in x), math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


# -- answer matching, as the SQuAD evaluation script defines it -----------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower-case, drop ASCII punctuation, the articles a/an/the, extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0."""
    golds = [golds] if isinstance(golds, str) else golds
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(g) for g in golds))


def unigram_overlap(prediction: str, reference: str) -> dict[str, float]:
    """SQuAD's token-level overlap of two texts: ``{'precision', 'recall', 'f1'}``.

    Tokens are the whitespace-separated words of the normalized texts
    (:func:`normalize_answer`), counted with multiplicity. When either side has
    no tokens, all three are 1.0 if both are empty and 0.0 otherwise (as
    SQuAD 2.0's ``compute_f1``).
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        value = float(pred == ref)
        return {"precision": value, "recall": value, "f1": value}
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = common / len(pred), common / len(ref)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}
