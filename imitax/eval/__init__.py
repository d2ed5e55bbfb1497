"""Evaluation: the evaluator, the LM wrapper, the task registry and generation.

>>> from imitax import eval as ev
>>> lm = ev.LM.from_path("/tmp/run")                              # checkpoint, workdir or HF directory
>>> out = ev.evaluate(lm, {"mmlu": {"data_dir": "data/mmlu"}}, "/tmp/run_eval")
>>> ev.tasks.names()                                              # the registered tasks
"""

from imitax.eval import evaluator, tasks
from imitax.eval.evaluator import evaluate, validate_tasks
from imitax.eval.generate import generate, sample_logits, top_k_filter, top_p_filter
from imitax.eval.lm import LM

__all__ = [
    "LM",
    "evaluate",
    "evaluator",
    "generate",
    "sample_logits",
    "tasks",
    "top_k_filter",
    "top_p_filter",
    "validate_tasks",
]
