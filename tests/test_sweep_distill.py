"""The method and LoRA sweep axes: ids, the teacher step in the plan, a sft/kd x LoRA 0/4 sweep, bad input."""

from __future__ import annotations

import csv
import json
import pathlib

import ml_collections
import pytest
import sweep_helpers
import train_helpers as th

from imitax import convert, models, sweep
from imitax.sweep import plan

STUDENT, TEACHER = "m1", "t"


def _checkpoint(path: pathlib.Path, vocab: int, hidden: int, layers: int, tokenizer: pathlib.Path) -> None:
    cfg = models.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=hidden // 4,
        mlp_dim=2 * hidden,
        max_position_embeddings=128,
    )
    convert.save_checkpoint(path, models.init_model(cfg, seed=1), tokenizer_dir=tokenizer)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny world, a student, a teacher (larger) and a teacher of another vocabulary."""
    root = tmp_path_factory.mktemp("distill_assets")
    vocab = sweep_helpers.link_tiny_world(tmp_path_factory, root / "world")
    tokenizer = root / "world" / "tokenizer"
    _checkpoint(root / STUDENT, vocab, 32, 1, tokenizer)
    _checkpoint(root / TEACHER, vocab, 64, 2, tokenizer)
    _checkpoint(root / "other_vocab", vocab + 64, 32, 1, tokenizer)
    return root


def make_config(assets: pathlib.Path) -> ml_collections.ConfigDict:
    """A student and a teacher (finetuned on the imitation data first, a step of the plan); sft,kd x LoRA 0,4."""
    c = sweep.default_config()
    c.name = "test-distill"
    c.base_models[STUDENT] = ml_collections.ConfigDict({"init_from": str(assets / STUDENT)})
    finetune = ml_collections.ConfigDict({"data": {"train": str(assets / "world" / "imitation_broad.json")}})
    finetune.data.token_budget = "1K"
    c.base_models[TEACHER] = ml_collections.ConfigDict(
        {"init_from": str(assets / TEACHER), "finetune": finetune, "teacher_only": True}
    )
    c.teacher_model = TEACHER
    c.data_sources.broad = ml_collections.ConfigDict({"train": str(assets / "world" / "imitation_broad.json")})
    c.token_budgets = "0,1K"
    c.methods = "sft,kd"
    c.lora_ranks = "0,4"
    c.train.seq_len = 64
    c.train.batch_size = 8
    c.train.dtype = "float32"
    c.train.optimizer.name = "adamw"
    c.train.optimizer.lr = 1e-2
    c.train.optimizer.warmup_steps = 1
    c.train.checkpoint_every = 1000
    c.train.log_every = 1
    c.eval.batch_size = 8
    c.eval.tasks.facts = ml_collections.ConfigDict(
        {
            "task": "multiple_choice",
            "scoring": "cloze",
            "data_file": str(assets / "world" / "facts_heldout.jsonl"),
            "limit": 16,
        }
    )
    return c


def quiet(_: str) -> None:
    pass


def test_default_axes_keep_cell_ids_and_the_axes_expand_inside_each_seed(assets):
    config = make_config(assets)
    config.methods, config.lora_ranks, config.seeds = "sft", "0", "0,1"
    plain = [c.id for c in sweep.expand(config)]
    assert plain == ["m1/base", "m1/broad/1K/seed0", "m1/broad/1K/seed1", "t/base"]  # ids as before the axes
    config.methods, config.lora_ranks = "sft,kd", "0,4"
    cells = sweep.expand(config)
    assert [c.id for c in cells] == [
        "m1/base",
        *(f"m1/broad/1K/{arm}seed{s}" for s in (0, 1) for arm in ("", "lora4/", "kd/", "kd-lora4/")),
        "t/base",  # teacher_only: evaluated, never a student
    ]
    assert [(c.method, c.lora) for c in cells[1:5]] == [("sft", 0), ("sft", 4), ("kd", 0), ("kd", 4)]


def test_the_teacher_step_precedes_kd_cells_and_the_plan_counts_its_flops(assets, tmp_path):
    config = make_config(assets)
    steps = sweep.graph(config, sweep.expand(config))
    order = [s.id for s in steps]
    assert order[0] == "t/finetune"
    for step in steps[1:]:
        assert step.needs == (("t/finetune",) if step.cell.method == "kd" or step.cell.model == TEACHER else ())
    # A shard of sft cells alone does not train the teacher.
    sft_only = [c for c in sweep.expand(config) if c.method == "sft" and c.model == STUDENT]
    assert [s.id for s in sweep.graph(config, sft_only) if s.cell is None] == []
    by_id = {s.id: s for s in steps}
    sft = plan.estimate(config, tmp_path, by_id["m1/broad/1K/seed0"])
    kd = plan.estimate(config, tmp_path, by_id["m1/broad/1K/kd/seed0"])
    teacher_params = convert.model_config(str(assets / TEACHER)).num_params()
    assert sft["flops"] == 6 * sft["params"] * 1000
    assert kd["flops"] - sft["flops"] == 2 * teacher_params * 1000


@pytest.fixture(scope="module")
def distill_sweep(assets, tmp_path_factory):
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)):
        workdir = tmp_path_factory.mktemp("distill") / "sweep"
        config = make_config(assets)
        # The teacher as a path (test_the_teacher_step_precedes_kd_cells... plans its finetuning step).
        del config.base_models[TEACHER]
        config.teacher_model = str(assets / TEACHER)
        summary = sweep.run(config, workdir, log=quiet)
    return workdir, summary


def test_sft_and_kd_with_and_without_lora_run_end_to_end(assets, distill_sweep):
    workdir, summary = distill_sweep
    assert summary["failed"] == []
    teacher_dir = assets / TEACHER
    for method in ("sft", "kd"):
        for rank in (0, 4):
            arm = "-".join(([method] if method != "sft" else []) + ([f"lora{rank}"] if rank else []))
            cell_dir = workdir / "cells" / "m1" / "broad" / "1K" / (arm or "") / "seed0"
            run = json.loads((cell_dir / "train" / "run_config.json").read_text())
            assert (run["method"], run["lora"]["rank"]) == (method, rank)
            assert run["teacher"] == (str(teacher_dir) if method == "kd" else "")
            assert json.loads((cell_dir / "cell.json").read_text())["status"] == "done"
    kd_cell = json.loads((workdir / "cells" / "m1" / "broad" / "1K" / "kd" / "seed0" / "cell.json").read_text())
    assert (kd_cell["method"], kd_cell["lora"]) == ("kd", 0)
    with open(workdir / "results" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    finetuned = sorted((r["method"], r["lora"]) for r in rows if r["model"] == "m1" and r["source"] == "broad")
    assert finetuned == [("kd", "0"), ("kd", "4"), ("sft", "0"), ("sft", "4")]
    assert [(r["model"], r["source"]) for r in rows if r["source"] == "(base)"] == [("m1", "(base)")]


BAD = [
    (
        "unknown method",
        lambda c, a: c.__setitem__("methods", "sft,dpo"),
        r"^methods: unknown method 'dpo'; known: sft, kd, gkd$",
    ),
    (
        "kd without a teacher",
        lambda c, a: c.__setitem__("teacher_model", ""),
        r"^methods: kd needs a teacher; set --config\.teacher_model=PATH",
    ),
    (
        "teacher of another vocabulary",
        lambda c, a: c.__setitem__("teacher_model", str(a / "other_vocab")),
        r"^teacher_model .*other_vocab: its vocabulary has \d+ tokens, base model m1's \d+",
    ),
    ("bad rank", lambda c, a: c.__setitem__("lora_ranks", "0,x"), r"^lora_ranks: expected integers"),
    (
        "bad kd setting",
        lambda c, a: c.train.kd.__setitem__("beta", 1.5),
        r"^train \[methods: kd, lora_ranks: 0\]\.kd\.beta must be in \[0, 1\]",
    ),
    (
        "method set in train",
        lambda c, a: c.train.__setitem__("method", "kd"),
        r"^train\.method: set by the sweep for each cell \(from methods\)",
    ),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_axes_are_refused_in_one_line_before_anything_runs(assets, tmp_path, name, mutate, message):
    config = make_config(assets)
    mutate(config, assets)
    with pytest.raises(sweep.SweepError, match=message) as error:
        sweep.run(config, tmp_path / "sweep", log=quiet)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "sweep" / "cells").exists() and not (tmp_path / "sweep" / "base").exists()
