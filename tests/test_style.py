"""The style task: list and summary detection, overlap and length metrics by hand, fake and real LMs."""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np
import pytest
import torch
import transformers

from imitax.eval import tasks
from imitax.eval.metrics import unigram_overlap
from imitax.eval.tasks.style import Style, has_list, has_summary

DATA = pathlib.Path(__file__).parent / "data"
STYLE_FILE = DATA / "style_sample.jsonl"


@functools.cache
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


# -- detectors and overlap -------------------------------------------------------------------------


def test_has_list():
    assert has_list("- a\n- b") and has_list("* a\n* b") and has_list("• a\n• b")
    assert has_list("Steps:\n1. mix\n2. bake\nDone.") and has_list("1) mix\n2) bake")
    assert has_list("Intro\n  - nested\n  - items")
    assert not has_list("- only one item")
    assert not has_list("1.5 million people\n2.5 more")  # a number, not an item: no space after the dot
    assert not has_list("**Bold** text\n**More** bold")
    assert not has_list("-no space\n-either")
    assert not has_list("")


def test_has_summary():
    assert has_summary("Details here.\n\nIn summary, it works.")
    assert has_summary("Details.\n\n**In conclusion**, yes.")
    assert has_summary("Details.\n   \nTo sum up: yes.")  # a blank line may hold spaces
    assert has_summary("A.\n\nB.\n\nOverall, fine.")
    assert not has_summary("In summary, a single paragraph is not a closing summary.")
    assert not has_summary("A.\n\nOveralls are work clothes.")  # whole words only
    assert not has_summary("A.\n\nIn summary, x.\n\nP.S. one more thing.")  # the last paragraph counts
    assert not has_summary("A.\nIn short, no blank line before it.")


