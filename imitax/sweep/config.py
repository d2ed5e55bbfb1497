"""A sweep config: its fields and defaults, list fields, and the ``{workdir}``/``{world}`` placeholders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from imitax.train import config as train_config

UNGUARDED_FIELDS = ("report", "teacher", "teacher_file", "compilation_cache")
CELL_FILE = "cell.json"
BASE_MODEL_FIELDS = ("init_from", "pretrain", "finetune", "teacher_only", "size", "train")


class SweepError(ValueError):
    """A sweep config or workdir that cannot be run; the message names the field and the fix."""


# -- config ------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """The fields of a sweep config, with their defaults (config files fill them in).

    Lists may be written as comma-separated strings (``token_budgets='0,300K,1M'``), which is
    also what a command-line override takes.
    """
    c = ml_collections.ConfigDict()
    c.name = "sweep"
    # name -> ConfigDict(init_from=PATH) or ConfigDict(pretrain=<trainer config>); optional
    # `size` (parameters, for the size axis; default: counted from the model's config) and
    # `train` (trainer fields this model's cells change, e.g. seq_len=1024 for GPT-2);
    # `finetune` (trainer fields, e.g. data.train: the model is finetuned on them, after its
    # pretraining, before any cell uses it: a teacher that knows the teacher's answers) and
    # `teacher_only=True` (evaluated as itself, never finetuned as a student).
    c.base_models = ml_collections.ConfigDict()
    # name -> ConfigDict(train=PATHS, format='auto', template='koala'): the trainer's data fields;
    # optional token_budgets (this source's own list, replacing the sweep's).
    c.data_sources = ml_collections.ConfigDict()
    c.token_budgets = "0"  # '0' = the base model itself
    c.seeds = "0"
    # The imitation method and LoRA axes: 'sft,kd,gkd' (the trainer's `method`) and '0,16'
    # (`lora.rank`, 0 = full finetuning). kd/gkd learn from `teacher_model`: a model path, or the
    # name of a base_models entry (then its pretraining/finetuning is a step kd/gkd cells wait for).
    # The methods' own settings (kd.loss, gkd.lambda_, lora.alpha, ...) are train's.
    c.methods = "sft"
    c.lora_ranks = "0"
    c.teacher_model = ""
    c.train = train_config.default_config()
    c.train.progress = False  # the sweep prints one progress line per cell instead
    c.eval = ml_collections.ConfigDict()
    # alias -> ConfigDict(task=REGISTRY NAME (default: the alias), **the task's keyword config).
    c.eval.tasks = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.mesh = "data=1,fsdp=-1,tensor=1"
    # The teacher's scores, 'alias/metric' -> value, drawn as dashed reference lines; and/or a
    # JSON file of the same mapping.
    c.teacher = ml_collections.ConfigDict()
    c.teacher_file = ""
    c.report = ml_collections.ConfigDict()
    c.report.metrics = ""  # 'alias/metric,...' to plot; '' = each task's headline metrics
    c.report.style_task = "style"  # the alias whose metrics go in the style figure
    # scripts/sweep.py keeps a persistent compilation cache in WORKDIR/jax_cache for every cell
    # (process set-up: library callers set their own with imitax.distributed.use_compilation_cache).
    c.compilation_cache = True
    c.world = ml_collections.ConfigDict()  # the demo's synthetic world (imitax.demo.world); empty = none
    return c


def items(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def budget_tokens(budget: str) -> int:
    from imitax.data.budget import parse_token_budget

    if budget.strip() in ("0", "0K", "0M"):
        return 0
    return parse_token_budget(budget)


# -- paths and placeholders ---------------------------------------------------------------------------


def _substitute(value: Any, names: Mapping[str, str]) -> Any:
    """``{workdir}`` and ``{world}`` in every string of a (nested) config value."""
    if isinstance(value, str):
        for key, path in names.items():
            value = value.replace("{" + key + "}", path)
        return value
    if isinstance(value, ml_collections.ConfigDict):
        out = ml_collections.ConfigDict()
        for k, v in value.items():
            out[k] = _substitute(v, names)
        return out
    if isinstance(value, list | tuple):
        return type(value)(_substitute(v, names) for v in value)
    return value


def resolved(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    names = {"workdir": str(workdir), "world": str(workdir / "world")}
    with config.unlocked():
        return _substitute(config, names)


def eval_tasks(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """``eval.tasks`` as the evaluator takes it: alias -> keyword config (``task=NAME`` when they differ)."""
    return {
        alias: dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec or {})
        for alias, spec in config.eval.tasks.items()
    }


STYLE_METRICS = ("list_recall", "summary_recall", "unigram_f1", "length_corr")
