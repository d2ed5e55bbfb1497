"""The multiple_choice task's cloze scoring (the harness's ARC style) against transformers, and acc_norm by hand."""

from __future__ import annotations

import pathlib

import pytest
from test_scoring import ATOL, harness_tokens, hf_loglikelihood, tiny_pair, tokenizer

from imitax.eval import tasks
from imitax.eval.lm import LM
from imitax.eval.tasks.multiple_choice import build_cloze_context

DATA = pathlib.Path(__file__).parent / "data"
POSITIONS = 128


def test_cloze_prompt_is_the_harness_arc_prompt():
    shot = {"question": "Is water wet?", "choices": ["Yes", "No"], "answer": 0}
    doc = {"question": "Which number is prime?", "choices": ["4", "11"], "answer": 1}
    assert build_cloze_context("Answer.\n\n", [shot], doc) == (
        "Answer.\n\nQuestion: Is water wet?\nAnswer: Yes\n\nQuestion: Which number is prime?\nAnswer:"
    )


def test_cloze_matches_transformers():
    torch_model, model = tiny_pair("llama", POSITIONS)
    lm = LM(model, tokenizer(), batch_size=4)
    task = tasks.get("multiple_choice")(
        data_file=DATA / "mc.jsonl", num_fewshot=1, fewshot_file=DATA / "mc.jsonl", scoring="cloze"
    )
    result = task.run(lm, progress=False)
    assert result.n == 4 and result.num_fewshot == 1 and set(result.metrics) == {"acc", "acc_norm"}
    shot = "Question: Which of these animals is a mammal?\nAnswer: Dolphin\n\n"
    docs = [
        ("Which of these animals is a mammal?", ["Shark", "Dolphin", "Trout"], 1),
        ("Is water wet?", ["Yes", "No"], 0),
        ("Which number is prime?", ["4", "6", "9", "11", "15"], 3),
        ("What colour is a clear daytime sky?", ["Green", "Blue", "Red", "Black"], 1),
    ]
    accs, norms = [], []
    for sample, (question, choices, answer) in zip(result.samples, docs, strict=True):
        context = f"{shot}Question: {question}\nAnswer:"
        want = [hf_loglikelihood(torch_model, *harness_tokens(context, f" {c}"), POSITIONS) for c in choices]
        assert sample["choices"] == choices and sample["target"] == answer
        for got_ll, got_greedy, (want_ll, want_greedy) in zip(
            sample["loglikelihoods"], sample["is_greedy"], want, strict=True
        ):
            assert abs(got_ll - want_ll) <= ATOL and got_greedy == want_greedy
        lls = [w for w, _ in want]
        pred = max(range(len(choices)), key=lambda j: lls[j])
        pred_norm = max(range(len(choices)), key=lambda j: lls[j] / len(choices[j]))
        assert (sample["pred"], sample["pred_norm"]) == (pred, pred_norm)
        accs.append(float(pred == answer))
        norms.append(float(pred_norm == answer))
    assert result.metrics["acc"] == pytest.approx(sum(accs) / 4)
    assert result.metrics["acc_norm"] == pytest.approx(sum(norms) / 4)
    assert result.info["scoring_method"] == "cloze"


class FixedLM:
    """Gives each continuation the log-likelihood in ``table``."""

    def __init__(self, table):
        self.table, self.requests = table, []

    def loglikelihood(self, requests, progress=False):
        self.requests += requests
        return [(self.table[cont], False) for _, cont in requests]


def test_acc_norm_divides_by_characters(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Pick", "choices": ["ééé", "ab"], "answer": 0}\n')
    # Per character: -3/3 = -1 beats -2.5/2 = -1.25; per UTF-8 byte (6 bytes) -0.5 would win too, but
    # raw -3 < -2.5 loses: acc 0, acc_norm 1.
    lm = FixedLM({" ééé": -3.0, " ab": -2.5})
    result = tasks.get("multiple_choice")(data_file=path, scoring="cloze").run(lm, progress=False)
    assert lm.requests == [("Question: Pick\nAnswer:", " ééé"), ("Question: Pick\nAnswer:", " ab")]
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}
    # Characters, not bytes: with -5.5 the harness's -5.5/3 < -2.5/2 picks "ab" (per byte -5.5/6 would pick "ééé").
    lm = FixedLM({" ééé": -5.5, " ab": -2.5})
    assert tasks.get("multiple_choice")(data_file=path, scoring="cloze").run(lm).metrics["acc_norm"] == 0.0
    with pytest.raises(ValueError, match="unknown scoring 'logits'; expected one of letters, cloze"):
        tasks.get("multiple_choice")(data_file=path, scoring="logits")
