"""The trainer's configuration: its defaults, the study's recipe, and ``check(config)``.

The trainer owns these; ``configs/*.py`` import them (never load each other by path), and the
trainer, the sweep and the scripts all call :func:`check`, so a field is validated in one place.

>>> c = default_config()                 # what configs/finetune.py starts from
>>> c = study_config("gpt2-1.5b")        # the study's recipe for one of its base models
>>> check(c)                             # raises ConfigError naming the field and the fix
"""

from __future__ import annotations

import warnings

import ml_collections

from imitax import models
from imitax.models import lora

# Architecture fields a config may override in a preset (unset = the preset's).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_position_embeddings",
)

# The study's base models (Gudibande et al., 2023) and the row length each can hold: GPT-2's
# learned positions stop at 1,024, so its blocks are 1,024 tokens; LLaMA's are the study's 2,048.
STUDY_MODELS = {"gpt2-1.5b": 1024, "llama-7b": 2048, "llama-13b": 2048}


class ConfigError(ValueError):
    """A trainer config that cannot run; the message names the field and what to change."""


def default_config() -> ml_collections.ConfigDict:
    """Every field of a training run, with its default.

    The defaults are the study's finetuning recipe (Koala turns, loss on the teacher's tokens,
    2,048-token rows, batch 32, one epoch, lr 2e-3 after 1,000 warm-up steps, the study's
    optimizer) with two exceptions: ``data.packing='pack'`` (examples kept apart by segment ids;
    the study concatenated them: ``'concat'``) and ``dropout=0`` (the study used 0.05);
    :func:`study_config` has neither exception.
    """
    c = ml_collections.ConfigDict()

    # Initial weights: an HF directory, an imitax checkpoint or a training workdir ('' = from scratch).
    c.init_from = ""
    c.model = "llama-7b"  # preset used when init_from is empty
    # Architecture overrides of the preset, e.g. --config.model_overrides.num_layers=2 (unset = the preset's).
    c.model_overrides = ml_collections.ConfigDict(
        {k: ml_collections.config_dict.placeholder(int) for k in SHAPE_FIELDS}
    )
    c.tokenizer = ""  # default: the one next to init_from
    c.dtype = "bfloat16"  # compute dtype
    c.param_dtype = "float32"  # parameter and optimizer-state dtype
    c.remat = "none"  # none | full | dots | dots_no_batch
    c.scan_layers = True
    # Dropout on the embeddings, attention probabilities and residual branches (train step only).
    # 0 here, unlike the study's 0.05 (study_config): LLaMA, Mistral, Qwen and Pythia ship with 0
    # (so do EasyLM's model defaults), and a step without it draws no random masks. It replaces the
    # rates in an init_from config.json (GPT-2's 0.1 were pretraining settings).
    c.dropout = 0.0
    # Sequence positions per chunk of the cross-entropy: [batch, chunk, vocab] float32 logits at a
    # time instead of [batch, seq_len, vocab]; 0 = all at once.
    c.loss_chunk_len = 256

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # paths, globs or hf:NAME[:CONFIG]:SPLIT, comma-separated
    c.data.format = "auto"  # sharegpt | messages | alpaca | hc3 | text | auto
    c.data.template = "koala"  # koala | vicuna | chatml | chat_template
    c.data.token_budget = ""  # e.g. 300K, 20M, 1.5B; '' = all the data
    c.data.packing = "pack"  # pack (segment ids) | concat (the study's plain concatenation)
    c.data.skip_invalid = False
    c.data.cache_dir = ""  # '' = WORKDIR/token_cache
    c.data.val_examples = 0.0  # a count, or a fraction in (0, 1)

    c.seq_len = 2048  # tokens per row; at most a learned-position model's max_position_embeddings
    c.batch_size = 32  # global, in rows of seq_len tokens
    c.total_steps = -1  # -1 = one epoch of the (budgeted) data
    c.grad_accum_steps = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "paper"  # paper (Adafactor as the study ran it) | adamw | lion
    c.optimizer.lr = 2e-3
    c.optimizer.schedule = "constant"  # after warm-up: constant | cosine | linear
    c.optimizer.warmup_steps = 1000
    # Warm-up as a fraction of the run's steps (0 = use warmup_steps): a 300K-token run at 32 x
    # 2,048 tokens a step has 5 steps, and ends long before 1,000 warm-up steps reach the peak lr.
    c.optimizer.warmup_fraction = 0.0
    c.optimizer.final_lr_fraction = 0.0
    c.optimizer.weight_decay = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.mu_dtype = "float32"

    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.keep_every = 0  # also keep every N-th step forever (milestones); 0 = none
    c.log_every = 10
    c.eval_every = 0  # validation loss every N steps (needs data.val_examples)
    c.eval_batches = 16
    c.progress = True

    # What the student learns from: 'sft' (cross-entropy on the teacher's text), 'kd' (a teacher's
    # next-token distributions at the same positions), 'gkd' (also on the student's own samples;
    # docs/distillation.md).
    c.method = "sft"
    c.teacher = ""  # kd: the teacher model (an HF directory, imitax checkpoint or workdir), frozen
    c.teacher_dtype = ""  # its parameter dtype ('' = param_dtype; 'bfloat16' halves its memory)
    c.kd = ml_collections.ConfigDict()
    c.kd.loss = "forward_kl"  # forward_kl | reverse_kl | jsd
    c.kd.beta = 0.5  # jsd: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    c.kd.temperature = 1.0  # both distributions at this temperature (no T^2 factor)
    c.kd.alpha = 0.0  # loss = (1 - alpha) * divergence + alpha * cross-entropy on the text
    c.kd.cache = ""  # a top-k cache of the teacher (scripts/teacher_logits.py) instead of running it
    # method=gkd: with probability lambda_ a batch's teacher turns are the student's own samples.
    c.gkd = ml_collections.ConfigDict()
    c.gkd.lambda_ = 0.5
    c.gkd.temperature = 1.0  # sampling temperature of the student's turns

    # Low-rank adapters (LoRA); rank 0 = off (every weight trains). The base stays frozen.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.0  # on the adapters' inputs (train step only)
    c.lora.targets = lora.DEFAULT_TARGETS  # re.search on projection paths, e.g. layers/attn/q_proj

    c.mesh = "data=1,fsdp=-1,tensor=1"
    c.seed = 0
    c.resume = False  # continue a workdir whose run had a different config
    c.overwrite = False  # move a different run in the workdir aside and start over

    # Read by scripts/train.py and scripts/sweep.py, which start JAX's multi-controller runtime.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # '' = auto-detect (TPU pods, SLURM) or single process
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.local_device_ids = ""
    return c


