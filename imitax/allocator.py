"""How the C library's allocator treats large freed blocks: kept for reuse, or handed back to the OS.

XLA's CPU runtime allocates each execution's temporaries (a GPT-2-124M train step: about 2.8 GB)
with ``malloc`` and frees them when the execution ends. glibc serves blocks that large with a fresh
``mmap`` and unmaps them at ``free``, so the next step page-faults every page again and the kernel
zeroes it: measured, 839,000 faults and 1.2-1.4 s of system time per GPT-2 step, 18% of its CPU
time (``benchmarks/results/train_profile.md``; in an idle A/B of GPT-2-124M's train step, 7.4 s
of system time per step without it and 1.0 s with it, 9.2 s against 5.8 s a step). Two
policies, one per kind of process:

* :func:`keep_freed_memory`, for processes that run the same programs over and over (training,
  evaluation, serving, a sweep's cells): one arena, no ``mmap`` for large blocks, and no trimming,
  so freed temporaries stay in the heap for the next step. The process keeps its peak heap, which
  a training process needs again at its next step anyway. The cost is memory: what was freed
  before the first step (an initialization's copy of the weights) stays in the heap as a hole
  that a larger block cannot use, so the resident set can exceed the compiled step's peak by
  that much (the 16-layer LLaMA-1B train step, 19.1 GiB compiled, reached 23.2 GiB and was
  killed on a 24 GiB machine). A run that only just fits should turn it off by setting any
  ``MALLOC_*`` variable (``MALLOC_ARENA_MAX=8`` gives glibc's defaults back).
* :func:`release_freed_memory`, for a process whose peak is what matters (``scripts/convert.py``:
  each tensor is read once and dropped): blocks of 1 MiB or more are mapped and unmapped, so that
  freed tensors leave the resident set at once.

Both are ``mallopt`` calls made at start-up, the same settings as glibc's ``MALLOC_*`` environment
variables (which cannot be set from inside a running process). There is no library for this:
the standard library has no binding for ``mallopt``, so it goes through ``ctypes``. A user who set
any of those variables, or ``GLIBC_TUNABLES``, keeps their choice; on a C library that is not glibc
(macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

__all__ = ["keep_freed_memory", "release_freed_memory"]

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What keep_freed_memory sets, named by the environment variables a user could have set instead.
# mallopt takes an int, and glibc converts it to a size_t for the trim threshold: -1 is SIZE_MAX,
# "never trim" (a threshold of 2**36 would be truncated to 0, "always trim").
KEEP_SETTINGS = {"MALLOC_ARENA_MAX": 1, "MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": -1}
_OPTIONS = {
    "MALLOC_ARENA_MAX": _M_ARENA_MAX,
    "MALLOC_MMAP_MAX_": _M_MMAP_MAX,
    "MALLOC_TRIM_THRESHOLD_": _M_TRIM_THRESHOLD,
}


def _glibc():
    """glibc's handle, or None on another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _user_chose(environ: Mapping[str, str]) -> bool:
    return "GLIBC_TUNABLES" in environ or any(k.startswith("MALLOC_") for k in environ)


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Keeps large freed blocks in the process for reuse (call at start-up, before JAX runs anything).

    Returns:
      Whether the settings were applied: False on a C library that is not glibc, or when the
      user set ``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment.
    """
    libc = _glibc()
    if libc is None or _user_chose(os.environ if environ is None else environ):
        return False
    return all(libc.mallopt(_OPTIONS[name], value) == 1 for name, value in KEEP_SETTINGS.items())


def release_freed_memory() -> bool:
    """Maps every block of 1 MiB or more on its own, so that freeing it returns it to the OS at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    per-tensor buffers come from the heap and stay resident once freed: converting a 2.2 GB
    bfloat16 model kept 0.7 GB of freed tensors resident. A fixed threshold turns that off.

    Returns:
      Whether the setting was applied (False on a C library that is not glibc).
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1
