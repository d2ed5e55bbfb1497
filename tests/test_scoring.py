"""Log-likelihood scoring against transformers + PyTorch, and the harness's tokenization rules by hand."""

from __future__ import annotations

import functools
import itertools
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import tiny_hf_config, to_imitax

from imitax import sharding
from imitax.eval import generate, scoring
from imitax.eval.lm import LM
from imitax.eval.scoring import Scorer, encode_pair, length_bucket, rolling_windows

TOKENIZER_DIR = pathlib.Path(__file__).parent / "data" / "tokenizer"
VOCAB = 320  # >= the test tokenizer's 300 ids
ATOL = 1e-4  # never loosened


@functools.cache
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@functools.cache
def tiny_pair(kind: str, max_positions: int) -> tuple[torch.nn.Module, object]:
    """A random ``kind`` model with the test tokenizer's vocabulary, and its imitax twin (built once)."""
    config = tiny_hf_config(kind)
    config.vocab_size = VOCAB
    config.update({"n_positions" if kind == "gpt2" else "max_position_embeddings": max_positions})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Spread-out random weights, as tests/hf_models.py draws them.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.2
            p.copy_(1 + noise if "norm" in name or ".ln_" in name else noise)
    return model.eval(), to_imitax(model)


def harness_tokens(context: str, continuation: str, prefix_id: int = 0) -> tuple[list[int], list[int]]:
    """The harness's encoding, written out independently of imitax."""
    tok = tokenizer()
    if context == "":
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def hf_loglikelihood(torch_model, context_ids, continuation_ids, max_length: int) -> tuple[float, bool]:
    """Summed log-probability of the continuation and its greediness, straight from transformers."""
    inputs = (list(context_ids) + list(continuation_ids))[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logits = torch_model(torch.tensor([inputs])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[len(inputs) - len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def assert_close(got, want):
    assert len(got) == len(want)
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert abs(g - w) <= ATOL, (g, w)
        assert g_greedy == w_greedy


CONTEXTS = [
    "The following are questions about space.\n\nWhich planet is red?\nA. Mars\nB. Venus\nAnswer:",
    "Question: what is two plus two?\nAnswer: ",  # trailing space: moves to the continuation
    "Once upon a time",
]
CONTINUATIONS = [" A", " B", " four", "Mars is red", " there was a dragon"]


# -- numerics against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loglikelihoods_match_transformers(kind):
    positions = 128 if kind == "llama" else 64
    torch_model, model = tiny_pair(kind, positions)
    lm = LM(model, tokenizer(), batch_size=4)
    requests = [(c, k) for c in CONTEXTS for k in CONTINUATIONS] + [("", "Hello world"), ("", " A")]
    want = [hf_loglikelihood(torch_model, *harness_tokens(c, k), positions) for c, k in requests]
    assert_close(lm.loglikelihood(requests), want)
    too_long = sum(len(c) + len(k) > positions + 1 for c, k in map(lambda r: harness_tokens(*r), requests))
    assert lm.stats.requests == len(requests) and lm.stats.truncated == too_long
    # Requests with one context and one-token continuations share a row.
    assert lm.stats.rows < len(requests)


def test_greedy_flag_is_true_for_the_argmax_continuation():
    torch_model, model = tiny_pair("llama", 128)
    context_ids = tokenizer()("Once upon a time")["input_ids"]
    with torch.no_grad():
        best = int(torch_model(torch.tensor([context_ids])).logits[0, -1].argmax())
    worst = (best + 1) % VOCAB
    got = Scorer(model).loglikelihood_tokens([(context_ids, [best]), (context_ids, [worst])])
    assert [greedy for _, greedy in got] == [True, False]
    assert_close(got, [hf_loglikelihood(torch_model, context_ids, [t], 128) for t in (best, worst)])


def test_left_truncation_matches_transformers_on_the_kept_tokens_and_is_counted():
    torch_model, model = tiny_pair("gpt2", 64)  # learned positions: 64 of them
    rs = np.random.RandomState(0)
    requests = [
        (rs.randint(1, VOCAB, 100).tolist(), rs.randint(1, VOCAB, 3).tolist()),  # 103 > 65: truncated
        (rs.randint(1, VOCAB, 62).tolist(), rs.randint(1, VOCAB, 3).tolist()),  # 65 = max_length + 1: kept whole
        (rs.randint(1, VOCAB, 10).tolist(), rs.randint(1, VOCAB, 64).tolist()),  # long continuation: truncated
    ]
    scorer = Scorer(model, batch_size=2)
    assert scorer.max_length == 64
    got = scorer.loglikelihood_tokens(requests)
    assert_close(got, [hf_loglikelihood(torch_model, c, k, 64) for c, k in requests])
    assert scorer.stats.truncated == 2
    with pytest.raises(ValueError, match="max_length"):
        scorer.loglikelihood_tokens([([1], [2] * 65)])


# -- the harness's tokenization rules, by hand ------------------------------------------------------


def test_trailing_space_moves_to_the_continuation():
    tok = tokenizer()
    context_ids, continuation_ids = encode_pair(tok, "Answer: ", "A", prefix_token_id=0)
    # Byte-level BPE: " A" is one token when the space is in front of it.
    assert context_ids == tok("Answer:")["input_ids"]
    assert continuation_ids == tok(" A")["input_ids"]
    assert (context_ids, continuation_ids) == encode_pair(tok, "Answer:", " A", prefix_token_id=0)
    # Several whitespace characters move together.
    assert encode_pair(tok, "Answer:\n ", "A", 0) == encode_pair(tok, "Answer:", "\n A", 0)
    assert encode_pair(tok, "Answer:\n ", "A", 0)[0] == tok("Answer:")["input_ids"]


def test_continuation_tokens_come_from_the_whole_string():
    tok = tokenizer()
    # "ab" + "cd": the continuation is what follows the context's tokens in the encoding of "abcd".
    context_ids, continuation_ids = encode_pair(tok, "hello wor", "ld", 0)
    whole = tok("hello world")["input_ids"]
    assert context_ids == tok("hello wor")["input_ids"]
    assert continuation_ids == whole[len(context_ids) :]


def test_empty_context_becomes_the_prefix_token():
    tok = tokenizer()
    assert tok.bos_token_id is None and tok.eos_token_id == 0  # so the prefix token is EOS
    assert scoring.resolve_prefix_token_id(tok) == 0
    hello = tok("hello world", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "", "hello world", 0) == ([0], hello)
    # A continuation that starts with the prefix token is its own context.
    assert encode_pair(tok, "", "<|endoftext|>hello world", 0) == ([0], hello)
    # An explicit prefix token wins.
    assert encode_pair(tok, "", "hello world", 7) == ([7], hello)


def test_rolling_windows_are_the_harness_windows():
    # The example in the harness's docstring: tokens 0..9, prefix P, max length 4.
    p = -1
    assert rolling_windows(list(range(10)), p, 4) == [
        ([p], [0, 1, 2, 3]),
        ([3], [4, 5, 6, 7]),
        ([5, 6, 7], [8, 9]),
    ]
    assert rolling_windows([5, 6], p, 4) == [([p], [5, 6])]
    assert rolling_windows([], p, 4) == []
    for n in range(1, 30):  # every token predicted once; every window reads at most max_length tokens
        windows = rolling_windows(list(range(n)), p, 4)
        assert [t for _, cont in windows for t in cont] == list(range(n))
        assert all(len(ctx) + len(cont) <= 5 for ctx, cont in windows)


def test_loglikelihood_rolling_equals_the_sum_of_token_logprobs():
    torch_model, model = tiny_pair("gpt2", 64)
    tok = tokenizer()
    text = "It was the best of times, it was the worst of times. " * 4
    ids = tok(text)["input_ids"]
    assert len(ids) > 64  # several windows
    want = sum(hf_loglikelihood(torch_model, c, k, 64)[0] for c, k in rolling_windows(ids, 0, 64))
    (got,) = LM(model, tok, batch_size=2).loglikelihood_rolling([text])
    assert abs(got - want) <= ATOL


def test_rolling_windows_whose_bucket_passes_the_row_width_equal_transformers():
    # A 40-token document is one window of 40 predictions in a 41-token row: the window's bucket
    # (64) is wider than the row (48 wide), so the scored positions must be the row's last 48.
    torch_model, model = tiny_pair("gpt2", 64)
    tok = tokenizer()
    lm = LM(model, tok, batch_size=2)
    long = "the quick brown fox jumps over a lazy dog while seven tired cats watch from the wall " * 4
    for tokens in (40, 64 + 40):  # alone in its batch; a second window after a full one
        text = next(long[:n] for n in range(len(long)) if len(tok(long[:n])["input_ids"]) == tokens)
        ids = tok(text)["input_ids"]
        want = sum(hf_loglikelihood(torch_model, c, k, 64)[0] for c, k in rolling_windows(ids, 0, 64))
        (got,) = lm.loglikelihood_rolling([text])
        assert abs(got - want) <= ATOL, tokens


# -- arrangement: batching, buckets, shared prefixes, meshes -----------------------------------------


def random_requests(seed: int, n: int, shared: int = 0, extra: int = 40) -> list[tuple[list[int], list[int]]]:
    """``n`` random contexts (a shared prefix, then up to ``extra`` tokens), each with 1-3 continuations."""
    rs = np.random.RandomState(seed)
    prefix = rs.randint(1, VOCAB, shared).tolist()
    requests = []
    for _ in range(n):
        context = prefix + rs.randint(1, VOCAB, rs.randint(1, extra)).tolist()
        for _ in range(rs.randint(1, 4)):  # one context, several continuations (some share the input)
            requests.append((context, rs.randint(1, VOCAB, rs.choice([1, 1, 3, 9])).tolist()))
    return requests


def test_batched_bucketed_scoring_equals_one_request_at_a_time():
    _, model = tiny_pair("llama", 128)
    requests = random_requests(seed=1, n=9)
    batched = Scorer(model, batch_size=4, share_prefix=False).loglikelihood_tokens(requests)
    single = Scorer(model, batch_size=1, share_prefix=False)
    assert_close(batched, [single.loglikelihood_tokens([r])[0] for r in requests])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # RoPE, and learned positions
def test_shared_prefix_path_equals_the_plain_path(kind):
    positions, shared, extra = (128, 64, 40) if kind == "llama" else (64, 30, 20)
    torch_model, model = tiny_pair(kind, positions)
    requests = random_requests(2, 10, shared, extra) + random_requests(3, 3, shared - 5, extra)
    requests += random_requests(seed=4, n=3, extra=extra)  # unrelated: plain rows beside the groups
    shared_scorer = Scorer(model, batch_size=4, min_shared_prefix=16)
    plain = Scorer(model, batch_size=4, share_prefix=False)
    got = shared_scorer.loglikelihood_tokens(requests)
    assert_close(got, plain.loglikelihood_tokens(requests))
    assert shared_scorer.stats.prefix_groups == 2
    assert shared_scorer.stats.computed_tokens < 0.7 * plain.stats.computed_tokens
    # ...and both equal transformers.
    assert_close(got[:6], [hf_loglikelihood(torch_model, c, k, positions) for c, k in requests[:6]])


def subjects(seed: int, positions: int) -> list[tuple[list[int], list[int]]]:
    """MMLU-like requests of 11 "subjects" (more than one wave of prefix groups), each with its own prefix.

    Per subject: a random prefix (its length varies, so a wave holds prefixes
    of different lengths), questions of varied lengths with the choices 1..4
    and a multi-token answer, one question too long for the window (its
    request is truncated from the left and no longer shares the prefix), and
    two truncated questions whose windows start at the same token (a group of
    their own). The last subject has a single whole question, one model
    input: it forms no group.
    """
    rs = np.random.RandomState(seed)
    requests = []
    for subject in range(11):
        prefix = rs.randint(1, VOCAB, rs.randint(positions // 4, positions // 2)).tolist()
        questions = 1 if subject == 10 else rs.randint(2, 6)
        for _ in range(questions):
            context = prefix + rs.randint(1, VOCAB, rs.randint(1, positions // 3)).tolist()
            requests += [(context, [k]) for k in (1, 2, 3, 4)]
            if subject != 10:  # another input (the context and the answer's first tokens): the lone one has one
                requests.append((context, rs.randint(1, VOCAB, 3).tolist()))
        long_context = prefix + rs.randint(1, VOCAB, positions).tolist()
        requests += [(long_context, [k]) for k in (1, 2)]
        # Two prompts of one length past the window: truncated, both start at the same token, so they share
        # (the rest of) the prefix and what follows it, and form a group of their own.
        shared = prefix + rs.randint(1, VOCAB, positions - len(prefix) + 5).tolist()
        for _ in range(2):
            requests += [(shared + rs.randint(1, VOCAB, 10).tolist(), [k]) for k in (1, 2)]
    return requests


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # RoPE, and learned positions
def test_waves_of_prefix_groups_truncated_and_lone_rows_match_transformers(kind):
    positions = 128 if kind == "llama" else 64
    torch_model, model = tiny_pair(kind, positions)
    requests = subjects(seed=11, positions=positions)
    scorer = Scorer(model, batch_size=4, min_shared_prefix=8)
    got = scorer.loglikelihood_tokens(requests)
    assert_close(got, [hf_loglikelihood(torch_model, c, k, positions) for c, k in requests])
    # Ten subjects and eleven pairs of truncated prompts formed groups (three waves: 8, 8, then 5 and
    # dummy rows); the lone question and the other truncated prompts ran plain.
    assert scorer.stats.prefix_groups == 10 + 11
    assert scorer.stats.truncated == 11 * (2 + 4)
    assert len(scorer.stats.programs) <= 1 + scoring._MAX_PLAIN_WIDTHS + 3 + scoring._MAX_SUFFIX_WIDTHS
    # The same requests in another order: same results (waves and batches are formed from sorted rows).
    order = np.random.RandomState(0).permutation(len(requests))
    shuffled = scorer.loglikelihood_tokens([requests[i] for i in order])
    assert_close(shuffled, [got[i] for i in order])


def test_widths_pad_least():
    rs = np.random.RandomState(0)
    for _ in range(30):
        lengths = rs.randint(1, 700, rs.randint(1, 40)).tolist()
        k = int(rs.randint(1, 5))
        got = scoring.choose_widths(lengths, k)
        rungs = sorted({-(-n // 16) * 16 if n <= 256 else length_bucket(n) for n in lengths})
        assert len(got) <= k and got[-1] == rungs[-1] and set(got) <= set(rungs)

        def padding(widths, lengths=lengths):
            return sum(min(w for w in widths if w >= n) - n for n in lengths)

        # Exhaustively: no other choice of at most k rungs (with the largest) pads less.
        best = min(
            padding([*chosen, rungs[-1]])
            for r in range(min(k, len(rungs)))
            for chosen in itertools.combinations(rungs[:-1], r)
        )
        assert padding(got) == best


def test_a_benchmark_compiles_a_bounded_number_of_programs():
    _, model = tiny_pair("llama", 128)
    scorer = Scorer(model, batch_size=4)

    def questions(seed):  # MMLU-like: a shared prompt, a question, the continuations 1..4
        contexts = {tuple(c) for c, _ in random_requests(seed, n=10, shared=64) + random_requests(seed, 2, extra=60)}
        return [(c, [k]) for c in sorted(contexts) for k in (1, 2, 3, 4)]

    scorer.loglikelihood_tokens(questions(5))
    jitted = (scoring._score_plain, scoring._extend_prefix, scoring._score_suffix)
    compiled = [f._cache_size() for f in jitted]
    programs = len(scorer.stats.programs)
    # Other questions, of lengths within the same buckets: nothing new is compiled.
    scorer.loglikelihood_tokens(questions(6))
    assert [f._cache_size() for f in jitted] == compiled
    assert len(scorer.stats.programs) == programs <= 6  # plain, prefix and a few suffix widths


def test_length_buckets():
    got = [length_bucket(n) for n in (1, 32, 33, 140, 512, 513, 700, 1024, 1025, 2000)]
    assert got == [32, 32, 64, 160, 512, 576, 704, 1024, 1152, 2048]
    assert len({length_bucket(n) for n in range(1, 4097)}) == 40


def test_scoring_on_a_mesh_equals_single_device():
    _, model = tiny_pair("llama", 128)
    requests = random_requests(seed=7, n=5, shared=64)
    want = Scorer(model, batch_size=4).loglikelihood_tokens(requests)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    scorer = Scorer(nnx.merge(graphdef, state), batch_size=3, mesh=mesh)
    assert scorer.batch_size == 4  # rounded up to the 4 batch shards
    assert_close(scorer.loglikelihood_tokens(requests), want)


# -- BOS: the harness's add_bos_token ----------------------------------------------------------------

BOS = 300  # "<s>", the id after the test tokenizer's 300


@functools.cache
def bos_tokenizer(adds_bos: bool):
    """The test BPE with a BOS token ``<s>``; ``adds_bos``: prepended by default, as LLaMA's tokenizer does.

    ``adds_bos=False`` is a Pythia-style tokenizer: it has a BOS token but does not add it.
    """
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", add_bos_token=adds_bos
    )
    plain = tok("hello", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id == BOS and tok("hello")["input_ids"] == ([BOS] if adds_bos else []) + plain
    return tok


def bos_reference(tok, context: str, continuation: str, with_bos: bool) -> tuple[list[int], list[int]]:
    """The harness's encoding, written out: BOS starts each encoding iff ``with_bos``; ``""`` becomes ``[BOS]``."""
    plain = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if context == "":
        return [BOS], plain(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    # A text that already starts with "<s>" brings its own BOS, whatever the setting.
    bos = [BOS] if with_bos and not context.startswith("<s>") else []
    context_ids, whole = bos + plain(context), bos + plain(context + continuation)
    return context_ids, whole[len(context_ids) :]


BOS_REQUESTS = [
    (CONTEXTS[0], " A"),
    (CONTEXTS[0], " B"),
    (CONTEXTS[1], "four"),
    (CONTEXTS[2], " there was a dragon"),
    ("", "Hello world"),  # the prefix token (BOS) in every setting
    ("<s>Once upon a time", " there"),  # BOS already there: never doubled
]


@pytest.mark.parametrize("adds_bos", [True, False], ids=["llama_style", "pythia_style"])
def test_add_bos_token_matches_transformers_on_the_harness_encoding(adds_bos):
    torch_model, model = tiny_pair("llama", 128)
    tok = bos_tokenizer(adds_bos)
    text = "It was the best of times."
    plain_text = tok(text, add_special_tokens=False)["input_ids"]
    results = {}
    # None: the tokenizer's default (the harness since 0.4.9.2); False: no BOS (up to 0.4.9.1); True: always.
    for setting, with_bos in ((None, adds_bos), (False, False), (True, True)):
        lm = LM(model, tok, batch_size=4, add_bos_token=setting)
        assert lm.add_bos_token is setting and lm.prefix_token_id == BOS
        encoded = [bos_reference(tok, c, k, with_bos) for c, k in BOS_REQUESTS]
        assert all(ctx[0] == BOS for ctx, _ in encoded[4:])  # empty context, and "<s>..." as written
        assert all((ctx[0] == BOS) == with_bos for ctx, _ in encoded[:4])
        assert [encode_pair(tok, c, k, BOS, add_bos_token=setting) for c, k in BOS_REQUESTS] == encoded
        results[setting] = got = lm.loglikelihood(BOS_REQUESTS)
        assert_close(got, [hf_loglikelihood(torch_model, c, k, 128) for c, k in encoded])
        # Rolling: the document's tokens (with BOS iff with_bos, so that BOS is then scored) after the prefix BOS.
        tokens = ([BOS] if with_bos else []) + plain_text
        (rolling,) = lm.loglikelihood_rolling([text])
        assert abs(rolling - hf_loglikelihood(torch_model, [BOS], tokens, 128)[0]) <= ATOL
    # The setting changes the numbers (so a scorer ignoring it fails above), except where BOS is fixed.
    with_, without = (results[None], results[False]) if adds_bos else (results[True], results[None])
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(with_[:4], without[:4], strict=True))
    assert_close(with_[4:], without[4:])


def test_add_bos_token_applies_to_generation_prompts():
    _, model = tiny_pair("llama", 128)
    tok = bos_tokenizer(True)
    context = "Once upon a time"
    plain = tok(context, add_special_tokens=False)["input_ids"]
    want = {}
    for setting, prompt in ((None, [BOS, *plain]), (False, plain)):
        want[setting] = tok.decode(generate(model, [prompt], max_new_tokens=8)[0], skip_special_tokens=True)
        lm = LM(model, tok, batch_size=2, add_bos_token=setting)
        assert lm.generate_until([(context, {"max_gen_toks": 8})]) == [want[setting]]
    assert want[None] != want[False]  # BOS changes this model's continuation: the check above has teeth


def test_bad_add_bos_token_is_refused():
    _, model = tiny_pair("llama", 128)
    with pytest.raises(ValueError, match="add_bos_token must be None, True or False, got 'false'"):
        Scorer(model, bos_tokenizer(True), add_bos_token="false")
    # The test tokenizer has EOS but no BOS: nothing to prepend.
    with pytest.raises(ValueError, match="add_bos_token=True, but this tokenizer has no BOS token.*--add_bos_token"):
        LM(model, tokenizer(), add_bos_token=True)
    assert LM(model, tokenizer(), add_bos_token=False).add_bos_token is False


# -- max_length against the model's positions ------------------------------------------------------------


def test_max_length_past_learned_positions_is_refused_naming_both_numbers_and_the_flag():
    _, gpt2 = tiny_pair("gpt2", 64)
    for make in (lambda: Scorer(gpt2, max_length=65), lambda: LM(gpt2, tokenizer(), max_length=65)):
        with pytest.raises(ValueError) as e:
            make()
        message = str(e.value)
        assert message.startswith("max_length 65 is longer than the 64 learned positions of this gpt2 model")
        assert message.endswith("set max_length (scripts/evaluate.py: --max_length) to at most 64")
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        Scorer(gpt2, max_length=0)
    assert Scorer(gpt2).max_length == Scorer(gpt2, max_length=64).max_length == 64
    # RoPE runs past its trained length (as transformers does), with a warning.
    _, llama = tiny_pair("llama", 128)
    with pytest.warns(UserWarning, match="max_length 200 is longer than this llama model's max_position_embeddings"):
        assert Scorer(llama, max_length=200).max_length == 200


def test_long_text_prompts_are_truncated_from_the_left_to_the_learned_positions():
    torch_model, model = tiny_pair("gpt2", 64)
    lm = LM(model, tokenizer(), batch_size=2)
    assert lm.max_length == 64
    long_context = " ".join(CONTEXTS) * 3
    requests = [(long_context, " A"), (long_context, " dragon"), (CONTEXTS[2] * 20, " there was a dragon")]
    encoded = [harness_tokens(c, k) for c, k in requests]
    assert all(len(c) + len(k) > 65 for c, k in encoded)  # every one is truncated
    got = lm.loglikelihood(requests)
    assert all(np.isfinite(logprob) for logprob, _ in got)
    # transformers on the kept tokens: the last 65 of context + continuation, the last one predicted only.
    assert_close(got, [hf_loglikelihood(torch_model, c, k, 64) for c, k in encoded])
    assert lm.stats.truncated == len(requests)


def test_bad_requests_are_refused():
    _, model = tiny_pair("llama", 128)
    scorer = Scorer(model)
    with pytest.raises(ValueError, match="non-empty"):
        scorer.loglikelihood_tokens([([], [1])])
    with pytest.raises(ValueError, match="vocab|token ids"):
        scorer.loglikelihood_tokens([([1], [VOCAB])])
    with pytest.raises(ValueError, match="no tokenizer"):
        scorer.loglikelihood([("a", "b")])


# -- the LM interface ----------------------------------------------------------------------------------


def test_lm_from_path_accepts_hf_directories_and_checkpoints(tmp_path):
    from imitax import convert

    torch_model, model = tiny_pair("llama", 128)
    torch_model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / "hf" / name)
    requests = [(CONTEXTS[0], " A"), (CONTEXTS[2], CONTINUATIONS[-1])]
    want = LM(model, tokenizer()).loglikelihood(requests)
    assert_close(LM.from_path(tmp_path / "hf", batch_size=2).loglikelihood(requests), want)
    convert.convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    assert_close(LM.from_path(tmp_path / "ckpt").loglikelihood(requests), want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected an imitax checkpoint.*training workdir.*config.json"):
        LM.from_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        LM.from_path(tmp_path / "missing")


def test_generate_until_cuts_at_the_first_stop_string():
    _, model = tiny_pair("llama", 128)
    lm = LM(model, tokenizer(), batch_size=2)
    context = "Once upon a time"
    full = tokenizer().decode(
        generate(model, [tokenizer()(context)["input_ids"]], max_new_tokens=12)[0], skip_special_tokens=True
    )
    assert len(full) > 6
    stop = full[4:6]
    got = lm.generate_until(
        [
            (context, {"until": [stop], "max_gen_toks": 12}),
            (context, {"until": [], "max_gen_toks": 12}),
            ("Hi", {"max_gen_toks": 5}),
        ]
    )
    assert got[:2] == [full.split(stop)[0], full]
    assert isinstance(got[2], str)
    with pytest.raises(ValueError, match="unknown generation settings \\['num_beams'\\]"):
        lm.generate_until([(context, {"num_beams": 2})])


def test_sampled_copies_of_a_request_differ_and_repeat_with_the_seed():
    _, model = tiny_pair("llama", 128)
    lm = LM(model, tokenizer(), batch_size=2)  # three copies: two batches
    requests = [("Once upon a time", {"max_gen_toks": 8, "temperature": 1.0, "seed": 3})] * 3
    samples = lm.generate_until(requests)
    assert len(set(samples)) == 3
    assert lm.generate_until(requests) == samples
