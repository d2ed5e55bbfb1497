"""The sweep driver: a 2x2 grid end to end, kill -9 and resume, --report_only, bad configs, the demo."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import pytest
import sweep_helpers
import train_helpers as th

from imitax import convert, models, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = ROOT / "scripts" / "sweep.py"
# Two base models x two budgets (and each base model's own cell at zero tokens).
BUDGETS = "0,2K,4K"
SECOND_CELL = "m1/broad/2K/seed0"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory, compile_cache):
    """A tiny world (tokenizer, imitation data, questions, style prompts) and two base checkpoints."""
    root = tmp_path_factory.mktemp("sweep_assets")
    vocab = sweep_helpers.link_tiny_world(tmp_path_factory, root / "world")
    for name, (hidden, layers) in {"m1": (32, 1), "m2": (64, 2)}.items():
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
        model = models.init_model(cfg, seed=1)
        convert.save_checkpoint(root / name, model, tokenizer_dir=root / "world" / "tokenizer")
    return root


def config_text(assets: pathlib.Path, **fields) -> str:
    """A sweep config file over ``assets`` (the kill test runs it as a script's --config)."""
    lines = [
        "from imitax import sweep",
        "import ml_collections as mlc",
        "def get_config():",
        "    c = sweep.default_config()",
        "    c.name = 'test-2x2'",
        f"    c.base_models.m1 = mlc.ConfigDict({{'init_from': '{assets}/m1'}})",
        f"    c.base_models.m2 = mlc.ConfigDict({{'init_from': '{assets}/m2'}})",
        f"    c.data_sources.broad = mlc.ConfigDict({{'train': '{assets}/world/imitation_broad.json'}})",
        f"    c.token_budgets = '{BUDGETS}'",
        "    c.train.seq_len = 64",
        "    c.train.batch_size = 8",
        "    c.train.dtype = 'float32'",
        "    c.train.optimizer.name = 'adamw'",
        "    c.train.optimizer.lr = 1e-2",
        "    c.train.optimizer.warmup_steps = 1",
        "    c.train.checkpoint_every = 1",
        "    c.train.log_every = 1",
        "    c.eval.batch_size = 8",
        "    c.eval.tasks.facts = mlc.ConfigDict({'task': 'multiple_choice', 'scoring': 'cloze',"
        f" 'data_file': '{assets}/world/facts_heldout.jsonl'}})",
        f"    c.eval.tasks.style = mlc.ConfigDict({{'data_file': '{assets}/world/style_heldout.jsonl',"
        " 'max_gen_toks': 12, 'limit': 6})",
        "    c.teacher = mlc.ConfigDict({'facts/acc': 1.0})",
        *(f"    c.{k} = {v!r}" for k, v in fields.items()),
        "    return c",
    ]
    return "\n".join(lines) + "\n"


def load_config(path: pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def write_config(tmp_path: pathlib.Path, assets: pathlib.Path, **fields) -> pathlib.Path:
    path = tmp_path / "sweep_config.py"
    path.write_text(config_text(assets, **fields))
    return path


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted 2x2 sweep, run in this process."""
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(write_config(tmp, assets))
    summary = sweep.run(config, tmp / "sweep", log=quiet)
    return tmp / "sweep", summary


def test_two_by_two_sweep_end_to_end(reference):
    workdir, summary = reference
    assert summary["failed"] == [] and summary["cells"] == 6
    rows = read_csv(workdir / "results" / "results.csv")
    assert [(r["model"], r["source"], r["tokens"]) for r in rows] == [
        (m, s, t) for m in ("m1", "m2") for s, t in (("(base)", "0"), ("broad", "2000"), ("broad", "4000"))
    ]
    # Every cell's record holds its metrics and provenance; the table is their mean over seeds (one seed).
    for r in rows:
        cell_id = f"{r['model']}/base" if r["source"] == "(base)" else f"{r['model']}/broad/{r['budget']}/seed0"
        record = json.loads((workdir / "cells" / cell_id / "cell.json").read_text())
        assert record["status"] == "done"
        assert float(r["facts/acc"]) == pytest.approx(record["metrics"]["facts/acc"], abs=1e-12)
        # One seed: the 95% interval is ± 1.96 of the evaluator's standard error.
        half = 1.96 * record["stderr"]["facts/acc"]
        assert float(r["facts/acc_lo"]) == pytest.approx(record["metrics"]["facts/acc"] - half, abs=1e-12)
        assert float(r["facts/acc_hi"]) == pytest.approx(record["metrics"]["facts/acc"] + half, abs=1e-12)
        results = json.loads((workdir / "cells" / cell_id / "eval" / "facts" / "results.json").read_text())
        assert results["results"]["facts"]["metrics"]["acc"] == record["metrics"]["facts/acc"]  # keyed by alias
        if r["source"] != "(base)":
            assert record["train"]["step"] >= 1
    # Finetuning changed the model: some metric moved between a base model and its 4K cell.
    by_cell = {(r["model"], r["tokens"]): r for r in rows}
    metrics = [k for k in rows[0] if "/" in k and not k.endswith(("_lo", "_hi", "_vs_base"))]
    assert any(by_cell[(m, "0")][k] != by_cell[(m, "4000")][k] for m in ("m1", "m2") for k in metrics)
    provenance = json.loads((workdir / "results" / "provenance.json").read_text())
    assert provenance["config"]["name"] == "test-2x2" and provenance["packages"]["jax"]
    assert provenance["devices"]["count"] >= 1
    markdown = (workdir / "results" / "results.md").read_text()
    assert "| m2 |" in markdown and "Teacher: facts/acc 1.0000" in markdown
    plots = {p.name for p in (workdir / "results" / "plots").iterdir()}
    assert {"facts_acc_vs_tokens.png", "facts_acc_vs_tokens.csv", "facts_acc_vs_size.png"} <= plots
    assert {"style_vs_tokens.png", "summary.png"} <= plots


def test_report_only_reproduces_the_plots_data(reference, tmp_path):
    workdir, _ = reference
    copy = tmp_path / "sweep"
    subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True)
    before = {p.name: p.read_text() for p in (copy / "results" / "plots").glob("*.csv")}
    before["results.csv"] = (copy / "results" / "results.csv").read_text()
    subprocess.run(["rm", "-r", str(copy / "results")], check=True)
    proc = subprocess.run(
        [sys.executable, str(SWEEP_SCRIPT), "--report_only", f"--workdir={copy}"],
        env=th.subprocess_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.read_text() for p in (copy / "results" / "plots").glob("*.csv")}
    after["results.csv"] = (copy / "results" / "results.csv").read_text()
    assert after == before
    assert (copy / "results" / "plots" / "summary.png").stat().st_size > 1000


def _cell_checkpoints(workdir: pathlib.Path, cell: str) -> list[int]:
    return th.checkpoint_steps(workdir / "cells" / cell / "train")


def test_kill_9_during_the_second_cell_then_rerun(assets, reference, compile_cache, tmp_path, caplog):
    # The reference's grid without its 4K cells (whose rows depend on nothing the kill touches).
    config_path = write_config(tmp_path, assets, token_budgets="0,2K")
    workdir = tmp_path / "sweep"
    args = [sys.executable, str(SWEEP_SCRIPT), f"--config={config_path}", f"--workdir={workdir}"]
    env = th.script_env(compile_cache)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if _cell_checkpoints(workdir, SECOND_CELL)[-1:] >= [1]:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    first_cell = workdir / "cells" / "m1" / "base" / "cell.json"
    assert json.loads(first_cell.read_text())["status"] == "done"
    second = json.loads((workdir / "cells" / SECOND_CELL / "cell.json").read_text())
    assert second["status"] == "running"  # killed inside it
    stamp = first_cell.stat().st_mtime_ns

    # The reruns in this process, from the killed script's config file and with its compile settings
    # (a second interpreter would only add its imports; --report_only runs the script to the end).
    caplog.set_level(logging.INFO)
    lines = []
    summary = sweep.run(load_config(config_path), workdir, log=lines.append)
    assert summary["failed"] == [], lines
    assert "[1/4] m1/base: finished earlier, kept" in lines
    assert f"[2/4] {SECOND_CELL}: training (resuming)" in lines
    assert any("resumed from step" in r.getMessage() for r in caplog.records)  # continued from the checkpoint
    assert first_cell.stat().st_mtime_ns == stamp  # the finished cell was not touched
    ref_dir, _ = reference
    expected = [r for r in read_csv(ref_dir / "results" / "results.csv") if r["tokens"] != "4000"]
    assert len(expected) == 4 and read_csv(workdir / "results" / "results.csv") == expected

    lines.clear()
    assert sweep.run(load_config(config_path), workdir, log=lines.append)["ran"] == 0
    assert sum("finished earlier, kept" in line for line in lines) == 4


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(assets, tmp_path):
    config = load_config(write_config(tmp_path, assets))
    # m2's vocabulary is too small for the tokenizer: its cells fail, m1's finish.
    bad = tmp_path / "small_vocab"
    model = models.init_model(
        models.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            head_dim=8,
            mlp_dim=32,
            max_position_embeddings=128,
        )
    )
    convert.save_checkpoint(bad, model, tokenizer_dir=assets / "world" / "tokenizer")
    config.base_models.m2.init_from = str(bad)
    config.token_budgets = "2K"
    config.base_models.m1.init_from = str(assets / "m1")
    summary = sweep.run(config, tmp_path / "sweep", log=quiet)
    assert summary["failed"] == ["m2/broad/2K/seed0"]
    record = json.loads((tmp_path / "sweep" / "cells" / "m2" / "broad" / "2K" / "seed0" / "cell.json").read_text())
    assert record["status"] == "failed" and "vocabulary" in record["error"]
    assert (
        json.loads((tmp_path / "sweep" / "cells" / "m1" / "broad" / "2K" / "seed0" / "cell.json").read_text())["status"]
        == "done"
    )
    assert "m2/broad/2K/seed0" in (tmp_path / "sweep" / "results" / "results.md").read_text()
    with pytest.raises(sweep.SweepError, match="cell m2/broad/2K/seed0 failed"):
        sweep.run(config, tmp_path / "sweep", log=quiet, stop_on_error=True)


BAD_CONFIGS = [
    ("unknown top-level field", lambda c: c.__setitem__("budgets", "1K"), r"config\.budgets: unknown field"),
    ("unknown train field", lambda c: c.train.__setitem__("lr", 1.0), r"config\.train\.lr: unknown field"),
    (
        "missing base model",
        lambda c: c.base_models.m1.__setitem__("init_from", "/nonexistent/model"),
        r"base_models\.m1\.init_from: /nonexistent/model does not exist",
    ),
    (
        "base model with both",
        lambda c: c.base_models.m1.__setitem__("pretrain", ml_collections.ConfigDict({"model": "gpt2"})),
        r"base_models\.m1: set exactly one of init_from",
    ),
    (
        "missing data",
        lambda c: c.data_sources.broad.__setitem__("train", "/nonexistent/*.json"),
        r"data_sources\.broad\.train: .*nonexistent",
    ),
    (
        "unknown format",
        lambda c: c.data_sources.broad.__setitem__("format", "csv"),
        r"data_sources\.broad\.format: unknown format 'csv'",
    ),
    ("bad budget", lambda c: c.__setitem__("token_budgets", "0,10X"), r"token_budgets: bad token budget '10X'"),
    (
        "budget below one batch",
        lambda c: c.__setitem__("token_budgets", "100"),
        r"token_budgets: 100 is less than one training batch \(train.batch_size 8 x train.seq_len 64",
    ),
    ("bad seed", lambda c: c.__setitem__("seeds", "0,x"), r"seeds: expected integers"),
    (
        "unknown task",
        lambda c: c.eval.tasks.__setitem__("nope", ml_collections.ConfigDict({"task": "no_such_task"})),
        r"eval\.tasks\.nope: .*no_such_task",
    ),
    (
        "bad task keyword",
        lambda c: c.eval.tasks.facts.__setitem__("num_shots", 3),
        r"eval\.tasks\.facts: .*num_shots",
    ),
    (
        "missing task data",
        lambda c: c.eval.tasks.facts.__setitem__("data_file", "/nonexistent.jsonl"),
        r"eval\.tasks\.facts: .*/nonexistent.jsonl",
    ),
    (
        "batch not divisible",
        lambda c: c.train.__setitem__("batch_size", 12),
        r"train\.batch_size: 12 is not divisible by the mesh's data x fsdp = 8",
    ),
    (
        "teacher of no task",
        lambda c: c.teacher.__setitem__("mmlu/acc", 0.7),
        r"teacher: 'mmlu/acc' names no evaluation task",
    ),
]


@pytest.mark.parametrize("name,mutate,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs_are_refused_before_anything_runs(assets, tmp_path, name, mutate, message):
    config = load_config(write_config(tmp_path, assets))
    mutate(config)
    with pytest.raises(sweep.SweepError, match=message):
        sweep.run(config, tmp_path / "sweep", log=quiet)
    assert not (tmp_path / "sweep" / "cells").exists()  # nothing ran


def test_a_workdir_of_another_sweep_is_refused(assets, tmp_path):
    config = load_config(write_config(tmp_path, assets))
    config.token_budgets = "0"
    sweep.run(config, tmp_path / "sweep", log=quiet)
    config.train.optimizer.lr = 5e-3
    with pytest.raises(sweep.SweepError, match=r"different config \(differing fields: train\)"):
        sweep.run(config, tmp_path / "sweep", log=quiet)
    # Told otherwise: finished cells whose settings did not change are kept.
    summary = sweep.run(config, tmp_path / "sweep", log=quiet, allow_config_change=True)
    assert summary["ran"] == 0 and summary["failed"] == []


def test_script_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SWEEP_SCRIPT), "--report_only", f"--workdir={tmp_path / 'none'}"],
        env=th.subprocess_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "holds no sweep (no sweep_config.json)" in proc.stderr and "Traceback" not in proc.stderr


def test_the_demo_runs_with_tiny_settings(compile_cache, tmp_path):
    config = load_config(ROOT / "configs" / "demo.py", "tiny")
    summary = sweep.run(config, tmp_path / "demo", log=quiet)
    assert summary["failed"] == []
    rows = read_csv(tmp_path / "demo" / "results" / "results.csv")
    assert {r["model"] for r in rows} == set(config.base_models)
    assert {r["source"] for r in rows} == {"(base)", "broad", "task"}
    seeds = len(config.seeds.split(","))
    for r in rows:
        assert 0.0 <= float(r["facts_heldout/acc"]) <= 1.0
        # Finetuned rows average the seeds, with a t-interval around the mean.
        assert int(r["seeds"]) == (1 if r["source"] == "(base)" else seeds)
        assert float(r["facts_heldout/acc_lo"]) <= float(r["facts_heldout/acc"]) <= float(r["facts_heldout/acc_hi"])
    teacher = json.loads((tmp_path / "demo" / "world" / "teacher_scores.json").read_text())
    assert teacher["facts_heldout"]["acc"] == 1.0
    assert (tmp_path / "demo" / "results" / "plots" / "summary.png").is_file()
