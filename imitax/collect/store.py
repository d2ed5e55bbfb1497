"""The collected file: JSON Lines, appended and flushed one whole record at a time, resumable.

Why append rather than the atomic rewrite of :mod:`imitax.records`: a collection runs for hours
and a kill must cost at most the requests in flight, so every record is on disk as soon as it is
answered. Each record is one ``write`` of one line followed by a flush; a process killed in the
middle of that write leaves a last line without its newline, which :func:`open_store` cuts off
on the next run (that record was never counted as collected, so it is asked for again). Nothing
else is ever rewritten, so a record once complete is never lost or duplicated.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import IO, Any

from imitax import records


class StoreError(ValueError):
    """The output file holds something other than collected records (a line that is not one)."""


def scan(path: str | os.PathLike) -> tuple[set[str], int]:
    """``(ids already collected, byte length of the complete lines)`` of ``path`` (empty when missing).

    A last line without a newline is a torn write and is not counted; any other bad line raises.

    Raises:
      StoreError: a complete line that is not a JSON object with a string ``id``, or an id twice.
    """
    ids: set[str] = set()
    good = 0
    if not os.path.exists(path):
        return ids, good
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # torn by a kill mid-write: dropped and asked for again
            if line.strip():
                record_id = _record_id(line)
                if record_id is None:
                    raise StoreError(f"{path}, line {lineno}: not a collected record (no JSON object with an id)")
                if record_id in ids:
                    raise StoreError(f"{path}, line {lineno}: id {record_id!r} appears twice")
                ids.add(record_id)
            good += len(line)
    return ids, good


def _record_id(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None


class Store:
    """Appends records to a JSON Lines file, one flushed line each (see the module docstring).

    The file is locked (``flock``, released when the process ends, however it ends) while a store
    is open, so a second collection into the same file is refused instead of duplicating records.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.done, good = scan(self.path)
        except BlockingIOError:
            self._file.close()
            raise StoreError(
                f"{self.path} is being written by another collection; wait for it or pick another file"
            ) from None
        except BaseException:
            self._file.close()
            raise
        if os.path.getsize(self.path) > good:
            os.truncate(self.path, good)  # the torn last line of a killed run

    def append(self, record: dict[str, Any]) -> None:
        if record["id"] in self.done:
            raise ValueError(f"record {record['id']!r} is already in {self.path}")
        self._file.write(records.dumps(record) + "\n")
        self._file.flush()
        self.done.add(record["id"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a collected file, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
