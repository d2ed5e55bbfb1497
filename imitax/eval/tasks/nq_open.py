"""Natural Questions (open domain): k-shot greedy answers scored by exact match, as the harness's ``nq_open``.

>>> result = tasks.get("nq_open")(num_fewshot=3).run(lm)                             # the hub dataset
>>> result = tasks.get("nq_open")(data_file="nq_dev.jsonl", fewshot_file="nq_train.jsonl").run(lm)
>>> result.metrics["exact_match"], result.stderr["exact_match"]

The prompt (the harness's ``nq_open.yaml``, version 4.0: ``description``,
``doc_to_text: "Q: {{question}}?\\\\nA:"``, ``target_delimiter: " "``,
``fewshot_delimiter: "\\\\n"``; a shot shows its first gold answer)::

    Answer these questions:\\\\n\\\\n
    Q: {shot question}?\\\\nA: {shot answer}\\\\n      (num_fewshot times)
    Q: {question}?\\\\nA:

The model continues it greedily up to ``max_gen_toks`` tokens and the text
before the first newline is its answer; ``exact_match`` is 1 when the answer
equals any gold answer after SQuAD normalization (lower case, no punctuation,
no articles, single spaces; :func:`imitax.eval.metrics.exact_match`), as the
study scored NQ. Two differences from the harness, both settable: the harness
also stops at ``.`` and ``,`` (``until=("\\\\n", ".", ",")`` reproduces that; it
cuts answers such as "Washington, D.C." short) and ignores case, punctuation
and articles with its own regular expressions. ``max_gen_toks`` defaults to 32,
not the harness's 256: NQ-open keeps only answers of at most five tokens, so a
longer generation cannot match, and a rambling model would otherwise decode 8x
longer for nothing.

Few-shot examples. With a separate pool (the hub's or TFDS's ``train`` split,
or ``fewshot_file=``) each question gets its own ``num_fewshot`` examples
drawn as the harness draws them: one ``random.Random(seed)`` (``seed`` default
1234, the harness's ``fewshot_random_seed``), and for each question in order
``rng.sample(pool, num_fewshot)``; with the hub dataset this gives the
harness's prompts. ``fewshot_sampler='first_n'`` uses the pool's first
examples for every question instead. With ``data_file=`` and no
``fewshot_file``, the data file's own first ``num_fewshot`` records are the
examples for every question and are not scored (``info['scored_from']``).

Data, in this order of preference (nothing touches the network when
``data_file`` is given):

* ``data_file=``: JSON Lines (or JSON array, or Parquet) records
  ``{"question": str, "answer": [str, ...]}`` (a single string answer is
  accepted), and optionally ``fewshot_file=`` in the same schema;
* ``source='hf'`` (default): the hub dataset ``google-research-datasets/nq_open``
  through ``datasets`` (``validation`` scored, ``train`` for the examples);
* ``source='tfds'``: TFDS ``natural_questions_open`` through
  ``tfds.data_source`` (array_record files already prepared under
  ``tfds_data_dir``; nothing is downloaded).
"""

from __future__ import annotations

import pathlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from imitax.eval import metrics
from imitax.eval.tasks.multiple_choice import read_records
from imitax.eval.tasks.registry import TaskResult, generate_until, register

__all__ = ["DESCRIPTION", "HUB_DATASET", "TFDS_NAME", "NQOpen", "format_question", "prompt"]

HUB_DATASET = "google-research-datasets/nq_open"
TFDS_NAME = "natural_questions_open"
DESCRIPTION = "Answer these questions:\n\n"
SOURCES = ("hf", "tfds")
SAMPLERS = ("random", "first_n")

_HOW_TO_SUPPLY = (
    "Supply local files instead: data_file=FILE (and optionally fewshot_file=FILE), JSON Lines records "
    '{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]} '
    "(scripts/evaluate.py: --nq_file=FILE [--nq_fewshot_file=FILE])"
)


def format_question(question: str) -> str:
    """``Q: {question}?\\nA:`` (the harness's ``doc_to_text``)."""
    return f"Q: {question}?\nA:"


def prompt(doc: dict[str, Any], shots: Sequence[dict[str, Any]], description: str = DESCRIPTION) -> str:
    """The k-shot prompt of ``doc``: the description, each shot with its first answer, then ``doc``'s question."""
    solved = "".join(f"{format_question(s['question'])} {s['answer'][0]}\n" for s in shots)
    return description + solved + format_question(doc["question"])


