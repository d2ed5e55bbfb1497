"""NQ-open: SQuAD normalization, the harness's prompt and few-shot draw, data sources (local, hub, TFDS), fake LMs."""

from __future__ import annotations

import json
import pathlib
import random

import numpy as np
import pytest

from imitax.eval import tasks
from imitax.eval.metrics import exact_match, normalize_answer
from imitax.eval.tasks import nq_open
from imitax.eval.tasks.nq_open import NQOpen

DATA = pathlib.Path(__file__).parent / "data"
NQ_FILE = DATA / "nq_sample.jsonl"
RECORDS = [json.loads(line) for line in NQ_FILE.read_text().splitlines()]


def test_normalization_cases():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  New\tYork \n") == "new york"
    assert normalize_answer("U.S.A.") == "usa" and normalize_answer("1,000") == "1000"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theory of Anne") == "theory of anne"  # articles only as whole words
    assert normalize_answer("A") == "" and normalize_answer("the-the") == "thethe"  # punctuation goes first
    assert normalize_answer("Café «Crème»") == "café «crème»"  # SQuAD drops ASCII punctuation only
    assert exact_match("Shakespeare.", ["William Shakespeare", "Shakespeare"]) == 1.0
    assert exact_match("the William Shakespeare", ["William Shakespeare"]) == 1.0
    assert exact_match("Bill Shakespeare", ["William Shakespeare", "Shakespeare"]) == 0.0
    assert exact_match("", ["a"]) == 1.0  # both normalize to "": SQuAD counts that as a match
    assert exact_match("8", "eight") == 0.0


def test_prompt_is_the_harness_prompt():
    shots = [{"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]}, RECORDS[1]]
    assert nq_open.prompt(RECORDS[2], shots) == (
        "Answer these questions:\n\n"
        "Q: who wrote hamlet?\nA: Shakespeare\n"
        "Q: what is the capital city of australia?\nA: Canberra\n"
        "Q: how many legs does a spider have?\nA:"
    )
    assert nq_open.prompt(RECORDS[2], []) == "Answer these questions:\n\nQ: how many legs does a spider have?\nA:"


class FakeLM:
    """Answers the last question of a prompt from a table, then keeps going with another question."""

    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def generate_until(self, requests):
        self.requests += requests
        out = []
        for context, settings in requests:
            question = context.rsplit("Q: ", 1)[1][: -len("?\nA:")]
            text = " " + self.answers.get(question, "no idea") + "\nQ: what next?\nA: more"
            for stop in settings["until"]:
                text = text.split(stop)[0]
            out.append(text)
        return out


ANSWERS = {
    "how many legs does a spider have": "Eight.",  # matches "eight"
    "what is the largest planet in the solar system": "the planet Jupiter",  # no match
    "who painted the mona lisa": "Da Vinci",  # matches the second gold answer
    "what is the chemical symbol for gold": "AU",
    "in which country is the city of kyoto": "China",
    "what is the boiling point of water in celsius": "100 degrees celsius",
}


@pytest.fixture
def offline(monkeypatch):
    """Any hub or TFDS access fails the test."""
    import datasets
    import tensorflow_datasets as tfds

    def network(*args, **kwargs):
        raise AssertionError("local files must not touch the network")

    monkeypatch.setattr(datasets, "load_dataset", network)
    monkeypatch.setattr(tfds, "data_source", network)


def test_local_file_its_own_examples_and_exact_match(offline):
    lm = FakeLM(ANSWERS)
    result = tasks.get("nq_open")(data_file=NQ_FILE).run(lm, progress=False)
    # The first 3 records are the examples (every question's), the other 5 are scored.
    assert result.n == 5 and result.num_fewshot == 3 and result.info["scored_from"] == 3
    assert [s["exact_match"] for s in result.samples] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert result.metrics["exact_match"] == pytest.approx(3 / 5)
    assert result.stderr["exact_match"] == pytest.approx(np.std([0, 1, 1, 0, 1], ddof=1) / np.sqrt(5))
    context, settings = lm.requests[0]
    assert settings == {"until": ["\n"], "max_gen_toks": 32, "temperature": 0.0}
    assert context == (
        "Answer these questions:\n\n"
        "Q: who wrote the play romeo and juliet?\nA: William Shakespeare\n"
        "Q: what is the capital city of australia?\nA: Canberra\n"
        "Q: how many legs does a spider have?\nA: eight\n"
        "Q: what is the largest planet in the solar system?\nA:"
    )
    sample = result.samples[1]
    assert sample["answer"] == "Da Vinci" and sample["normalized"] == "da vinci"
    assert sample["target"] == ["Leonardo da Vinci", "da Vinci"] and sample["context"].endswith("mona lisa?\nA:")
    # The harness's stops include "," and ".": they turn "da Vinci, Leonardo" into "da Vinci".
    comma = FakeLM({**ANSWERS, "who painted the mona lisa": "da Vinci, Leonardo"})
    assert tasks.get("nq_open")(data_file=NQ_FILE, until=["\n", ".", ","]).run(comma).samples[1]["exact_match"] == 1.0
    assert tasks.get("nq_open")(data_file=NQ_FILE).run(comma).samples[1]["exact_match"] == 0.0
    zero = tasks.get("nq_open")(data_file=NQ_FILE, num_fewshot=0, limit=2).run(FakeLM(ANSWERS), progress=False)
    assert (
        zero.n == 2
        and zero.samples[0]["context"] == "Answer these questions:\n\nQ: who wrote the play romeo and juliet?\nA:"
    )


def test_fewshot_file_draws_as_the_harness(offline, tmp_path):
    pool = [{"question": f"question {i}", "answer": [f"answer {i}"]} for i in range(20)]
    pool_file = tmp_path / "train.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool))
    lm = FakeLM(ANSWERS)
    result = NQOpen(data_file=NQ_FILE, fewshot_file=pool_file, num_fewshot=2).run(lm, progress=False)
    assert result.n == 8  # nothing held back: the examples come from the other file
    rng = random.Random(1234)  # the harness's fewshot_random_seed; one draw per question, in order
    for sample in result.samples:
        shots = rng.sample(pool, 2)
        assert sample["context"] == nq_open.prompt(sample, shots)
    assert len({s["context"].split("Q: ")[1] for s in result.samples}) > 1  # the questions got different shots
    first = NQOpen(data_file=NQ_FILE, fewshot_file=pool_file, num_fewshot=2, fewshot_sampler="first_n").run(lm)
    assert all(s["context"].startswith(nq_open.prompt({"question": "x"}, pool[:2])[:-8]) for s in first.samples)


def test_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS if split == "validation" else RECORDS[:4])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    docs, shots, info = NQOpen(limit=3).load()
    assert calls == [("google-research-datasets/nq_open", "validation"), ("google-research-datasets/nq_open", "train")]
    assert len(docs) == 3 and all(len(s) == 3 for s in shots) and info["source"] == "hf"
    assert docs[0] == RECORDS[0]

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"nq_open.*no internet.*data_file=FILE.*--nq_file=FILE"):
        NQOpen().load()


