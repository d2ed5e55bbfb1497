"""The evaluator (validation, results.json, samples files, atomic writes) with fake LMs, and scripts/evaluate.py."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from imitax.eval import evaluator, tasks
from imitax.eval.tasks.humaneval import load_problems, truncate

DATA = pathlib.Path(__file__).parent / "data"


class FakeLM:
    """Scores a continuation by its first character (`` A`` best) and answers prompts with ``answer(prompt)``."""

    def __init__(self, answer=lambda prompt: ""):
        self.answer, self.calls = answer, []

    def loglikelihood(self, requests, progress=False):
        self.calls.append(("loglikelihood", len(requests)))
        return [(-float(ord(cont.strip()[0])), cont == " A") for _, cont in requests]

    def generate_until(self, requests):
        self.calls.append(("generate_until", len(requests)))
        return [truncate(self.answer(prompt), settings["until"]) for prompt, settings in requests]


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# -- validation ------------------------------------------------------------------------------------


def test_validate_reports_every_problem_and_lists_what_is_accepted():
    evaluator.validate_tasks({"mmlu": {"data_dir": "x", "num_fewshot": 5}, "humaneval": {}})
    with pytest.raises(ValueError) as e:
        evaluator.validate_tasks(
            {"mmlu": {"num_shots": 5}, "mlmu": {}, "multiple_choice": {}, "humaneval": {"data_file": "x"}}
        )
    message = str(e.value)
    assert f"unknown task(s) 'mlmu'; known tasks: {', '.join(tasks.names())}" in message
    assert "task 'mmlu' does not take num_shots; it accepts: num_fewshot, limit, subjects, data_dir" in message
    assert "task 'multiple_choice' needs data_file= (it accepts: data_file, num_fewshot" in message
    assert "humaneval" not in message.split("known tasks")[0]  # a valid entry is not blamed
    with pytest.raises(ValueError, match="no tasks to evaluate; known tasks: humaneval, mmlu"):
        evaluator.validate_tasks({})
    # The sweep's grids are ml_collections configs.
    import ml_collections

    evaluator.validate_tasks(ml_collections.ConfigDict({"mmlu": {"data_dir": "x"}}))
    with pytest.raises(ValueError, match="task 'mmlu' does not take dir"):
        evaluator.validate_tasks(ml_collections.FrozenConfigDict({"mmlu": {"dir": "x"}}))


def test_nothing_runs_and_nothing_is_written_on_bad_input(tmp_path):
    lm = FakeLM()
    good = {"multiple_choice": {"data_file": str(DATA / "mc.jsonl")}}
    with pytest.raises(ValueError, match="'nq_closed'"):
        evaluator.evaluate(lm, {**good, "nq_closed": {}}, tmp_path / "out", progress=False)
    # Data is read for every task before the first one runs.
    missing = {"humaneval": {"data_file": str(tmp_path / "nope.jsonl")}}
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such HumanEval problems file. Pass data_file="):
        evaluator.evaluate(lm, {**good, **missing}, tmp_path / "out", progress=False)
    # A keyword value the task itself rejects.
    with pytest.raises(ValueError, match="task 'multiple_choice': num_fewshot=2 needs fewshot_file="):
        evaluator.evaluate(lm, {"multiple_choice": {**good["multiple_choice"], "num_fewshot": 2}}, tmp_path / "out")
    assert lm.calls == [] and not (tmp_path / "out").exists()


def test_named_tasks_run_one_task_twice_and_are_built_once(tmp_path):
    data_file = tmp_path / "mc.jsonl"
    data_file.write_bytes((DATA / "mc.jsonl").read_bytes())
    tasks_config = {
        "first": {"task": "multiple_choice", "data_file": str(data_file), "limit": 2},
        "all": {"task": "multiple_choice", "data_file": str(data_file)},
    }
    with pytest.raises(ValueError, match=r"task 'first' \(multiple_choice\) does not take size; it accepts: data_file"):
        evaluator.validate_tasks({"first": {"task": "multiple_choice", "size": 2}})
    built = evaluator.build_tasks(tasks_config)
    assert list(built) == ["first", "all"]
    # Built tasks serve many models: nothing is read again (the data file is gone by now).
    data_file.unlink()
    for _ in range(2):
        out = evaluator.evaluate(FakeLM(), tasks_config, tmp_path / "out", progress=False, built=built)
        assert out["results"]["first"]["n"] == 2 and out["results"]["all"]["n"] == 4
        # The fake LM picks " A": right on the second question only (targets 1, 0, 3, ...).
        assert out["results"]["first"]["metrics"]["acc"] == 0.5 and out["results"]["all"]["metrics"]["acc"] == 0.25
    assert out["config"]["first"]["task"] == "multiple_choice"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results.json",
        "samples_all.jsonl",
        "samples_first.jsonl",
    ]
    with pytest.raises(ValueError, match=r"built tasks \['first', 'all'\] are not the tasks \['first'\]"):
        evaluator.evaluate(FakeLM(), {"first": tasks_config["first"]}, built=built)


# -- results and samples ---------------------------------------------------------------------------


def test_results_json_and_samples(tmp_path):
    problems = load_problems(DATA / "humaneval_sample.jsonl")[0]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
    lm = FakeLM(lambda prompt: solutions[prompt] if prompt == problems[0]["prompt"] else "    pass\n")
    config = {
        "multiple_choice": {"data_file": DATA / "mc.jsonl", "limit": 3},
        "humaneval": {"data_file": str(DATA / "humaneval_sample.jsonl"), "limit": 1},  # one problem: stderr nan
    }
    out = evaluator.evaluate(lm, config, tmp_path / "out", model_info={"path": "fake", "step": 3}, progress=False)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == out
    assert set(written) == {"results", "config", "model", "provenance"}
    assert written["model"] == {"path": "fake", "step": 3}
    assert written["config"]["multiple_choice"] == {"data_file": str(DATA / "mc.jsonl"), "limit": 3}

    mc = written["results"]["multiple_choice"]
    assert set(mc) == {"metrics", "stderr", "n", "num_fewshot", "info"}
    assert mc["n"] == 3 and mc["num_fewshot"] == 0
    # The fake LM always prefers " A": right on the question whose answer is 0 (the second) only.
    samples = read_jsonl(tmp_path / "out" / "samples_multiple_choice.jsonl")
    assert [s["pred"] for s in samples] == [0, 0, 0] and [s["target"] for s in samples] == [1, 0, 3]
    assert mc["metrics"]["acc"] == pytest.approx(1 / 3) == sum(s["acc"] for s in samples) / 3
    assert mc["stderr"]["acc"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert samples[0]["question"] == "Which of these animals is a mammal?" and samples[0]["loglikelihoods"] == [
        -65.0,
        -66.0,
        -67.0,
    ]

    he = written["results"]["humaneval"]
    assert he["metrics"] == {"pass@1": 1.0} and he["stderr"] == {"pass@1": None} and he["n"] == 1
    assert read_jsonl(tmp_path / "out" / "samples_humaneval.jsonl")[0]["passed"] == [True]
    assert he["info"]["seconds"] > 0

    prov = written["provenance"]
    assert {"jax", "flax", "transformers", "imitax"} <= set(prov["packages"]) and prov["packages"]["jax"]
    assert prov["devices"]["backend"] == "cpu" and prov["devices"]["count"] == 8
    assert prov["git"] is None or len(prov["git"]["revision"]) == 40
    assert prov["started"] <= prov["finished"]
    # Strict JSON (no NaN), and no temporary files left behind.
    json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=pytest.fail)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results.json",
        "samples_humaneval.jsonl",
        "samples_multiple_choice.jsonl",
    ]
    # No output_dir: the same numbers, nothing written.
    again = evaluator.evaluate(FakeLM(), {"multiple_choice": config["multiple_choice"]}, progress=False)
    assert again["results"]["multiple_choice"]["metrics"] == mc["metrics"]


def test_a_crash_leaves_no_results_json_and_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = {
        "multiple_choice": {"data_file": str(DATA / "mc.jsonl")},
        "humaneval": {"data_file": str(DATA / "humaneval_sample.jsonl")},
    }

    def broken(requests):
        raise RuntimeError("device lost")

    lm = FakeLM()
    lm.generate_until = broken
    with pytest.raises(RuntimeError, match="device lost"):
        evaluator.evaluate(lm, config, out, progress=False)
    # The finished task's samples are complete; results.json is absent, as is any temporary file.
    assert sorted(p.name for p in out.iterdir()) == ["samples_multiple_choice.jsonl"]
    assert len(read_jsonl(out / "samples_multiple_choice.jsonl")) == 4
    # An interrupted write leaves the old file as it was.
    (out / "results.json").write_text('{"old": true}')
    monkeypatch.setattr(evaluator.records, "dumps", lambda value, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        evaluator.evaluate(FakeLM(), {"multiple_choice": config["multiple_choice"]}, out, progress=False)
    assert json.loads((out / "results.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples_multiple_choice.jsonl"]


def test_generation_longer_than_the_model_is_refused_before_running(tmp_path):
    lm = FakeLM()
    lm.max_length = 64
    config = {
        "multiple_choice": {"data_file": str(DATA / "mc.jsonl")},
        "nq_open": {"data_file": str(DATA / "nq_sample.jsonl"), "max_gen_toks": 64},
    }
    with pytest.raises(ValueError, match="task 'nq_open': max_gen_toks=64 but the model reads at most 64 tokens"):
        evaluator.evaluate(lm, config, tmp_path / "out", progress=False)
    assert lm.calls == [] and not (tmp_path / "out").exists()


# -- scripts/evaluate.py ---------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LLaMA with the test tokenizer, saved as a Hugging Face directory."""
    import torch
    import transformers
    from hf_models import tiny_hf_config

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = 320, 512  # the tokenizer has 300 ids
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(DATA / "tokenizer")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with 64 learned positions and the test tokenizer, as a Hugging Face directory."""
    import torch
    import transformers
    from hf_models import tiny_hf_config

    config = tiny_hf_config("gpt2")
    config.vocab_size = 320
    assert config.n_positions == 64
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(DATA / "tokenizer")).save_pretrained(path)
    return path


def _script(*args, cache):
    import subprocess
    import sys

    from train_helpers import script_env

    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *map(str, args)],
        cwd=ROOT,
        env=script_env(cache, device_count=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process):
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def test_script_end_to_end(hf_dir, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    run = _script(
        f"--model={hf_dir}",
        "--tasks=mmlu,nq_open,humaneval,style,multiple_choice",
        f"--output_dir={out}",
        "--num_fewshot=1",
        "--limit=2",
        "--batch_size=4",
        "--max_gen_toks=8",
        f"--mmlu_dir={DATA / 'mmlu'}",
        f"--nq_file={DATA / 'nq_sample.jsonl'}",
        f"--humaneval_file={DATA / 'humaneval_sample.jsonl'}",
        f"--style_file={DATA / 'style_sample.jsonl'}",
        f"--mc_file={DATA / 'mc.jsonl'}",
        f"--mc_fewshot_file={DATA / 'mc.jsonl'}",
        "--mc_scoring=cloze",
        "--add_bos_token=false",  # this tokenizer has no BOS: the numbers equal the default's
        cache=tmp_path / "cache",
    )
    # A dataset read through the `datasets` library (`hf:DIR:SPLIT`, as a hub name would be), run
    # meanwhile: datasets' fingerprinting must work in the script's process.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "data.json").write_text((DATA / "sharegpt.json").read_text())
    hub_run = _script(
        f"--model={hf_dir}",
        "--tasks=perplexity",
        f"--perplexity_file=hf:{hub}:train",
        f"--output_dir={tmp_path / 'hub_out'}",
        cache=tmp_path / "hub_cache",
    )
    # Bad input, run meanwhile: one line on stderr, exit status 1, nothing written.
    bad = {
        "unknown": _script(
            f"--model={hf_dir}", "--tasks=mmlu,nq_closed", f"--output_dir={tmp_path / 'b1'}", cache=tmp_path / "c1"
        ),
        "data": _script(
            f"--model={hf_dir}",
            "--tasks=nq_open",
            f"--nq_file={tmp_path / 'nq.jsonl'}",
            f"--output_dir={tmp_path / 'b2'}",
            cache=tmp_path / "c2",
        ),
        "model": _script(
            f"--model={tmp_path}",
            "--tasks=humaneval",
            f"--humaneval_file={DATA / 'humaneval_sample.jsonl'}",
            f"--output_dir={tmp_path / 'b3'}",
            cache=tmp_path / "c3",
        ),
        "style": _script(
            f"--model={hf_dir}", "--tasks=style", f"--output_dir={tmp_path / 'b4'}", cache=tmp_path / "c4"
        ),
        "bos_value": _script(
            f"--model={hf_dir}",
            "--add_bos_token=yes",
            f"--mc_file={DATA / 'mc.jsonl'}",
            "--tasks=multiple_choice",
            f"--output_dir={tmp_path / 'b5'}",
            cache=tmp_path / "c5",
        ),
        "no_bos": _script(  # the test tokenizer has no BOS token to prepend
            f"--model={hf_dir}",
            "--add_bos_token=true",
            f"--mc_file={DATA / 'mc.jsonl'}",
            "--tasks=multiple_choice",
            f"--output_dir={tmp_path / 'b6'}",
            cache=tmp_path / "c6",
        ),
        "max_length": _script(  # past GPT-2's 64 learned positions
            f"--model={gpt2_dir}",
            "--max_length=100",
            f"--mc_file={DATA / 'mc.jsonl'}",
            "--tasks=multiple_choice",
            f"--output_dir={tmp_path / 'b7'}",
            cache=tmp_path / "c7",
        ),
    }
    want = {
        "unknown": f"evaluate.py: error: unknown task(s) nq_closed; known tasks: {', '.join(tasks.names())}",
        "data": f"evaluate.py: error: {tmp_path / 'nq.jsonl'}: no such NQ-open data file. Supply local files",
        "model": f"evaluate.py: error: model: {tmp_path} is not a model directory; expected an imitax checkpoint",
        "style": "evaluate.py: error: task 'style' needs --style_file=FILE",
        "bos_value": "evaluate.py: error: --add_bos_token must be true or false (or unset: the tokenizer's "
        "default), got 'yes'",
        "no_bos": "evaluate.py: error: add_bos_token=True, but this tokenizer has no BOS token to prepend",
        "max_length": "evaluate.py: error: max_length 100 is longer than the 64 learned positions of this gpt2 "
        "model (positions 64.. have no embedding); set max_length (scripts/evaluate.py: --max_length) to at most 64",
    }
    for i, (name, process) in enumerate(bad.items(), start=1):
        code, _, stderr = _finish(process)
        assert code == 1, (name, stderr)
        assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(want[name]), (name, stderr)
        assert not (tmp_path / f"b{i}").exists()

    code, _, stderr = _finish(hub_run)
    assert code == 0, stderr
    hub_results = json.loads((tmp_path / "hub_out" / "results.json").read_text())["results"]["perplexity"]
    assert hub_results["n"] == 2  # of the file's 3 conversations, "c" has no teacher turn

    code, stdout, stderr = _finish(run)
    assert code == 0, stderr
    assert f"wrote {out / 'results.json'}" in stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"mmlu", "nq_open", "humaneval", "style", "multiple_choice"}
    assert results["model"]["add_bos_token"] is False and results["model"]["max_length"] == 512
    assert results["model"]["path"] == str(hf_dir) and results["config"]["mmlu"] == {
        "data_dir": str(DATA / "mmlu"),
        "num_fewshot": 1,
        "limit": 2,
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json"] + [f"samples_{t}.jsonl" for t in results["results"]]
    )
    samples = {t: read_jsonl(out / f"samples_{t}.jsonl") for t in results["results"]}
    for task, result in results["results"].items():
        assert result["n"] == len(samples[task]), task
    r = results["results"]

    mmlu = samples["mmlu"]  # 2 questions of each of the 3 subjects
    assert r["mmlu"]["n"] == 6 and r["mmlu"]["num_fewshot"] == 1
    for s in mmlu:
        assert {"question", "subject", "target", "loglikelihoods", "is_greedy", "acc"} <= set(s)
        assert len(s["loglikelihoods"]) == len(s["is_greedy"]) == 4
        assert s["acc"] == float(max(range(4), key=lambda j: s["loglikelihoods"][j]) == s["target"])
    assert r["mmlu"]["metrics"]["acc"] == pytest.approx(sum(s["acc"] for s in mmlu) / 6)
    assert r["mmlu"]["info"]["scoring"]["requests"] == 24

    nq = samples["nq_open"]  # the file's first record is the example; the next 2 are scored
    assert [s["question"] for s in nq] == [
        json.loads(line)["question"] for line in (DATA / "nq_sample.jsonl").read_text().splitlines()[1:3]
    ]
    assert r["nq_open"]["metrics"]["exact_match"] == pytest.approx(sum(s["exact_match"] for s in nq) / 2)
    assert all("\n" not in s["answer"] for s in nq)

    assert r["humaneval"]["metrics"]["pass@1"] == pytest.approx(sum(s["num_correct"] for s in samples["humaneval"]) / 2)
    style = samples["style"]
    assert r["style"]["metrics"]["list_rate"] == pytest.approx(sum(s["answer_list"] for s in style) / 2)
    assert r["style"]["metrics"]["unigram_f1"] == pytest.approx(sum(s["unigram_f1"] for s in style) / 2)
    assert r["style"]["info"]["prompts_tokenized_as_in_training"] == 2
    mc = samples["multiple_choice"]
    assert r["multiple_choice"]["metrics"]["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in mc) / 2)
    assert results["provenance"]["packages"]["imitax"] and results["provenance"]["devices"]["count"] == 1
