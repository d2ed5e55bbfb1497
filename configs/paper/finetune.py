r"""One finetuning run of the study (Gudibande et al., 2023), as its reference code ran it.

  python scripts/train.py --config=configs/paper/finetune.py:model=llama-7b,data=sharegpt_mix,budget=20M \
      --workdir=DIR --config.init_from=LLAMA_7B_HF_DIR --config.data.train=SHAREGPT_MIX_FILES

Arguments after the colon: ``model`` (gpt2-1.5b | llama-7b | llama-13b, the
study's base models), ``data`` (sharegpt_mix | nq_synthetic: only decides the
default format), ``budget`` (imitation tokens, 0.3M to 150M in the study; empty
= all). The weights and data are the user's: point ``init_from`` at the base
model (HF directory or imitax checkpoint) and ``data.train`` at the files.

What the study did (DESIGN.md, "Facts from the study"): conversations in the
Koala format with loss on the teacher's turns only, concatenated and chunked into
2048-token blocks; batch 32; one epoch; lr 2e-3 with 1000 linear warm-up steps
and no decay; unfactored Adafactor with momentum 0.9, decay rate 0.95,
parameter scaling, global-norm clipping 1.0, decoupled weight decay 1e-3;
dropout 0.05 (on the embeddings, the attention probabilities and the residual
branches: the places the reference code's GPT-2 and LLaMA models have it).
"""

import importlib.util
import os

import ml_collections


def _base():
    # Config files are loaded by path (not as a package), so the base config is too.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "finetune.py")
    spec = importlib.util.spec_from_file_location("imitax_configs_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = ("gpt2-1.5b", "llama-7b", "llama-13b")
SOURCES = {"sharegpt_mix": "auto", "nq_synthetic": "auto"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = dict(item.split("=", 1) for item in arg.split(",") if item)
    model = options.get("model", "llama-7b")
    source = options.get("data", "sharegpt_mix")
    if model not in MODELS:
        raise ValueError(f"model={model!r}: the study's base models are {MODELS}")
    if source not in SOURCES:
        raise ValueError(f"data={source!r}: the study's imitation sources are {sorted(SOURCES)}")
    c = _base().get_config(f"model={model}")
    c.data.format = SOURCES[source]
    c.data.template = "koala"
    c.data.packing = "concat"
    c.data.token_budget = options.get("budget", "")
    c.seq_len = 2048
    c.batch_size = 32
    c.total_steps = -1
    c.optimizer.name = "paper"
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 1000
    c.optimizer.schedule = "constant"
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.clip_norm = 1.0
    c.optimizer.weight_decay = 1e-3
    c.dropout = 0.05
    c.remat = "full"  # 7B/13B at 2048 tokens need it on 80 GB accelerators
    return c