def test_tfds_data_source(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    calls = []

    def data_source(name, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        records = RECORDS if split == "validation" else RECORDS[:3]
        # array_record records as TFDS decodes them: bytes, and numpy arrays of bytes for sequences.
        return [
            {"question": r["question"].encode(), "answer": np.array([a.encode() for a in r["answer"]])} for r in records
        ]

    monkeypatch.setattr(tfds, "data_source", data_source)
    docs, shots, info = NQOpen(source="tfds", tfds_data_dir=str(tmp_path)).load()
    assert calls == [("natural_questions_open", s, str(tmp_path), False) for s in ("validation", "train")]
    assert docs == RECORDS and info["source"] == "tfds" and all(len(s) == 3 for s in shots)

    def missing(*args, **kwargs):
        raise FileNotFoundError("no array_record files")

    monkeypatch.setattr(tfds, "data_source", missing)
    with pytest.raises(FileNotFoundError, match=r"tfds build natural_questions_open.*data_file=FILE"):
        NQOpen(source="tfds").load()


def test_bad_input(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such NQ-open data file. Supply local files"):
        NQOpen(data_file=tmp_path / "nope.jsonl").load()
    with pytest.raises(ValueError, match="num_fewshot=8 but .* holds 8 records"):
        NQOpen(data_file=NQ_FILE, num_fewshot=8).load()
    with pytest.raises(ValueError, match="num_fewshot=9 but only 8 few-shot examples are available"):
        NQOpen(data_file=NQ_FILE, fewshot_file=NQ_FILE, num_fewshot=9).load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl, record 0: answer must hold at least one"):
        NQOpen(data_file=bad, num_fewshot=0).load()
    with pytest.raises(ValueError, match="fewshot_file= needs data_file="):
        NQOpen(fewshot_file=NQ_FILE)
    with pytest.raises(ValueError, match="unknown source 'tf'"):
        NQOpen(source="tf")
