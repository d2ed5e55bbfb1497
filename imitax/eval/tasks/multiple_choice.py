"""Any multiple-choice question set, scored by log-likelihood in the MMLU prompt style.

>>> result = tasks.get("multiple_choice")(data_file="questions.jsonl").run(lm)

Data: a JSON Lines (or JSON array, or Parquet) file of records with
``question`` (text), ``choices`` (2 to 26 texts) and ``answer`` (the index of
the right choice, or its letter). Each prompt is::

    {description}{shot question}\\nA. {choice}\\nB. {choice}...\\nAnswer: {letter}\\n\\n...
    {question}\\nA. {choice}\\nB. {choice}...\\nAnswer:

and the continuations `` A``, `` B``... are scored; the prediction is the most
likely one (ties go to the first), as the harness's ``acc``. Zero-shot by
default; few-shot examples are the first ``num_fewshot`` records of
``fewshot_file``, in order.

The helpers here (:func:`format_question`, :func:`build_context`,
:func:`score_choices`, :func:`read_records`) are shared with the MMLU task.
"""

from __future__ import annotations

import json
import pathlib
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from imitax.eval import metrics
from imitax.eval.tasks import TaskResult, register

__all__ = ["LETTERS", "MultipleChoice", "build_context", "format_question", "read_records", "score_choices"]

LETTERS = string.ascii_uppercase


def format_question(question: str, choices: Sequence[str]) -> str:
    """``{question}\\nA. {choice}\\nB. {choice}...\\nAnswer:`` (the question stripped, as the harness's MMLU)."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_context(description: str, shots: Sequence[dict[str, Any]], doc: dict[str, Any]) -> str:
    """The prompt of ``doc``: the description, each solved shot and its ``\\n\\n``, then ``doc``'s question."""
    solved = "".join(f"{format_question(s['question'], s['choices'])} {LETTERS[s['answer']]}\n\n" for s in shots)
    return description + solved + format_question(doc["question"], doc["choices"])


def score_choices(lm, contexts: Sequence[str], num_choices: Sequence[int], progress: bool = True) -> list[list]:
    """Log-likelihoods of the continuations `` A``, `` B``... of each context.

    Returns:
      One list per context of ``(loglikelihood, is_greedy)`` per choice.
    """
    requests = [(context, f" {LETTERS[j]}") for context, k in zip(contexts, num_choices, strict=True) for j in range(k)]
    scores = iter(lm.loglikelihood(requests, progress=progress))
    return [[next(scores) for _ in range(k)] for k in num_choices]


def choice_record(doc: dict[str, Any], scores: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """The per-example sample record: inputs, per-choice scores, prediction and correctness."""
    lls = [float(ll) for ll, _ in scores]
    pred = int(np.argmax(lls))  # First of equal maxima, as the harness.
    return {
        "question": doc["question"],
        "choices": list(doc["choices"]),
        "target": doc["answer"],
        "loglikelihoods": lls,
        "is_greedy": [bool(g) for _, g in scores],
        "pred": pred,
        "acc": float(pred == doc["answer"]),
    }


# -- data -----------------------------------------------------------------------------------------


def read_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl``/``.json`` (lines or one array) or ``.parquet`` file, in order."""
    path = pathlib.Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON: {e.msg}") from None
    return records


def parse_answer(value: Any, num_choices: int, where: str) -> int:
    """An answer index from an int, a digit string or a letter."""
    if isinstance(value, str):
        value = value.strip()
        if len(value) == 1 and value in LETTERS:
            value = LETTERS.index(value)
        elif value.isdigit():
            value = int(value)
    if not isinstance(value, int | np.integer) or not 0 <= value < num_choices:
        raise ValueError(f"{where}: answer must be a choice index in [0, {num_choices}) or its letter, got {value!r}")
    return int(value)


def check_doc(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Validates one record (question, choices, answer) and normalizes its answer to an index."""
    missing = [k for k in ("question", "choices", "answer") if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (needs question, choices, answer)")
    choices = record["choices"]
    if isinstance(choices, str) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: choices must be a list of 2 to {len(LETTERS)} texts")
    return {
        **record,
        "choices": [str(c) for c in choices],
        "answer": parse_answer(record["answer"], len(choices), where),
    }


# -- the task -------------------------------------------------------------------------------------


@register("multiple_choice")
class MultipleChoice:
    """Letter-choice questions from a local file (see the module docstring).

    Args:
      data_file: the questions (``.jsonl``, ``.json`` or ``.parquet``).
      num_fewshot: solved examples before each question (default 0).
      fewshot_file: where the solved examples come from (its first records).
      description: text before everything else (e.g. a task statement ending in ``\\n\\n``).
      limit: evaluate only the first ``limit`` questions.
      seed: accepted for a uniform task interface; nothing here is random.
    """

    def __init__(
        self,
        data_file: str | pathlib.Path,
        num_fewshot: int = 0,
        fewshot_file: str | pathlib.Path | None = None,
        description: str = "",
        limit: int | None = None,
        seed: int = 0,
    ):
        self.data_file, self.fewshot_file = pathlib.Path(data_file), fewshot_file
        self.num_fewshot, self.description, self.limit, self.seed = num_fewshot, description, limit, seed
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        if num_fewshot and fewshot_file is None:
            raise ValueError(f"num_fewshot={num_fewshot} needs fewshot_file= (the solved examples to show)")

    def load(self) -> tuple[list[dict], list[dict]]:
        """``(questions, shots)``, validated; read once per task object."""
        if getattr(self, "_loaded", None) is None:
            self._loaded = self.docs()
        return self._loaded

    def docs(self) -> tuple[list[dict], list[dict]]:
        """``(questions, shots)``, validated."""
        if not self.data_file.is_file():
            raise FileNotFoundError(
                f"{self.data_file}: no such file. Pass data_file= a .jsonl, .json or .parquet file of records "
                "{question, choices: [texts], answer: index or letter}"
            )
        docs = [check_doc(r, f"{self.data_file}, record {i}") for i, r in enumerate(read_records(self.data_file))]
        docs = docs[: self.limit] if self.limit is not None else docs
        shots: list[dict] = []
        if self.num_fewshot:
            pool = read_records(self.fewshot_file)
            if self.num_fewshot > len(pool):
                raise ValueError(f"num_fewshot={self.num_fewshot} but {self.fewshot_file} holds {len(pool)} examples")
            shots = [check_doc(r, f"{self.fewshot_file}, record {i}") for i, r in enumerate(pool[: self.num_fewshot])]
        return docs, shots

    def run(self, lm, progress: bool = True) -> TaskResult:
        docs, shots = self.load()
        contexts = [build_context(self.description, shots, doc) for doc in docs]
        before = lm.stats.copy() if hasattr(lm, "stats") else None
        scores = score_choices(lm, contexts, [len(d["choices"]) for d in docs], progress=progress)
        samples = [choice_record(doc, s) for doc, s in zip(docs, scores, strict=True)]
        correct = [s["acc"] for s in samples]
        info = {"data_file": str(self.data_file), "fewshot_file": self.fewshot_file and str(self.fewshot_file)}
        if before is not None:
            info["scoring"] = lm.stats.since(before).to_dict()
        return TaskResult(
            metrics={"acc": metrics.mean(correct)},
            stderr={"acc": metrics.mean_stderr(correct)},
            n=len(docs),
            num_fewshot=self.num_fewshot,
            samples=samples,
            info=info,
        )
