"""Multi-host start-up through JAX's own multi-controller runtime.

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
