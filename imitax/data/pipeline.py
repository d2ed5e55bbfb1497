"""The data section of a run: :class:`DataConfig` -> token cache -> train/val selections.

Typical use (the trainer's)::

    data = build_datasets(DataConfig(**config.data), tokenizer)
    batches = PackedBatches(data.train, config.data.seq_len, config.batch_size, seed=config.data.seed,
                            packing=config.data.packing)
    batch = batches.batch_at(step, jax.process_index(), jax.process_count())
"""

from __future__ import annotations

import dataclasses

from imitax.data.budget import parse_token_budget, split_examples
from imitax.data.cache import DEFAULT_CACHE_DIR, TokenDataset, build_token_cache
from imitax.data.formats import FORMATS
from imitax.data.packing import PACKINGS
from imitax.data.templates import TEMPLATES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of a config; the field names are its keys (``data.train``, ...).

    Attributes:
      train: data sources: paths, directories, globs or ``hf:NAME[:CONFIG]:SPLIT`` (one string or a
        sequence; see :mod:`imitax.data.formats`).
      format: record format (``sharegpt``, ``messages``, ``alpaca``, ``hc3``, ``text``), or ``auto``
        to detect it per source.
      template: turn format: ``koala`` (the study's), ``vicuna``, ``chatml`` or ``chat_template``.
      token_budget: training tokens to take (``'300K'``, ``'20M'``, ``'1.5B'``, an int), counted as in
        :mod:`imitax.data.budget`; None takes all.
      seq_len: tokens per packed row.
      packing: ``pack`` (examples kept apart by segment ids) or ``concat`` (the study's stream).
      skip_invalid: skip and count bad records instead of raising.
      cache_dir: where token caches live.
      val_examples: examples held out for validation: a count, or a fraction in (0, 1).
      seed: picks the validation and budget examples, and orders the batches.
    """

    train: str | tuple[str, ...] = ()
    format: str = "auto"
    template: str = "koala"
    token_budget: int | str | None = None
    seq_len: int = 2048
    packing: str = "pack"
    skip_invalid: bool = False
    cache_dir: str = DEFAULT_CACHE_DIR
    val_examples: int | float = 0
    seed: int = 0

    def __post_init__(self):
        train = (self.train,) if isinstance(self.train, str) else tuple(self.train)
        object.__setattr__(self, "train", train)
        if not train:
            raise ValueError("data.train names no source")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}: expected 'auto' or one of {sorted(FORMATS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r}: expected one of {TEMPLATES}")
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing={self.packing!r}: expected one of {PACKINGS}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")
        parse_token_budget(self.token_budget)  # A malformed budget fails here, before any tokenizing.


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """The training selection, the validation selection (None without ``val_examples``) and stats.

    ``stats`` holds the cache's reading stats (``records``, ``invalid``, ``no_teacher``,
    ``conversations``, ``tokens``, ``loss_tokens``) and, for each split, ``{split}_examples``,
    ``{split}_tokens`` and ``{split}_loss_tokens``, plus ``cache`` (its directory).
    """

    train: TokenDataset
    val: TokenDataset | None
    stats: dict


def build_datasets(config: DataConfig, tokenizer, *, progress: bool = True) -> DataSplits:
    """Tokenizes (or reopens) ``config.train`` and selects the validation and training examples."""
    cache = build_token_cache(
        config.train,
        tokenizer,
        format=config.format,
        template=config.template,
        skip_invalid=config.skip_invalid,
        cache_dir=config.cache_dir,
        progress=progress,
    )
    train, val = split_examples(
        cache, seed=config.seed, val_examples=config.val_examples, token_budget=config.token_budget
    )
    stats = dict(cache.stats, cache=cache.path)
    for name, split in (("train", train), ("val", val)):
        stats |= {f"{name}_examples": len(split), f"{name}_tokens": split.num_tokens}
        stats[f"{name}_loss_tokens"] = split.num_loss_tokens
    return DataSplits(train, val if len(val) else None, stats)
