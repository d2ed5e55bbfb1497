"""Style imitation: how a model's answers compare with a teacher's on held-out prompts (the study's style metrics).

>>> result = tasks.get("style")(data_file="heldout.jsonl").run(lm)
>>> result.metrics["list_recall"], result.metrics["unigram_f1"], result.metrics["length_corr"]

The study found that imitation models pick up the teacher's *style* quickly:
they write a list when the teacher would, close with a summary paragraph, use
its words and match its answer lengths. This task measures exactly that.

Data (``data_file=``): a ``.jsonl``/``.json`` file of ``{"prompt": str,
"reference": str}`` records (optionally ``"system"``), or any chat data the
trainer reads (a file, directory, glob or ``hf:NAME[:CONFIG]:SPLIT``; ShareGPT,
OpenAI messages, Alpaca, HC3; see :mod:`imitax.data.formats`), where the
prompt is a conversation's first user turn and the reference the teacher turn
right after it (the system text is kept; conversations without such a pair
are skipped and counted).

The model's answer: the prompt rendered with the training turn template
(``template='koala'``, :mod:`imitax.data.templates`) up to the start of the
teacher's turn, e.g. ``BEGINNING OF CONVERSATION: USER: {prompt} GPT:``,
continued greedily (``lm.generate_until``) for at most ``max_gen_toks`` tokens
and cut at the end of the turn: the tokenizer's end-of-text token, the text
``</s>`` or ``USER:`` (koala, vicuna), ``<|im_end|>`` or ``<|im_start|>``
(chatml); then stripped of surrounding whitespace. The task checks that the
LM's tokenization of each prompt equals the trainer's token ids
(``info['prompts_tokenized_as_in_training']``).

Per answer (and per reference), with ``words`` = ``len(text.split())``:

* ``has_list``: at least two lines that start (after indentation) with ``-``,
  ``*``, ``•``, ``N.`` or ``N)`` followed by whitespace (:func:`has_list`).
* ``has_summary``: the text has at least two paragraphs (separated by a blank
  line) and the last one starts (after leading punctuation such as ``**``)
  with a cue of :data:`SUMMARY_CUES`, matched lower-cased as whole words
  (:func:`has_summary`).

Metrics (means over prompts unless said; each mean has its standard error):

* ``list_rate``, ``teacher_list_rate``: fraction of model / teacher answers with a list.
* ``list_agreement``: fraction of prompts where the model uses a list iff the teacher does.
* ``list_recall``: among prompts where the teacher uses a list, the fraction where the model does
  ("uses a list when the teacher does"; ``nan`` when the teacher never does).
* ``summary_rate``, ``teacher_summary_rate``, ``summary_agreement``, ``summary_recall``: the same
  for a closing summary paragraph.
* ``unigram_f1``, ``unigram_precision``, ``unigram_recall``: SQuAD's token overlap of the answer
  with the reference after SQuAD normalization (:func:`imitax.eval.metrics.unigram_overlap`;
  recall: the share of the reference's words the answer contains).
* ``answer_words``, ``reference_words``: mean lengths in words.
* ``length_corr``: Pearson correlation of answer and reference lengths in words across prompts
  (``nan``, i.e. ``null`` in JSON, with fewer than 2 prompts or constant lengths; no stderr).
* ``length_ratio``: mean answer words / mean reference words (no stderr).
"""

from __future__ import annotations

import itertools
import pathlib
import re
from collections.abc import Sequence
from typing import Any

from imitax import data
from imitax.data.formats import TEACHER, USER, Conversation
from imitax.eval import encoding, metrics
from imitax.eval.tasks.multiple_choice import read_records
from imitax.eval.tasks.registry import TaskResult, generate_until, register

__all__ = ["SUMMARY_CUES", "Style", "has_list", "has_summary", "style_metrics"]

# Openings of a closing summary paragraph, lower-case (matched as whole words at the paragraph's start).
SUMMARY_CUES = (
    "in summary",
    "to summarize",
    "to summarise",
    "to sum up",
    "summing up",
    "in conclusion",
    "in short",
    "in brief",
    "overall",
    "all in all",
    "in a nutshell",
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_LEADING_PUNCTUATION = re.compile(r"^[^\w]+")
_CUE = re.compile(r"^(?:" + "|".join(re.escape(c) for c in SUMMARY_CUES) + r")\b")
# End of the model's turn, per template (besides the tokenizer's end-of-text token).
_TURN_ENDS = {
    "koala": ("</s>", "USER:"),
    "vicuna": ("</s>", "USER:"),
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "chat_template": ("</s>",),
}


def has_list(text: str) -> bool:
    """Whether ``text`` holds a list: two or more lines starting with ``-``, ``*``, ``•``, ``N.`` or ``N)``."""
    return sum(bool(_LIST_ITEM.match(line)) for line in text.splitlines()) >= 2


def has_summary(text: str) -> bool:
    """Whether ``text`` ends with a summary paragraph: a last paragraph (after a blank line) opening with a cue."""
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()]
    if len(paragraphs) < 2:
        return False
    return bool(_CUE.match(_LEADING_PUNCTUATION.sub("", paragraphs[-1].strip().lower())))


