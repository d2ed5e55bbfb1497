"""Readers: imitation-data records -> :class:`Conversation`.

A *source* is a local file, a directory (all its ``.json``/``.jsonl``/``.parquet`` files), a glob
pattern, or a Hugging Face hub dataset written ``hf:NAME``, ``hf:NAME:SPLIT`` or
``hf:NAME:CONFIG:SPLIT`` (split ``train`` when left out; ``NAME`` may also be a local dataset
directory, which is how the hub path is tested offline).

Record formats (``format=``; ``auto`` picks one per source from the keys of its first record):

* ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...]}``. ``from`` is ``human`` or
  ``user`` (a user turn), ``gpt``, ``chatgpt``, ``bard`` or ``assistant`` (a teacher turn), or
  ``system`` (the system text; only as the first turn).
* ``messages`` (OpenAI style): ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles
  ``system``/``user``/``assistant``; ``content`` is a string or a list of ``{"type": "text",
  "text": ...}`` parts, joined.
* ``alpaca``: ``{"instruction", "input" (optional), "output"}``: the user turn is the instruction,
  followed by a blank line and the input when the input is not empty; the teacher turn is the output.
* ``hc3``: ``{"question", "chatgpt_answers": [...]}``: one single-turn conversation per answer.
* ``text``: ``{"text": ...}``: a document, every token of which carries loss (no turn template).

Every record is checked field by field. A bad record raises :class:`DataError` naming the file, the
line (JSON Lines) or record index (JSON arrays, Parquet, hub datasets) and the field; with
``skip_invalid=True`` it is skipped and counted instead. Conversations without a non-empty teacher
turn (and empty documents) are dropped and counted as ``no_teacher``.

Why local JSON is parsed with the standard ``json`` module rather than ``datasets``: the records must
be validated exactly as written, with line numbers. ``datasets``' JSON loader unifies the schema
across records (a missing key becomes ``None``), casts between types, and re-encodes fields of mixed
types as JSON strings (in streaming mode ``{"output": "b"}`` next to ``{"output": 5}`` comes back as
the string ``'"b"'``, checked with datasets 5.2), and its parse errors name a row of the block it
was reading, not the file's line. Local Parquet files are read with ``pyarrow`` (what ``datasets``'
Parquet builder wraps) to avoid an Arrow copy in the HF cache and, in streaming mode, an import of
torch; hub datasets go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

USER = "user"
TEACHER = "teacher"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One training example: optional system text and ``(role, text)`` turns.

    Attributes:
      turns: ``(role, text)`` pairs; ``role`` is :data:`USER` or :data:`TEACHER`.
      system: system text, or None.
      document: plain text (``turns`` is one teacher turn); encoded without a turn template.
      where: where the record came from (``'path, line 3'``), for error messages.
    """

    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    document: bool = False
    where: str = dataclasses.field(default="", compare=False)

    @property
    def has_teacher(self) -> bool:
        return any(role == TEACHER and text.strip() for role, text in self.turns)


class DataError(ValueError):
    """A record that cannot be read; the message starts with where it is."""

    def __init__(self, where: str, message: str, field: str | None = None):
        self.where, self.field = where, field
        super().__init__(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


class _Invalid(Exception):
    """Raised by the parsers; the reader adds the location."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------------------------
# Record parsers: record (a dict) -> conversations.


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(record: dict, field: str, *, optional: bool = False) -> Any:
    """``record[key]`` where ``field`` is the key's full path (``'messages[2].role'``) for messages."""
    value = record.get(field.rsplit(".", 1)[-1])
    if value is None and not optional:
        raise _Invalid(field, "missing")
    return value


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_kind(value)}")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list | tuple):
        raise _Invalid(field, f"expected a list, got {_kind(value)}")
    return list(value)


def _dict(value: Any, field: str | None) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(field, f"expected an object, got {_kind(value)}")
    return value