# -- data -----------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check(record: Any, where: str) -> dict[str, Any]:
    """``{question, answer: [str, ...]}`` from a record (TFDS bytes and numpy arrays decoded)."""
    if not isinstance(record, dict) or record.get("question") is None or record.get("answer") is None:
        raise ValueError(f"{where}: needs question and answer (a list of gold answers)")
    answers = record["answer"]
    answers = [answers] if isinstance(answers, str | bytes) else list(np.asarray(answers, dtype=object).ravel())
    answers = [_text(a) for a in answers]
    if not answers or not all(a.strip() for a in answers):
        raise ValueError(f"{where}: answer must hold at least one non-empty gold answer, got {record['answer']!r}")
    return {"question": _text(record["question"]), "answer": answers}


def _read_file(path: str | pathlib.Path, what: str) -> list[dict[str, Any]]:
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NQ-open {what}. {_HOW_TO_SUPPLY}")
    return [_check(r, f"{path}, record {i}") for i, r in enumerate(read_records(path))]


def load_hub(name: str, split: str, fewshot_split: str | None) -> tuple[list, list, dict[str, Any]]:
    """``(docs, pool, info)`` from the hub dataset through ``datasets``."""
    import datasets  # Imported here: it takes seconds, and local files do not need it.

    try:
        docs = datasets.load_dataset(name, split=split)
        pool = datasets.load_dataset(name, split=fewshot_split) if fewshot_split else []
    except Exception as e:  # Offline, missing, renamed: datasets raises many types; the cure is the same.
        raise FileNotFoundError(
            f"could not load the hub dataset {name!r} ({type(e).__name__}: {e}). {_HOW_TO_SUPPLY}"
        ) from e
    info = {"source": "hf", "dataset": name, "split": split, "fewshot_split": fewshot_split}
    return (
        [_check(r, f"{name}:{split}, record {i}") for i, r in enumerate(docs)],
        [_check(r, f"{name}:{fewshot_split}, record {i}") for i, r in enumerate(pool)],
        info,
    )


