r"""One finetuning run of the study (Gudibande et al., 2023), as its reference code ran it.

  python scripts/train.py --config=configs/paper/finetune.py:model=llama-7b,budget=20M \
      --workdir=DIR --config.init_from=LLAMA_7B_HF_DIR --config.data.train=SHAREGPT_MIX_FILES

Arguments after the colon: ``model`` (gpt2-1.5b | llama-7b | llama-13b, the study's base
models) and ``budget`` (imitation tokens, 0.3M to 150M in the study; empty = all the data).
The weights and data are the user's: point ``init_from`` at the base model (HF directory or
imitax checkpoint) and ``data.train`` at the files.

The recipe (``imitax.train.config.study_config``; docs/study.md): conversations in the Koala
format with loss on the teacher's turns only, concatenated and chunked into 2,048-token blocks
(1,024 for GPT-2, whose learned positions end there); batch 32; one epoch; lr 2e-3 with 1,000
linear warm-up steps and no decay; unfactored Adafactor with momentum 0.9, decay rate 0.95,
parameter scaling, global-norm clipping 1.0, decoupled weight decay 1e-3; dropout 0.05.

At 32 x 2,048 tokens a step, 1,000 warm-up steps take 65M tokens: a smaller budget ends before
the learning rate reaches its peak (the trainer warns). That is what the study ran; to warm up
over a share of the run instead, add ``--config.optimizer.warmup_fraction=0.1``.
"""

import ml_collections

from imitax.train import config as train_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = train_config.parse_arg(arg, {"model": "llama-7b", "budget": ""}, "configs/paper/finetune.py")
    c = train_config.study_config(options["model"])
    c.data.token_budget = options["budget"]
    return c
