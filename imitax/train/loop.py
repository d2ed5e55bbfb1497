"""The training loop: ``run(config, workdir)``.

Reads top to bottom: set-up (devices, workdir, tokenizer, data, model, state),
then the loop (batch -> step -> metrics -> validation -> checkpoint), then the
final save. Rerunning the same command on the same workdir resumes from the
newest good checkpoint and continues bitwise identically: the data order is a
function of (seed, step) and the checkpoint holds everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from imitax import convert, models, records, sharding
from imitax.data import DataConfig, PackedBatches, build_datasets
from imitax.models import lora
from imitax.train import checkpointing, metrics, optim, teacher_cache
from imitax.train import config as train_config
from imitax.train import state as train_state
from imitax.train import step as train_step

# Config keys that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_KEYS = (
    "total_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "keep_every",
    "log_every",
    "eval_every",
    "resume",
    "overwrite",
    "distributed",
    "progress",
)


class TrainingError(RuntimeError):
    """The run cannot go on (bad input or a diverged loss); the message says why."""


RUN_CONFIG = "run_config.json"


# -- set-up helpers ---------------------------------------------------------------------------------


def _check_workdir(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Refuses a workdir that holds a run of a different config (unless told otherwise).

    The run's config is recorded (:func:`_record_config`) only once its first step has trained,
    so a run that fails during set-up (bad data, a bad option) leaves nothing that would refuse
    the corrected command.
    """
    try:
        changed = records.check_config_record(
            workdir / RUN_CONFIG,
            json.loads(config.to_json()),
            ignore=RESUMABLE_KEYS,
            allow=config.overwrite or config.resume,
            what="a run",
            fix="Use another --workdir, --config.resume=True to continue it with the new config, or "
            "--config.overwrite=True to move the old run aside and start over.",
        )
    except records.ConfigMismatch as e:
        raise TrainingError(str(e)) from None
    if changed and config.overwrite:
        backup = workdir.parent / f"{workdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            workdir.rename(backup)
        multihost_utils.sync_global_devices("imitax_workdir_moved")
        logging.warning("config.overwrite: the previous run in %s was moved to %s", workdir, backup)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)