def study_config(model: str = "llama-7b") -> ml_collections.ConfigDict:
    """The study's finetuning recipe for one of its base models (``STUDY_MODELS``).

    Koala turns with loss on the teacher's tokens only, concatenated (no segment ids) into
    rows of 2,048 tokens (1,024 for GPT-2, whose learned positions end there); batch 32; one
    epoch; lr 2e-3 after 1,000 linear warm-up steps, no decay; unfactored Adafactor with
    momentum 0.9, decay rate 0.95, parameter scaling, clipping 1.0, decoupled decay 1e-3;
    dropout 0.05. Weights and data are the user's (``init_from``, ``data.train``).
    """
    if model not in STUDY_MODELS:
        raise ConfigError(f"model={model!r}: the study's base models are {', '.join(STUDY_MODELS)}")
    c = default_config()
    c.model = model
    c.data.template = "koala"
    c.data.packing = "concat"
    c.seq_len = STUDY_MODELS[model]
    c.batch_size = 32
    c.total_steps = -1
    c.optimizer.name = "paper"
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 1000
    c.optimizer.warmup_fraction = 0.0
    c.optimizer.schedule = "constant"
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.clip_norm = 1.0
    c.optimizer.weight_decay = 1e-3
    c.dropout = 0.05
    c.remat = "full"  # 7B/13B at 2,048 tokens need it on 80 GB accelerators
    return c


