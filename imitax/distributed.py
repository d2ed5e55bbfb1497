"""Process set-up, called by ``scripts/`` (never by library functions): JAX's multi-controller
runtime and the persistent compilation cache.

Every process runs the same program. On TPU pods and under SLURM (and other
clusters JAX knows), ``jax.distributed.initialize()`` finds its peers by itself;
elsewhere the coordinator address, process count and id are given explicitly
(``--config.distributed.coordinator_address=HOST:PORT`` etc.).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

_AUTO_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def initialize(cfg: Any | None = None) -> None:
    """Starts the distributed runtime once, if this job spans several processes.

    Args:
      cfg: an object with ``coordinator_address`` (``''`` = auto-detect),
        ``num_processes``, ``process_id`` and ``local_device_ids`` (``''`` = all),
        or None to auto-detect only.
    """
    if jax.distributed.is_initialized():
        return
    address = getattr(cfg, "coordinator_address", "") if cfg is not None else ""
    if address:
        local = getattr(cfg, "local_device_ids", "")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(cfg.num_processes),
            process_id=int(cfg.process_id),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    elif any(k in os.environ for k in _AUTO_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def use_compilation_cache(path: str) -> None:
    """Keeps compiled programs in ``path`` for later processes, unless a cache is already set.

    Every program is cached (no minimum compile time): a sweep's cells and a rerun repeat the same
    train step and scoring programs, and on CPU many of them compile in under a second each.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # the cache is set up once per process: make it see the dir
