"""pass@k: the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With ``n`` samples of a problem of which ``c`` pass, the chance that at least
one of ``k`` samples drawn without replacement passes is
``1 - C(n - c, k) / C(n, k)``. The binomials overflow floats for realistic
``n`` (``C(200, 100)`` is about 9e58), so the ratio is computed as the product
``prod_{i = n - c + 1}^{n} (1 - k / i)``, as the paper's code does.

>>> round(pass_at_k(n=10, c=3, k=1), 6)  # 3 of 10 correct: one draw passes with chance 0.3
0.3
>>> metrics, stderr = pass_at_k_summary([10, 10], [3, 0], ks=(1, 5, 100))  # no pass@100 from 10 samples
>>> {name: round(value, 4) for name, value in metrics.items()}
{'pass@1': 0.15, 'pass@5': 0.4583}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from imitax.eval import metrics

__all__ = ["estimate_pass_at_k", "pass_at_k", "pass_at_k_summary"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct.

    Raises:
      ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """pass@k of each problem.

    Args:
      num_samples: samples per problem (one number for all, or one per problem).
      num_correct: correct samples per problem.
      k: the k of pass@k.

    Returns:
      A float64 array with one estimate per problem.
    """
    if isinstance(num_samples, int):
        num_samples = [num_samples] * len(num_correct)
    if len(num_samples) != len(num_correct):
        raise ValueError(f"{len(num_samples)} sample counts for {len(num_correct)} problems")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct, strict=True)], np.float64)


def pass_at_k_summary(
    num_samples: int | Sequence[int], num_correct: Sequence[int], ks: Sequence[int]
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean pass@k over problems and its standard error, for every ``k`` that every problem allows.

    The standard error is that of a mean over problems
    (:func:`imitax.eval.metrics.mean_stderr`, as the lm-evaluation-harness
    reports it); NaN for a single problem.

    Returns:
      ``(metrics, stderr)``, both keyed ``'pass@{k}'``.
    """
    smallest_n = num_samples if isinstance(num_samples, int) else min(num_samples, default=0)
    values, stderr = {}, {}
    for k in sorted(set(ks)):
        if k > smallest_n:
            continue
        per_problem = estimate_pass_at_k(num_samples, num_correct, k).tolist()
        values[f"pass@{k}"], stderr[f"pass@{k}"] = metrics.mean(per_problem), metrics.mean_stderr(per_problem)
    return values, stderr
