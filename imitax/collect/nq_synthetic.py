"""The study's NQ-synthetic recipe: ask the teacher for new Natural Questions-style question-answer pairs.

Each request shows the teacher ``examples`` pairs drawn from a seed file of NQ-style records
(``{"question", "answer": [...]}``, the file the ``nq_open`` task reads) and asks for ``pairs``
new ones in the same ``Q:``/``A:`` form (:data:`PROMPT`). Request ``i`` draws its examples with
``random.Random(seed + i)``, so a rerun asks the same prompts under the same ids and resumes.

The replies are parsed strictly (:func:`parse_pairs`): a pair is a ``Q:`` line followed by an
``A:`` line (list numbering and Markdown bold tolerated); answers longer than
:data:`MAX_ANSWER_WORDS` words are dropped, as NQ-open keeps only short answers. Pairs are
deduplicated on the normalized question (SQuAD normalization, :func:`imitax.eval.metrics.normalize_answer`),
and questions that copy a seed example are dropped. The result is written twice: as training
conversations (ShareGPT: the question as the user turn, the answer as the teacher turn) and as an
NQ-style file that ``scripts/evaluate.py --nq_file`` reads.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from imitax import records
from imitax.collect.prompts import Prompt
from imitax.eval import metrics

PROMPT = (
    "Here are some questions people ask a search engine, each with a short answer (a few words, as in the "
    "Natural Questions dataset):\n\n{examples}\n\n"
    "Write {pairs} new questions of the same kind, on different topics, each with its correct short answer. "
    'Use exactly the same format: a line starting with "Q:" and the next line starting with "A:". '
    "Write nothing else."
)
MAX_ANSWER_WORDS = 5
_LINE = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*)?(?:\*\*)?(Q|A)(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*?)\s*(?:\*\*)?\s*$")


def build_prompts(seed_pairs: Sequence[dict[str, Any]], n: int, examples: int = 5, pairs: int = 10, seed: int = 0):
    """``n`` generation prompts, ids ``nq_synthetic-{i}``, each with ``examples`` seed pairs drawn by ``seed + i``."""
    if examples < 1 or examples > len(seed_pairs):
        raise ValueError(f"--nq_examples must be in [1, {len(seed_pairs)}] (the seed file's pairs), got {examples}")
    if n < 1 or pairs < 1:
        raise ValueError(f"--nq_requests and --nq_pairs must be >= 1, got {n} and {pairs}")
    out = []
    for i in range(n):
        shown = random.Random(seed + i).sample(list(seed_pairs), examples)
        text = "\n".join(f"Q: {p['question']}\nA: {p['answer'][0]}" for p in shown)
        out.append(Prompt(f"nq_synthetic-{i}", (PROMPT.format(examples=text, pairs=pairs),), where=f"request {i}"))
    return out


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs of one reply: each ``Q:`` line with the ``A:`` line right after it.

    A ``Q:`` without an ``A:`` next, an ``A:`` without a ``Q:`` before, empty fields and answers of
    more than :data:`MAX_ANSWER_WORDS` words are left out. A trailing ``?`` is removed from the
    question (NQ stores questions without one; the ``nq_open`` prompt adds it).
    """
    lines = [m.groups() for m in map(_LINE.match, text.splitlines()) if m]
    found = []
    for (kind, question), (next_kind, answer) in zip(lines, lines[1:], strict=False):
        if kind == "Q" and next_kind == "A":
            question = question.rstrip("?").strip()
            if question and answer and len(answer.split()) <= MAX_ANSWER_WORDS:
                found.append((question, answer))
    return found


def dedupe(pairs: Iterable[tuple[str, str]], exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The first pair of every normalized question, without those in ``exclude`` (the seed questions)."""
    seen = {metrics.normalize_answer(q) for q in exclude}
    out = []
    for question, answer in pairs:
        key = metrics.normalize_answer(question)
        if key and key not in seen:
            seen.add(key)
            out.append((question, answer))
    return out


def write_outputs(collected: Sequence[dict[str, Any]], seed_pairs: Sequence[dict[str, Any]], train_file, nq_file):
    """Parses every collected reply (in request order), dedupes, writes both files atomically; returns counts."""
    ordered = sorted(collected, key=lambda r: int(r["id"].rsplit("-", 1)[1]))
    parsed = [pair for r in ordered for pair in parse_pairs(r["conversations"][-1]["value"])]
    kept = dedupe(parsed, (p["question"] for p in seed_pairs))
    train = [
        {"id": f"nq_synthetic-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate(kept)
    ]
    records.write_lines(train_file, [records.dumps(r) + "\n" for r in train])
    records.write_lines(nq_file, [records.dumps({"question": q, "answer": [a]}) + "\n" for q, a in kept])
    return {"replies": len(ordered), "parsed": len(parsed), "kept": len(kept)}


def output_paths(out: str | os.PathLike) -> tuple[str, str]:
    """``(training conversations, NQ-style file)`` beside the collected replies: ``X.train.jsonl``, ``X.nq.jsonl``."""
    stem = os.fspath(out).removesuffix(".jsonl")
    return f"{stem}.train.jsonl", f"{stem}.nq.jsonl"
