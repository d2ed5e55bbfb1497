"""MMLU (Hendrycks et al., 2021), k-shot, scored by log-likelihood exactly as the lm-evaluation-harness's ``mmlu``.

>>> result = tasks.get("mmlu")(num_fewshot=5, data_dir="data/mmlu").run(lm)
>>> result.metrics["acc"], result.metrics["acc_macro"], result.metrics["acc/anatomy"]

The prompt (the harness's ``mmlu/default`` task: ``_default_template_yaml`` and
``mmlu_<subject>.yaml``, ``fewshot_config.sampler: first_n``)::

    The following are multiple choice questions (with answers) about {subject, _ as spaces}.\\n\\n
    {dev question 1, stripped}\\nA. {choice}\\nB. {choice}\\nC. {choice}\\nD. {choice}\\nAnswer: {letter}\\n\\n
    ... (the first k dev examples of the subject, in order)
    {test question, stripped}\\nA. ...\\nD. {choice}\\nAnswer:

The continuations `` A``..`` D`` are scored by log-likelihood; the prediction
is the most likely (ties: the first). Metrics: ``acc`` (micro: over all
questions; its stderr is the exact one over all questions, where the harness
pools its subjects' stderrs), ``acc_macro`` (the plain mean over subjects),
``acc/<subject>`` and ``acc/<category>`` (stem, humanities, social_sciences,
other, weighted by size as the harness's groups).

Data (``data_dir=``, or the hub dataset ``cais/mmlu`` when it is not given).
A local directory in any of these layouts, read without touching the network:

* combined files ``dev.jsonl`` and ``test.jsonl`` (or ``.parquet``; the hub's
  ``dev-00000-of-00001.parquet`` names too), directly in the directory or in
  ``all/``, records in the ``cais/mmlu`` schema: ``question``, ``subject``,
  ``choices`` (four texts), ``answer`` (0-3);
* one subdirectory per subject holding such ``dev`` and ``test`` files (the
  directory names the subject);
* the original CSV release: ``dev/<subject>_dev.csv`` and
  ``test/<subject>_test.csv``, no header, columns question, A, B, C, D and the
  answer letter.
"""

from __future__ import annotations

import collections
import csv
import pathlib
import re
from typing import Any

from imitax.eval import metrics
from imitax.eval.tasks.multiple_choice import build_context, check_doc, choice_record, read_records, score_choices
from imitax.eval.tasks.registry import TaskResult, register

__all__ = ["CATEGORIES", "HUB_DATASET", "MMLU", "SUBJECTS", "description", "load_local", "prompt"]

HUB_DATASET = "cais/mmlu"

# The 57 subjects and the harness's category of each.
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
SPLITS = ("dev", "test")

_HOW_TO_SUPPLY = (
    "Supply local files with data_dir=DIR in one of these layouts: DIR/dev.jsonl and DIR/test.jsonl (or .parquet) "
    "with records {question, subject, choices: [4 texts], answer: 0-3} (the cais/mmlu schema); "
    "DIR/<subject>/dev.jsonl and DIR/<subject>/test.jsonl; or the original CSV release "
    "(DIR/dev/<subject>_dev.csv and DIR/test/<subject>_test.csv: question, A, B, C, D, answer letter; no header)."
)