def parse_arg(arg: str, known: dict[str, str | None], where: str, *, lists: tuple[str, ...] = ()) -> dict[str, str]:
    """Parses a config file's argument (``'model=llama-7b,tiny'``), refusing names it does not know.

    Args:
      arg: the text after the colon in ``--config=FILE:ARG``: comma-separated ``key=value``
        items and bare flags (a flag reads as ``'1'``).
      known: each accepted name and its default (None: absent unless given).
      where: the config file, for the message.
      lists: names whose value is itself comma-separated (``models=a,b``): a bare item after
        one of them that is not a known name continues its value.

    Raises:
      ConfigError: an unknown name, listing the known ones.
    """
    options = {k: v for k, v in known.items() if v is not None}
    previous = None
    for item in (i.strip() for i in arg.split(",")):
        if not item:
            continue
        key, _, value = item.partition("=")
        if "=" not in item and key not in known and previous in lists:
            options[previous] += "," + key
            continue
        if key not in known:
            raise ConfigError(
                f"{where}: unknown argument {key!r} in {arg!r}; it accepts {', '.join(sorted(known))} "
                f"(e.g. --config={where}:{next(iter(known))}=...)"
            )
        options[key] = value if "=" in item else "1"
        previous = key
    return options


def model_config(config: ml_collections.ConfigDict, where: str = "config") -> models.TransformerConfig:
    """The architecture the run trains, read without loading weights (``init_from``'s, or the preset's)."""
    if config.init_from:
        from imitax import convert

        return convert.model_config(config.init_from, where=f"{where}.init_from")
    overrides = {k: v for k, v in config.model_overrides.items() if v is not None}
    return models.preset(config.model, **overrides)


def check(
    config: ml_collections.ConfigDict, *, where: str = "config", model: models.TransformerConfig | None = None
) -> models.TransformerConfig:
    """Checks a training config before anything is loaded or compiled; returns the model's config.

    ``model`` is the architecture when the caller knows it already (the sweep, for a base model
    that is still to be pretrained); otherwise it is read from ``init_from`` or the preset.

    Checked here: the data section (through the data layer's own :class:`~imitax.data.DataConfig`),
    the optimizer and schedule names, the warm-up, the row length against the model's positions,
    the batch against the accumulation steps, the dtypes and the remat policy.

    Raises:
      ConfigError: naming the field (prefixed by ``where``) and what to change.
      FileNotFoundError: ``init_from`` does not exist.
    """
    from imitax.data import DataConfig
    from imitax.train import optim

    def fail(field: str, message: str):
        raise ConfigError(f"{where}.{field}: {message}")

    if not config.data.train:
        fail("data.train", "empty; set --config.data.train=PATHS (comma-separated files or globs) or hf:NAME")
    try:
        DataConfig(
            train=config.data.train,
            format=config.data.format,
            template=config.data.template,
            token_budget=config.data.token_budget or None,
            seq_len=config.seq_len,
            packing=config.data.packing,
        )
    except ValueError as e:
        fail("data", str(e))
    if config.optimizer.name not in optim.OPTIMIZERS:
        fail("optimizer.name", f"unknown optimizer {config.optimizer.name!r}; known: {', '.join(optim.OPTIMIZERS)}")
    if config.optimizer.schedule not in optim.SCHEDULES:
        fail(
            "optimizer.schedule",
            f"unknown schedule {config.optimizer.schedule!r}; known: {', '.join(optim.SCHEDULES)}",
        )
    if not 0.0 <= config.optimizer.warmup_fraction < 1.0:
        fail("optimizer.warmup_fraction", f"must be in [0, 1), got {config.optimizer.warmup_fraction}")
    for field in ("batch_size", "grad_accum_steps", "seq_len"):
        if config[field] < 1:
            fail(field, f"must be at least 1, got {config[field]}")
    if config.batch_size % config.grad_accum_steps:
        fail(
            "batch_size",
            f"{config.batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}",
        )
    if config.total_steps == 0:
        fail("total_steps", "0 steps would train nothing; -1 trains one epoch of the data")
    if model is None and not config.init_from and config.model not in models.PRESETS:
        fail("model", f"unknown preset {config.model!r}; known: {', '.join(sorted(models.PRESETS))}")
    try:
        cfg = model or model_config(config, where)
    except FileNotFoundError:
        raise
    except ValueError as e:
        if config.init_from:
            raise ConfigError(str(e)) from None  # it names init_from already
        fail("model", str(e))
    _check_methods(config, where, fail)
    try:
        cfg = cfg.replace(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        cfg.check_length(config.seq_len, what=f"{where}.seq_len", fix="--config.seq_len")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


METHODS = ("sft", "kd", "gkd")


def lora_config(config: ml_collections.ConfigDict) -> lora.LoRAConfig | None:
    """The run's adapters (None when ``lora.rank`` is 0); raises ValueError for a bad field."""
    if config.lora.rank == 0:
        return None
    return lora.LoRAConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout, targets=config.lora.targets
    )


