r"""Imitation finetuning of a base LM (defaults: the study's settings, except dropout).

  python scripts/train.py --config=configs/finetune.py --workdir=DIR \
      --config.init_from=HF_OR_IMITAX_DIR --config.data.train=sharegpt.json

The argument after the colon is a comma-separated list of ``key=value`` items
and flags: ``model=NAME`` picks a preset for training from scratch (when
``init_from`` is empty) and ``tiny`` shrinks everything to run on a laptop CPU:

  python scripts/train.py --config=configs/finetune.py:model=pythia-70m,tiny --workdir=/tmp/run \
      --config.data.train=tests/data/sharegpt.json
"""

import ml_collections

_SHAPES = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_position_embeddings",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = dict(item.split("=", 1) if "=" in item else (item, "1") for item in arg.split(",") if item)
    c = ml_collections.ConfigDict()

    # Initial weights: an HF directory, an imitax checkpoint or a training workdir ('' = from scratch).
    c.init_from = ""
    c.model = options.get("model", "llama-7b")  # preset used when init_from is empty
    # Architecture overrides of the preset, e.g. --config.model_overrides.num_layers=2 (unset = the preset's).
    c.model_overrides = ml_collections.ConfigDict({k: ml_collections.config_dict.placeholder(int) for k in _SHAPES})
    c.tokenizer = ""  # default: the one next to init_from
    c.dtype = "bfloat16"  # compute dtype
    c.param_dtype = "float32"  # parameter and optimizer-state dtype
    c.remat = "none"  # none | full | dots | dots_no_batch
    c.scan_layers = True
    # Dropout on the embeddings, attention probabilities and residual branches (train step only).
    # 0 here, unlike the study's 0.05 (configs/paper/finetune.py): LLaMA, Mistral, Qwen and Pythia
    # ship with 0 (so do EasyLM's model defaults), and a step without it draws no random masks.
    # It replaces the rates in an init_from config.json (GPT-2's 0.1 were pretraining settings).
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

    # The study: 2048-token blocks, batch 32, one epoch, lr 2e-3 with 1000 warm-up steps, no decay.
    c.seq_len = 2048
    c.batch_size = 32  # global, in rows of seq_len tokens
    c.total_steps = -1  # -1 = one epoch of the (budgeted) data
    c.grad_accum_steps = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "paper"  # paper (Adafactor as the study ran it) | adamw | lion
    c.optimizer.lr = 2e-3
    c.optimizer.schedule = "constant"  # after warm-up: constant | cosine | linear
    c.optimizer.warmup_steps = 1000
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

    c.mesh = "data=1,fsdp=-1,tensor=1"
    c.seed = 0
    c.resume = False  # continue a workdir whose run had a different config
    c.overwrite = False  # move a different run in the workdir aside and start over

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # '' = auto-detect (TPU pods, SLURM) or single process
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.local_device_ids = ""

    if "tiny" in options:
        c.dtype = "float32"
        c.model_overrides.update(
            dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128)
        )
        c.seq_len = 128
        c.batch_size = 8
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 5
        c.checkpoint_every = 20
        c.log_every = 5
    return c
