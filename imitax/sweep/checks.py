"""Checks of a whole grid before anything runs; each layer's own check does the work."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from etils import epath

from imitax import convert
from imitax.sweep.config import BASE_MODEL_FIELDS, SweepError, default_config, eval_tasks, items, resolved
from imitax.sweep.plan import Cell, base_finetune_config, cell_train_config, expand, methods
from imitax.train import config as train_config

# -- validation ---------------------------------------------------------------------------------------


# Fields whose keys are the user's names (checked by their own rules, not against the defaults).
_OPEN_FIELDS = ("config.base_models", "config.data_sources", "config.eval.tasks", "config.teacher", "config.world")


def check_keys(given: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, where: str) -> None:
    """Every key of ``given`` exists in ``reference`` (recursively)."""
    if where in _OPEN_FIELDS:
        return
    for key, value in given.items():
        if key not in reference:
            raise SweepError(f"{where}.{key}: unknown field (known: {', '.join(sorted(reference.keys()))})")
        ref = reference[key]
        if isinstance(ref, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
            check_keys(value, ref, f"{where}.{key}")


def _check_files(spec: str, where: str) -> None:
    from imitax.data import formats

    for part in items(spec):
        if part.startswith("hf:"):
            continue
        try:
            formats.resolve_sources(part)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"{where}: {e}") from None


def validate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Cell]:
    """Checks the whole grid before anything runs (see :func:`validate_and_build`); returns its cells."""
    return validate_and_build(config, workdir)[0]


def validate_and_build(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[list[Cell], dict]:
    """Checks the whole grid before anything runs; returns its cells.

    Paths may use ``{workdir}`` and ``{world}`` (the demo's generated data, built before this
    check). Checked: every base model (its path's kind, or its pretraining config and data),
    every data source (files exist, format and template known), budgets and seeds, every cell's
    trainer config through the trainer's own check (fields, row length against the base
    model's positions, batch against the mesh), each budget against the tokens its source
    holds (counted once per source and tokenizer, through the token cache the cells reuse),
    every evaluation task (registered name, accepted keywords, data files present), the
    teacher's metric names.

    Returns:
      The cells, and the evaluation tasks built and loaded (alias -> task), which every cell's
      evaluation reuses.

    Raises:
      SweepError: naming the first field that is wrong and what to do.
    """
    from imitax.data import formats, templates
    from imitax.eval import evaluator

    workdir = epath.Path(workdir)
    check_keys(config, default_config(), "config")
    config = resolved(config, workdir)
    _check_axis_fields(config)
    if not config.base_models:
        raise SweepError("base_models: empty; name at least one, e.g. --config.base_models.NAME.init_from=PATH")
    trainer_defaults = train_config.default_config()
    architectures = {}  # base model -> its TransformerConfig (read without weights)
    for name, spec in config.base_models.items():
        where = f"base_models.{name}"
        if not isinstance(spec, ml_collections.ConfigDict):
            raise SweepError(f"{where}: expected a ConfigDict with init_from=PATH or pretrain=<trainer config>")
        unknown = set(spec.keys()) - set(BASE_MODEL_FIELDS)
        if unknown:
            raise SweepError(f"{where}: unknown fields {sorted(unknown)} (known: {', '.join(BASE_MODEL_FIELDS)})")
        if bool(spec.get("init_from")) == bool(spec.get("pretrain")):
            raise SweepError(f"{where}: set exactly one of init_from (a model path) and pretrain (a trainer config)")
        if spec.get("train"):
            check_keys(spec.train, trainer_defaults, f"{where}.train")
        if spec.get("init_from"):
            try:
                architectures[name] = convert.model_config(spec.init_from, where=f"{where}.init_from")
            except (ValueError, FileNotFoundError) as e:
                raise SweepError(str(e)) from None
        else:
            pre = spec.pretrain
            check_keys(pre, trainer_defaults, f"{where}.pretrain")
            _check_files(pre.data.train, f"{where}.pretrain.data.train")
            architectures[name] = _check_trainer(pre, f"{where}.pretrain")
        if spec.get("finetune"):
            check_keys(spec.finetune, trainer_defaults, f"{where}.finetune")
            finetune = base_finetune_config(config, workdir, name)
            _check_files(finetune.data.train, f"{where}.finetune.data.train")
            _check_trainer(finetune, f"{where}.finetune", architectures[name])
    for name, spec in config.data_sources.items():
        where = f"data_sources.{name}"
        if not isinstance(spec, ml_collections.ConfigDict) or not spec.get("train"):
            raise SweepError(f"{where}: expected a ConfigDict with train=PATHS (and optionally format, template)")
        known = {"train", "format", "template", "skip_invalid", "token_budgets"}
        if set(spec.keys()) - known:
            raise SweepError(
                f"{where}: unknown fields {sorted(set(spec.keys()) - known)} (known: {', '.join(sorted(known))})"
            )
        _check_files(spec.train, f"{where}.train")
        fmt = spec.get("format", "auto")
        if fmt != "auto" and fmt not in formats.FORMATS:
            raise SweepError(f"{where}.format: unknown format {fmt!r} (known: auto, {', '.join(formats.FORMATS)})")
        template = spec.get("template", config.train.data.template)
        if template not in templates.TEMPLATES:
            raise SweepError(
                f"{where}.template: unknown template {template!r} (known: {', '.join(templates.TEMPLATES)})"
            )
    cells = expand(config)
    if not any(c.source for c in cells) and not config.data_sources and any(c.tokens for c in cells):
        raise SweepError("data_sources: empty, but token_budgets asks for finetuning")
    if not items(config.seeds):
        raise SweepError("seeds: empty; give at least one, e.g. --config.seeds=0")
    if config.train.init_from:
        raise SweepError("train.init_from: set by the sweep for each cell (from base_models); leave it empty")
    _check_axes(config, cells, architectures)
    checked = set()
    for cell in cells:
        if cell.source is None or (cell.model, cell.source, cell.method, cell.lora) in checked:
            continue
        checked.add((cell.model, cell.source, cell.method, cell.lora))
        train = cell_train_config(config, workdir, cell)
        where = "train"
        if cell.arm:
            where += f" [methods: {cell.method}, lora_ranks: {cell.lora}]"
        if config.base_models[cell.model].get("train"):
            where += f" (with base_models.{cell.model}.train)"
        _check_trainer(train, where, architectures[cell.model])
        batch_tokens = train.batch_size * train.seq_len
        small = [c for c in cells if (c.model, c.source) == (cell.model, cell.source) and c.tokens < batch_tokens]
        if small:
            raise SweepError(
                f"token_budgets: {small[0].budget} is less than one training batch ({where}.batch_size "
                f"{train.batch_size} x {where}.seq_len {train.seq_len} = {batch_tokens} tokens)"
            )
    _check_budgets_fit(config, workdir, cells)
    if not config.eval.tasks:
        raise SweepError("eval.tasks: empty; name at least one task, e.g. --config.eval.tasks.mmlu.data_dir=DIR")
    built = {}
    for alias, spec in eval_tasks(config).items():
        try:  # builds the task and reads its data: a missing file fails now, not after training
            built |= evaluator.build_tasks({alias: spec}, load=True)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"eval.tasks.{alias}: {e}") from None
    for key in config.teacher:
        if key.split("/")[0] not in config.eval.tasks:
            raise SweepError(f"teacher: {key!r} names no evaluation task (tasks: {', '.join(config.eval.tasks)})")
    return cells, built


def _check_axis_fields(config) -> None:
    """``train.method``, ``train.teacher`` and ``train.lora.rank`` are the axes': left at their defaults."""
    defaults = train_config.default_config()
    for field, axis in (("method", "methods"), ("teacher", "teacher_model"), ("lora.rank", "lora_ranks")):
        value, default = config.train, defaults
        for part in field.split("."):
            value, default = value[part], default[part]
        if value != default:
            raise SweepError(f"train.{field}: set by the sweep for each cell (from {axis}); leave it {default!r}")


def _check_axes(config, cells: Sequence[Cell], architectures: dict) -> None:
    """The method and LoRA axes own the trainer's ``method``, ``teacher`` and ``lora.rank``; the teacher's vocabulary.

    Each method's and rank's own settings are checked by the trainer (every cell's config goes
    through :func:`imitax.train.config.check`); here, what only the sweep knows: a teacher for
    ``kd``/``gkd``, and that its vocabulary is every student's.
    """
    known = ", ".join(train_config.METHODS)
    if not methods(config):
        raise SweepError(f"methods: empty; give at least one of {known}, e.g. --config.methods=sft")
    unknown = [m for m in methods(config) if m not in train_config.METHODS]
    if unknown:  # named here by the sweep's field; the trainer's check names its own
        raise SweepError(f"methods: unknown method {unknown[0]!r}; known: {known}")
    distilled = sorted({c.model for c in cells if c.method != "sft"})
    if not distilled:
        return
    name = config.teacher_model
    if not name:
        kinds = ",".join(m for m in methods(config) if m != "sft")
        raise SweepError(
            f"methods: {kinds} needs a teacher; set --config.teacher_model=PATH (a model) "
            "or the name of a base_models entry"
        )
    if name in config.base_models:
        teacher, where = architectures[name], f"teacher_model (base_models.{name})"
    else:
        try:
            teacher, where = convert.model_config(name, where="teacher_model"), f"teacher_model {name}"
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(str(e)) from None
    for model in distilled:
        if architectures[model].vocab_size != teacher.vocab_size:
            raise SweepError(
                f"{where}: its vocabulary has {teacher.vocab_size} tokens, base model {model}'s "
                f"{architectures[model].vocab_size}: distillation needs the students' vocabulary; choose a teacher "
                "of their family (or drop kd/gkd from methods)"
            )


def _check_trainer(train: ml_collections.ConfigDict, where: str, model=None):
    """The trainer's own check of ``train`` (and the batch against the mesh); returns the architecture."""
    try:
        cfg = train_config.check(train, where=where, model=model)
    except train_config.ConfigError as e:
        raise SweepError(str(e)) from None
    except FileNotFoundError as e:
        raise SweepError(str(e)) from None
    _check_batch(train, where)
    return cfg


def _base_tokenizer(config, name: str) -> epath.Path:
    """The tokenizer directory a base model's cells use (the trainer's rule: see ``loop.tokenizer_dir``)."""
    from imitax.train import loop

    spec = config.base_models[name]
    if spec.get("pretrain"):
        train = spec.pretrain
    else:
        train = ml_collections.ConfigDict({"tokenizer": config.train.tokenizer, "init_from": spec.init_from})
    try:
        return loop.tokenizer_dir(train)
    except loop.TrainingError as e:
        raise SweepError(f"base_models.{name}: {e}") from None


def _check_budgets_fit(config, workdir: epath.Path, cells: Sequence[Cell]) -> None:
    """Each source holds at least its largest budget, counted with each base model's tokenizer.

    The count is the token cache's (every token of every example, as the budgets count them), so
    the cells that follow reopen the same cache instead of tokenizing again.
    """
    import transformers

    from imitax.data import build_token_cache

    largest: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        key = (cell.model, cell.source)
        if cell.source is not None and (key not in largest or cell.tokens > largest[key].tokens):
            largest[key] = cell
    counts: dict[tuple[str, str], int] = {}  # (tokenizer dir, source) -> tokens
    for (model, source), cell in largest.items():
        tok_dir = _base_tokenizer(config, model)
        if (str(tok_dir), source) not in counts:
            train = cell_train_config(config, workdir, cell)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
            try:
                cache = build_token_cache(
                    [s for s in train.data.train.split(",") if s],
                    tokenizer,
                    format=train.data.format,
                    template=train.data.template,
                    skip_invalid=train.data.skip_invalid,
                    cache_dir=train.data.cache_dir,
                    progress=False,
                )
            except (ValueError, FileNotFoundError) as e:
                raise SweepError(f"data_sources.{source}: {e}") from None
            counts[(str(tok_dir), source)] = cache.num_tokens
        held = counts[(str(tok_dir), source)]
        if cell.tokens > held:
            field = (
                f"data_sources.{source}.token_budgets"
                if config.data_sources[source].get("token_budgets")
                else "token_budgets"
            )
            raise SweepError(
                f"{field}: {cell.budget} is more than data_sources.{source} holds ({held:,} tokens with "
                f"base model {model}'s tokenizer in {tok_dir}); lower the budget to at most {held:,} or add data"
            )


def _check_batch(train: ml_collections.ConfigDict, where: str) -> None:
    """The global batch splits evenly over the mesh's batch axes and the accumulation steps."""
    from imitax import sharding

    try:
        mesh = sharding.make_mesh(train.mesh)
    except ValueError as e:
        raise SweepError(f"{where}.mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if train.batch_size % (shards * train.grad_accum_steps):
        raise SweepError(
            f"{where}.batch_size: {train.batch_size} is not divisible by the mesh's data x fsdp = {shards} "
            f"devices times grad_accum_steps = {train.grad_accum_steps}; change one of them"
        )