def test_unigram_overlap_by_hand():
    # SQuAD normalization: case, punctuation and articles go.
    assert unigram_overlap("The Paris, France!", "paris france") == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # prediction [cats, sit, cats] vs reference [cats, sleep]: 1 common token.
    got = unigram_overlap("Cats sit, cats.", "A cat? Cats sleep.")
    assert got["precision"] == pytest.approx(1 / 3) and got["recall"] == pytest.approx(1 / 3)
    got = unigram_overlap("cats sit cats", "cats sleep")
    assert got == {"precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(0.4)}
    assert unigram_overlap("", "") == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert unigram_overlap("the", "x") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # nothing left after "the"


# -- the task with a fake LM -----------------------------------------------------------------------

ANSWERS = {
    "How do I make a cup of tea?": "- Boil water.\n- Steep the tea.",
    "What is the capital of France?": "Paris is the capital of France.",
    "Give me tips for better sleep.": "Sleep more.",
    "Why is the sky blue?": "Because of scattering.\n\nIn short, physics.",
    "Name a prime number.": "1. Two\n2. Three\n\nOverall, many.",
    "How should I prepare for an exam?": "Study.\n\nIn conclusion, rest.",
}


class FakeLM:
    """Answers the rendered prompt ``BEGINNING OF CONVERSATION: USER: {prompt} GPT:`` from a table, then rambles."""

    def __init__(self, answers):
        self.answers, self.requests, self.tokenizer = answers, [], tokenizer()

    def generate_until(self, requests):
        self.requests += requests
        out = []
        for context, settings in requests:
            prompt = context.split("USER: ", 1)[1].rsplit(" GPT:", 1)[0]
            text = " " + self.answers[prompt] + " USER: and another question"
            for stop in settings["until"]:
                text = text.split(stop)[0]
            out.append(text)
        return out


def test_metrics_with_fixed_answers():
    lm = FakeLM(ANSWERS)
    result = tasks.get("style")(data_file=STYLE_FILE).run(lm, progress=False)
    assert result.n == 6 and result.num_fewshot == 0
    assert lm.requests[1] == (
        "BEGINNING OF CONVERSATION: USER: What is the capital of France? GPT:",
        {"until": ["</s>", "USER:", "<|endoftext|>"], "max_gen_toks": 256, "temperature": 0.0},
    )
    m, se = result.metrics, result.stderr
    # Teacher: list in references 1, 3, 6; summary in 1, 4, 6. Model: list in 1, 5; summary in 4, 5, 6.
    assert [s["reference_list"] for s in result.samples] == [True, False, True, False, False, True]
    assert [s["answer_list"] for s in result.samples] == [True, False, False, False, True, False]
    assert [s["reference_summary"] for s in result.samples] == [True, False, False, True, False, True]
    assert [s["answer_summary"] for s in result.samples] == [False, False, False, True, True, True]
    assert m["list_rate"] == pytest.approx(1 / 3) and m["teacher_list_rate"] == 0.5
    assert m["list_agreement"] == 0.5 and m["list_recall"] == pytest.approx(1 / 3)
    assert m["summary_rate"] == 0.5 and m["teacher_summary_rate"] == 0.5
    assert m["summary_agreement"] == pytest.approx(2 / 3) and m["summary_recall"] == pytest.approx(2 / 3)
    # Unigram F1 per prompt, counted by hand on the normalized words:
    # 4 of 4 answer words among the reference's 28 -> 2 * 1 * (1/7) / (8/7) = 1/4; identical bags -> 1; none -> 0;
    # 3 of 6 among 19 -> 6/25; none -> 0; 1 of 4 among 15 -> 2/19.
    f1 = [0.25, 1.0, 0.0, 6 / 25, 0.0, 2 / 19]
    recall = [1 / 7, 1.0, 0.0, 3 / 19, 0.0, 1 / 15]
    assert [s["unigram_f1"] for s in result.samples] == pytest.approx(f1)
    assert m["unigram_f1"] == pytest.approx(sum(f1) / 6) and m["unigram_recall"] == pytest.approx(sum(recall) / 6)
    assert se["unigram_f1"] == pytest.approx(np.std(f1, ddof=1) / math.sqrt(6))
    assert se["list_recall"] == pytest.approx(np.std([1, 0, 0], ddof=1) / math.sqrt(3))
    # Lengths in whitespace-separated words.
    answer_words, reference_words = [7, 6, 2, 6, 6, 4], [32, 6, 17, 22, 5, 19]
    assert [s["answer_words"] for s in result.samples] == answer_words
    assert [s["reference_words"] for s in result.samples] == reference_words
    assert m["length_ratio"] == pytest.approx(31 / 101)
    assert m["length_corr"] == pytest.approx(np.corrcoef(answer_words, reference_words)[0, 1])
    assert "length_corr" not in se
    assert result.samples[0]["answer"] == ANSWERS["How do I make a cup of tea?"]  # cut at USER:, stripped
    assert result.info["prompts_tokenized_as_in_training"] == 6


def test_constant_lengths_and_no_teacher_lists(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "reference": "one two"}\n{"prompt": "b", "reference": "three four"}\n')
    result = Style(data_file=path).run(FakeLM({"a": "x y", "b": "z w"}), progress=False)
    assert math.isnan(result.metrics["length_corr"]) and math.isnan(result.metrics["list_recall"])
    assert result.metrics["length_ratio"] == 1.0 and result.to_dict()["metrics"]["length_corr"] is None


def test_chat_records_and_template(tmp_path):
    lm = FakeLM({"What is the capital of France?": "Paris.", "Say hi.": "Hello."})
    result = Style(data_file=DATA / "sharegpt.json").run(lm, progress=False)
    # The first user turn and the teacher's answer to it; the teacher-less conversation is dropped by the reader.
    assert [(s["prompt"], s["reference"]) for s in result.samples] == [
        ("What is the capital of France?", "Paris."),
        ("Say hi.", "Hi there!"),
    ]
    assert lm.requests[0][0] == "BEGINNING OF CONVERSATION: Be brief. USER: What is the capital of France? GPT:"
    assert result.info["format"] == "auto" and result.info["read"]["no_teacher"] == 1
    assert result.metrics["unigram_f1"] == pytest.approx(0.5)  # 1 and 0
    vicuna = Style(data_file=STYLE_FILE, template="vicuna", limit=1)
    contexts, _ = vicuna.contexts(tokenizer(), vicuna.load()[0])
    assert contexts[0].endswith(" USER: How do I make a cup of tea? ASSISTANT:")


def test_bad_input(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"nope.jsonl: no such style data. Pass data_file= .*\{prompt, reference\}"
    ):
        Style(data_file=tmp_path / "nope.jsonl").load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, record 1: needs string fields prompt and reference"):
        Style(data_file=bad).load()
    with pytest.raises(ValueError, match="zero-shot"):
        Style(data_file=bad, num_fewshot=1)
    with pytest.raises(ValueError, match="unknown template"):
        Style(data_file=bad, template="alpaca")


# -- a real model ----------------------------------------------------------------------------------


def test_real_model_answers_are_transformers_greedy_continuations():
    from hf_models import tiny_hf_config, to_imitax

    from imitax import data
    from imitax.eval.lm import LM

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = 320, 128  # the test tokenizer has 300 ids
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lm = LM(to_imitax(torch_model), tokenizer(), batch_size=4)
    result = Style(data_file=STYLE_FILE, max_gen_toks=6, limit=3).run(lm, progress=False)
    assert result.n == 3 and result.info["prompts_tokenized_as_in_training"] == 3
    for sample in result.samples:
        conv = data.Conversation(((data.USER, sample["prompt"]),))
        ids = data.encode_prompt(conv, tokenizer(), "koala").tolist()  # the trainer's own prompt tokens
        with torch.no_grad():
            out = torch_model.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tokenizer().eos_token_id
            )
        text = tokenizer().decode(out[0, len(ids) :], skip_special_tokens=True)
        for stop in ("</s>", "USER:", "<|endoftext|>"):
            text = text.split(stop)[0]
        assert sample["answer"] == text.strip()
    assert set(result.metrics) >= {"list_recall", "summary_recall", "unigram_f1", "length_corr", "length_ratio"}