def _turns(items: list, field: str, role_key: str, text_key: str, roles: dict[str, str], text: Callable):
    """Shared by ShareGPT and messages: a list of role/text dicts -> (system, turns)."""
    system, turns = None, []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        item = _dict(item, where)
        role = _str(_get(item, f"{where}.{role_key}"), f"{where}.{role_key}")
        content = text(_get(item, f"{where}.{text_key}"), f"{where}.{text_key}")
        mapped = roles.get(role.lower())
        if mapped is None:
            raise _Invalid(f"{where}.{role_key}", f"unknown role {role!r} (expected one of {sorted(roles)})")
        if mapped == "system":
            if turns or system is not None:
                raise _Invalid(f"{where}.{role_key}", "a system turn must come first")
            system = content
        else:
            turns.append((mapped, content))
    return system, tuple(turns)


SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": TEACHER, "chatgpt": TEACHER, "bard": TEACHER}
SHAREGPT_ROLES |= {"assistant": TEACHER, "system": "system"}
MESSAGE_ROLES = {"system": "system", "user": USER, "assistant": TEACHER}


def parse_sharegpt(record: dict) -> list[Conversation]:
    items = _list(_get(record, "conversations"), "conversations")
    system, turns = _turns(items, "conversations", "from", "value", SHAREGPT_ROLES, _str)
    return [Conversation(turns, system)]


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    parts = []
    for i, part in enumerate(_list(value, field)):
        part = _dict(part, f"{field}[{i}]")
        if part.get("type") != "text":
            raise _Invalid(f"{field}[{i}].type", f"only text parts are supported, got {part.get('type')!r}")
        parts.append(_str(_get(part, f"{field}[{i}].text"), f"{field}[{i}].text"))
    return "".join(parts)


def parse_messages(record: dict) -> list[Conversation]:
    items = _list(_get(record, "messages"), "messages")
    system, turns = _turns(items, "messages", "role", "content", MESSAGE_ROLES, _content)
    return [Conversation(turns, system)]


