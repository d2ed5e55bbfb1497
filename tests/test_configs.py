"""Every file under configs/: its arguments, and a run through the checks the trainer and the sweep use.

Presets that need the user's weights get tiny stand-ins: Hugging Face directories with the real
models' position limits (GPT-2: 1,024 learned positions; LLaMA: 2,048 rotary positions) and a
small tokenizer, which is all the checks read (no weights are loaded before training starts).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import subprocess
import sys
import warnings

import ml_collections
import pytest
import train_helpers as th

from imitax import sweep, train
from imitax.demo import world

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOKENIZER = DATA / "tokenizer"
CONFIG_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.py"))
# Each config file, the arguments its docstring documents, and an argument it must refuse.
ARGUMENTS = {
    "configs/finetune.py": ["", "model=pythia-70m,tiny", "model=gpt2"],
    "configs/paper/finetune.py": ["", "model=gpt2-1.5b,budget=20M", "model=llama-13b"],
    "configs/paper/sweep.py": ["", "models=llama_7b", "models=gpt2_xl,llama_13b"],
    "configs/demo.py": ["", "tiny"],
    "configs/demo_distill.py": ["", "tiny"],
}


def load(path: str, arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"config_{pathlib.Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_config_file_is_covered():
    assert sorted(ARGUMENTS) == CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_files_accept_their_arguments_and_refuse_others(path):
    for arg in ARGUMENTS[path]:
        assert isinstance(load(path, arg), ml_collections.ConfigDict)
    # The argument a user mistypes most: the singular/plural of the real one, or an invented one.
    for bad in ("model=llama-7b" if path == "configs/paper/sweep.py" else "models=llama_7b", "tiny=1,colour=red"):
        if path in ("configs/finetune.py", "configs/demo.py") and bad.startswith("tiny"):
            bad = "colour=red"
        with pytest.raises(train.ConfigError, match=r"unknown argument .*; it accepts"):
            load(path, bad)


def test_paper_sweep_refuses_an_unknown_model():
    with pytest.raises(train.ConfigError, match="the study's base models are gpt2_xl, llama_7b, llama_13b"):
        load("configs/paper/sweep.py", "models=llama_70b")


def test_the_script_reports_a_bad_config_argument_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/sweep.py", "--config=configs/paper/sweep.py:model=llama-7b", f"--workdir={tmp_path}"],
        cwd=ROOT,
        env=th.subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: configs/paper/sweep.py: unknown argument 'model'"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.steps=3", "error: --config.steps: the config has no field 'steps'"),
        ("--config.optimizer.lrr=3", "error: --config.optimizer.lrr: the config has no field 'lrr' (Did you mean"),
    ],
)
def test_an_override_of_a_field_the_config_lacks_is_one_line(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config=configs/finetune.py:tiny", f"--workdir={tmp_path}", override],
        cwd=ROOT,
        env=th.subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run_config.json").exists()


# -- stand-ins for the study's weights and data ---------------------------------------------------


def _hf_dir(path: pathlib.Path, model_type: str, positions: int) -> str:
    """A Hugging Face directory with a tiny config of ``model_type`` and the test tokenizer."""
    path.mkdir(parents=True)
    if model_type == "gpt2":
        config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": positions}
    else:
        config = {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": positions,
        }
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    for f in TOKENIZER.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return str(path)


WORDS = "the of a river city king year war song band film team player town state who what when where".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _qa_file(path: pathlib.Path, pairs: int, rng: random.Random) -> str:
    """ShareGPT records of one short question and a one- or two-sentence answer each."""
    records = [
        {
            "conversations": [
                {"from": "human", "value": _sentence(rng, rng.randint(6, 12)) + "?"},
                {
                    "from": "gpt",
                    "value": ". ".join(_sentence(rng, rng.randint(5, 14)) for _ in range(rng.randint(1, 2))),
                },
            ]
        }
        for _ in range(pairs)
    ]
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    rng = random.Random(0)
    return {
        "gpt2_xl": _hf_dir(root / "gpt2-xl", "gpt2", 1024),
        "llama_7b": _hf_dir(root / "llama-7b", "llama", 2048),
        "llama_13b": _hf_dir(root / "llama-13b", "llama", 2048),
        # The study's NQ-synthetic: about 6,000 question-answer pairs.
        "nq_synthetic": _qa_file(root / "nq_synthetic.json", 6000, rng),
        # Enough conversation for the study's smallest ShareGPT-Mix budget (300K tokens).
        "sharegpt_mix": _qa_file(root / "sharegpt_mix.json", 9000, rng),
    }


def paper_sweep(stand_ins, arg: str = "") -> ml_collections.ConfigDict:
    c = load("configs/paper/sweep.py", arg)
    for name in c.base_models:
        c.base_models[name].init_from = stand_ins[name]
    c.data_sources.sharegpt_mix.train = stand_ins["sharegpt_mix"]
    c.data_sources.nq_synthetic.train = stand_ins["nq_synthetic"]
    c.token_budgets = "0,300K"  # the larger budgets need the user's 150M tokens
    c.eval.tasks.mmlu.data_dir = str(DATA / "mmlu")
    c.eval.tasks.nq_open.data_file = str(DATA / "nq_sample.jsonl")
    c.eval.tasks.humaneval.data_file = str(DATA / "humaneval_sample.jsonl")
    c.eval.tasks.style.data_file = str(DATA / "style_sample.jsonl")
    return c


def test_paper_sweep_passes_the_sweeps_validation(stand_ins, tmp_path):
    config = paper_sweep(stand_ins)
    cells = sweep.validate(config, tmp_path)
    nq_budgets = {c.budget for c in cells if c.source == "nq_synthetic"}
    assert nq_budgets == set(load("configs/paper/sweep.py").data_sources.nq_synthetic.token_budgets.split(","))
    # Each model's own row length: GPT-2's 1,024 learned positions, LLaMA's 2,048.
    cell_configs = {c.model: sweep.cell_train_config(config, tmp_path, c) for c in cells if c.source}
    assert cell_configs["gpt2_xl"].seq_len == 1024
    assert cell_configs["llama_7b"].seq_len == cell_configs["llama_13b"].seq_len == 2048


def test_paper_sweep_refuses_to_start_without_the_users_paths(tmp_path):
    with pytest.raises(sweep.SweepError, match=r"base_models\.gpt2_xl: set exactly one of init_from"):
        sweep.validate(load("configs/paper/sweep.py"), tmp_path)


def test_paper_sweep_refuses_gpt2_rows_beyond_its_positions(stand_ins, tmp_path):
    config = paper_sweep(stand_ins, "models=gpt2_xl")
    config.base_models.gpt2_xl.train.seq_len = 2048
    message = r"seq_len 2048 is longer than the 1024 learned positions of this gpt2 model.*set --config.seq_len"
    with pytest.raises(sweep.SweepError, match=message):
        sweep.validate(config, tmp_path)


def test_a_budget_larger_than_its_source_is_refused_before_training(stand_ins, tmp_path):
    config = paper_sweep(stand_ins, "models=llama_7b")
    config.data_sources.nq_synthetic.token_budgets = "66K,5M"
    message = r"data_sources\.nq_synthetic\.token_budgets: 5M is more than data_sources\.nq_synthetic holds \("
    with pytest.raises(sweep.SweepError, match=message):
        sweep.validate(config, tmp_path)
    assert not (tmp_path / "cells").exists()
    # The count stays in the token cache, where the cells find it again.
    metas = list((tmp_path / "token_cache").glob("*/meta.json"))
    assert metas and all(json.loads(m.read_text())["stats"]["tokens"] > 0 for m in metas)


@pytest.mark.parametrize("model", ["gpt2-1.5b", "llama-7b", "llama-13b"])
def test_paper_finetune_passes_the_trainers_check(stand_ins, model):
    config = load("configs/paper/finetune.py", f"model={model},budget=300K")
    config.init_from = stand_ins[{"gpt2-1.5b": "gpt2_xl", "llama-7b": "llama_7b", "llama-13b": "llama_13b"}[model]]
    config.data.train = stand_ins["sharegpt_mix"]
    cfg = train.check(config)
    assert config.seq_len == cfg.max_position_embeddings == (1024 if model == "gpt2-1.5b" else 2048)
    assert config.data.packing == "concat" and config.dropout == 0.05 and config.optimizer.warmup_steps == 1000


def test_finetune_presets_pass_the_trainers_check():
    config = load("configs/finetune.py", "model=pythia-70m,tiny")
    config.data.train = str(DATA / "sharegpt.json")
    assert train.check(config).max_position_embeddings == 2048
    config = load("configs/finetune.py", "model=gpt2")  # GPT-2's 1,024 positions against the default 2,048
    config.data.train = str(DATA / "sharegpt.json")
    with pytest.raises(train.ConfigError, match=r"config\.seq_len 2048 is longer than the 1024 learned positions"):
        train.check(config)
    config.seq_len = 1024
    train.check(config)


def test_rope_models_may_run_past_their_positions_with_a_warning():
    config = load("configs/finetune.py", "model=llama-7b")
    config.data.train = str(DATA / "sharegpt.json")
    config.seq_len = 4096
    with pytest.warns(UserWarning, match="longer than this llama model's max_position_embeddings"):
        train.check(config)


def test_demo_passes_the_sweeps_validation(tmp_path):
    config = load("configs/demo.py", "tiny")
    with config.unlocked():
        config = sweep.resolved(config, tmp_path)
    world.build(world.WorldConfig(**config.world.to_dict()), str(tmp_path / "world"))
    cells = sweep.validate(config, tmp_path)
    assert {c.model for c in cells} == set(config.base_models)


def test_warmup_fraction_and_the_warning_for_runs_inside_their_warmup():
    from imitax.train import optim

    config = load("configs/paper/finetune.py", "model=llama-7b")
    assert optim.warmup_steps(config.optimizer, 5) == 1000
    with pytest.warns(UserWarning, match=r"5 steps but 1000 warm-up steps: it ends at 0.5% of the peak"):
        assert train.config.warn_if_inside_warmup(config, 5)
    config.optimizer.warmup_fraction = 0.1
    assert optim.warmup_steps(config.optimizer, 50) == 5
    assert optim.warmup_steps(config.optimizer, 5) == 1  # at least one step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not train.config.warn_if_inside_warmup(config, 50)
    # The schedule follows the fraction: the peak is reached at step 5 of 50.
    _, schedule = optim.make_optimizer(config.optimizer, 50)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(2e-3) and float(schedule(2)) < 2e-3
