"""The demo's training and evaluation recipe, shared by its sweep configs.

``configs/demo.py`` (output imitation) and ``configs/demo_distill.py`` (distillation) run the same
world with the same pretraining, finetuning and evaluation settings, and differ only in their
grids; config files are loaded by path and cannot import each other, so the recipe lives here.
"""

from __future__ import annotations

import ml_collections

from imitax import sweep
from imitax.train import config as train_config

__all__ = ["evaluation", "finetuning", "pretraining"]


def pretraining(size: tuple[int, int, int, int, int], vocab: int) -> ml_collections.ConfigDict:
    """A LLaMA-style model of ``size`` (hidden, layers, heads, mlp, steps), trained from scratch on the corpus."""
    hidden, layers, heads, mlp, steps = size
    pre = train_config.default_config()
    pre.model = "llama-7b"  # the architecture; every width below is overridden
    pre.model_overrides.update(
        dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            mlp_dim=mlp,
            max_position_embeddings=256,
        )
    )
    pre.tokenizer = "{world}/tokenizer"
    pre.data.train = "{world}/corpus.jsonl"
    pre.data.format = "text"
    pre.dtype = "float32"  # bfloat16 is no faster on CPUs
    pre.seq_len = 128
    pre.batch_size = 16
    pre.total_steps = steps
    pre.optimizer.name = "adamw"
    pre.optimizer.lr = 3e-3
    pre.optimizer.schedule = "constant"
    pre.optimizer.warmup_steps = max(1, steps // 10)
    pre.optimizer.weight_decay = 0.0
    pre.checkpoint_every = steps
    pre.log_every = max(1, steps // 5)
    return pre


def finetuning(t: ml_collections.ConfigDict, tiny: bool) -> None:
    """Sets a sweep's ``train`` fields to the demo's finetuning recipe.

    The study's recipe (Koala turns, loss on the teacher's tokens, one epoch of the budget), scaled
    down; AdamW, because the study's parameter-scaled Adafactor at its learning rate moves weights of
    these tiny models too little in a few dozen steps.
    """
    t.dtype = "float32"
    t.seq_len = 64 if tiny else 128
    t.batch_size = 8
    t.optimizer.name = "adamw"
    t.optimizer.lr = 1e-3
    t.optimizer.warmup_steps = 5
    t.optimizer.weight_decay = 0.0
    t.checkpoint_every = 1000
    t.log_every = 8


def evaluation(c: ml_collections.ConfigDict, tiny: bool) -> None:
    """Sets a sweep's evaluation to the world's benchmarks: held-out and seen facts, style; the scripted teacher."""
    c.eval.batch_size = 16
    c.eval.tasks.facts_heldout = ml_collections.ConfigDict(
        dict(task="multiple_choice", data_file="{world}/facts_heldout.jsonl", scoring="cloze")
    )
    c.eval.tasks.facts_seen = ml_collections.ConfigDict(
        dict(task="multiple_choice", data_file="{world}/facts_seen.jsonl", scoring="cloze", limit=300)
    )
    c.eval.tasks.style = ml_collections.ConfigDict(
        dict(data_file="{world}/style_heldout.jsonl", max_gen_toks=64 if tiny else 128)
    )
    c.teacher_file = "{world}/teacher_scores.json"
    c.report.metrics = ",".join(["facts_heldout/acc", "facts_seen/acc"] + [f"style/{m}" for m in sweep.STYLE_METRICS])
