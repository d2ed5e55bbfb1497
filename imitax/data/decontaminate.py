"""Decontamination: which imitation-data records share n-grams with the benchmarks' items.

>>> index = Index(load_benchmarks("mmlu:data/mmlu,nq_open:nq.jsonl"), n=13)
>>> report, clean = scan("collected.jsonl", index)

Text is compared as normalized tokens: Unicode NFKC, lower case, runs of letters and digits
(``\\w+``), so punctuation, case and spacing do not hide a copy. A record is every text of it (the
system text and all turns, joined, so a question in one turn and its answer in the next are one
run of tokens); an item is the texts its benchmark shows or scores (:data:`SEGMENTS`), each
taken on its own. A record overlaps an item when they share an ``n``-gram (13 by default, as
GPT-3's and Tulu's contamination reports used). An item text shorter than ``n`` tokens but of at
least ``min_tokens`` (default 8, GPT-3's smallest ``n``) counts as one gram that a record must
contain whole; shorter texts (an NQ question of five words, an MMLU choice) are too short to
tell a copy from a coincidence and are counted as ``too_short`` in the report, not matched.

Benchmarks are read by the evaluator's own loaders, so decontamination sees exactly the items the
evaluation scores: ``mmlu:DIR`` (:func:`imitax.eval.tasks.mmlu.load_local`, dev and test),
``nq_open:FILE``, ``humaneval:FILE`` (:func:`imitax.eval.tasks.humaneval.load_problems`) and
``style:FILE`` (the tasks' ``load``).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from imitax.data import formats
from imitax.data.formats import DataError

NGRAM = 13
MIN_TOKENS = 8
_WORD = re.compile(r"\w+")
# benchmark -> the fields of an item whose text is matched (see the loaders below).
SEGMENTS = {
    "mmlu": "question, each choice",
    "nq_open": "question; question followed by each gold answer",
    "humaneval": "prompt (signature and docstring), canonical solution",
    "style": "prompt, reference answer",
}


def tokens(text: str) -> list[str]:
    """Normalized tokens: NFKC, lower case, ``\\w+`` runs."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark item: ``benchmark``, an ``id`` within it, and the texts matched."""

    benchmark: str
    id: str
    texts: tuple[str, ...]


def _mmlu(path: str) -> list[Item]:
    from imitax.eval.tasks import mmlu

    splits, _ = mmlu.load_local(path)
    return [
        Item("mmlu", f"{subject}/{split}/{i}", (doc["question"], *doc["choices"]))
        for split, subjects in splits.items()
        for subject, docs in subjects.items()
        for i, doc in enumerate(docs)
    ]


def _nq_open(path: str) -> list[Item]:
    from imitax.eval import tasks

    docs = tasks.get("nq_open")(data_file=path, num_fewshot=0).load()[0]
    return [
        Item("nq_open", str(i), (d["question"], *(f"{d['question']} {a}" for a in d["answer"])))
        for i, d in enumerate(docs)
    ]


def _humaneval(path: str) -> list[Item]:
    from imitax.eval.tasks import humaneval

    problems, _ = humaneval.load_problems(path)
    return [Item("humaneval", p["task_id"], (p["prompt"], p["canonical_solution"])) for p in problems]


def _style(path: str) -> list[Item]:
    from imitax.eval import tasks

    pairs, _ = tasks.get("style")(data_file=path).load()
    return [Item("style", str(i), (p["prompt"], p["reference"])) for i, p in enumerate(pairs)]


LOADERS = {"mmlu": _mmlu, "nq_open": _nq_open, "humaneval": _humaneval, "style": _style}


