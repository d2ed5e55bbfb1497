"""Tasks: MMLU's prompt, data layouts and numbers; the multiple-choice and perplexity tasks; the registry."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scoring import ATOL, harness_tokens, hf_loglikelihood, tiny_pair, tokenizer

from imitax import data
from imitax.eval import tasks
from imitax.eval.lm import LM
from imitax.eval.tasks import mmlu

DATA = pathlib.Path(__file__).parent / "data"
MMLU_DIR = DATA / "mmlu"
POSITIONS = 1024  # the sample's 5-shot prompts are 610-690 tokens with the tiny tokenizer


def records(split: str) -> list[dict]:
    return [json.loads(line) for line in (MMLU_DIR / f"{split}.jsonl").read_text().splitlines()]


# -- the prompt ------------------------------------------------------------------------------------------


def test_prompt_is_the_harness_prompt():
    splits, _ = mmlu.load_local(MMLU_DIR)
    doc = splits["test"]["astronomy"][0]  # its question has surrounding whitespace, stripped in the prompt
    want = (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
        "What is the name of the galaxy that contains the Solar System?\n"
        "A. Andromeda\nB. Triangulum\nC. Milky Way\nD. Whirlpool\nAnswer: C\n\n"
        "What is the largest planet in the Solar System?\nA. Jupiter\nB. Saturn\nC. Neptune\nD. Earth\nAnswer:"
    )
    assert mmlu.prompt(doc, splits["dev"]["astronomy"][:2]) == want
    geography = splits["test"]["high_school_geography"][0]
    assert mmlu.prompt(geography, []) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Which ocean is the largest?\nA. Atlantic\nB. Indian\nC. Arctic\nD. Pacific\nAnswer:"
    )
    assert len(mmlu.SUBJECTS) == 57 and set(mmlu.SUBJECTS.values()) == set(mmlu.CATEGORIES)


# -- the numbers -----------------------------------------------------------------------------------------


def test_mmlu_5_shot_matches_transformers():
    torch_model, model = tiny_pair("llama", POSITIONS)
    lm = LM(model, tokenizer(), batch_size=4)
    result = tasks.get("mmlu")(data_dir=MMLU_DIR).run(lm, progress=False)
    assert result.n == 9 and result.num_fewshot == 5
    splits, _ = mmlu.load_local(MMLU_DIR)
    for sample in result.samples:
        doc = next(d for d in splits["test"][sample["subject"]] if d["question"] == sample["question"])
        context = mmlu.prompt(doc, splits["dev"][doc["subject"]][:5])
        want = [hf_loglikelihood(torch_model, *harness_tokens(context, f" {x}"), POSITIONS) for x in "ABCD"]
        for got_ll, got_greedy, (want_ll, want_greedy) in zip(
            sample["loglikelihoods"], sample["is_greedy"], want, strict=True
        ):
            assert abs(got_ll - want_ll) <= ATOL and got_greedy == want_greedy
        assert sample["acc"] == float(max(range(4), key=lambda j: want[j][0]) == doc["answer"])
    accs = [s["acc"] for s in result.samples]
    assert result.metrics["acc"] == pytest.approx(sum(accs) / 9)
    by_subject = {s: [x["acc"] for x in result.samples if x["subject"] == s] for s in splits["test"]}
    assert result.metrics["acc_macro"] == pytest.approx(sum(sum(v) / 3 for v in by_subject.values()) / 3)
    assert result.metrics["acc/astronomy"] == pytest.approx(sum(by_subject["astronomy"]) / 3)
    assert result.metrics["acc/stem"] == pytest.approx(
        (sum(by_subject["astronomy"]) + sum(by_subject["abstract_algebra"])) / 6
    )
    if 0 < result.metrics["acc"] < 1:
        p = result.metrics["acc"]
        assert result.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / 8))
    # The shared 5-shot prefix of each subject was computed once.
    assert result.info["scoring"]["prefix_groups"] == 3 and result.info["scoring"]["truncated"] == 0
    assert result.info["layout"] == "combined"
    json.dumps(result.to_dict())  # JSON-able


def test_mmlu_with_truncated_prompts_and_a_subject_without_a_group_matches_transformers():
    # A 640-position GPT-2: of the 5-shot prompts (613-683 tokens), abstract algebra keeps two whole (a
    # group) and one truncated from the left, astronomy keeps all three, high school geography none (no group).
    positions = 640
    torch_model, model = tiny_pair("gpt2", positions)
    lm = LM(model, tokenizer(), batch_size=4)
    result = tasks.get("mmlu")(data_dir=MMLU_DIR).run(lm, progress=False)
    splits, _ = mmlu.load_local(MMLU_DIR)
    truncated = 0
    for sample in result.samples:
        doc = next(d for d in splits["test"][sample["subject"]] if d["question"] == sample["question"])
        encoded = [harness_tokens(mmlu.prompt(doc, splits["dev"][doc["subject"]][:5]), f" {x}") for x in "ABCD"]
        truncated += sum(len(c) + len(k) > positions + 1 for c, k in encoded)
        want = [hf_loglikelihood(torch_model, c, k, positions) for c, k in encoded]
        for got_ll, got_greedy, (want_ll, want_greedy) in zip(
            sample["loglikelihoods"], sample["is_greedy"], want, strict=True
        ):
            assert abs(got_ll - want_ll) <= ATOL and got_greedy == want_greedy
        assert sample["acc"] == float(max(range(4), key=lambda j: want[j][0]) == doc["answer"])
    scoring = result.info["scoring"]
    assert truncated == scoring["truncated"] == 4 * 4
    assert scoring["prefix_groups"] == 2


# -- data layouts ----------------------------------------------------------------------------------------


def _docs(splits):
    return {
        split: {s: [(d["question"], d["choices"], d["answer"]) for d in docs] for s, docs in v.items()}
        for split, v in splits.items()
    }


def test_every_local_layout_loads_the_same_questions(tmp_path, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("local files must not touch the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    want, _ = mmlu.load_local(MMLU_DIR)
    # Combined Parquet files with the hub's names, in all/.
    (tmp_path / "hub" / "all").mkdir(parents=True)
    for split in mmlu.SPLITS:
        pq.write_table(
            pa.Table.from_pylist(records(split)), tmp_path / "hub" / "all" / f"{split}-00000-of-00001.parquet"
        )
    # One subdirectory per subject (JSONL, without the subject field: the directory names it).
    for split in mmlu.SPLITS:
        for r in records(split):
            subject_dir = tmp_path / "per_subject" / r["subject"]
            subject_dir.mkdir(parents=True, exist_ok=True)
            with open(subject_dir / f"{split}.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k != "subject"}) + "\n")
    # The original CSV release: no header, answer letters.
    for split in mmlu.SPLITS:
        (tmp_path / "csv" / split).mkdir(parents=True)
        for r in records(split):
            with open(tmp_path / "csv" / split / f"{r['subject']}_{split}.csv", "a", newline="") as f:
                csv.writer(f).writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    for layout in ("hub", "per_subject", "csv"):
        got, info = mmlu.load_local(tmp_path / layout)
        assert mmlu.MMLU(data_dir=tmp_path / layout).load()[2]["layout"] == info["layout"]
        assert _docs(got) == _docs(want), layout
        assert info["layout"] == {"hub": "combined", "per_subject": "per_subject", "csv": "csv"}[layout]


def test_hub_dataset_path(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(records(split))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    docs, shots, info = mmlu.MMLU(num_fewshot=2).load()
    assert calls == [("cais/mmlu", "all", "dev"), ("cais/mmlu", "all", "test")]
    assert info["source"] == "hub" and len(docs) == 9 and all(len(s) == 2 for s in shots.values())

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"cais/mmlu.*no internet.*data_dir=DIR.*_dev\.csv"):
        mmlu.MMLU().load()


def test_limit_and_subjects():
    docs, shots, info = mmlu.MMLU(limit=2, subjects="astronomy", data_dir=MMLU_DIR).load()
    assert [d["subject"] for d in docs] == ["astronomy"] * 2 and list(shots) == ["astronomy"]


# -- errors ------------------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown task 'mmmlu'; known tasks: humaneval, mmlu, multiple_choice, nq_open, pairwise, perplexity, "
        "style",
    ):
        tasks.get("mmmlu")
    assert {"mmlu", "multiple_choice", "perplexity"} <= set(tasks.names())


def test_missing_data_says_how_to_supply_it(tmp_path):
    for where in (tmp_path, tmp_path / "nothing_here"):
        with pytest.raises(FileNotFoundError, match=r"data_dir=DIR.*dev\.jsonl.*<subject>.*_test\.csv"):
            mmlu.MMLU(data_dir=where).load()


def test_too_many_shots(tmp_path):
    with pytest.raises(ValueError, match="num_fewshot=6 but subject 'abstract_algebra' has only 5 dev examples"):
        mmlu.MMLU(num_fewshot=6, data_dir=MMLU_DIR).load()
    with pytest.raises(ValueError, match="no test questions for subjects \\['anatomy'\\]"):
        mmlu.MMLU(subjects=["anatomy"], data_dir=MMLU_DIR).load()
    shutil.copytree(MMLU_DIR, tmp_path / "bad")
    with open(tmp_path / "bad" / "test.jsonl", "a") as f:
        f.write(json.dumps({"question": "q", "subject": "astronomy", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="4 choices"):
        mmlu.MMLU(data_dir=tmp_path / "bad").load()


# -- the other tasks ---------------------------------------------------------------------------------------


def test_multiple_choice_task():
    torch_model, model = tiny_pair("llama", POSITIONS)
    lm = LM(model, tokenizer(), batch_size=4)
    result = tasks.get("multiple_choice")(data_file=DATA / "mc.jsonl").run(lm, progress=False)
    assert result.n == 4 and result.num_fewshot == 0
    sample = result.samples[2]
    assert sample["target"] == 3 and len(sample["loglikelihoods"]) == 5
    context = "Which number is prime?\nA. 4\nB. 6\nC. 9\nD. 11\nE. 15\nAnswer:"
    want = [hf_loglikelihood(torch_model, *harness_tokens(context, f" {x}"), POSITIONS)[0] for x in "ABCDE"]
    assert max(abs(g - w) for g, w in zip(sample["loglikelihoods"], want, strict=True)) <= ATOL
    assert result.samples[3]["target"] == 1  # the letter "B"
    assert result.metrics["acc"] == sum(s["acc"] for s in result.samples) / 4
    with pytest.raises(ValueError, match="fewshot_file"):
        tasks.get("multiple_choice")(data_file=DATA / "mc.jsonl", num_fewshot=1)


def test_perplexity_task():
    _, model = tiny_pair("gpt2", 64)  # conversations longer than 64 tokens span several windows
    lm = LM(model, tokenizer(), batch_size=4)
    result = tasks.get("perplexity")(data_file=str(DATA / "sharegpt.json"), template="koala").run(lm, progress=False)
    texts = [data.render(c, tokenizer(), "koala") for c in data.load_conversations(str(DATA / "sharegpt.json"))]
    assert result.n == len(texts) and texts[0].startswith("BEGINNING OF CONVERSATION:")
    total = sum(lm.loglikelihood_rolling(texts))
    num_bytes = sum(len(t.encode()) for t in texts)
    assert result.metrics["bits_per_byte"] == pytest.approx(-total / num_bytes / math.log(2), rel=1e-6)
    tokens = sum(len(tokenizer()(t)["input_ids"]) for t in texts)
    assert result.metrics["token_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-6)
    assert result.info["scoring"]["requests"] > result.n  # several windows each
