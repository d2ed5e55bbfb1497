r"""The study's grid (Gudibande et al., 2023): base models x imitation sources x token budgets.

  python scripts/sweep.py --config=configs/paper/sweep.py --workdir=gs://BUCKET/imitation-sweep \
      --config.base_models.gpt2_xl.init_from=/weights/gpt2-xl \
      --config.base_models.llama_7b.init_from=/weights/llama-7b \
      --config.base_models.llama_13b.init_from=/weights/llama-13b \
      --config.data_sources.sharegpt_mix.train='/data/sharegpt/*.json,/data/hc3/*.jsonl,/data/discord/*.json' \
      --config.data_sources.nq_synthetic.train=/data/nq_synthetic.jsonl \
      --config.eval.tasks.style.data_file=/data/heldout_sharegpt.json

The argument after the colon, ``models=``, picks base models (``gpt2_xl``, ``llama_7b``,
``llama_13b``; e.g. ``configs/paper/sweep.py:models=llama_7b``); budgets change with
``--config.token_budgets=...``.

The weights and data are the user's (the study's imitation data is not redistributable): every
path above must be set, and the sweep refuses to start until they are. Settings (docs/study.md):
each cell finetunes with the study's recipe (``imitax.train.config.study_config``: Koala format,
loss on the teacher's tokens, 2,048-token blocks, 1,024 for GPT-2, whose learned positions end
there; batch 32; one epoch of the budget; lr 2e-3 after 1,000 warm-up steps; the study's
Adafactor-with-momentum optimizer). Budgets: 0.3M to 150M tokens of ShareGPT-Mix; NQ-synthetic
holds about 6,000 short question-answer pairs (a few hundred thousand tokens), so its budgets stop
at 200K; the sweep counts each source's tokens with each base model's tokenizer and refuses a
budget larger than its source before anything trains. Evaluation: MMLU 5-shot, Natural Questions
3-shot, HumanEval pass@1 (0-shot, greedy) and the style metrics against the teacher's answers to
held-out prompts.

As in the study, the 1,000 warm-up steps (65M tokens for LLaMA at 32 x 2,048) outlast every
budget below 65M: those runs end before the learning rate reaches its peak, and the trainer warns.
``--config.train.optimizer.warmup_fraction=0.1`` warms up over a tenth of each run instead.
"""

import ml_collections

from imitax import sweep
from imitax.train import config as train_config

# Sweep name -> the study's base model (GPT-2 1.5B, LLaMA 7B, LLaMA 13B).
BASE_MODELS = {"gpt2_xl": "gpt2-1.5b", "llama_7b": "llama-7b", "llama_13b": "llama-13b"}
# The study's amounts of imitation data (tokens); 0 evaluates each base model itself.
BUDGETS = "0,300K,1M,3M,10M,30M,150M"
# NQ-synthetic: ~6,000 ChatGPT question-answer pairs of a sentence or two, ~40 tokens each with
# the Koala template, so about 240K tokens; the largest budget stays under that. A row of GPT-2
# holds 32 x 1,024 = 33K tokens, one of LLaMA 65K: every budget is at least one batch.
NQ_BUDGETS = "66K,130K,200K"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = train_config.parse_arg(
        arg, {"models": ",".join(BASE_MODELS)}, "configs/paper/sweep.py", lists=("models",)
    )
    models = [m for m in options["models"].split(",") if m]
    unknown = sorted(set(models) - set(BASE_MODELS))
    if unknown or not models:
        raise train_config.ConfigError(
            f"configs/paper/sweep.py: models={options['models']!r}; the study's base models are "
            f"{', '.join(BASE_MODELS)} (comma-separated, e.g. models=llama_7b,llama_13b)"
        )
    c = sweep.default_config()
    c.name = "paper"
    c.train = train_config.study_config("llama-7b")
    c.train.progress = False
    for name in models:
        study = train_config.study_config(BASE_MODELS[name])
        # init_from is the user's weights; each model's own row length (GPT-2: 1,024 positions).
        c.base_models[name] = ml_collections.ConfigDict(
            {"init_from": "", "train": ml_collections.ConfigDict({"seq_len": study.seq_len})}
        )
    c.data_sources.sharegpt_mix = ml_collections.ConfigDict({"train": "", "format": "auto", "template": "koala"})
    c.data_sources.nq_synthetic = ml_collections.ConfigDict(
        {"train": "", "format": "auto", "template": "koala", "token_budgets": NQ_BUDGETS}
    )
    c.token_budgets = BUDGETS
    c.seeds = "0"
    c.eval.batch_size = 16
    c.eval.tasks.mmlu = ml_collections.ConfigDict({"num_fewshot": 5})
    c.eval.tasks.nq_open = ml_collections.ConfigDict({"num_fewshot": 3})
    c.eval.tasks.humaneval = ml_collections.ConfigDict({})
    c.eval.tasks.style = ml_collections.ConfigDict({"data_file": ""})  # held-out prompts + teacher answers
    c.report.metrics = "mmlu/acc,nq_open/exact_match,humaneval/pass@1," + ",".join(
        f"style/{m}" for m in sweep.STYLE_METRICS
    )
    return c
