"""Records on disk, one way for the trainer, the evaluator and the sweep: atomic JSON, provenance, fingerprints.

A record is written under a temporary name beside its destination and renamed into place, so a
reader (or a rerun after a kill) sees the old file or the new one, never half of one. Paths may
be local or remote (``gs://...``, through etils' epath); local files are also flushed to disk
before the rename.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

PACKAGES = ("imitax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "datasets")
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: ``nan``/``inf`` -> None, numpy -> Python, paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text of ``value`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(value), ensure_ascii=False, allow_nan=False, **kwargs)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Writes ``lines`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    if "://" in os.fspath(path):  # remote storage: no fsync; the store's rename is the commit
        remote = epath.Path(path)
        remote.parent.mkdir(parents=True, exist_ok=True)
        tmp = remote.parent / f".{remote.name}.tmp"
        tmp.write_text("".join(lines))
        tmp.replace(remote)
        return
    path = pathlib.Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes ``data`` as indented strict JSON, atomically."""
    write_lines(path, [dumps(data, indent=2, sort_keys=True) + "\n"])


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON data at ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(epath.Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able ``data`` (keys sorted)."""
    return hashlib.sha256(json.dumps(jsonable(data), sort_keys=True).encode()).hexdigest()[:16]


def git_revision() -> dict[str, Any] | None:
    """The commit of the imitax source tree and whether it has local changes (None outside a checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": head, "dirty": bool(status.strip())}


def provenance() -> dict[str, Any]:
    """Where a result came from: package versions, Python, host, devices, the code's git revision, time."""
    import jax

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    kinds: dict[str, int] = {}
    for device in jax.devices():
        kinds[device.device_kind] = kinds.get(device.device_kind, 0) + 1
    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "devices": {
            "backend": jax.default_backend(),
            "count": jax.device_count(),
            "local_count": jax.local_device_count(),
            "process_count": jax.process_count(),
            "kinds": kinds,
        },
        "git": git_revision(),
        "time": now(),
    }


# -- the workdir guard ----------------------------------------------------------------------------------


class ConfigMismatch(ValueError):
    """A workdir's saved config record differs from the current config; ``keys`` are the differing keys."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The top-level keys whose values differ between two config records, less ``ignore``, sorted."""
    ignored = set(ignore)
    return sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))


def check_config_record(
    path: str | os.PathLike,
    current: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    allow: bool = False,
    what: str = "a run",
    noun: str = "keys",
    fix: str = "Use another --workdir",
) -> list[str]:
    """Compares the config record saved at ``path`` with ``current``; returns the differing keys.

    The one guard of a workdir against a run of another config: the trainer's ``run_config.json``
    and the sweep's ``sweep_config.json``. No record yet (a new workdir, or a run that failed before
    it recorded its config) differs in nothing. Writing the record is the caller's business (the
    trainer writes it only once a step has trained).

    Args:
      path: the saved record (JSON).
      current: the current config, as JSON data (``json.loads(config.to_json_best_effort())``).
      ignore: keys that may differ (they do not change what is computed: steps to go, logging).
      allow: return the differing keys instead of raising (the caller resumes or moves the old run aside).
      what: what the workdir holds, for the message ("a run", "a sweep").
      noun: what the keys are called in the message ("keys", "fields").
      fix: the message's last sentence: what to do instead.

    Raises:
      ConfigMismatch: keys differ and ``allow`` is false; the message names the workdir, the keys and ``fix``.
    """
    saved = read_json(path)
    if saved is None:
        return []
    changed = differing_keys(saved, current, ignore)
    if changed and not allow:
        workdir = epath.Path(path).parent
        raise ConfigMismatch(
            f"{workdir} holds {what} with a different config (differing {noun}: {', '.join(changed)}). {fix}", changed
        )
    return changed
