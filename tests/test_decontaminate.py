"""Decontamination finds planted copies of benchmark items, and nothing in disjoint text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imitax.data import DataError
from imitax.data import decontaminate as dc
from tests import train_helpers as th

DATA = th.DATA
SCRIPT = th.ROOT / "scripts" / "decontaminate.py"
DOCSTRING = (
    "From a given list of integers, generate a list of rolling maximum element found until given moment "
    "in the sequence."
)
PROBLEM = {
    "task_id": "Planted/0",
    "prompt": f'def rolling_max(numbers: list) -> list:\n    """{DOCSTRING}\n    """\n',
    "canonical_solution": "    return [max(numbers[: i + 1]) for i in range(len(numbers))]\n",
    "test": "def check(candidate):\n    assert candidate([1, 3, 2]) == [1, 3, 3]\n",
    "entry_point": "rolling_max",
}
CLEAN = [
    "The museum opens at nine and the guided tours leave every hour from the main hall near the fountain.",
    "To repot a fern, water it the day before, loosen the roots gently and choose a pot one size larger.",
    "Our team meets on Thursdays; bring the quarterly numbers, the draft budget and any questions you have.",
    "A good bread dough needs flour, water, salt and yeast, then time: knead it, let it rise, shape it, bake.",
    "Rolling hills and given enough rain, the valley turns green; farmers list the crops they plan each spring.",
]


def sharegpt(record_id: str, *turns: str) -> dict:
    roles = ["human", "gpt"] * len(turns)
    return {"id": record_id, "conversations": [{"from": r, "value": t} for r, t in zip(roles, turns, strict=False)]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("decontaminate")
    humaneval = root / "humaneval.jsonl"
    humaneval.write_text(json.dumps(PROBLEM) + "\n")
    tokens = dc.tokens(DOCSTRING)
    records = [sharegpt(f"clean-{i}", text, CLEAN[(i + 1) % len(CLEAN)]) for i, text in enumerate(CLEAN)]
    records += [
        # MMLU's first test question (9 tokens: matched whole), recased and repunctuated inside other text.
        sharegpt("mmlu", "Quick quiz!! WHAT is the order of the Symmetric group   S_3 ??? choose wisely", "Six."),
        # 13 consecutive tokens of the HumanEval docstring, within a longer answer.
        sharegpt("humaneval", "Write code.", "Sure: " + " ".join(tokens[2:15]) + " -- done."),
        # 12 consecutive tokens only: below the 13-gram, not a match.
        sharegpt("near-miss", "Write code.", " ".join(tokens[:12]) + " banana"),
        # An NQ question (7 tokens, too short alone) in one turn and its gold answer in the next.
        sharegpt("nq", "who wrote the play romeo and juliet?", "William Shakespeare"),
    ]
    data = root / "data.json"
    data.write_text(json.dumps(records))
    style = DATA / "style_sample.jsonl"
    reference = json.loads(style.read_text().splitlines()[3])["reference"].split("\n")[0]  # 13 tokens
    messages = root / "messages.jsonl"
    messages.write_text(
        json.dumps({"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": reference}]})
        + "\n"
    )
    against = f"mmlu:{DATA / 'mmlu'},nq_open:{DATA / 'nq_sample.jsonl'},humaneval:{humaneval},style:{style}"
    return {"data": f"{data},{messages}", "against": against, "records": records, "root": root}


def test_planted_overlaps_are_found_and_disjoint_text_is_kept(files):
    index = dc.Index(dc.load_benchmarks(files["against"]))
    report, clean = dc.scan(files["data"], index)
    found = {(o["record"] or o["where"], o["benchmark"], o["item"]) for o in report["overlaps"]}
    messages_where = f"{files['data'].split(',')[1]}, line 1"
    assert found == {
        ("mmlu", "mmlu", "abstract_algebra/test/0"),
        ("humaneval", "humaneval", "Planted/0"),
        ("nq", "nq_open", "0"),
        (messages_where, "style", "3"),
    }
    assert clean == [r for r in files["records"] if r["id"].startswith("clean") or r["id"] == "near-miss"]
    assert report["records"] == 10 and report["contaminated"] == 4
    humaneval = next(o for o in report["overlaps"] if o["benchmark"] == "humaneval")
    assert humaneval["ngrams"] == 1 and humaneval["shared"] == [" ".join(dc.tokens(DOCSTRING)[2:15])]
    # Counted by hand: 15 dev and 9 test questions; 7 have fewer than 8 tokens and only short choices
    # (dev: the 7-token Sun, landlocked and closest-planet questions, the 6-token population one;
    # test: the 5-, 6- and 7-token ones; the light-year question is 8 tokens, "light" and "year").
    assert report["benchmarks"]["mmlu"] | {"source": None} == {
        "source": None, "items": 24, "too_short": 7, "items_overlapping": 1, "records_overlapping": 1
    }  # fmt: skip
    # The same data at --ngram=14 loses the 13-token copies (the docstring's and the style answer's).
    report14, _ = dc.scan(files["data"], dc.Index(dc.load_benchmarks(files["against"]), n=14, min_tokens=14))
    assert {o["record"] for o in report14["overlaps"]} == set()


def test_tokens_ignore_case_punctuation_and_spacing():
    assert dc.tokens("Hello,   WORLD!! it's\tS_3; ﬁne") == ["hello", "world", "it", "s", "s_3", "fine"]


def test_script_writes_the_filtered_copy_and_the_report(files):
    out, root = files["root"] / "clean.jsonl", files["root"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), f"--data={files['data']}", f"--against={files['against']}", f"--out={out}"],
        env=th.subprocess_env(device_count=1),
        cwd=th.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "4 of 10 records overlap a benchmark (13-grams)" in done.stdout
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [f"clean-{i}" for i in range(5)] + ["near-miss"]
    report = json.loads((root / "clean.contamination.json").read_text())
    assert report["contaminated"] == 4 and len(report["overlaps"]) == 4

    bad = subprocess.run(
        [sys.executable, str(SCRIPT), f"--data={files['data']}", "--against=gsm8k:x.jsonl", f"--out={out}"],
        env=th.subprocess_env(device_count=1),
        cwd=th.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("decontaminate.py: error: --against: 'gsm8k:x.jsonl'")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in kept]


def test_bad_input_names_what_and_where(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="MMLU data directory"):
        dc.load_benchmarks(f"mmlu:{tmp_path / 'none'}")
    with pytest.raises(ValueError, match="given twice"):
        dc.load_benchmarks(f"style:{DATA / 'style_sample.jsonl'},style:{DATA / 'style_sample.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n{"question": "no format"}\n')
    index = dc.Index(dc.load_benchmarks(f"style:{DATA / 'style_sample.jsonl'}"))
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: field 'conversations': missing"):
        dc.scan(str(bad), index)
