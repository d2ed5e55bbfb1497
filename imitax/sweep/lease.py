"""Cell leases: a file in a cell's directory that says who runs the cell, so no two drivers run it.

Two drivers started on one sweep workdir (two shells, two SLURM array tasks, a Ray driver and a
local one) share the cells between them: before a driver runs a cell it takes the cell's lease,
``cells/<cell id>/lease.json``, and a cell
whose lease another live driver holds is left to that driver (the generated world and a base
model's pretraining have theirs too: ``world.lease.json``, ``base/<model>.lease.json``). The lease records its owner (a
random id per driver), the host and pid, and a heartbeat time that a thread of the owner rewrites
every ``heartbeat`` seconds. A lease is expired, and may be taken over, when its heartbeat is
older than ``timeout`` seconds, or at once when its owner's host is this host and its process is
gone (a driver killed with SIGKILL).

Taking a lease is one ``open(O_CREAT | O_EXCL)``, atomic on local file systems and on NFS v3+,
the shared file systems SLURM clusters use (object stores such as ``gs://`` have no exclusive
create: give each driver its own shard there, ``--cells=I/N``). Taking over an expired lease
renames it aside first (only one of several drivers can rename the same file), checks that what
it renamed is the expired lease it read, then creates its own. Hand-written, because the
lock libraries (filelock, fasteners) hold OS locks that end with the process or its NFS client
and record no owner or heartbeat that another host can read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from imitax import records

LEASE_FILE = "lease.json"
HEARTBEAT_S = 10.0
TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, read from its file."""

    owner: str
    host: str
    pid: int
    heartbeat: float
    path: str

    def age(self) -> float:
        return time.time() - self.heartbeat

    def alive(self, timeout: float) -> bool:
        """The owner still runs: a fresh heartbeat, and (on this host) a live process."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False
        return self.age() <= timeout

    def describe(self) -> str:
        return f"owner {self.owner} (pid {self.pid} on {self.host}, heartbeat {self.age():.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read(path: str | os.PathLike) -> Holder | None:
    """The lease at ``path`` (a lease file), or None when there is none (or it is unreadable)."""
    data = records.read_json(path)
    if not isinstance(data, dict):
        return None
    try:
        return Holder(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["heartbeat"]), str(path))
    except (KeyError, TypeError, ValueError):
        return None


class Leases:
    """The leases one driver holds, kept alive by one heartbeat thread.

    >>> with Leases() as leases:
    ...     if leases.acquire(cell_dir / LEASE_FILE):   # False: another live driver runs it
    ...         ...                                     # run the cell
    ...         leases.release(cell_dir / LEASE_FILE)
    """

    def __init__(self, owner: str | None = None, *, heartbeat: float = HEARTBEAT_S, timeout: float = TIMEOUT_S):
        self.owner = owner or uuid.uuid4().hex[:12]
        self.heartbeat = heartbeat
        self.timeout = timeout
        self._held: dict[str, epath.Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: list[str] = []  # leases another driver took over (this driver was thought dead)

    def __enter__(self) -> Leases:
        self._thread = threading.Thread(target=self._beat, name="imitax-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for key in list(self._held):
            self.release(key)

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def holder(self, path: str | os.PathLike) -> Holder | None:
        """The live holder of the lease at ``path`` other than this driver, or None."""
        held = read(path)
        if held is None or held.owner == self.owner or not held.alive(self.timeout):
            return None
        return held

    def acquire(self, path: str | os.PathLike) -> bool:
        """Takes the lease at ``path`` (a lease file); False when another live driver holds it."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another driver taking over an expired lease: look again
            if self._create(path):
                with self._lock:
                    self._held[str(path)] = path
                return True
            held = read(path)
            if held is not None and held.owner == self.owner:
                return True
            if held is not None and held.alive(self.timeout):
                return False
            if held is None and path.exists():  # being written this instant by its creator
                time.sleep(0.05)
                continue
            self._take_over(path, held)
        return False

    def _create(self, path: epath.Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._record()))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, path: epath.Path, expired: Holder | None) -> None:
        """Moves an expired lease aside (only if it is still the one read: a fresh one is put back)."""
        aside = path.parent / f".{path.name}.{self.owner}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another driver moved it first
        moved = read(aside)
        if expired is not None and moved is not None and moved != dataclasses.replace(expired, path=str(aside)):
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # a live lease taken in between: give it back
        aside.unlink(missing_ok=True)

    def release(self, path: str | os.PathLike) -> None:
        """Gives the lease at ``path`` up (when this driver still holds it)."""
        with self._lock:
            path = self._held.pop(str(epath.Path(path)), None)
        if path is not None:
            held = read(path)
            if held is not None and held.owner == self.owner:
                path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                held = dict(self._held)
            for key, path in held.items():
                current = read(path)
                if current is None or current.owner != self.owner:
                    with self._lock:
                        self._held.pop(key, None)
                    self.lost.append(key)
                    continue
                records.write_json(path, self._record())