def kd_config(config: ml_collections.ConfigDict):
    """The run's distillation settings (None for ``sft``); raises ValueError for a bad field."""
    from imitax.train import distill

    if config.method == "sft":
        return None
    kd = config.kd
    return distill.KDConfig(loss=kd.loss, beta=kd.beta, temperature=kd.temperature, alpha=kd.alpha)


def gkd_config(config: ml_collections.ConfigDict):
    """The run's on-policy settings (None unless ``method=gkd``); raises ValueError for a bad field."""
    from imitax.train import gkd

    if config.method != "gkd":
        return None
    return gkd.GKDConfig(lambda_=config.gkd.lambda_, temperature=config.gkd.temperature)


def _check_methods(config: ml_collections.ConfigDict, where: str, fail) -> None:
    """The method, its teacher and the LoRA section."""
    if config.method not in METHODS:
        fail("method", f"unknown method {config.method!r}; known: {', '.join(METHODS)}")
    try:
        kd_config(config)
        gkd_config(config)
        lora_config(config)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None  # the message starts with the field
    if config.method != "sft" and not config.teacher:
        fail(
            "teacher",
            f"method={config.method} needs a teacher: set --config.teacher=PATH (an HF directory or imitax checkpoint)",
        )
    if config.method == "gkd" and config.kd.cache:
        fail("kd.cache", "method=gkd scores the student's own samples, which no cache holds; use the online teacher")
    if config.method == "gkd" and config.kd.alpha:
        fail("kd.alpha", "method=gkd trains on the divergence alone (as TRL's GKD trainer); set kd.alpha=0")
    if config.teacher_dtype not in ("", "float32", "bfloat16"):
        fail("teacher_dtype", f"expected '', 'float32' or 'bfloat16', got {config.teacher_dtype!r}")
    if config.lora.rank and not config.init_from:
        fail("lora.rank", "LoRA adapts a pretrained model: set --config.init_from=PATH (or lora.rank=0)")


def warn_if_inside_warmup(config: ml_collections.ConfigDict, total_steps: int) -> bool:
    """Warns when the run ends before its learning rate reaches the peak; returns whether it does."""
    from imitax.train import optim

    warmup = optim.warmup_steps(config.optimizer, total_steps)
    if total_steps >= warmup:
        return False
    warnings.warn(
        f"the run has {total_steps} steps but {warmup} warm-up steps: it ends at "
        f"{total_steps / warmup:.1%} of the peak learning rate {config.optimizer.lr}. Set "
        "--config.optimizer.warmup_fraction (e.g. 0.1) to warm up over a share of the run instead",
        stacklevel=2,
    )
    return True
