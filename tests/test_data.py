"""imitax.data: readers, templates and loss masks, token cache, budgets, packing, batch order."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from imitax import data
from imitax.data import templates
from imitax.data.formats import TEACHER, USER, Conversation

DATA = pathlib.Path(__file__).parent / "data"
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "BEGINNING OF CONVERSATION: Be brief. USER: What is the capital of France? GPT: Paris. USER: And of Italy?",
    "GPT: Rome. A chat between a curious user and an artificial intelligence assistant. ASSISTANT: Hi there!",
    "system user assistant Tell me a joke. Why did the chicken cross the road? What is two plus two? Four.",
] * 3
CONV = Conversation(
    ((USER, "What is the capital of France?"), (TEACHER, "Paris."), (USER, "And of Italy?"), (TEACHER, "Rome.")),
    system="Be brief.",
)


def make_tokenizer(metaspace=False, vocab_size=420, bos=False):
    """A tiny tokenizer trained here: byte-level BPE (GPT-2 style) or SentencePiece style (Metaspace)."""
    tok = Tokenizer(models.BPE())
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:  # Like LLaMA's: <s> before every encoded text.
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def runs(mask):
    """[(start, end)] of the runs of 1s in mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


# ----------------------------------------------------------------------------------------------- readers


def test_readers_each_format():
    stats = data.formats.new_stats()
    got = list(data.load_conversations(str(DATA / "sharegpt.json"), stats=stats))  # JSON array
    assert [c.turns for c in got] == [CONV.turns, ((USER, "Say hi."), (TEACHER, "Hi there!"))]
    assert got[0].system == "Be brief." and got[1].where.endswith("sharegpt.json, record 1")
    assert stats == {"records": 3, "invalid": 0, "no_teacher": 1, "conversations": 2}

    got = list(data.load_conversations(str(DATA / "messages.jsonl")))  # JSON Lines
    assert [(c.system, c.turns) for c in got] == [
        ("You are helpful.", ((USER, "Name a color."), (TEACHER, "Blue."))),
        (None, ((USER, "Count to three."), (TEACHER, "One, two, three."))),
    ]
    got = list(data.load_conversations(str(DATA / "alpaca.json")))
    assert [c.turns for c in got] == [
        ((USER, "Add the numbers.\n\n2 and 3"), (TEACHER, "5")),
        ((USER, "Name a fruit."), (TEACHER, "Apple.")),
    ]
    stats = data.formats.new_stats()
    got = list(data.load_conversations(str(DATA / "hc3.parquet"), stats=stats))  # Parquet
    question = (USER, "Why is the sky blue?")
    assert [c.turns for c in got] == [
        (question, (TEACHER, "Because of Rayleigh scattering.")),
        (question, (TEACHER, "Sunlight scatters off air molecules.")),
    ]
    assert stats["no_teacher"] == 1 and got[1].where.endswith("hc3.parquet, record 0")
    got = list(data.load_conversations(str(DATA / "text.jsonl")))
    assert [(c.document, c.turns) for c in got] == [(True, ((TEACHER, "The quick brown fox."),))] + [
        (True, ((TEACHER, "Jumps over the lazy dog."),))
    ]


