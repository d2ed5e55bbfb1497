r"""Distillation in the demo's synthetic world: one teacher model teaches three students by sft, kd and gkd.

  python scripts/sweep.py --config=configs/demo_distill.py --workdir=out/demo_distill
  python scripts/sweep.py --config=configs/demo_distill.py:tiny --workdir=/tmp/demo_distill   # seconds

The world is ``configs/demo.py``'s (``imitax/demo/world.py``: part A's facts are in the imitation
data, part B's only in the pretraining corpus). What differs from that demo:

1. The teacher is a language model here, not the world's scripted teacher: a larger model than
   the students, pretrained on the whole corpus (so it knows part B's facts as well as its size
   allows) and then finetuned on the first 24K tokens of the teacher's answers
   (``imitation_broad.json``). It is the base model ``teacher`` (``teacher_only``: evaluated as itself, its
   own row in the report, never a student); its pretraining and finetuning are one step of the
   plan, which every kd and gkd cell waits for.
2. The three students (the demo's sizes) learn from it at the same token budgets by
   ``methods = sft,kd,gkd``: ``sft`` is cross-entropy on the imitation text (the world's
   imitation data, the text the teacher was finetuned on, not text sampled from the teacher
   model), ``kd`` the forward KL to the teacher's next-token distributions on the same
   positions, ``gkd`` the same divergence on the students' own samples half the time
   (``gkd.lambda_ = 0.5``).
3. One source (broad), one budget (16K tokens), two seeds (the fewest that give a t-interval).

``docs/demo_distill_results.md`` has what one run showed, and how long it took.

The question it asks: does learning from the teacher's distributions instead of its text
carry any of part B's facts (``facts_heldout/acc``), which the imitation text never states?
"""

import dataclasses

import ml_collections

from imitax import sweep
from imitax.demo import recipe, world
from imitax.train import config as train_config

# name -> (hidden, layers, heads, mlp, pretraining steps). The students are configs/demo.py's sizes
# with 150 pretraining steps instead of 200 (to keep the run within 15 minutes on a shared 2-core
# machine); the teacher is wider than the largest and pretrains longer, so that it knows more of part B.
STUDENTS = {
    "small": (64, 2, 4, 128, 150),
    "medium": (96, 3, 4, 192, 150),
    "large": (128, 4, 4, 256, 150),
}
TEACHER = (160, 4, 4, 320, 400)
TINY_STUDENTS = {"small": (32, 1, 2, 64, 20)}
TINY_TEACHER = (64, 2, 4, 128, 20)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    tiny = "tiny" in train_config.parse_arg(arg, {"tiny": None}, "configs/demo_distill.py")
    c = sweep.default_config()
    c.name = "demo-distill-tiny" if tiny else "demo-distill"
    c.world = ml_collections.ConfigDict(dataclasses.asdict(world.tiny() if tiny else world.WorldConfig()))
    vocab = c.world.vocab_size

    for name, size in (TINY_STUDENTS if tiny else STUDENTS).items():
        c.base_models[name] = ml_collections.ConfigDict({"pretrain": recipe.pretraining(size, vocab)})
    # The teacher: pretrained on the corpus, then finetuned on the first 24K tokens of the teacher's
    # answers (enough to take up their style; a full epoch cost it held-out facts in a first run).
    finetune = ml_collections.ConfigDict({"data": {"train": "{world}/imitation_broad.json"}})
    finetune.data.token_budget = "" if tiny else "24K"
    c.base_models.teacher = ml_collections.ConfigDict(
        {
            "pretrain": recipe.pretraining(TINY_TEACHER if tiny else TEACHER, vocab),
            "finetune": finetune,
            "teacher_only": True,
        }
    )
    c.teacher_model = "teacher"

    c.data_sources.broad = ml_collections.ConfigDict({"train": "{world}/imitation_broad.json"})
    c.token_budgets = "0,2K" if tiny else "0,16K"
    c.seeds = "0,1"
    c.methods = "sft,kd,gkd"

    # The demo's finetuning recipe (imitax.demo.recipe); kd and gkd with their defaults (forward KL, T = 1;
    # gkd.lambda_ = 0.5, the students sampling at T = 1).
    recipe.finetuning(c.train, tiny)
    recipe.evaluation(c, tiny)
    return c
