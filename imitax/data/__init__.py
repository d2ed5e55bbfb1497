"""Imitation data: records -> conversations -> token ids + loss mask -> token cache -> packed batches.

Host-side numpy only (no JAX), one stage per module:

* :mod:`~imitax.data.formats`: ShareGPT / OpenAI messages / Alpaca / HC3 / text records from
  local JSON, JSONL and Parquet files or hub datasets -> :class:`Conversation`.
* :mod:`~imitax.data.templates`: a conversation -> ``(ids, mask)`` in the Koala (the study's),
  Vicuna, ChatML or the tokenizer's own chat format; loss only on the teacher's tokens.
* :mod:`~imitax.data.cache`: tokenize once into flat memory-mapped arrays (:class:`TokenDataset`).
* :mod:`~imitax.data.budget`: nested token budgets and a validation split from one seeded shuffle.
* :mod:`~imitax.data.packing`: :class:`PackedBatches`, whose ``batch_at(step)`` is a pure
  function of (seed, step).
* :mod:`~imitax.data.pipeline`: :class:`DataConfig` (the ``data.*`` config keys) and
  :func:`build_datasets`, which chains the above.
"""

from imitax.data.budget import num_val_examples, parse_token_budget, split_examples
from imitax.data.cache import DEFAULT_CACHE_DIR, TokenDataset, build_token_cache
from imitax.data.formats import (
    FORMATS,
    TEACHER,
    USER,
    Conversation,
    DataError,
    Source,
    load_conversations,
    resolve_sources,
)
from imitax.data.packing import PACKINGS, PackedBatches
from imitax.data.pipeline import DataConfig, DataSplits, build_datasets
from imitax.data.templates import TEMPLATES, VICUNA_SYSTEM, Encoder, encode_conversation, encode_prompt, render

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FORMATS",
    "PACKINGS",
    "TEACHER",
    "TEMPLATES",
    "USER",
    "VICUNA_SYSTEM",
    "Conversation",
    "DataConfig",
    "DataError",
    "DataSplits",
    "Encoder",
    "PackedBatches",
    "Source",
    "TokenDataset",
    "build_datasets",
    "build_token_cache",
    "encode_conversation",
    "encode_prompt",
    "load_conversations",
    "num_val_examples",
    "parse_token_budget",
    "render",
    "resolve_sources",
    "split_examples",
]
