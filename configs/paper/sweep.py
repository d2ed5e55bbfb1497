r"""The study's grid (Gudibande et al., 2023): base models x imitation sources x token budgets.

  python scripts/sweep.py --config=configs/paper/sweep.py --workdir=gs://BUCKET/imitation-sweep \
      --config.base_models.gpt2_xl.init_from=/weights/gpt2-xl \
      --config.base_models.llama_7b.init_from=/weights/llama-7b \
      --config.base_models.llama_13b.init_from=/weights/llama-13b \
      --config.data_sources.sharegpt_mix.train='/data/sharegpt/*.json,/data/hc3/*.jsonl,/data/discord/*.json' \
      --config.data_sources.nq_synthetic.train=/data/nq_synthetic.jsonl \
      --config.eval.tasks.style.data_file=/data/heldout_sharegpt.json

The weights and data are the user's (the study's imitation data is not redistributable): every
path above must be set, and the sweep refuses to start until they are. Settings (DESIGN.md,
"Facts from the study"): each cell finetunes with configs/paper/finetune.py's recipe (Koala
format, loss on the teacher's tokens, 2048-token blocks, batch 32, one epoch of the budget, lr
2e-3 after 1000 warm-up steps, the study's Adafactor-with-momentum optimizer); budgets from 0.3M
to 150M tokens of ShareGPT-Mix, and up to the ~6,000 examples of NQ-synthetic; evaluation:
MMLU 5-shot, Natural Questions 3-shot, HumanEval pass@1 (0-shot, greedy) and the style metrics
against the teacher's answers to held-out prompts. Drop a base model with a smaller config
(e.g. ``configs/paper/sweep.py:models=llama_7b``), budgets with ``--config.token_budgets=...``.
"""

import importlib.util
import os

import ml_collections

from imitax import sweep

BASE_MODELS = ("gpt2_xl", "llama_7b", "llama_13b")  # GPT-2 1.5B, LLaMA 7B, LLaMA 13B
# The study's amounts of imitation data (tokens); 0 evaluates each base model itself.
BUDGETS = "0,300K,1M,3M,10M,30M,150M"
NQ_BUDGETS = "300K,1M,3M"  # NQ-synthetic holds only a few million tokens


def _paper_finetune() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py")
    spec = importlib.util.spec_from_file_location("imitax_configs_paper_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("model=llama-7b")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = dict(item.split("=", 1) for item in arg.split(",") if item)
    models = [m for m in options.get("models", ",".join(BASE_MODELS)).split(",") if m]
    unknown = sorted(set(models) - set(BASE_MODELS))
    if unknown:
        raise ValueError(f"models={unknown}: the study's base models are {BASE_MODELS}")
    c = sweep.default_config()
    c.name = "paper"
    for name in models:
        c.base_models[name] = ml_collections.ConfigDict({"init_from": ""})  # the user's weights
    c.data_sources.sharegpt_mix = ml_collections.ConfigDict({"train": "", "format": "auto", "template": "koala"})
    c.data_sources.nq_synthetic = ml_collections.ConfigDict(
        {"train": "", "format": "auto", "template": "koala", "token_budgets": NQ_BUDGETS}
    )
    c.token_budgets = BUDGETS
    c.seeds = "0"
    c.train = _paper_finetune()
    c.train.progress = False
    c.eval.batch_size = 16
    c.eval.tasks.mmlu = ml_collections.ConfigDict({"num_fewshot": 5})
    c.eval.tasks.nq_open = ml_collections.ConfigDict({"num_fewshot": 3})
    c.eval.tasks.humaneval = ml_collections.ConfigDict({})
    c.eval.tasks.style = ml_collections.ConfigDict({"data_file": ""})  # held-out prompts + teacher answers
    c.report.metrics = "mmlu/acc,nq_open/exact_match,humaneval/pass@1," + ",".join(
        f"style/{m}" for m in sweep.STYLE_METRICS
    )
    return c
