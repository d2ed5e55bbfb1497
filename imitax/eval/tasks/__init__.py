"""Evaluation tasks, registered by name.

>>> from imitax.eval import tasks
>>> tasks.names()                                   # ['mmlu', 'multiple_choice', 'perplexity', ...]
>>> task = tasks.get("mmlu")(num_fewshot=5, data_dir="data/mmlu")
>>> result = task.run(lm)                           # lm: imitax.eval.lm.LM (or anything with its methods)
>>> result.metrics["acc"], result.stderr["acc"]

The contract of a task class (registered with :func:`register`): it is
constructed from keyword config only (``num_fewshot``, ``limit``, ``seed`` and
data-location keywords such as ``data_dir`` or ``data_file``; its docstring
lists them), and ``run(lm, progress=True)`` returns a :class:`TaskResult`.
"""

from __future__ import annotations

from imitax.eval.tasks.registry import TaskResult, generate_until, get, names, register

__all__ = ["TaskResult", "generate_until", "get", "names", "register"]

# Importing a task module registers its tasks. The list is explicit on purpose; add new modules here.
from imitax.eval.tasks import humaneval, mmlu, multiple_choice, nq_open, pairwise, perplexity, style  # noqa: E402, F401
