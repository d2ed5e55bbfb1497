"""Token budgets and the validation split: nested selections from one seeded shuffle.

The examples of a token cache are shuffled once, with ``seed``. The first ``val_examples`` of that
order are held out for validation. The training set is the shortest prefix of the rest that holds
``token_budget`` tokens, its last example cut so that the count is exact. With the same seed and
``val_examples``, every smaller budget's training set is a prefix, hence a subset, of every larger
one's; the validation set does not depend on the budget.

What a budget counts: every token of the training examples (``TokenDataset.num_tokens``) -- the
template's text, the system text, user and teacher turns, end-of-turn and BOS tokens -- which is how
the study sizes its imitation data (0.3M to 150M tokens). Padding added by packing is not counted.
The teacher (loss) tokens of the same selection are ``TokenDataset.num_loss_tokens``; log both.
"""

from __future__ import annotations

import decimal
import re

import numpy as np

from imitax.data.cache import TokenDataset

SHUFFLE_STREAM = 0  # Random streams: np.random.default_rng([seed, stream, ...]); packing.py uses 1.
_MULTIPLIERS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
_BUDGET = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMB]?)", re.IGNORECASE)


def parse_token_budget(value: int | float | str | None) -> int | None:
    """``'300K'`` -> 300_000, ``'20M'``, ``'1.5B'`` -> 1_500_000_000, ``1000`` -> 1000; None -> None (all data).

    Raises:
      ValueError: not a positive whole number of tokens (``'1.5'``, ``'10X'``, ``'-3'``, ``0``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        match = _BUDGET.fullmatch(value.strip().replace("_", ""))
        if match is None:
            raise ValueError(f"bad token budget {value!r}: expected a number with an optional K, M or B suffix")
        amount = decimal.Decimal(match.group(1)) * _MULTIPLIERS[match.group(2).upper()]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        amount = decimal.Decimal(value)
    else:
        raise ValueError(f"bad token budget {value!r}: expected an int or a string like '300K'")
    if amount != amount.to_integral_value() or amount <= 0:
        raise ValueError(f"bad token budget {value!r}: not a positive whole number of tokens")
    return int(amount)


def num_val_examples(val_examples: int | float, num_examples: int) -> int:
    """A count (int >= 0) or a fraction (float in (0, 1), rounded) of ``num_examples``."""
    if isinstance(val_examples, float) and 0 < val_examples < 1:
        count = round(val_examples * num_examples)
    elif isinstance(val_examples, int | np.integer) and not isinstance(val_examples, bool) and val_examples >= 0:
        count = int(val_examples)
    else:
        raise ValueError(f"val_examples must be a count >= 0 or a fraction in (0, 1), got {val_examples!r}")
    if count >= num_examples:
        raise ValueError(f"val_examples={val_examples!r} holds out {count} of {num_examples} examples, leaving none")
    return count


def split_examples(
    dataset: TokenDataset,
    *,
    seed: int = 0,
    val_examples: int | float = 0,
    token_budget: int | float | str | None = None,
) -> tuple[TokenDataset, TokenDataset]:
    """``(train, val)`` selections of ``dataset``, as the module docstring describes.

    Returns:
      ``train`` in the shuffled order (the order packing uses), holding exactly ``token_budget``
      tokens (all of them without a budget); ``val`` with ``val_examples`` whole examples.

    Raises:
      ValueError: a malformed budget, or one larger than the training data (the message says how many
        tokens there are).
    """
    budget = parse_token_budget(token_budget)
    order = np.random.default_rng([seed, SHUFFLE_STREAM]).permutation(len(dataset))
    n_val = num_val_examples(val_examples, len(dataset))
    val, rest = dataset.select(order[:n_val]), order[n_val:]
    if budget is None:
        return dataset.select(rest), val
    cumulative = np.cumsum(dataset.lengths[rest])
    available = int(cumulative[-1])
    if budget > available:
        held_out = f", after holding out {n_val:,} for validation" if n_val else ""
        raise ValueError(
            f"token budget {budget:,} exceeds the data: {available:,} tokens in {len(rest):,} examples{held_out}"
        )
    last = int(np.searchsorted(cumulative, budget))  # The first prefix with at least `budget` tokens.
    chosen = rest[: last + 1]
    lengths = dataset.lengths[chosen].copy()
    lengths[-1] -= int(cumulative[last]) - budget
    return dataset.select(chosen, lengths), val