def parse_alpaca(record: dict) -> list[Conversation]:
    instruction = _str(_get(record, "instruction"), "instruction")
    extra = _get(record, "input", optional=True)
    extra = "" if extra is None else _str(extra, "input")
    output = _str(_get(record, "output"), "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [Conversation(((USER, user), (TEACHER, output)))]


def parse_hc3(record: dict) -> list[Conversation]:
    question = _str(_get(record, "question"), "question")
    answers = _list(_get(record, "chatgpt_answers"), "chatgpt_answers")
    answers = [_str(a, f"chatgpt_answers[{i}]") for i, a in enumerate(answers)]
    # No answer still yields one (teacher-less) conversation, so that the record is counted as dropped.
    return [Conversation(((USER, question), (TEACHER, a))) for a in answers] or [Conversation(((USER, question),))]


def parse_text(record: dict) -> list[Conversation]:
    return [Conversation(((TEACHER, _str(_get(record, "text"), "text")),), document=True)]


# name -> (parser, keys that identify the format in ``auto`` mode); detection tries them in order.
FORMATS: dict[str, tuple[Callable[[dict], list[Conversation]], tuple[str, ...]]] = {
    "sharegpt": (parse_sharegpt, ("conversations",)),
    "messages": (parse_messages, ("messages",)),
    "hc3": (parse_hc3, ("question", "chatgpt_answers")),
    "alpaca": (parse_alpaca, ("instruction", "output")),
    "text": (parse_text, ("text",)),
}


def detect_format(record: Any) -> str:
    record = _dict(record, None)
    for name, (_, keys) in FORMATS.items():
        if all(record.get(k) is not None for k in keys):
            return name
    expected = "; ".join(f"{n}: {', '.join(k)}" for n, (_, k) in FORMATS.items())
    raise _Invalid(None, f"no known format matches keys {sorted(record)} (expected {expected})")


# ---------------------------------------------------------------------------------------------
# Sources: specs -> files / hub datasets -> (where, record) pairs.


@dataclasses.dataclass(frozen=True)
class Source:
    """One local file, or one split of a hub dataset (``dataset`` is the loaded ``datasets.Dataset``)."""

    name: str
    path: str | None = None
    dataset: Any = dataclasses.field(default=None, compare=False, repr=False)

    def fingerprint(self) -> dict:
        """What identifies this source's content for the token cache (see ``cache.py``)."""
        if self.path is not None:
            st = os.stat(self.path)
            return {"path": os.path.abspath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        files = [f["filename"] for f in self.dataset.cache_files]
        stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        # In-memory datasets have no cache files; ``_fingerprint`` is datasets' own content hash.
        return {"hub": self.name, "files": stats, "fingerprint": getattr(self.dataset, "_fingerprint", None)}


def _expand(spec: str) -> list[str]:
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        return [os.path.join(spec, n) for n in names if n.endswith(FILE_SUFFIXES)]
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data source {spec!r} does not exist")
    return [spec]


def _load_hub(spec: str) -> Source:
    import datasets  # Imported here: it takes seconds, and local files do not need it.

    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad hub source {spec!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    dataset = datasets.load_dataset(name, config, split=split)
    return Source(name=f"hf:{name}{':' + config if config else ''}:{split}", dataset=dataset)


def resolve_sources(specs: str | Iterable[str]) -> list[Source]:
    """Expands paths, directories, globs and ``hf:`` specs into sources (files sorted by name).

    Raises:
      FileNotFoundError: a path that does not exist, or a pattern that matches no file.
      ValueError: a file that is not ``.json``, ``.jsonl`` or ``.parquet``.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    sources = []
    for spec in specs:
        if spec.startswith("hf:"):
            sources.append(_load_hub(spec))
            continue
        paths = _expand(os.path.expanduser(spec))
        if not paths:
            raise FileNotFoundError(f"data source {spec!r} matches no {'/'.join(FILE_SUFFIXES)} file")
        for path in paths:
            if not path.endswith(FILE_SUFFIXES):
                raise ValueError(f"{path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
            sources.append(Source(name=path, path=path))
    return sources


class _Unreadable:
    """Stands in for a record whose JSON text does not parse."""

    def __init__(self, message: str):
        self.message = message


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is skipped.
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # One JSON array of records.
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}", f"invalid JSON: {e.msg}") from None
            for i, record in enumerate(records):
                yield f"{path}, record {i}", record
            return
        for lineno, line in enumerate(f, start=1):  # JSON Lines.
            if not line.strip():
                continue
            try:
                yield f"{path}, line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}, line {lineno}", _Unreadable(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}, record {index}", record
            index += 1


def iter_records(source: Source) -> Iterator[tuple[str, Any]]:
    """Yields ``(where, record)`` for every record of ``source``, in order."""
    if source.path is None:
        for i, record in enumerate(source.dataset):
            yield f"{source.name}, record {i}", record
    elif source.path.endswith(".parquet"):
        yield from _iter_parquet(source.path)
    else:
        yield from _iter_json(source.path)


def new_stats() -> dict[str, int]:
    return {"records": 0, "invalid": 0, "no_teacher": 0, "conversations": 0}


def load_conversations(
    sources: str | Source | Iterable[str | Source],
    format: str = "auto",
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
) -> Iterator[Conversation]:
    """Yields the usable conversations of ``sources``, in order.

    Args:
      sources: specs (see the module docstring) or resolved :class:`Source` objects.
      format: a key of :data:`FORMATS`, or ``'auto'`` to detect it per source from its first record.
      skip_invalid: skip (and count) bad records instead of raising.
      stats: if given, updated in place: ``records`` read, ``invalid`` records skipped, conversations
        dropped for having ``no_teacher``, and ``conversations`` yielded.

    Raises:
      DataError: a bad record (unless ``skip_invalid``), or a JSON array file that does not parse.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r} (expected 'auto' or one of {sorted(FORMATS)})")
    if isinstance(sources, str | Source):
        sources = [sources]
    stats = new_stats() if stats is None else stats
    for source in sources:
        if isinstance(source, str):
            yield from load_conversations(resolve_sources(source), format, skip_invalid=skip_invalid, stats=stats)
            continue
        parse = None if format == "auto" else FORMATS[format][0]
        for where, record in iter_records(source):
            stats["records"] += 1
            try:
                if isinstance(record, _Unreadable):
                    raise DataError(where, record.message)
                if parse is None:
                    parse = FORMATS[detect_format(record)][0]
                conversations = parse(_dict(record, None))
            except (_Invalid, DataError) as e:
                if not skip_invalid:
                    raise (DataError(where, e.message, e.field) if isinstance(e, _Invalid) else e) from None
                stats["invalid"] += 1
                continue
            for conversation in conversations:
                if not conversation.has_teacher:
                    stats["no_teacher"] += 1
                    continue
                stats["conversations"] += 1
                yield dataclasses.replace(conversation, where=where)
