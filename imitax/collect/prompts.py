"""Prompt files -> :class:`Prompt` (the user turns a teacher is asked to answer).

A prompt source is what the trainer reads (a file, directory, glob or ``hf:NAME[:CONFIG]:SPLIT``;
see :func:`imitax.data.formats.resolve_sources`), in one of these formats, detected per source from
the keys of its first record:

* ``prompt``: ``{"id", "prompt"}`` (optionally ``"system"``): one single-turn prompt.
* ``sharegpt`` / ``messages``: a conversation; its user turns are the prompts, in order, and the
  teacher answers each one seeing its own earlier answers (the conversation's own teacher turns
  are dropped). A leading system turn is kept and sent.
* ``alpaca``: ``{"instruction", "input"}`` (``"output"`` optional and ignored): the user turn is
  built exactly as the trainer builds it.

A record's ``id`` is its ``id`` field when it has one, else ``"<source>:<index>"``; ids must be
unique across all sources, because a rerun skips the ids already collected.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

from imitax.data import formats
from imitax.data.formats import USER, DataError

# name -> keys whose presence identifies the format (tried in order).
PROMPT_FORMATS = {
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt": ("prompt",),
    "alpaca": ("instruction",),
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What one collected record answers: the user turns, in order, and the system text.

    Attributes:
      id: unique across the prompt sources.
      turns: the user turns; the teacher answers each in order.
      system: system text sent first, or None.
      where: where it came from (``'path, line 3'``), for messages.
    """

    id: str
    turns: tuple[str, ...]
    system: str | None = None
    where: str = ""

    def messages(self, answers: Sequence[str] = ()) -> list[dict[str, str]]:
        """The chat messages that ask for turn ``len(answers)``: system, then user/assistant pairs."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, answer in zip(self.turns, answers, strict=False):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": self.turns[len(answers)]}]


def detect(record: Any, where: str) -> str:
    """The prompt format of ``record`` (one of :data:`PROMPT_FORMATS`)."""
    if isinstance(record, dict):
        for name, keys in PROMPT_FORMATS.items():
            if all(record.get(k) is not None for k in keys):
                return name
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    expected = "; ".join(f"{n}: {', '.join(k)}" for n, k in PROMPT_FORMATS.items())
    raise DataError(where, f"unknown prompt format: keys {keys} (expected {expected})")


def _user_turns(record: dict, fmt: str) -> tuple[tuple[str, ...], str | None]:
    """``(user turns, system)`` of a record, through the trainer's own parsers."""
    if fmt == "prompt":
        prompt, system = record.get("prompt"), record.get("system")
        if not isinstance(prompt, str):
            raise formats._Invalid("prompt", "missing" if prompt is None else "expected a string")
        if not (system is None or isinstance(system, str)):
            raise formats._Invalid("system", "expected a string")
        return (prompt,), system
    if fmt == "alpaca":  # The trainer's parser needs an output; a prompt file need not have one.
        record = {**record, "output": record.get("output") or ""}
    parse = {"sharegpt": formats.parse_sharegpt, "messages": formats.parse_messages, "alpaca": formats.parse_alpaca}
    (conversation,) = parse[fmt](record)
    return tuple(text for role, text in conversation.turns if role == USER), conversation.system


def read_prompts(specs: str | Sequence[str], limit: int | None = None) -> tuple[list[Prompt], dict[str, int]]:
    """The prompts of ``specs`` (comma-separated or a list), in order, and counts per format.

    Records without a non-empty user turn are skipped and counted as ``no_prompt``.

    Raises:
      DataError: a record in an unknown format or with bad fields, or an id seen twice (names both places).
      FileNotFoundError, ValueError: a source that does not exist or is not a JSON/JSONL/Parquet file.
    """
    specs = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    prompts, seen, counts = [], {}, {"no_prompt": 0}
    for prompt in _iter_prompts(specs, counts):
        if prompt.id in seen:
            raise DataError(prompt.where, f"id {prompt.id!r} already used at {seen[prompt.id]}; ids must be unique")
        seen[prompt.id] = prompt.where
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts, counts


def _iter_prompts(specs: list[str], counts: dict[str, int]) -> Iterator[Prompt]:
    for source in formats.resolve_sources(specs):
        fmt = None
        label = source.name if source.path is None else os.path.basename(source.path)
        for index, (where, record) in enumerate(formats.iter_records(source)):
            if isinstance(record, formats._Unreadable):
                raise DataError(where, record.message)
            fmt = fmt or detect(record, where)
            try:
                if not isinstance(record, dict):
                    raise formats._Invalid(None, f"expected an object, got {type(record).__name__}")
                turns, system = _user_turns(record, fmt)
            except formats._Invalid as e:  # the trainer's parsers' error, located here as the trainer does
                raise DataError(where, e.message, e.field) from None
            if not turns or not all(t.strip() for t in turns):
                counts["no_prompt"] += 1
                continue
            counts[fmt] = counts.get(fmt, 0) + 1
            given = record.get("id")
            yield Prompt(str(given) if given is not None else f"{label}:{index}", turns, system, where)