def load_tfds(name: str, split: str, fewshot_split: str | None, data_dir: str | None) -> tuple[list, list, dict]:
    """``(docs, pool, info)`` from a prepared TFDS dataset through ``tfds.data_source`` (array_record)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "source='tfds' needs TensorFlow Datasets: pip install tensorflow-datasets array-record"
        ) from e
    try:
        docs = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        pool = tfds.data_source(name, split=fewshot_split, data_dir=data_dir, download=False) if fewshot_split else []
    except Exception as e:  # Not prepared, wrong directory, old file format: the cure is the same.
        raise FileNotFoundError(
            f"could not open the TFDS dataset {name!r} (data_dir={data_dir}) ({type(e).__name__}: {e}). Prepare it "
            f"once with `tfds build {name}` (needs TensorFlow) into tfds_data_dir, or: {_HOW_TO_SUPPLY}"
        ) from e
    info = {"source": "tfds", "dataset": name, "split": split, "fewshot_split": fewshot_split, "data_dir": data_dir}
    return (
        [_check(docs[i], f"tfds:{name}:{split}, record {i}") for i in range(len(docs))],
        [_check(pool[i], f"tfds:{name}:{fewshot_split}, record {i}") for i in range(len(pool))],
        info,
    )


# -- the task -------------------------------------------------------------------------------------


@register("nq_open")
class NQOpen:
    """NQ-open exact match (see the module docstring).

    Args:
      num_fewshot: solved examples before each question (default 3, the study's setting).
      limit: evaluate only the first ``limit`` questions.
      data_file: local questions ``{question, answer: [...]}``; when given, nothing is downloaded.
      fewshot_file: local examples in the same schema (default: see the module docstring).
      source: ``'hf'`` or ``'tfds'``, where the data comes from when ``data_file`` is not given.
      hub_dataset, split, fewshot_split: the hub (or TFDS) dataset and its splits.
      tfds_name, tfds_data_dir: the TFDS dataset and the directory it was prepared in.
      fewshot_sampler: ``'random'`` (the harness's per-question draw) or ``'first_n'``.
      description: text before the examples (the harness's).
      until: stop strings; the answer is the text before the first (default: a newline).
      max_gen_toks: the longest answer, in tokens.
      seed: the few-shot sampler's seed (the harness's default 1234).
    """

    def __init__(
        self,
        num_fewshot: int = 3,
        limit: int | None = None,
        data_file: str | pathlib.Path | None = None,
        fewshot_file: str | pathlib.Path | None = None,
        source: str = "hf",
        hub_dataset: str = HUB_DATASET,
        split: str = "validation",
        fewshot_split: str = "train",
        tfds_name: str = TFDS_NAME,
        tfds_data_dir: str | None = None,
        fewshot_sampler: str = "random",
        description: str = DESCRIPTION,
        until: Sequence[str] | str = ("\n",),
        max_gen_toks: int = 32,
        seed: int = 1234,
    ):
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
        if fewshot_sampler not in SAMPLERS:
            raise ValueError(f"unknown fewshot_sampler {fewshot_sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if fewshot_file is not None and data_file is None:
            raise ValueError("fewshot_file= needs data_file= (the questions to score) as well")
        self.num_fewshot, self.limit, self.data_file, self.fewshot_file = num_fewshot, limit, data_file, fewshot_file
        self.source, self.hub_dataset, self.split, self.fewshot_split = source, hub_dataset, split, fewshot_split
        self.tfds_name, self.tfds_data_dir, self.fewshot_sampler = tfds_name, tfds_data_dir, fewshot_sampler
        self.description, self.max_gen_toks, self.seed = description, max_gen_toks, seed
        self.until = [until] if isinstance(until, str) else list(until)

    def load(self) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], dict[str, Any]]:
        """``(questions, their few-shot examples, info)``; read once per task object.

        Raises:
          FileNotFoundError: the data cannot be found or loaded (the message says how to supply local files).
          ValueError: a bad record, or more shots asked than examples available.
        """
        if getattr(self, "_loaded", None) is not None:
            return self._loaded
        k = self.num_fewshot
        pool_split = self.fewshot_split if k else None
        if self.data_file is not None:
            docs = _read_file(self.data_file, "data file")
            info: dict[str, Any] = {"source": "local", "data_file": str(self.data_file)}
            if self.fewshot_file is not None:
                pool = _read_file(self.fewshot_file, "few-shot file")
                info["fewshot_file"] = str(self.fewshot_file)
            else:  # The file's own first records are the examples, and are not scored.
                if k >= len(docs):
                    raise ValueError(
                        f"num_fewshot={k} but {self.data_file} holds {len(docs)} records: its first {k} are the "
                        "examples, leaving none to score (or pass fewshot_file=)"
                    )
                pool, docs = docs[:k], docs[k:]
                info["scored_from"] = k
        elif self.source == "hf":
            docs, pool, info = load_hub(self.hub_dataset, self.split, pool_split)
        else:
            docs, pool, info = load_tfds(self.tfds_name, self.split, pool_split, self.tfds_data_dir)
        if k > len(pool):
            raise ValueError(f"num_fewshot={k} but only {len(pool)} few-shot examples are available")
        docs = docs[: self.limit] if self.limit is not None else docs
        own_examples = self.data_file is not None and self.fewshot_file is None
        if own_examples or self.fewshot_sampler == "first_n":
            shots = [pool[:k]] * len(docs)
            info["fewshot_sampler"] = "first_n"
        else:  # The harness's ContextSampler: one Random(seed), rng.sample(pool, k) per question, in order.
            rng = random.Random(self.seed)
            shots = [[pool[i] for i in rng.sample(range(len(pool)), k)] for _ in docs]
            info["fewshot_sampler"], info["seed"] = "random", self.seed
        self._loaded = (docs, shots, info)
        return self._loaded

    def generation_settings(self) -> dict[str, Any]:
        return {"until": list(self.until), "max_gen_toks": self.max_gen_toks, "temperature": 0.0}

    def run(self, lm, progress: bool = True) -> TaskResult:
        docs, shots, info = self.load()
        contexts = [prompt(doc, s, self.description) for doc, s in zip(docs, shots, strict=True)]
        settings = self.generation_settings()
        outputs = generate_until(lm, [(c, dict(settings)) for c in contexts], progress)
        if len(outputs) != len(contexts):
            raise ValueError(f"the LM returned {len(outputs)} answers for {len(contexts)} questions")
        samples = []
        for doc, context, output in zip(docs, contexts, outputs, strict=True):
            answer = output
            for stop in self.until:  # The LM cuts already; cutting again protects against one that does not.
                if stop:
                    answer = answer.split(stop)[0]
            answer = answer.strip()
            samples.append(
                {
                    "question": doc["question"],
                    "target": doc["answer"],
                    "context": context,
                    "answer": answer,
                    "normalized": metrics.normalize_answer(answer),
                    "exact_match": metrics.exact_match(answer, doc["answer"]),
                }
            )
        scores = [s["exact_match"] for s in samples]
        info = {**info, "generation": settings}
        return TaskResult(
            metrics={"exact_match": metrics.mean(scores)},
            stderr={"exact_match": metrics.mean_stderr(scores)},
            n=len(samples),
            num_fewshot=self.num_fewshot,
            samples=samples,
            info=info,
        )