def test_glob_directory_and_explicit_format():
    got = list(data.load_conversations(str(DATA / "shards" / "*.jsonl")))
    assert [c.where.rsplit("/", 1)[1] for c in got] == ["part-0.jsonl, line 1", "part-0.jsonl, line 2"] + [
        "part-1.jsonl, line 1"
    ]
    assert got[2].turns == ((USER, "Name a planet."), (TEACHER, "Mars."))
    assert [c.turns for c in data.load_conversations(str(DATA / "shards"))] == [c.turns for c in got]
    with pytest.raises(data.DataError, match=r"sharegpt.json, record 0: field 'instruction': missing"):
        list(data.load_conversations(str(DATA / "sharegpt.json"), format="alpaca"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        list(data.load_conversations(str(DATA / "nothing-*.jsonl")))


def test_malformed_records_name_file_line_and_field(tmp_path):
    bad = str(DATA / "bad.jsonl")
    with pytest.raises(data.DataError) as e:
        list(data.load_conversations(bad))
    assert str(e.value) == f"{bad}, line 3: field 'conversations[1].value': expected a string, got int"
    assert e.value.field == "conversations[1].value"

    path = tmp_path / "bad.json"  # In a JSON array, records are counted from 0.
    path.write_text(json.dumps([{"messages": []}, {"messages": [{"role": "user"}]}]))
    with pytest.raises(data.DataError, match=r"bad.json, record 1: field 'messages\[0\].content': missing"):
        list(data.load_conversations(str(path)))
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(data.DataError, match=r"bad.json, line 2: invalid JSON"):
        list(data.load_conversations(str(path)))


def test_skip_invalid_counts_and_no_teacher_dropped():
    stats = data.formats.new_stats()
    got = list(data.load_conversations(str(DATA / "bad.jsonl"), skip_invalid=True, stats=stats))
    assert [c.where.rsplit(", ", 1)[1] for c in got] == ["line 1", "line 6"]
    # Lines 3 (value is an int), 4 (broken JSON) and 5 (unknown role) are skipped; line 2 is blank.
    assert stats == {"records": 5, "invalid": 3, "no_teacher": 0, "conversations": 2}


def test_hub_source_reads_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = tmp_path / "hub" / "data"  # A dataset repository laid out as on the hub, read offline.
    repo.mkdir(parents=True)
    shutil.copy(DATA / "hc3.parquet", repo / "train-00000-of-00001.parquet")
    got = list(data.load_conversations(f"hf:{tmp_path / 'hub'}:train"))
    assert [c.turns for c in got] == [c.turns for c in data.load_conversations(str(DATA / "hc3.parquet"))]
    assert got[0].where == f"hf:{tmp_path / 'hub'}:train, record 0"
    (source,) = data.resolve_sources(f"hf:{tmp_path / 'hub'}")
    assert source.name.endswith(":train") and source.fingerprint()["files"]


# --------------------------------------------------------------------------------------------- templates


def test_template_texts(tokenizer):
    assert data.render(CONV, tokenizer, "koala") == (
        "BEGINNING OF CONVERSATION: Be brief. USER: What is the capital of France? GPT: Paris.</s> "
        "USER: And of Italy? GPT: Rome.</s>"
    )
    assert data.render(CONV, tokenizer, "koala", prompt=True).endswith("GPT: Rome.</s> GPT:")
    no_system = Conversation(CONV.turns)
    assert data.render(no_system, tokenizer, "vicuna") == (
        f"{data.VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT: Paris.</s>"
        "USER: And of Italy? ASSISTANT: Rome.</s>"
    )
    assert data.render(CONV, tokenizer, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "template, expected",
    [
        ("koala", [" Paris.</s>", " Rome.</s>"]),
        ("vicuna", [" Paris.</s>", " Rome.</s>"]),
        ("chatml", ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
        ("chat_template", ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
    ],
)
def test_loss_mask_is_teacher_text_and_end_of_turn(template, expected):
    tok = make_tokenizer()
    tok.chat_template = CHATML_JINJA
    ids, mask = data.encode_conversation(CONV, tok, template)
    assert ids.dtype == np.uint32 and mask.dtype == np.uint8 and ids.shape == mask.shape
    assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == expected
    assert tok.decode(ids) == data.render(CONV, tok, template)
    # Changing a user turn changes the inputs, not which teacher tokens carry loss.
    edited = Conversation(((USER, "Which city is the capital of France, please?"), *CONV.turns[1:]), CONV.system)
    ids2, mask2 = data.encode_conversation(edited, tok, template)
    assert len(ids2) != len(ids)
    np.testing.assert_array_equal(ids2[mask2 == 1], ids[mask == 1])
    np.testing.assert_array_equal(ids2[np.argmax(mask2) :], ids[np.argmax(mask) :])  # Same from the 1st answer.


def test_chat_template_mode_matches_chatml(tokenizer):
    tok = make_tokenizer()
    tok.chat_template = CHATML_JINJA
    for a, b in zip(
        data.encode_conversation(CONV, tok, "chat_template"), data.encode_conversation(CONV, tok, "chatml"), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    prompt = Conversation(CONV.turns[:1])
    np.testing.assert_array_equal(
        data.encode_prompt(prompt, tok, "chat_template"), data.encode_prompt(prompt, tok, "chatml")
    )
    with pytest.raises(data.DataError, match="before the first teacher turn"):
        data.encode_conversation(Conversation(((TEACHER, "hi"),)), tok, "chat_template")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        data.encode_conversation(CONV, tokenizer, "chat_template")


@pytest.mark.parametrize("template", ["koala", "vicuna", "chatml"])
def test_segmentwise_equals_whole_string_for_byte_level_bpe(tokenizer, template):
    for conv in [CONV, *data.load_conversations([str(DATA / "shards"), str(DATA / "alpaca.json")])]:
        ids, _ = data.encode_conversation(conv, tokenizer, template)
        whole = tokenizer(data.render(conv, tokenizer, template), add_special_tokens=False)["input_ids"]
        assert ids.tolist() == whole


def test_sentencepiece_style_tokenizer_gets_one_space_per_chunk():
    tok = make_tokenizer(metaspace=True, vocab_size=200)
    assert templates.adds_leading_space(tok) and not templates.adds_leading_space(make_tokenizer())
    ids, mask = data.encode_conversation(CONV, tok, "koala")
    assert tok.decode(ids, skip_special_tokens=False) == data.render(CONV, tok, "koala")
    assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == ["Paris.</s>", "Rome.</s>"]  # Decoders drop ▁.
    first_answer_token = tok.convert_ids_to_tokens(ids[runs(mask)[0][0]].item())
    assert first_answer_token.startswith("▁")  # The space restored by the tokenizer, as in "GPT: Paris".
    # Vicuna's "</s>USER:" has no space; encoded on its own, the chunk after </s> still starts with one.
    ids, _ = data.encode_conversation(Conversation(CONV.turns), tok, "vicuna")
    after_eos = ids[np.flatnonzero(ids == tok.eos_token_id)[0] + 1].item()
    assert tok.convert_ids_to_tokens(after_eos).startswith("▁")


def test_special_tokens_in_text_stay_text_and_bos_prefix():
    tok = make_tokenizer(bos=True)
    conv = Conversation(((USER, "Spell </s> please"), (TEACHER, "It is </s>.")))
    ids, mask = data.encode_conversation(conv, tok, "koala")
    assert ids[0] == tok.bos_token_id and mask[0] == 0  # The tokenizer's own BOS, without loss.
    assert (ids == tok.eos_token_id).sum() == 1 and ids[-1] == tok.eos_token_id  # Only the real end of turn.
    assert tok.decode(ids[mask == 1]) == " It is </s>.</s>"
    doc, doc_mask = data.encode_conversation(Conversation(((TEACHER, "Plain text."),), document=True), tok)
    assert tok.decode(doc) == "<s>Plain text.</s>" and doc_mask.tolist() == [0] + [1] * (len(doc) - 1)


# ------------------------------------------------------------------------------------------- token cache


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch, tokenizer):
    shutil.copytree(DATA, tmp_path / "data")
    sources = [str(tmp_path / "data" / "shards" / "*.jsonl"), str(tmp_path / "data" / "sharegpt.json")]
    expected = data.encode_conversation(next(data.load_conversations(sources)), tokenizer)
    calls = []  # Conversations per tokenizer call.
    encode_pieces = templates.Encoder.encode_pieces
    monkeypatch.setattr(
        templates.Encoder, "encode_pieces", lambda self, p: calls.append(len(p)) or encode_pieces(self, p)
    )
    cache = str(tmp_path / "cache")
    build = lambda tok=tokenizer, **kw: data.build_token_cache(sources, tok, cache_dir=cache, progress=False, **kw)

    first = build()
    assert calls == [5] and len(first) == 5 and isinstance(first.ids, np.memmap)
    assert first.stats | {"sources": None} == {
        "records": 6, "invalid": 0, "no_teacher": 1, "conversations": 5,
        "tokens": first.num_tokens, "loss_tokens": first.num_loss_tokens, "sources": None,
    }  # fmt: skip
    np.testing.assert_array_equal(first[0][0], expected[0])
    np.testing.assert_array_equal(first[0][1], expected[1])
    assert os.listdir(cache) == [os.path.basename(first.path)]  # No temporary directory left.

    second = build()
    assert calls == [5] and second.path == first.path  # Not tokenized again.
    np.testing.assert_array_equal(second.ids, first.ids)
    assert second.stats == first.stats
    assert build(template="vicuna").path != first.path
    assert build(tok=make_tokenizer(vocab_size=400)).path != first.path
    os.utime(tmp_path / "data" / "sharegpt.json", ns=(0, 0))  # A touched source is read again.
    assert build().path != first.path and len(calls) == 4


def test_failed_build_leaves_nothing(tmp_path, tokenizer):
    with pytest.raises(data.DataError):
        data.build_token_cache(str(DATA / "bad.jsonl"), tokenizer, cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []
    ds = data.build_token_cache(
        str(DATA / "bad.jsonl"), tokenizer, cache_dir=str(tmp_path), progress=False, skip_invalid=True
    )
    assert (len(ds), ds.stats["invalid"]) == (2, 3)


# --------------------------------------------------------------------------------------------- budgets


def test_parse_token_budget():
    assert data.parse_token_budget("300K") == 300_000
    assert data.parse_token_budget("20M") == 20_000_000
    assert data.parse_token_budget("1.5B") == 1_500_000_000
    assert data.parse_token_budget("2k") == 2000 and data.parse_token_budget(1000) == 1000
    assert data.parse_token_budget(3e5) == 300_000 and data.parse_token_budget(None) is None
    for bad in ["1.5", "10X", "", "-3", "K", "1.0005K", 0, 2.5, True]:
        with pytest.raises(ValueError, match="bad token budget"):
            data.parse_token_budget(bad)


def synthetic(n=100, seed=1):
    """n examples of 10-60 tokens; example i's ids are 1000 * i + position, masks random after token 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 61, n)
    return data.TokenDataset.from_examples(
        (1000 * i + np.arange(k), np.concatenate([[0], rng.integers(0, 2, k - 1)])) for i, k in enumerate(lengths)
    )


def test_budgets_are_nested_and_exact():
    ds = synthetic()
    small, val_small = data.split_examples(ds, seed=3, val_examples=5, token_budget="1K")
    large, val_large = data.split_examples(ds, seed=3, val_examples=5, token_budget=2000)
    assert (small.num_tokens, large.num_tokens) == (1000, 2000)
    np.testing.assert_array_equal(val_small.starts, val_large.starts)  # Validation does not depend on the budget.
    assert len(val_small) == 5 and not set(val_small.starts) & set(large.starts)
    k = len(small)
    np.testing.assert_array_equal(small.starts, large.starts[:k])  # A prefix of the same shuffle...
    np.testing.assert_array_equal(small.lengths[:-1], large.lengths[: k - 1])
    assert small.lengths[-1] < large.lengths[k - 1]  # ...whose last example is cut to hit 1000 exactly.
    cut_ids, cut_mask = small[k - 1]
    assert small.loss_counts[-1] == cut_mask[1:].sum() and len(cut_ids) == small.lengths[-1]
    assert small.num_loss_tokens == sum(int(small[i][1][1:].sum()) for i in range(k))
    everything, _ = data.split_examples(ds, seed=3, val_examples=5)
    assert everything.num_tokens == ds.num_tokens - val_small.num_tokens
    other, _ = data.split_examples(ds, seed=4, val_examples=5, token_budget="1K")
    assert not np.array_equal(other.starts[:5], small.starts[:5])


def test_budget_errors_and_val_fraction():
    ds = synthetic()
    with pytest.raises(ValueError, match=f"exceeds the data: {ds.num_tokens:,} tokens in 100 examples"):
        data.split_examples(ds, token_budget="1M")
    train, val = data.split_examples(ds, val_examples=0.1)
    assert (len(train), len(val)) == (90, 10)
    with pytest.raises(ValueError, match="leaving none"):
        data.split_examples(ds, val_examples=100)


# --------------------------------------------------------------------------------------------- packing

A = ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])
B = ([6, 7, 8], [0, 1, 1])
C = ([9, 10, 11, 12], [0, 0, 1, 1])


def rows_of(batches, step=0):
    """The batch at ``step`` with its rows put back in row-id order (empty rows last)."""
    batch, rows = batches.batch_at(step), batches.rows_at(step)
    order = np.argsort(np.where(rows < 0, 1 << 40, rows), kind="stable")
    return {k: v[order].tolist() for k, v in batch.items()}


def test_pack_hand_checked():
    batches = data.PackedBatches(data.TokenDataset.from_examples([A, B, C]), seq_len=8, batch_size=2)
    assert (batches.num_rows, batches.steps_per_epoch) == (2, 1)  # A+B fill row 0 exactly; C opens row 1.
    got = rows_of(batches)
    assert got["inputs"] == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert got["segment_ids"] == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert got["positions"] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert got["targets"] == [[2, 3, 4, 5, 0, 7, 8, 0], [10, 11, 12, 0, 0, 0, 0, 0]]
    assert got["loss_mask"] == [[0, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert batches.stats["loss_tokens"] == 7 == sum(map(sum, got["loss_mask"]))


def test_pack_splits_long_examples_without_losing_targets():
    long = (list(range(1, 11)), [0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    batches = data.PackedBatches(data.TokenDataset.from_examples([long]), seq_len=4, batch_size=3)
    got = rows_of(batches)  # Chunks of 4, 4 and 2 tokens, one row each.
    assert got["inputs"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert got["targets"] == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 0, 0, 0]]
    assert got["loss_mask"] == [[0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert got["positions"] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 0]]
    assert got["segment_ids"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_concat_hand_checked():
    batches = data.PackedBatches(data.TokenDataset.from_examples([A, B, C]), 5, batch_size=3, packing="concat")
    got = rows_of(batches)  # The stream 1..12 in rows of 5; targets run on across examples.
    assert got["inputs"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 0, 0, 0]]
    assert got["targets"] == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 0, 0, 0, 0]]
    assert got["loss_mask"] == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 1], [1, 0, 0, 0, 0]]
    assert got["segment_ids"] == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    assert got["positions"] == [[0, 1, 2, 3, 4]] * 2 + [[0, 1, 0, 0, 0]]


@pytest.mark.parametrize("packing", data.PACKINGS)
def test_batch_order_is_a_function_of_seed_and_step(packing):
    ds = synthetic(n=40)
    make = lambda seed=7: data.PackedBatches(ds, seq_len=64, batch_size=4, seed=seed, packing=packing)
    a, b = make(), make()
    spe = a.steps_per_epoch
    assert a.num_rows % 4 != 0  # So the epoch's last batch is topped up with empty rows.
    for step in [0, 3, spe - 1, spe, 2 * spe + 1]:
        for key, value in a.batch_at(step).items():
            np.testing.assert_array_equal(value, b.batch_at(step)[key], err_msg=key)
    epoch0 = np.concatenate([a.rows_at(s) for s in range(spe)])
    epoch1 = np.concatenate([a.rows_at(s) for s in range(spe, 2 * spe)])
    assert sorted(epoch0[epoch0 >= 0]) == list(range(a.num_rows)) == sorted(epoch1[epoch1 >= 0])
    assert (epoch0 < 0).sum() == spe * 4 - a.num_rows and not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(a.rows_at(0), make(seed=8).rows_at(0))
    last = a.batch_at(spe - 1)
    assert last["segment_ids"][a.rows_at(spe - 1) < 0].sum() == 0  # Empty rows are all padding.
    total = sum(a.batch_at(s)["loss_mask"].sum() for s in range(spe))
    if packing == "pack":
        assert total == ds.num_loss_tokens  # Every loss target once per epoch.


@pytest.mark.parametrize("packing", data.PACKINGS)
def test_multihost_rows_equal_slices_of_global_batch(packing):
    batches = data.PackedBatches(synthetic(n=40), seq_len=64, batch_size=4, seed=2, packing=packing)
    for step in [0, 1, batches.steps_per_epoch - 1, batches.steps_per_epoch + 2]:
        whole = batches.batch_at(step)
        for count in (2, 4):
            parts = [batches.batch_at(step, p, count) for p in range(count)]
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="bad process"):
        batches.batch_at(0, 0, 3)


# -------------------------------------------------------------------------------------------- pipeline


def test_build_datasets(tmp_path, tokenizer):
    config = data.DataConfig(
        train=[str(DATA / "shards"), str(DATA / "hc3.parquet")],
        token_budget=60,
        val_examples=1,
        cache_dir=str(tmp_path),
        seq_len=32,
    )
    assert config.train == (str(DATA / "shards"), str(DATA / "hc3.parquet"))
    splits = data.build_datasets(config, tokenizer, progress=False)
    assert splits.train.num_tokens == 60 == splits.stats["train_tokens"]
    assert (splits.stats["val_examples"], splits.stats["conversations"], splits.stats["no_teacher"]) == (1, 5, 1)
    assert splits.stats["train_loss_tokens"] == splits.train.num_loss_tokens > 0
    batch = data.PackedBatches(splits.train, config.seq_len, 2, seed=config.seed).batch_at(0)
    assert batch["inputs"].shape == (2, 32)
    with pytest.raises(ValueError, match="bad token budget"):
        data.DataConfig(train="x.jsonl", token_budget="lots")
    with pytest.raises(ValueError, match="data.template"):
        data.DataConfig(train="x.jsonl", template="alpaca")