def _record_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Writes ``run_config.json`` atomically (a rerun's check compares against it)."""
    if jax.process_index() == 0:
        records.write_json(workdir / RUN_CONFIG, json.loads(config.to_json()))


def _resolve_init(init_from: str) -> tuple[str, epath.Path]:
    """``('hf'|'imitax', path)`` for an HF directory, an imitax checkpoint or a training workdir."""
    return _resolve_init_path(init_from, "init_from")


def _resolve_init_path(path: str, where: str) -> tuple[str, epath.Path]:
    try:
        kind = convert.require_model_kind(path, where=where)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    return ("hf", epath.Path(path)) if kind == "hf" else ("imitax", convert.resolve(path))


def tokenizer_dir(config: ml_collections.ConfigDict) -> epath.Path:
    """The tokenizer a run uses: ``config.tokenizer``, else the one that comes with ``init_from``.

    Raises:
      TrainingError: neither names a tokenizer.
    """
    if config.tokenizer:
        return epath.Path(config.tokenizer)
    if config.init_from:
        kind, path = _resolve_init(config.init_from)
        if kind == "hf":
            return path
        found = convert.tokenizer_dir(path)
        if found is not None:
            return found
    raise TrainingError("no tokenizer: set --config.tokenizer=DIR (a Hugging Face tokenizer directory)")


def _load_model(config, mesh) -> models.Transformer:
    options = dict(dtype=config.dtype, remat=config.remat, scan_layers=config.scan_layers)
    # One rate at the three places the study's code (EasyLM) and GPT-2 put dropout; it replaces
    # whatever a Hugging Face config.json says (GPT-2's 0.1 were its pretraining settings).
    options |= {k: config.dropout for k in ("embed_dropout", "attention_dropout", "residual_dropout")}
    if not config.init_from:
        overrides = {k: v for k, v in config.model_overrides.items() if v is not None}
        cfg = models.preset(config.model, param_dtype=config.param_dtype, **options, **overrides)
        return models.init_model(cfg, mesh=mesh, seed=config.seed)
    kind, path = _resolve_init(config.init_from)
    if kind == "hf":
        model = convert.load_hf(path, mesh=mesh, dtype=config.param_dtype)
    else:
        model = convert.load_checkpoint(path, mesh=mesh, dtype=config.param_dtype)
    # Run-time options only: the graph (and the parameters) stay as loaded.
    model.cfg = model.cfg.replace(**options)
    return model


def _frozen_parts(config, model, lora_cfg, mesh) -> tuple[dict, dict | None]:
    """Adds a LoRA run's adapters to ``model``; returns ``({'base': frozen weights}, the lora item)``.

    Without LoRA: ``({}, None)``. The item names the base (``init_from`` and a fingerprint of its
    weights, :func:`imitax.models.lora.fingerprint`), which the checkpoints hold instead of it.
    """
    if lora_cfg is None:
        return {}, None
    try:
        names = lora.add_adapters(model, lora_cfg, mesh=mesh, seed=config.seed)
    except ValueError as e:
        raise TrainingError(f"config.{e}") from None
    base = nnx.state(model, lora.BASE).to_pure_dict()
    info = {
        **dataclasses.asdict(lora_cfg),
        "adapted": names,
        "base": os.path.abspath(config.init_from),
        "base_fingerprint": lora.fingerprint(base),
        "base_dtype": config.param_dtype,
    }
    return {"base": base}, info


def _check_same_base(mgr, lora_info: dict | None) -> None:
    """Refuses to resume a LoRA run whose base weights changed since its checkpoints were written."""
    if lora_info is None:
        return
    saved = convert.checkpoint.lora_info(epath.Path(mgr.directory) / str(mgr.latest_step()))
    if saved and saved["base_fingerprint"] != lora_info["base_fingerprint"]:
        raise TrainingError(
            f"the base model {lora_info['base']} is not the one this run's adapters were trained on "
            f"(fingerprint {lora_info['base_fingerprint']}, checkpoints say {saved['base_fingerprint']}); "
            "restore that base, or use another --workdir"
        )


def load_teacher(config, student: models.TransformerConfig, tokenizer, mesh) -> models.Transformer:
    """The frozen teacher of ``method=kd``, refused if its vocabulary or tokenizer is not the student's."""
    kind, path = _resolve_init_path(config.teacher, "config.teacher")
    dtype = config.teacher_dtype or config.param_dtype
    teacher_cfg = convert.model_config(path, where="config.teacher")
    if teacher_cfg.vocab_size != student.vocab_size:
        raise TrainingError(
            f"config.teacher: {path} has a vocabulary of {teacher_cfg.vocab_size} tokens, the student "
            f"{student.vocab_size}: distillation needs the same vocabulary; choose a teacher of the student's family"
        )
    import transformers

    tok_dir = path if kind == "hf" else convert.tokenizer_dir(path)
    if tok_dir is not None:
        theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise TrainingError(
                f"config.teacher: the tokenizer in {tok_dir} differs from the run's: distillation needs the "
                "same tokenizer; choose a teacher that shares the student's"
            )
    if kind == "hf":
        teacher = convert.load_hf(path, mesh=mesh, dtype=dtype)
    else:
        teacher = convert.load_checkpoint(path, mesh=mesh, dtype=dtype)
    teacher.cfg = teacher.cfg.replace(dtype=config.dtype, scan_layers=config.scan_layers)
    return teacher


def data_config(config, workdir: epath.Path) -> DataConfig:
    d = config.data
    if not d.train:
        raise TrainingError("no training data: set --config.data.train=PATHS (comma-separated) or hf:NAME")
    val = d.val_examples
    return DataConfig(
        train=tuple(s for s in d.train.split(",") if s),
        format=d.format,
        template=d.template,
        token_budget=d.token_budget or None,
        seq_len=config.seq_len,
        packing=d.packing,
        skip_invalid=d.skip_invalid,
        cache_dir=d.cache_dir or str(workdir / "token_cache"),
        val_examples=int(val) if float(val).is_integer() else float(val),
        seed=config.seed,
    )


def _global_batch(local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    mesh = batch_sharding.mesh
    return {
        k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v) for k, v in local.items()
    }


def _local_rows(batches: PackedBatches, step: int) -> np.ndarray:
    """This process's row ids of the batch at ``step`` (as ``batch_at`` slices them)."""
    local = batches.batch_size // jax.process_count()
    return batches.rows_at(step)[jax.process_index() * local : (jax.process_index() + 1) * local]


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (all processes agree on it)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def check(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


# -- the run ------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as ``config`` says, in ``workdir``; returns the final metrics.

    Process set-up (``jax.distributed.initialize`` on several hosts, a compilation cache) is the
    caller's: ``scripts/train.py`` does it (see :mod:`imitax.distributed`).

    Raises:
      TrainingError: bad input, a workdir of another run, or a non-finite loss.
    """
    try:
        arch = train_config.check(config)  # the architecture, read without loading weights
    except (train_config.ConfigError, ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    workdir_path = epath.Path(workdir)
    _check_workdir(config, workdir_path)
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # Tokenizer and data first (bad data fails before any weights load), then the model.
    import transformers

    tok_dir = tokenizer_dir(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    if len(tokenizer) > arch.vocab_size:
        raise TrainingError(
            f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{arch.vocab_size}: they do not belong together"
        )
    data_cfg = data_config(config, workdir_path)
    splits = build_datasets(data_cfg, tokenizer, progress=jax.process_index() == 0)
    if jax.process_index() == 0 and not (workdir_path / "tokenizer").exists():
        convert.checkpoint.copy_tokenizer(tok_dir, workdir_path / "tokenizer")
    lora_cfg, kd = train_config.lora_config(config), train_config.kd_config(config)
    with jax.set_mesh(mesh):
        model = _load_model(config, mesh)
        frozen, lora_info = _frozen_parts(config, model, lora_cfg, mesh)
        online = kd is not None and not config.kd.cache
        teacher = load_teacher(config, model.cfg, tokenizer, mesh) if online else None
    if teacher is not None:
        frozen["teacher"] = nnx.state(teacher, nnx.Param).to_pure_dict()
    trainable = nnx.LoRAParam if lora_cfg is not None else nnx.Param
    cfg = model.cfg
    batches = PackedBatches(splits.train, config.seq_len, config.batch_size, config.seed, data_cfg.packing)
    total_steps = config.total_steps if config.total_steps > 0 else batches.steps_per_epoch
    logging.info("data: %s; packed: %s; training %d steps", splits.stats, batches.stats, total_steps)
    train_config.warn_if_inside_warmup(config, total_steps)
    cache = None
    if kd is not None and config.kd.cache:
        try:
            cache = teacher_cache.TeacherCache(
                config.kd.cache, batches, splits.stats.get("cache", ""), config.teacher, kd.temperature
            )
        except (teacher_cache.CacheError, FileNotFoundError) as e:
            raise TrainingError(str(e)) from None

    # Optimizer, state, compiled step.
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (n_batch_shards * config.grad_accum_steps):
        raise TrainingError(
            f"batch_size={config.batch_size} must be divisible by data*fsdp={n_batch_shards} times "
            f"grad_accum_steps={config.grad_accum_steps}"
        )
    optimizer, schedule = optim.make_optimizer(config.optimizer, total_steps)
    graphdef = nnx.graphdef(model)
    teacher_graphdef = nnx.graphdef(teacher) if teacher is not None else None
    shardings = train_state.state_shardings(model, optimizer, mesh, trainable)
    batch_sharding = sharding.batch_sharding(mesh)
    mgr = checkpointing.manager(
        str(workdir_path),
        save_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        keep_period=config.keep_every,
    )
    data_info = {"fingerprint": splits.stats.get("cache", ""), "seed": config.seed}
    with jax.set_mesh(mesh):
        abstract = train_state.abstract_train_state(model, optimizer, shardings, trainable)
        restored = checkpointing.restore_latest(mgr, abstract)
        if restored is None:
            state = train_state.create_train_state(model, optimizer, shardings, config.seed, trainable)
        else:
            state, _ = restored
            _check_same_base(mgr, lora_info)
            logging.info("resumed from step %d", int(state.step))
        del model, teacher  # the train state and `frozen` own the parameters now
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen) if frozen else None
        step_fn = train_step.jit_train_step(
            train_step.make_train_step(
                graphdef,
                optimizer,
                schedule,
                config.grad_accum_steps,
                loss_chunk_len=config.loss_chunk_len,
                kd=kd,
                teacher_graphdef=teacher_graphdef,
                on_policy=train_config.gkd_config(config),
            ),
            shardings,
            batch_sharding,
            frozen_shardings,
            cached_teacher=cache is not None,
        )
        base = {"base": frozen["base"]} if "base" in frozen else None
        eval_fn = functools.partial(
            jax.jit(train_step.make_eval_step(graphdef, loss_chunk_len=config.loss_chunk_len)), frozen=base
        )
    step_args = (frozen,) if frozen else ()

    flops_per_token = metrics.train_flops_per_token(cfg, config.seq_len)
    peak, peak_source = metrics.peak_flops_per_second()
    logging.info("MFU is measured against %.1f TFLOP/s (%s)", peak / 1e12, peak_source)
    writer = metrics.MetricsWriter(str(workdir_path))
    preemption = _Preemption()
    model_config = cfg.to_dict()
    start_step = int(state.step)
    progress = None
    if jax.process_index() == 0 and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")

    def save(force: bool) -> None:
        data = {**data_info, "step": int(state.step)}
        checkpointing.save(mgr, state, model_config, data, force=force, lora=lora_info)

    # The loop.
    last = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step, total_steps):
                local = batches.batch_at(step, jax.process_index(), jax.process_count())
                if cache is not None:
                    local |= cache.batch_for(_local_rows(batches, step), local["loss_mask"])
                state, step_metrics = step_fn(state, _global_batch(local, batch_sharding), *step_args)
                # The per-step divergence check. The loss is that of the parameters before this
                # update; the parameter norm, of those after it, which are the ones a save would keep.
                loss, param_norm = (float(step_metrics[k]) for k in ("loss", "param_norm"))
                if not (np.isfinite(loss) and np.isfinite(param_norm)):
                    raise TrainingError(
                        f"training diverged at step {step + 1} (loss {loss}, parameter norm {param_norm}); "
                        f"stopping without saving (the last good checkpoint is kept: step {mgr.latest_step()})"
                    )
                if step == start_step:
                    _record_config(config, workdir_path)  # set-up worked and a step trained: the run exists
                window_steps += 1
                done = step + 1
                if done % config.log_every == 0 or done == total_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * config.batch_size * config.seq_len / elapsed
                    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    last |= {
                        "step_time_s": elapsed / window_steps,
                        "tokens_per_s": tokens_per_s,
                        "mfu": tokens_per_s * flops_per_token / peak,
                    }
                    writer.write(done, last)
                    window_start, window_steps = time.perf_counter(), 0
                if (
                    splits.val is not None
                    and config.eval_every
                    and (done % config.eval_every == 0 or done == total_steps)
                ):
                    val = _validate(eval_fn, state.params, splits.val, config, batch_sharding)
                    writer.write(done, val)
                    last |= val
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}")
                save(force=False)
                if preemption.check():
                    if mgr.latest_step() != done:  # the periodic save above may have just saved it
                        save(force=True)
                    mgr.wait_until_finished()
                    logging.warning("SIGTERM: saved a checkpoint at step %d and stopped", done)
                    return {"preempted": True, "step": done, **last}
            if start_step >= total_steps:
                _record_config(config, workdir_path)  # nothing left to train (a rerun with more steps resumes)
            if mgr.latest_step() != int(state.step):
                save(force=True)
            mgr.wait_until_finished()
    finally:
        preemption.restore()
        writer.close()
        if progress is not None:
            progress.close()
        mgr.close()
    return {"step": int(state.step), **last}


def _validate(eval_fn, params, dataset, config, batch_sharding) -> dict[str, float]:
    """Loss and accuracy over (up to ``config.eval_batches``) batches of the held-out split."""
    batches = PackedBatches(dataset, config.seq_len, config.batch_size, config.seed, config.data.packing)
    n = min(batches.steps_per_epoch, config.eval_batches or batches.steps_per_epoch)
    totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    for i in range(n):
        local = batches.batch_at(i, jax.process_index(), jax.process_count())
        out = jax.device_get(eval_fn(params, _global_batch(local, batch_sharding)))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    tokens = max(totals["tokens"], 1.0)
    return {"val_loss": totals["loss_sum"] / tokens, "val_accuracy": totals["correct"] / tokens}


def clear_workdir(workdir: str) -> None:
    """Deletes a workdir (tests and scripts that start over on purpose)."""
    if os.path.isdir(workdir):
        shutil.rmtree(workdir)