def parse_against(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """``'mmlu:DIR,nq_open:FILE'`` (or its parts) -> ``[('mmlu', 'DIR'), ('nq_open', 'FILE')]``."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    out = []
    for part in parts:
        name, sep, path = part.partition(":")
        if not sep or name not in LOADERS or not path:
            raise ValueError(f"--against: {part!r} is not BENCHMARK:PATH with BENCHMARK one of {', '.join(LOADERS)}")
        out.append((name, path))
    if not out:
        raise ValueError(
            f"--against names no benchmark; give BENCHMARK:PATH items, BENCHMARK one of {', '.join(LOADERS)}"
        )
    return out


def load_benchmarks(spec: str | Sequence[str]) -> dict[str, tuple[str, list[Item]]]:
    """``{name: (path, items)}`` for every ``BENCHMARK:PATH`` of ``spec``, read by the evaluator's loaders."""
    out = {}
    for name, path in parse_against(spec):
        if name in out:
            raise ValueError(f"--against: {name} given twice ({out[name][0]} and {path})")
        out[name] = (path, LOADERS[name](path))
    return out


class Index:
    """Every item's grams -> the items holding them (see the module docstring for what a gram is)."""

    def __init__(self, benchmarks: dict[str, tuple[str, list[Item]]], n: int = NGRAM, min_tokens: int = MIN_TOKENS):
        if n < 1 or not 1 <= min_tokens <= n:
            raise ValueError(f"need --ngram >= 1 and 1 <= --min_tokens <= --ngram, got {n} and {min_tokens}")
        self.n, self.min_tokens = n, min_tokens
        self.items: list[Item] = []
        self.grams: dict[tuple[str, ...], set[int]] = {}
        self.stats = {
            name: {"source": path, "items": len(items), "too_short": 0} for name, (path, items) in benchmarks.items()
        }
        for _, items in benchmarks.values():
            for item in items:
                self._add(item)
        self.lengths = sorted({len(g) for g in self.grams})

    def _add(self, item: Item) -> None:
        index, usable = len(self.items), False
        self.items.append(item)
        for text in item.texts:
            toks = tokens(text)
            if len(toks) < self.min_tokens:
                continue
            usable = True
            for gram in _windows(toks, min(self.n, len(toks))):
                self.grams.setdefault(gram, set()).add(index)
        if not usable:
            self.stats[item.benchmark]["too_short"] += 1

    def matches(self, text: str) -> dict[int, list[tuple[str, ...]]]:
        """``{item index: the grams of it found in text}``."""
        toks, found = tokens(text), {}
        for length in self.lengths:
            for gram in _windows(toks, length):
                for index in self.grams.get(gram, ()):
                    found.setdefault(index, []).append(gram)
        return found


def _windows(toks: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def record_text(record: Any, parse) -> str:
    """All texts of a training record (system and every turn), one per line."""
    texts = []
    for conversation in parse(formats._dict(record, None)):
        texts += [conversation.system or ""] + [text for _, text in conversation.turns]
    return "\n".join(texts)


def iter_data(specs: str | Iterable[str]) -> Iterator[tuple[str, Any, str]]:
    """``(where, raw record, its text)`` for every record of the data sources, in order.

    Raises:
      DataError: a record in no known format or with bad fields (names the file and line).
    """
    for source in formats.resolve_sources(specs.split(",") if isinstance(specs, str) else specs):
        parse = None
        for where, record in formats.iter_records(source):
            try:
                if isinstance(record, formats._Unreadable):
                    raise DataError(where, record.message)
                parse = parse or formats.FORMATS[formats.detect_format(record)][0]
                text = record_text(record, parse)
            except formats._Invalid as e:  # the trainer's parsers' error, located as the trainer does
                raise DataError(where, e.message, e.field) from None
            yield where, record, text


def scan(specs: str | Iterable[str], index: Index, max_shown: int = 3) -> tuple[dict[str, Any], list[Any]]:
    """``(report, records that overlap nothing)`` of the data ``specs`` against ``index``.

    The report: counts per benchmark (items, ``too_short``, items and records overlapping) and one
    entry per overlapping (record, item) pair with the number of shared grams and a few of them.
    """
    stats = {name: dict(s, items_overlapping=0, records_overlapping=0) for name, s in index.stats.items()}
    overlaps, clean, hit_items, total = [], [], set(), 0
    for where, record, text in iter_data(specs):
        total += 1
        found = index.matches(text)
        if not found:
            clean.append(record)
            continue
        record_id = record.get("id") if isinstance(record.get("id"), str | int) else None
        for benchmark in {index.items[i].benchmark for i in found}:
            stats[benchmark]["records_overlapping"] += 1
        for i, grams in sorted(found.items()):
            item = index.items[i]
            hit_items.add(i)
            shown = [" ".join(g) for g in dict.fromkeys(grams)][:max_shown]
            overlaps.append(
                {
                    "record": record_id,
                    "where": where,
                    "benchmark": item.benchmark,
                    "item": item.id,
                    "ngrams": len(set(grams)),
                    "shared": shown,
                }  # fmt: skip
            )
    for i in hit_items:
        stats[index.items[i].benchmark]["items_overlapping"] += 1
    report = {
        "ngram": index.n,
        "min_tokens": index.min_tokens,
        "records": total,
        "contaminated": total - len(clean),
        "benchmarks": stats,
        "overlaps": overlaps,
    }
    return report, clean
