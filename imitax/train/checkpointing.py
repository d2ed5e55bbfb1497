"""Training checkpoints with Orbax: asynchronous, rotated, resumable, corruption-tolerant.

Each step directory ``WORKDIR/checkpoints/<step>/`` holds the items

    params/       the model parameters (same layout as an imitax checkpoint)
    model_config/ the model config (JSON)
    train_state/  optimizer state, step and RNG
    data/         the data position and the run's fingerprint (JSON)
    lora/         LoRA runs only: the adapters' settings and their base (path and fingerprint)

so a step directory is itself an imitax checkpoint: ``scripts/convert.py
--export --ckpt=WORKDIR`` exports the latest one, and ``--config.init_from``
accepts it. A LoRA run's ``params/`` holds only its adapters; its base weights are
read again from the path ``lora/`` names (:func:`imitax.convert.load_checkpoint`
merges them).
"""

from __future__ import annotations

import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from imitax.train.state import TrainState

ITEMS = ("params", "model_config", "train_state", "data", "lora")


def manager(workdir: str, *, save_every: int, keep: int, keep_period: int | None) -> ocp.CheckpointManager:
    """The run's checkpoint manager: async saves, last ``keep`` kept plus every ``keep_period``-th."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1),
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options, item_names=ITEMS)


def save(
    mgr: ocp.CheckpointManager,
    state: TrainState,
    model_config: dict,
    data: dict,
    *,
    force: bool = False,
    lora: dict | None = None,
) -> bool:
    """Starts an asynchronous save of ``state`` at its step; returns whether one started.

    ``lora``: a LoRA run's adapter settings and base (written as the ``lora`` item).
    """
    step = int(state.step)
    rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    items = dict(
        params=ocp.args.StandardSave(state.params),
        model_config=ocp.args.JsonSave(model_config),
        train_state=ocp.args.StandardSave(rest),
        data=ocp.args.JsonSave(data),
    )
    if lora is not None:
        items["lora"] = ocp.args.JsonSave(lora)
    return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(mgr: ocp.CheckpointManager, abstract: TrainState) -> tuple[TrainState, dict] | None:
    """The newest checkpoint that restores cleanly, or None when there is none.

    Orbax only lists finalized steps (a save interrupted before its atomic commit
    is invisible). A committed step that fails to restore (a truncated or
    damaged file) is reported, moved aside (see :func:`_set_aside`) and the next
    older one is tried.
    """
    result, moved = None, False
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            rest = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
            restored = mgr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract.params),
                    train_state=ocp.args.StandardRestore(rest),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
            logging.warning(
                "checkpoint at step %d cannot be restored (%s: %s); trying an older one", step, type(e).__name__, e
            )
            _set_aside(mgr, step)
            moved = True
            continue
        ts = restored["train_state"]
        state = TrainState(step=ts["step"], params=restored["params"], opt_state=ts["opt_state"], rng=ts["rng"])
        result = state, restored["data"]
        break
    if moved:
        mgr.reload()  # it still lists the steps moved away
    return result


def _set_aside(mgr: ocp.CheckpointManager, step: int) -> None:
    """Moves an unrestorable step out of the run's ``checkpoints/`` into ``unrestorable_checkpoints/``.

    Left in place, it would stay the manager's latest step: the run could not
    save that step again, nor any earlier one, and an export of the workdir
    would pick it. It is moved rather than deleted because the failure may be
    transient (a network file system's hiccup) and the files worth inspecting.
    """
    src = epath.Path(mgr.directory) / str(step)
    dst = epath.Path(mgr.directory).parent / "unrestorable_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        logging.warning("moved the unrestorable checkpoint of step %d to %s", step, dst)
    multihost_utils.sync_global_devices(f"imitax_set_aside_{step}")