def _rate(values: Sequence[float]) -> tuple[float, float]:
    return metrics.mean(values), metrics.mean_stderr(values)


def style_metrics(samples: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, stderr)`` from per-example records (as :meth:`Style.run` writes them)."""
    values: dict[str, float] = {}
    stderr: dict[str, float] = {}

    def put(name, numbers):
        values[name], stderr[name] = _rate([float(x) for x in numbers])

    for feature in ("list", "summary"):
        model = [s[f"answer_{feature}"] for s in samples]
        teacher = [s[f"reference_{feature}"] for s in samples]
        put(f"{feature}_rate", model)
        put(f"teacher_{feature}_rate", teacher)
        put(f"{feature}_agreement", [m == t for m, t in zip(model, teacher, strict=True)])
        put(f"{feature}_recall", [m for m, t in zip(model, teacher, strict=True) if t])
    for name in ("unigram_f1", "unigram_precision", "unigram_recall", "answer_words", "reference_words"):
        put(name, [s[name] for s in samples])
    answer_words = [s["answer_words"] for s in samples]
    reference_words = [s["reference_words"] for s in samples]
    values["length_corr"] = metrics.pearson(answer_words, reference_words)
    total = sum(reference_words)
    values["length_ratio"] = sum(answer_words) / total if total else float("nan")
    return values, stderr


def _pairs_from_records(records: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    pairs = []
    for i, r in enumerate(records):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("reference"), str):
            raise ValueError(f"{where}, record {i}: needs string fields prompt and reference")
        system = r.get("system")
        pairs.append({"prompt": r["prompt"], "reference": r["reference"], "system": system, "where": f"{where}, {i}"})
    return pairs


def _pair_from_conversation(conv: Conversation) -> dict[str, Any] | None:
    """The first user turn and the teacher turn right after it (None when there is no such pair)."""
    for (role, text), (next_role, next_text) in itertools.pairwise(conv.turns):
        if role == USER and next_role == TEACHER and next_text.strip():
            return {"prompt": text, "reference": next_text, "system": conv.system, "where": conv.where}
    return None


@register("style")
class Style:
    """The study's style metrics against a teacher's answers (see the module docstring).

    Args:
      data_file: ``{prompt, reference}`` records, or chat data in any format the trainer reads.
      format: ``'auto'`` (``{prompt, reference}`` records if the file's first record has both
        fields, else the trainer's detection), ``'pairs'``, or one of :data:`imitax.data.FORMATS`.
      template: the training turn format, one of :data:`imitax.data.TEMPLATES`.
      max_gen_toks: the longest answer, in tokens (default 256).
      limit: evaluate only the first ``limit`` prompts.
      num_fewshot: must be 0.
      seed: accepted for a uniform task interface; decoding is greedy.
    """

    def __init__(
        self,
        data_file: str | pathlib.Path,
        format: str = "auto",
        template: str = "koala",
        max_gen_toks: int = 256,
        limit: int | None = None,
        num_fewshot: int = 0,
        seed: int = 0,
    ):
        if num_fewshot:
            raise ValueError(f"the style task is zero-shot, got num_fewshot={num_fewshot}")
        if template not in data.TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {', '.join(data.TEMPLATES)}")
        if format not in ("auto", "pairs", *data.FORMATS):
            raise ValueError(f"unknown format {format!r}; known: auto, pairs, {', '.join(data.FORMATS)}")
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self.data_file, self.format, self.template = str(data_file), format, template
        self.max_gen_toks, self.limit, self.num_fewshot, self.seed = max_gen_toks, limit, num_fewshot, seed

    def load(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``(pairs, info)``: each pair's ``prompt``, ``reference``, ``system`` and ``where``; read once.

        Raises:
          FileNotFoundError: no such data (the message says what to supply).
          ValueError: bad records, or no usable prompt.
        """
        if getattr(self, "_loaded", None) is not None:
            return self._loaded
        path = pathlib.Path(self.data_file).expanduser()
        if not self.data_file.startswith("hf:") and not path.exists() and not any(c in self.data_file for c in "*?["):
            raise FileNotFoundError(
                f"{path}: no such style data. Pass data_file= a .jsonl/.json file of {{prompt, reference}} records "
                "(the teacher's reference answers to held-out prompts), or chat data the trainer reads "
                "(ShareGPT, messages, Alpaca, HC3)"
            )
        fmt, info = self.format, {"data_file": self.data_file, "template": self.template}
        if fmt == "auto" and path.is_file() and path.suffix in (".json", ".jsonl"):
            first = next(iter(read_records(path)), None)
            fmt = "pairs" if isinstance(first, dict) and {"prompt", "reference"} <= set(first) else "auto"
        if fmt == "pairs":
            pairs = _pairs_from_records(read_records(path), str(path))
            info["skipped"] = 0
        else:
            stats = data.formats.new_stats()
            conversations = data.load_conversations(self.data_file, fmt, stats=stats)
            found = [_pair_from_conversation(c) for c in conversations]
            pairs = [p for p in found if p is not None]
            info["skipped"], info["read"] = len(found) - len(pairs), stats
        info["format"] = fmt
        pairs = pairs[: self.limit] if self.limit is not None else pairs
        if not pairs:
            raise ValueError(f"{self.data_file}: no prompt with a teacher answer to compare against")
        self._loaded = (pairs, info)
        return self._loaded

    def contexts(self, tokenizer, pairs: Sequence[dict[str, Any]]) -> tuple[list[str], list[Conversation]]:
        """Each prompt rendered as training renders it up to the teacher's turn, and the conversations rendered."""
        encoder = data.Encoder(tokenizer, self.template)
        conversations = [Conversation(((USER, p["prompt"]),), p["system"]) for p in pairs]
        return [encoder.render(c, prompt=True) for c in conversations], conversations

    def stop_sequences(self, tokenizer) -> list[str]:
        """Where the model's turn ends: the template's markers and the tokenizer's end-of-text text."""
        stops = list(_TURN_ENDS[self.template])
        eos = getattr(tokenizer, "eos_token", None)
        if isinstance(eos, str) and eos and eos not in stops:
            stops.append(eos)
        return stops

    def run(self, lm, progress: bool = True) -> TaskResult:
        pairs, info = self.load()
        info = dict(info)
        tokenizer = lm.tokenizer
        contexts, conversations = self.contexts(tokenizer, pairs)
        # The LM tokenizes the text; check that it reads each prompt exactly as training encoded it.
        prefix = encoding.resolve_prefix_token_id(tokenizer, getattr(lm, "prefix_token_id", None))
        encoder = data.Encoder(tokenizer, self.template)
        trained = [encoder.encode_prompt(c).tolist() for c in conversations]
        read = encoding.tok_encode(tokenizer, contexts, prefix, add_bos_token=getattr(lm, "add_bos_token", None))
        same = sum(a == b for a, b in zip(read, trained, strict=True))
        settings = {"until": self.stop_sequences(tokenizer), "max_gen_toks": self.max_gen_toks, "temperature": 0.0}
        outputs = generate_until(lm, [(c, dict(settings)) for c in contexts], progress)
        if len(outputs) != len(contexts):
            raise ValueError(f"the LM returned {len(outputs)} answers for {len(contexts)} prompts")

        samples = []
        for pair, output in zip(pairs, outputs, strict=True):
            answer = output
            for stop in settings["until"]:  # The LM cuts already; cutting again protects against one that does not.
                answer = answer.split(stop)[0]
            answer, reference = answer.strip(), pair["reference"].strip()
            overlap = metrics.unigram_overlap(answer, reference)
            samples.append(
                {
                    "where": pair["where"],
                    "prompt": pair["prompt"],
                    "reference": reference,
                    "answer": answer,
                    "answer_list": has_list(answer),
                    "reference_list": has_list(reference),
                    "answer_summary": has_summary(answer),
                    "reference_summary": has_summary(reference),
                    "unigram_f1": overlap["f1"],
                    "unigram_precision": overlap["precision"],
                    "unigram_recall": overlap["recall"],
                    "answer_words": len(answer.split()),
                    "reference_words": len(reference.split()),
                }
            )
        values, stderr = style_metrics(samples)
        info.update(generation=settings, prompts_tokenized_as_in_training=same, example_context=contexts[0])
        return TaskResult(values, stderr, n=len(samples), num_fewshot=0, samples=samples, info=info)
