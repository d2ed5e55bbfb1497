"""What the sweep test modules share: one tiny synthetic world per test session.

``test_sweep``, ``test_sweep_ray`` and ``test_sweep_distill`` each ran ``world.build(world.tiny())``
into their own directory (a few seconds each); the world is deterministic and only read by
the sweeps, so one copy serves them all.
"""

from __future__ import annotations

import functools
import pathlib

from imitax.demo import world


@functools.cache
def _build(directory: pathlib.Path) -> int:
    return world.build(world.tiny(), directory)["vocab_size"]


def link_tiny_world(tmp_path_factory, link: pathlib.Path) -> int:
    """Makes ``link`` point at this session's ``world.tiny()`` (built on first use); returns its vocabulary size."""
    vocab_size = _build(tmp_path_factory.getbasetemp() / "tiny_world")
    link.symlink_to(tmp_path_factory.getbasetemp() / "tiny_world", target_is_directory=True)
    return vocab_size
