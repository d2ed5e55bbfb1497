"""imitax.allocator: freed large blocks are reused without page faults, and a user's own settings win."""

import os
import subprocess
import sys

import pytest

from imitax import allocator

# Allocates, fills and frees 256 MiB a few times, and prints the minor page faults of all but the
# first round: each fault is a page the kernel had to map (and zero) again.
_PROBE = """
import resource, sys
import numpy as np
from imitax import allocator
if sys.argv[1] == "keep":
    print(allocator.keep_freed_memory())
def round_():
    block = np.ones(64 << 20, np.float32)
    return float((block * 2)[-1])
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's; this C library is not glibc")


def _faults(mode: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    return out.stdout.split()


def test_freed_blocks_are_reused_without_faulting_their_pages_again():
    (default,) = _faults("default")
    applied, kept = _faults("keep")
    assert int(default) > 100  # glibc unmapped each 256 MiB block at free, and the next round faulted it in
    assert applied == "True" and int(kept) == 0


def test_a_users_malloc_settings_are_left_alone():
    applied, faults = _faults("keep", env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert applied == "False" and int(faults) > 100
    assert allocator.keep_freed_memory(environ={"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}) is False
