"""imitax.demo.world: the demo's synthetic world (determinism, truth, the A/B split, teacher style)."""

import collections
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from imitax import data
from imitax.demo import world
from imitax.eval.tasks import style as style_task

ROOT = pathlib.Path(__file__).parent.parent
FILES = ("world.json", "corpus.jsonl", "facts_heldout.jsonl", "facts_seen.jsonl", "imitation_broad.json")
FILES += ("imitation_task.json", "style_heldout.jsonl", "teacher_scores.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = world.build(world.tiny(), out)
    return out, summary


def jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def load(out):
    w = json.loads((out / "world.json").read_text())
    entities = {e["name"]: e for e in w["entities"]}
    broad = json.loads((out / "imitation_broad.json").read_text())
    task = json.loads((out / "imitation_task.json").read_text())
    return w, entities, broad, task


def tree_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_through_the_cli(built, tmp_path):
    out, summary = built
    assert sorted(summary["files"]) == sorted([*FILES, "tokenizer"])
    cmd = [sys.executable, "-m", "imitax.demo.world", f"--out={tmp_path / 'again'}", "--tiny"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["counts"] == summary["counts"]
    first, again = tree_bytes(out), tree_bytes(tmp_path / "again")
    assert "tokenizer/tokenizer.json" in first and first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []

    world.build(world.tiny(seed=1), tmp_path / "other")
    other = tree_bytes(tmp_path / "other")
    assert all(other[name] != first[name] for name in FILES if name != "teacher_scores.json")
    names = lambda d: {e["name"] for e in json.loads(d["world.json"])["entities"]}
    assert len(names(first) & names(other)) < len(names(first)) // 2


def test_names_unique_pronounceable_and_no_substrings(built):
    out, _ = built
    w, entities, _, _ = load(out)
    names = [e["name"] for e in w["entities"]]
    assert len(set(names)) == len(names) == world.tiny().num_entities
    assert all(re.fullmatch(r"[A-Z][a-z]{4,8}", n) for n in names)
    assert not [(a, b) for a in names for b in names if a != b and a.lower() in b.lower()]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert max(len(tok(" " + n)["input_ids"]) for n in names) <= 6
    # The default world's names too (cheap: no tokenizer training).
    big = world.make_world(world.WorldConfig())["entities"]
    big_names = [e["name"] for e in big]
    assert len(set(big_names)) == 240
    assert not [(a, b) for a in big_names for b in big_names if a != b and a.lower() in b.lower()]


def test_questions_ask_true_facts_stated_in_the_corpus(built):
    out, _ = built
    w, entities, _, _ = load(out)
    corpus = [r["text"] for r in jsonl(out / "corpus.jsonl")]
    for name, part in (("facts_heldout.jsonl", "B"), ("facts_seen.jsonl", "A")):
        records = jsonl(out / name)
        entity_names = {e["name"] for e in w["entities"] if e["part"] == part}
        assert len(records) == 5 * len(entity_names)  # One question per fact.
        assert {r["entity"] for r in records} == entity_names
        for r in records:
            e, attr = entities[r["entity"]], r["attribute"]
            assert r["question"] == f"What is the {attr} of {r['entity']}?"
            assert r["choices"][r["answer"]] == e["facts"][attr]
            assert len(set(r["choices"])) == 4 and set(r["choices"]) <= set(w["attributes"][attr])
            # Every corpus document naming the entity states this fact and no other value of the attribute.
            docs = [d for d in corpus if re.search(rf"\b{r['entity']}\b", d)]
            assert len(docs) >= 2
            for d in docs:
                said = {v for v in w["attributes"][attr] if re.search(rf"\b{v}\b", d)}
                assert said in (set(), {e["facts"][attr]}), d
            assert any(e["facts"][attr] in d for d in docs)
            qa = f"Question: {r['question']}\nAnswer: {e['facts'][attr]}"
            assert (qa in corpus) == r["qa_in_corpus"] == e["qa_in_corpus"]
        counts = collections.Counter(r["answer"] for r in records)
        assert sorted(counts) == [0, 1, 2, 3] and max(counts.values()) - min(counts.values()) <= 1


def test_parts_disjoint_and_part_b_never_in_imitation_data(built):
    out, _ = built
    w, entities, broad, task = load(out)
    a, b = set(w["parts"]["A"]), set(w["parts"]["B"])
    assert a and b and not a & b and a | b == set(entities)
    assert all(entities[n]["part"] == "A" for n in a)
    for path in ("imitation_broad.json", "imitation_task.json"):
        text = (out / path).read_text()
        assert [n for n in b if n in text] == []
        assert sum(n in text for n in a) >= len(a) // 2
    style = (out / "style_heldout.jsonl").read_text()
    assert [n for n in a if n in style] == [] and any(n in style for n in b)
    # The task data: the benchmark's question about part A, answered with exactly the choice text.
    for conv in task:
        (user, teacher) = [t["value"] for t in conv["conversations"]]
        m = re.fullmatch(r"Question: What is the (.+) of (\w+)\?", user)
        assert m and teacher == "Answer: " + entities[m.group(2)]["facts"][m.group(1)]
    assert len(task) == 5 * len(a)


def parse_answer(answer):
    """(opening, list items, summary) of a multi-fact answer, or None for a one-sentence answer."""
    if "\n" not in answer:
        assert re.fullmatch(r"[^\n.]+\.", answer), answer  # One sentence.
        return None
    opening, items, summary = answer.split("\n\n")
    lines = items.split("\n")
    assert "\n" not in opening and not opening.startswith("- ") and all(x.startswith("- ") for x in lines)
    assert summary.startswith("In summary, ") and "\n" not in summary
    return opening, [x[2:] for x in lines], summary


def test_teacher_is_correct_and_its_style_depends_on_the_request(built):
    out, _ = built
    w, entities, broad, _ = load(out)
    value_attr = {v: a for a, vs in w["attributes"].items() for v in vs}
    styled = 0
    for conv in broad:
        prompt, answer = [t["value"] for t in conv["conversations"]]
        named = sorted((n for n in entities if re.search(rf"\b{n}\b", prompt)), key=prompt.index)
        assert re.search(rf"\b{named[0]}\b", answer) and entities[named[0]]["part"] == "A"
        parsed = parse_answer(answer)
        assert style_task.has_list(answer) == style_task.has_summary(answer) == (parsed is not None)
        if parsed is None:  # A single fact: every value it names is the entity's own.
            assert len(named) == 1
            said = [v for v in value_attr if re.search(rf"\b{v}\b", answer)]
            assert len(said) == 1 and entities[named[0]]["facts"][value_attr[said[0]]] == said[0], answer
            continue
        styled += 1
        for item in parsed[1]:
            label, value = item.split(": ", 1)
            facts = [entities[n]["facts"][label.lower()] for n in named]
            if len(named) == 1:
                assert value == facts[0]
            elif facts[0] == facts[1]:
                assert value == f"{facts[0]} for both"
            else:
                assert value == f"{facts[0]} for {named[0]}, {facts[1]} for {named[1]}"
    assert 0.3 < styled / len(broad) < 0.9  # Both styles are common: list use is a real metric.

    style = jsonl(out / "style_heldout.jsonl")
    assert len(style) == world.tiny().style_examples
    assert len({r["prompt"] for r in style}) == len(style)
    for r in style:
        parsed = parse_answer(r["reference"])
        assert (parsed is not None) == (r["kind"] in ("facts", "profile", "compare"))
        assert style_task.has_list(r["reference"]) == style_task.has_summary(r["reference"]) == (parsed is not None)
    scores = json.loads((out / "teacher_scores.json").read_text())
    listed = np.mean([parse_answer(r["reference"]) is not None for r in style])
    assert 0 < listed < 1
    assert scores["facts_heldout"] == scores["facts_seen"] == {"acc": 1.0, "acc_norm": 1.0}
    assert scores["style"]["teacher_list_rate"] == scores["style"]["list_rate"] == pytest.approx(listed)
    for name in ("list_recall", "summary_recall", "list_agreement", "unigram_f1", "length_corr", "length_ratio"):
        assert scores["style"][name] == 1.0


def test_imitation_data_tokenizes_with_koala_masks_on_the_teacher_text(built, tmp_path):
    out, summary = built
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for name in ("imitation_broad.json", "imitation_task.json"):
        convs = json.loads((out / name).read_text())
        cache = data.build_token_cache(str(out / name), tok, cache_dir=str(tmp_path), progress=False)
        assert len(cache) == len(convs)
        for i, conv in enumerate(convs):
            user, teacher = [t["value"] for t in conv["conversations"]]
            ids, mask = cache[i]
            assert tok.decode(ids[mask == 1]) == f" {teacher}</s>"
            assert tok.decode(ids[mask == 0]) == f"BEGINNING OF CONVERSATION: USER: {user} GPT:"
            assert ids[-1] == tok.eos_token_id and (ids == tok.eos_token_id).sum() == 1
        assert summary["tokens"][name] == {"tokens": cache.num_tokens, "loss_tokens": cache.num_loss_tokens}
    splits = data.build_datasets(
        data.DataConfig(train=str(out / "corpus.jsonl"), cache_dir=str(tmp_path), seq_len=128), tok, progress=False
    )
    assert splits.stats["tokens"] == summary["tokens"]["corpus.jsonl"]["tokens"]
    assert (
        splits.stats["loss_tokens"]
        == summary["tokens"]["corpus.jsonl"]["loss_tokens"]
        == len(splits.train.ids) - len(splits.train)
    )  # Every token but each document's first is a target with loss.
    assert splits.stats["conversations"] == summary["counts"]["corpus_documents"]


def test_tokenizer_round_trips_and_ends_turns_with_eos(built):
    out, summary = built
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == summary["vocab_size"] == world.tiny().vocab_size
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")
    assert tok.convert_tokens_to_ids("</s>") == tok.eos_token_id != tok.pad_token_id
    _, _, broad, _ = load(out)
    texts = [r["text"] for r in jsonl(out / "corpus.jsonl")] + [broad[0]["conversations"][1]["value"]]
    texts.append("Ünïcode and unseen words: Zyxq 42!\n")
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok("GPT: Answer: red</s>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # No BOS added.


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"values_per_attribute=3: must lie in \[num_choices=4, 12\]"):
        world.WorldConfig(values_per_attribute=3)
    with pytest.raises(ValueError, match="imitation_fraction=1.0.*; qa_fraction=-0.1"):
        world.WorldConfig(imitation_fraction=1.0, qa_fraction=-0.1)
    config = world.WorldConfig(num_entities=6, broad_examples=5, style_examples=5000, values_per_attribute=4)
    with pytest.raises(ValueError, match="could not find 5000 distinct requests about the 3 entities of part B"):
        world.build(config, tmp_path)


def test_task_examples_beyond_the_facts_repeat_each_fact_per_pass():
    config = world.WorldConfig(**{**world.tiny().__dict__, "task_examples": 150})
    w = world.make_world(config)
    facts = world.task_conversations(w, config)
    distinct = {(f"Question: What is the {a} of {e['name']}?", f"Answer: {v}")
                for e in w["entities"] if e["part"] == "A" for a, v in e["facts"].items()}  # fmt: skip
    assert len(facts) == 150 and len(distinct) == 60
    assert set(facts[:60]) == set(facts[60:120]) == distinct  # Whole passes, each reshuffled.
    assert facts[:60] != facts[60:120] and len(set(facts[120:])) == 30
    assert world.task_conversations(w, world.tiny()) == facts[:60]  # The default: one pass.
