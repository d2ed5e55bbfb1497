"""Any multiple-choice question set, scored by log-likelihood: letter choices (MMLU style) or cloze (ARC style).

>>> result = tasks.get("multiple_choice")(data_file="questions.jsonl").run(lm)
>>> result = tasks.get("multiple_choice")(data_file="questions.jsonl", scoring="cloze").run(lm)
>>> result.metrics["acc"], result.metrics["acc_norm"]                 # acc_norm: cloze only

Data: a JSON Lines (or JSON array, or Parquet) file of records with
``question`` (text), ``choices`` (2 to 26 texts) and ``answer`` (the index of
the right choice, or its letter). Zero-shot by default; few-shot examples are
the first ``num_fewshot`` records of ``fewshot_file``, in order.

``scoring="letters"`` (default; the harness's MMLU prompt). Each prompt is::

    {description}{shot question}\\nA. {choice}\\nB. {choice}...\\nAnswer: {letter}\\n\\n...
    {question}\\nA. {choice}\\nB. {choice}...\\nAnswer:

and the continuations `` A``, `` B``... are scored; the prediction is the most
likely one (ties go to the first), as the harness's ``acc``.

``scoring="cloze"`` (the harness's ARC, PIQA, HellaSwag style: the model never
sees the other choices, so it suits small models that cannot pick a letter)::

    {description}Question: {shot question}\\nAnswer: {right choice}\\n\\n...Question: {question}\\nAnswer:

and each choice's text is scored as the continuation `` {choice}``. ``acc``
takes the most likely choice; ``acc_norm`` the one with the highest
log-likelihood per character of the choice text, ``ll / len(choice)``: what
the harness computes (``completion_len = [len(choice) for choice in choices]``
in ``ConfigurableTask.process_results``: characters of the choice, not its
UTF-8 bytes, which differ only for non-ASCII text; the harness's rule is kept
so that the numbers match its numbers).

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
from imitax.eval.tasks.registry import TaskResult, register

__all__ = [
    "LETTERS",
    "SCORINGS",
    "MultipleChoice",
    "build_cloze_context",
    "build_context",
    "format_question",
    "read_records",
    "score_choices",
]

LETTERS = string.ascii_uppercase
SCORINGS = ("letters", "cloze")


def format_question(question: str, choices: Sequence[str]) -> str:
    """``{question}\\nA. {choice}\\nB. {choice}...\\nAnswer:`` (the question stripped, as the harness's MMLU)."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_context(description: str, shots: Sequence[dict[str, Any]], doc: dict[str, Any]) -> str:
    """The prompt of ``doc``: the description, each solved shot and its ``\\n\\n``, then ``doc``'s question."""
    solved = "".join(f"{format_question(s['question'], s['choices'])} {LETTERS[s['answer']]}\n\n" for s in shots)
    return description + solved + format_question(doc["question"], doc["choices"])


def build_cloze_context(description: str, shots: Sequence[dict[str, Any]], doc: dict[str, Any]) -> str:
    """The cloze prompt of ``doc``: ``Question: {question}\\nAnswer:`` after the solved shots (the harness's ARC)."""
    solved = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return f"{description}{solved}Question: {doc['question']}\nAnswer:"


def score_cloze(lm, contexts: Sequence[str], docs: Sequence[dict[str, Any]], progress: bool = True) -> list[list]:
    """Log-likelihoods of each doc's choices as continuations `` {choice}`` of its context."""
    requests = [(context, f" {c}") for context, doc in zip(contexts, docs, strict=True) for c in doc["choices"]]
    scores = iter(lm.loglikelihood(requests, progress=progress))
    return [[next(scores) for _ in doc["choices"]] for doc in docs]


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


def cloze_record(doc: dict[str, Any], scores: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """:func:`choice_record` plus the length-normalized prediction (``pred_norm``, ``acc_norm``)."""
    record = choice_record(doc, scores)
    # The harness divides by len(choice) with no guard; an empty choice text would divide by zero there.
    normalized = [ll / max(len(c), 1) for ll, c in zip(record["loglikelihoods"], doc["choices"], strict=True)]
    record["pred_norm"] = int(np.argmax(normalized))
    record["acc_norm"] = float(record["pred_norm"] == doc["answer"])
    return record


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
      scoring: ``'letters'`` (score `` A``, `` B``...) or ``'cloze'`` (score each choice's text; adds ``acc_norm``).
      seed: accepted for a uniform task interface; nothing here is random.
    """

    def __init__(
        self,
        data_file: str | pathlib.Path,
        num_fewshot: int = 0,
        fewshot_file: str | pathlib.Path | None = None,
        description: str = "",
        limit: int | None = None,
        scoring: str = "letters",
        seed: int = 0,
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
        self.scoring = scoring
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
        before = lm.stats.copy() if hasattr(lm, "stats") else None
        if self.scoring == "cloze":
            contexts = [build_cloze_context(self.description, shots, doc) for doc in docs]
            scores = score_cloze(lm, contexts, docs, progress=progress)
            samples = [cloze_record(doc, s) for doc, s in zip(docs, scores, strict=True)]
        else:
            contexts = [build_context(self.description, shots, doc) for doc in docs]
            scores = score_choices(lm, contexts, [len(d["choices"]) for d in docs], progress=progress)
            samples = [choice_record(doc, s) for doc, s in zip(docs, scores, strict=True)]
        names = ("acc", "acc_norm") if self.scoring == "cloze" else ("acc",)
        info = {
            "data_file": str(self.data_file),
            "fewshot_file": self.fewshot_file and str(self.fewshot_file),
            "scoring_method": self.scoring,
        }
        if before is not None:
            info["scoring"] = lm.stats.since(before).to_dict()
        return TaskResult(
            metrics={k: metrics.mean([s[k] for s in samples]) for k in names},
            stderr={k: metrics.mean_stderr([s[k] for s in samples]) for k in names},
            n=len(docs),
            num_fewshot=self.num_fewshot,
            samples=samples,
            info=info,
        )
