"""Collecting imitation data from a teacher: prompts in, ShareGPT records out, resumable.

* :mod:`~imitax.collect.prompts`: prompt files (``{id, prompt}``, ShareGPT, messages, Alpaca, hub
  datasets) -> :class:`Prompt`.
* :mod:`~imitax.collect.client`: the ``openai`` async client with bounded concurrency, rate limits and
  retries; :func:`collect` runs a collection.
* :mod:`~imitax.collect.store`: the append-and-flush output file a rerun resumes from.
* :mod:`~imitax.collect.nq_synthetic`: the study's NQ-synthetic recipe.

Decontamination against the benchmarks is :mod:`imitax.data.decontaminate`. ``scripts/collect.py``
is the command line.
"""

from imitax.collect.client import Outcome, RateLimiter, Sampling, Teacher, TeacherError, collect, open_teacher
from imitax.collect.prompts import Prompt, read_prompts
from imitax.collect.store import Store, StoreError

__all__ = [
    "Outcome",
    "Prompt",
    "RateLimiter",
    "Sampling",
    "Store",
    "StoreError",
    "Teacher",
    "TeacherError",
    "collect",
    "open_teacher",
    "read_prompts",
]