def description(subject: str) -> str:
    """The harness's task description, which starts every prompt of ``subject``."""
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def prompt(doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The full k-shot prompt of ``doc`` (ending in ``Answer:``), as the harness builds it."""
    return build_context(description(doc["subject"]), shots, doc)


# -- data -----------------------------------------------------------------------------------------

Splits = dict[str, dict[str, list[dict[str, Any]]]]  # split -> subject -> docs, in file order


def _split_files(directory: pathlib.Path, split: str) -> list[pathlib.Path]:
    """``split.jsonl``/``.json``/``.parquet`` and the hub's ``split-00000-of-00001.parquet`` names, sorted."""
    pattern = re.compile(rf"{split}([.-].*)?\.(jsonl|json|parquet)$")
    return sorted(p for p in directory.glob(f"{split}*") if p.is_file() and pattern.fullmatch(p.name))


def _add(out: Splits, split: str, record: dict[str, Any], where: str, subject: str | None = None) -> None:
    subject = subject or record.get("subject")
    if not subject:
        raise ValueError(f"{where}: no subject (a combined file needs a subject field in every record)")
    doc = check_doc(record, where)
    if len(doc["choices"]) != 4:
        raise ValueError(f"{where}: MMLU questions have 4 choices, got {len(doc['choices'])}")
    out[split].setdefault(subject, []).append({**doc, "subject": subject})


def _read_files(out: Splits, split: str, files: list[pathlib.Path], subject: str | None = None) -> None:
    for path in files:
        for i, record in enumerate(read_records(path)):
            _add(out, split, record, f"{path}, record {i}", subject)


def load_local(data_dir: str | pathlib.Path) -> tuple[Splits, dict[str, Any]]:
    """Reads a local MMLU directory in any layout of the module docstring.

    Returns:
      ``({'dev': {subject: docs}, 'test': {subject: docs}}, info)`` where
      ``info`` names the layout and the files read.

    Raises:
      FileNotFoundError: the directory holds none of the layouts (the message says how to supply them).
    """
    root = pathlib.Path(data_dir).expanduser()
    out: Splits = {split: {} for split in SPLITS}
    if not root.is_dir():
        raise FileNotFoundError(f"MMLU data directory {root} does not exist. {_HOW_TO_SUPPLY}")
    files: list[pathlib.Path] = []
    csv_files = {split: sorted((root / split).glob(f"*_{split}.csv")) for split in SPLITS}
    for combined in (root, root / "all"):
        found = {split: _split_files(combined, split) if combined.is_dir() else [] for split in SPLITS}
        if all(found.values()):
            layout = "combined"
            for split in SPLITS:
                _read_files(out, split, found[split])
                files += found[split]
            break
    else:
        subject_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _split_files(d, "test")]
        if subject_dirs:
            layout = "per_subject"
            for d in subject_dirs:
                for split in SPLITS:
                    _read_files(out, split, _split_files(d, split), subject=d.name)
                    files += _split_files(d, split)
        elif csv_files["test"]:
            layout = "csv"
            for split in SPLITS:
                for path in csv_files[split]:
                    _read_csv(out, split, path)
                    files.append(path)
        else:
            raise FileNotFoundError(f"no MMLU data found in {root}. {_HOW_TO_SUPPLY}")
    return out, {"source": "local", "data_dir": str(root), "layout": layout, "files": [str(f) for f in files]}


