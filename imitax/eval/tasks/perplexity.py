"""Perplexity of held-out chat data, rendered in the training format.

>>> result = tasks.get("perplexity")(data_file="heldout.jsonl", template="koala").run(lm)
>>> result.metrics["bits_per_byte"], result.metrics["token_perplexity"]

Data: any file or hub source the trainer reads (ShareGPT, OpenAI messages,
Alpaca, HC3, plain text; see :mod:`imitax.data.formats`), each conversation
rendered to text with one of :data:`imitax.data.TEMPLATES` (special tokens as
their text, which the tokenizer reads back as the special tokens).

What is measured (a choice). The whole rendered conversation, user turns and
role labels included, is scored with ``loglikelihood_rolling`` (the harness's
disjoint windows over ``max_length``), as the harness's perplexity tasks
(wikitext) score a document. This compares models on one tokenizer-independent
footing (``bits_per_byte``, ``byte_perplexity``, ``word_perplexity``, as the
harness reports them), and ``token_perplexity`` for models that share a
tokenizer. The loss on the teacher's tokens only is the trainer's validation
loss, which measures what finetuning optimizes; this task measures how well
the model predicts the conversations as a whole. Corpus-level ratios have no
per-example standard error here (the harness reports none either).
"""

from __future__ import annotations

import itertools
import math
import re

from imitax import data
from imitax.eval import encoding, metrics
from imitax.eval.tasks.registry import TaskResult, register

__all__ = ["Perplexity"]


@register("perplexity")
class Perplexity:
    """Rolling log-likelihood of rendered conversations (see the module docstring).

    Args:
      data_file: a data source spec as the trainer takes it (a file, a
        directory, a glob, or ``hf:NAME[:CONFIG]:SPLIT``).
      format: the record format, or ``'auto'`` to detect it.
      template: the turn format, one of :data:`imitax.data.TEMPLATES`.
      limit: score only the first ``limit`` conversations.
      num_fewshot: must be 0 (there is nothing to show).
      seed: accepted for a uniform task interface; nothing here is random.
    """

    def __init__(
        self,
        data_file: str,
        format: str = "auto",
        template: str = "koala",
        limit: int | None = None,
        num_fewshot: int = 0,
        seed: int = 0,
    ):
        if num_fewshot:
            raise ValueError(f"the perplexity task is zero-shot, got num_fewshot={num_fewshot}")
        if template not in data.TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {', '.join(data.TEMPLATES)}")
        self.data_file, self.format, self.template, self.limit, self.seed = data_file, format, template, limit, seed

    def load(self) -> tuple[list[data.Conversation], dict[str, int]]:
        """``(conversations, reading statistics)``; read once per task object."""
        if getattr(self, "_loaded", None) is None:
            stats = data.formats.new_stats()
            conversations = list(
                itertools.islice(data.load_conversations(self.data_file, self.format, stats=stats), self.limit)
            )
            if not conversations:
                raise ValueError(f"{self.data_file}: no conversations with a teacher turn")
            self._loaded = (conversations, stats)
        return self._loaded

    def run(self, lm, progress: bool = True) -> TaskResult:
        conversations, stats = self.load()
        encoder = data.Encoder(lm.tokenizer, self.template)
        texts = [encoder.render(conv) for conv in conversations]
        before = lm.stats.copy() if hasattr(lm, "stats") else None
        logprobs = lm.loglikelihood_rolling(texts, progress=progress)
        prefix = encoding.resolve_prefix_token_id(lm.tokenizer, getattr(lm, "prefix_token_id", None))
        # Counted as the LM encoded them for scoring (its add_bos_token decides whether a BOS is scored).
        bos = getattr(lm, "add_bos_token", None)
        tokens = [len(ids) for ids in encoding.tok_encode(lm.tokenizer, texts, prefix, add_bos_token=bos)]
        num_bytes = [len(t.encode("utf-8")) for t in texts]
        words = [len(re.split(r"\s+", t.strip())) for t in texts]
        total = math.fsum(logprobs)
        samples = [
            {"where": conv.where, "loglikelihood": lp, "tokens": n, "bytes": b, "words": w}
            for conv, lp, n, b, w in zip(conversations, logprobs, tokens, num_bytes, words, strict=True)
        ]
        info = {"data_file": str(self.data_file), "format": self.format, "template": self.template, "read": stats}
        if before is not None:
            info["scoring"] = lm.stats.since(before).to_dict()
        return TaskResult(
            metrics={
                "token_perplexity": metrics.perplexity(total, sum(tokens)),
                "word_perplexity": metrics.perplexity(total, sum(words)),
                "byte_perplexity": metrics.perplexity(total, sum(num_bytes)),
                "bits_per_byte": metrics.bits_per_byte(total, sum(num_bytes)),
                "loglikelihood": total,
                "tokens": float(sum(tokens)),
            },
            stderr={},
            n=len(conversations),
            num_fewshot=0,
            samples=samples,
            info=info,
        )
