r"""Imitation finetuning of a base LM: the study's recipe, with examples packed apart and no dropout.

  python scripts/train.py --config=configs/finetune.py --workdir=DIR \
      --config.init_from=HF_OR_IMITAX_DIR --config.data.train=sharegpt.json

The defaults (``imitax.train.config.default_config``) are the study's finetuning recipe except
two choices: examples are packed with segment ids (``--config.data.packing=concat`` is the
study's plain concatenation) and dropout is 0 (the study's 0.05 is ``--config.dropout=0.05``);
``configs/paper/finetune.py`` is the recipe with neither exception.

Distillation from an open teacher and LoRA are options of the same config (docs/distillation.md):
``--config.method=kd|gkd --config.teacher=PATH`` and ``--config.lora.rank=16 --config.lora.alpha=32``.

The argument after the colon is a comma-separated list of ``key=value`` items and flags:
``model=NAME`` picks a preset for training from scratch (when ``init_from`` is empty) and
``tiny`` shrinks everything to run on a laptop CPU:

  python scripts/train.py --config=configs/finetune.py:model=pythia-70m,tiny --workdir=/tmp/run \
      --config.tokenizer=tests/data/tokenizer --config.model_overrides.vocab_size=320 \
      --config.data.train=tests/data/sharegpt.json
"""

import ml_collections

from imitax.train import config as train_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = train_config.parse_arg(arg, {"model": "llama-7b", "tiny": None}, "configs/finetune.py")
    c = train_config.default_config()
    c.model = options["model"]
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