def _read_csv(out: Splits, split: str, path: pathlib.Path) -> None:
    subject = path.name[: -len(f"_{split}.csv")]
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) != 6:
                raise ValueError(f"{path}, row {i}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            record = {"question": row[0], "choices": row[1:5], "answer": row[5]}
            _add(out, split, record, f"{path}, row {i}", subject)


def load_hub(name: str = HUB_DATASET) -> tuple[Splits, dict[str, Any]]:
    """Reads the hub dataset's ``all`` config (dev and test splits) with ``datasets``.

    Raises:
      FileNotFoundError: it could not be loaded (offline, say); the message says how to supply local files.
    """
    import datasets  # Imported here: it takes seconds, and local files do not need it.

    out: Splits = {split: {} for split in SPLITS}
    try:
        loaded = {split: datasets.load_dataset(name, "all", split=split) for split in SPLITS}
    except Exception as e:  # Offline, missing, renamed: datasets raises many types; the cure is the same.
        message = f"could not load the hub dataset {name!r} ({type(e).__name__}: {e}). {_HOW_TO_SUPPLY}"
        raise FileNotFoundError(message) from e
    for split, dataset in loaded.items():
        for i, record in enumerate(dataset):
            _add(out, split, record, f"{name}:all:{split}, record {i}")
    return out, {"source": "hub", "dataset": name, "config": "all"}


# -- the task -------------------------------------------------------------------------------------


@register("mmlu")
class MMLU:
    """MMLU with the harness's prompt and metrics (see the module docstring).

    Args:
      num_fewshot: solved dev examples before each question (default 5, the study's setting).
      limit: evaluate only the first ``limit`` test questions of each subject (as the harness's ``--limit``).
      subjects: the subjects to evaluate (default: every subject in the data).
      data_dir: a local directory (see the module docstring); ``None`` reads the hub dataset.
      hub_dataset: the hub dataset to read when ``data_dir`` is ``None``.
      seed: accepted for a uniform task interface; the first-k shots involve no randomness.
    """

    def __init__(
        self,
        num_fewshot: int = 5,
        limit: int | None = None,
        subjects: list[str] | tuple[str, ...] | str | None = None,
        data_dir: str | pathlib.Path | None = None,
        hub_dataset: str = HUB_DATASET,
        seed: int = 0,
    ):
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.num_fewshot, self.limit, self.seed = num_fewshot, limit, seed
        self.subjects = [subjects] if isinstance(subjects, str) else subjects
        self.data_dir, self.hub_dataset = data_dir, hub_dataset

    def load(self) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """``(test docs, shots per subject, info)``, with the subject selection, limit and shot count checked.

        The data is read once per task object (the evaluator reads every task's data before running any).
        """
        if getattr(self, "_loaded", None) is None:
            self._loaded = self._read()
        docs, shots, info = self._loaded
        return docs, shots, dict(info)

    def _read(self):
        splits, info = load_local(self.data_dir) if self.data_dir is not None else load_hub(self.hub_dataset)
        available = sorted(splits["test"])
        subjects = list(self.subjects) if self.subjects is not None else available
        missing = [s for s in subjects if s not in splits["test"]]
        if missing:
            raise ValueError(f"no test questions for subjects {missing}; the data has {available}")
        docs, shots = [], {}
        for subject in subjects:
            dev = splits["dev"].get(subject, [])
            if self.num_fewshot > len(dev):
                raise ValueError(
                    f"num_fewshot={self.num_fewshot} but subject {subject!r} has only {len(dev)} dev examples"
                )
            shots[subject] = dev[: self.num_fewshot]
            test = splits["test"][subject]
            docs += test[: self.limit] if self.limit is not None else test
        info["subjects"] = subjects
        return docs, shots, info

    def run(self, lm, progress: bool = True) -> TaskResult:
        docs, shots, info = self.load()
        contexts = [prompt(doc, shots[doc["subject"]]) for doc in docs]
        before = lm.stats.copy() if hasattr(lm, "stats") else None
        scores = score_choices(lm, contexts, [4] * len(docs), progress=progress)
        samples = [{"subject": d["subject"], **choice_record(d, s)} for d, s in zip(docs, scores, strict=True)]
        if before is not None:
            info["scoring"] = lm.stats.since(before).to_dict()
        return TaskResult(**_aggregate(samples), n=len(docs), num_fewshot=self.num_fewshot, samples=samples, info=info)


def _aggregate(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Micro, macro, per-subject and per-category accuracies with their standard errors."""
    by_subject: dict[str, list[float]] = collections.defaultdict(list)
    for s in samples:
        by_subject[s["subject"]].append(s["acc"])
    by_category: dict[str, list[float]] = collections.defaultdict(list)
    for subject, values in by_subject.items():
        by_category[SUBJECTS.get(subject, "other")] += values
    everything = [s["acc"] for s in samples]
    subject_means = [metrics.mean(v) for v in by_subject.values()]
    values = {"acc": metrics.mean(everything), "acc_macro": metrics.mean(subject_means)}
    stderr = {
        "acc": metrics.mean_stderr(everything),
        "acc_macro": metrics.unweighted_mean_stderr([metrics.mean_stderr(v) for v in by_subject.values()]),
    }
    for name, group in [*sorted(by_category.items()), *sorted(by_subject.items())]:
        values[f"acc/{name}"], stderr[f"acc/{name}"] = metrics.mean(group), metrics.mean_stderr(group)
    return {"metrics": values, "stderr": stderr}
