r"""The study in miniature, on a synthetic world, in minutes on a laptop CPU (the README's main command).

The argument after the colon, ``tiny``, shrinks it to the test suite's size.

  python scripts/sweep.py --config=configs/demo.py --workdir=out/demo
  python scripts/sweep.py --config=configs/demo.py:tiny --workdir=/tmp/demo     # the test suite's size

What runs (``imitax/demo/world.py`` describes the world):

1. A synthetic world of fictional people with five attributes each is written as a plain-text
   corpus (biographies, and question/answer lines for half the people), as multiple-choice
   questions about each part of the world, as a teacher's chat answers about part A ("broad"
   imitation data: lists and a closing "In summary," paragraph) and as the teacher's answers in
   the benchmark's own question form about part A ("task" imitation data).
2. Three LLaMA-style base models of different sizes are trained from scratch on the corpus.
3. Each base model is finetuned on each imitation source at several token budgets (Koala turn
   format, loss on the teacher's tokens only, one epoch of the budget), with three seeds.
4. Every cell is evaluated: factual accuracy on the held-out part B (log-likelihood of each
   choice after "Question: ...\nAnswer:") and on part A, and the style metrics of its answers to
   held-out requests against the teacher's (list and summary use, unigram F1, length correlation).
5. The report gives each metric's mean over the seeds with a 95% interval and marks the cells
   that differ from their base model beyond it (``imitax/sweep/report.py``).
"""

import dataclasses

import ml_collections

from imitax import sweep
from imitax.demo import recipe, world
from imitax.train import config as train_config

# name -> (hidden, layers, heads, mlp, pretraining steps): the same 200 steps of 16 x 128 tokens
# (about 8 passes over the corpus) for every size, so the larger models memorize more of it.
SIZES = {
    "small": (64, 2, 4, 128, 200),
    "medium": (96, 3, 4, 192, 200),
    "large": (128, 4, 4, 256, 200),
}
TINY_SIZES = {"small": (32, 1, 2, 64, 20), "large": (64, 2, 4, 128, 20)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    tiny = "tiny" in train_config.parse_arg(arg, {"tiny": None}, "configs/demo.py")
    c = sweep.default_config()
    c.name = "demo-tiny" if tiny else "demo"
    c.world = ml_collections.ConfigDict(dataclasses.asdict(world.tiny() if tiny else world.WorldConfig()))
    vocab = c.world.vocab_size

    for name, size in (TINY_SIZES if tiny else SIZES).items():
        c.base_models[name] = ml_collections.ConfigDict({"pretrain": recipe.pretraining(size, vocab)})

    c.data_sources.broad = ml_collections.ConfigDict({"train": "{world}/imitation_broad.json"})
    # The task data is small (one question per fact of part A): its own, smaller budgets.
    c.data_sources.task = ml_collections.ConfigDict(
        {"train": "{world}/imitation_task.json", "token_budgets": "1K" if tiny else "4K,12K"}
    )
    c.token_budgets = "0,2K" if tiny else "0,8K,32K,128K"
    # Three finetuning seeds per cell, so that the report's intervals cover how much a result moves
    # with the seed (a single seed moved by a few points between machines). The tiny settings keep
    # two, the fewest with a t-interval, to hold the test suite's time down.
    c.seeds = "0,1" if tiny else "0,1,2"

    recipe.finetuning(c.train, tiny)
    recipe.evaluation(c, tiny)
    return c
