"""Generation: greedy decoding against transformers' ``generate``, batching, sampling and stopping."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import FAMILIES, VOCAB, tiny_pair
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from imitax import sharding
from imitax.eval import generate, sample_logits, top_k_filter, top_p_filter
from imitax.eval.generate import _decode, _prefill

generate_module = sys.modules["imitax.eval.generate"]  # `imitax.eval.generate` is the function

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 9, 12)
NEG_INF = -np.inf


def make_prompts(seed: int = 0, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(0, VOCAB, n).tolist() for n in lengths]


def hf_greedy(torch_model, prompts: list[list[int]], max_new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy continuation of a left-padded batch (the tiny configs have no eos)."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        out = torch_model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    assert out.shape[1] == width + max_new_tokens
    return out[:, width:].tolist()


# -- greedy decoding equals transformers ----------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_matches_transformers(kind):
    torch_model, model = tiny_pair(kind)
    prompts = make_prompts()
    want = hf_greedy(torch_model, prompts)
    assert len({t for row in want for t in row}) > 5, "degenerate reference: the test would prove little"
    got = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    assert got == want


def test_batched_generation_equals_one_prompt_at_a_time():
    _, model = tiny_pair("mistral")  # sliding window + GQA: the row's positions must not shift
    prompts = make_prompts(seed=1, lengths=(1, 14, 8))
    batched = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    assert batched == [generate(model, [p], max_new_tokens=NEW_TOKENS)[0] for p in prompts]
    assert all(len(row) == NEW_TOKENS for row in batched)


def test_second_call_reuses_the_compiled_programs():
    _, model = tiny_pair("llama")
    generate(model, make_prompts(seed=2), max_new_tokens=8)
    sizes = _prefill._cache_size(), _decode._cache_size()
    # Other prompts and another max_new_tokens within the same buckets: no new trace.
    generate(model, make_prompts(seed=3, lengths=(2, 11, 7)), max_new_tokens=12)
    assert (_prefill._cache_size(), _decode._cache_size()) == sizes


# -- sampling ---------------------------------------------------------------------------------------


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds():
    _, model = tiny_pair("llama3")
    prompts = make_prompts(seed=4)
    sample = lambda seed: generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=seed)
    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert first != generate(model, prompts, max_new_tokens=16), "temperature 1 should not be greedy"


def test_top_k_1_and_tiny_top_p_equal_greedy():
    _, model = tiny_pair("llama3")
    prompts = make_prompts(seed=4)
    greedy = generate(model, prompts, max_new_tokens=16)
    assert generate(model, prompts, max_new_tokens=16, temperature=0.7, top_k=1, seed=3) == greedy
    assert generate(model, prompts, max_new_tokens=16, temperature=0.7, top_p=1e-6, seed=3) == greedy


def test_top_k_filter_by_hand():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 5.0, 4.0]])
    top2 = [[NEG_INF, 3.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, 5.0, 4.0]]
    top1 = [[NEG_INF, 3.0, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, 5.0, NEG_INF]]
    np.testing.assert_array_equal(top_k_filter(logits, 2), top2)
    np.testing.assert_array_equal(top_k_filter(logits, 1), top1)
    # k = 0 and k >= vocab keep everything.
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
    np.testing.assert_array_equal(top_k_filter(logits, 9), logits)
    # A tie with the k-th largest is kept.
    np.testing.assert_array_equal(top_k_filter(jnp.array([[2.0, 1.0, 2.0, 0.0]]), 1), [[2.0, NEG_INF, 2.0, NEG_INF]])


def test_top_p_filter_by_hand():
    # Probabilities 0.5, 0.2, 0.25, 0.05 (sorted: 0.5, 0.25, 0.2, 0.05; mass before each: 0, 0.5, 0.75, 0.95).
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.25, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.3) == [True, False, False, False]
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, False, True, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    np.testing.assert_allclose(top_p_filter(logits, 0.6)[0, 0], np.log(0.5), rtol=1e-6)  # survivors keep their value


def test_filters_match_transformers_warpers():
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 2
    for k in (1, 5, 20):
        want = TopKLogitsWarper(k, filter_value=-np.inf)(None, torch.as_tensor(logits)).numpy()
        np.testing.assert_array_equal(top_k_filter(jnp.asarray(logits), k), want)
    for p in (0.1, 0.5, 0.9):
        want = TopPLogitsWarper(p, filter_value=-np.inf)(None, torch.as_tensor(logits)).numpy()
        np.testing.assert_array_equal(top_p_filter(jnp.asarray(logits), p), want)


def test_sample_logits_follows_the_filtered_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    logits_bv = jnp.broadcast_to(jnp.log(probs), (20000, 4))
    draw = jax.jit(sample_logits)
    key = jax.random.key(0)
    counts = np.bincount(np.asarray(draw(key, logits_bv, 1.0, 0, 1.0)), minlength=4) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)  # ~4 standard errors
    # Temperature 0.5 squares the probabilities (then renormalizes).
    counts = np.bincount(np.asarray(draw(key, logits_bv, 0.5, 0, 1.0)), minlength=4) / 20000
    np.testing.assert_allclose(counts, probs**2 / (probs**2).sum(), atol=0.015)
    # top-k 2 renormalizes over the two most likely tokens; top-p 0.6 keeps the same two.
    for top_k, top_p in ((2, 1.0), (0, 0.6)):
        counts = np.bincount(np.asarray(draw(key, logits_bv, 1.0, top_k, top_p)), minlength=4) / 20000
        np.testing.assert_allclose(counts, [4 / 7, 3 / 7, 0, 0], atol=0.015)


# -- stopping ----------------------------------------------------------------------------------------


def cut_at(row: list[int], eos: set[int]) -> list[int]:
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    return row if stop is None else row[: stop + 1]


def test_eos_stops_a_row_and_the_others_continue():
    _, model = tiny_pair("mistral")
    prompts = make_prompts()
    full = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    # An eos that row 0 emits early and some other row never emits.
    eos = next(t for t in full[0][2:] if any(t not in row for row in full[1:]))
    got = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert got == [cut_at(row, {eos}) for row in full]
    assert got[0][-1] == eos and len(got[0]) < NEW_TOKENS
    assert any(len(row) == NEW_TOKENS for row in got), "some row should have run to the end"


def test_several_eos_ids_and_the_loop_exits_when_every_row_has_finished(monkeypatch):
    _, model = tiny_pair("mistral")
    prompts = make_prompts()
    full = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    eos = tuple({row[3] for row in full})  # every row stops by its fourth token
    steps = []

    def decode(*args, **kwargs):
        out, num_steps = _decode(*args, **kwargs)
        steps.append(int(num_steps))
        return out, num_steps

    monkeypatch.setattr(generate_module, "_decode", decode)
    got = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert got == [cut_at(row, set(eos)) for row in full]
    assert all(len(row) <= 4 for row in got)
    assert steps == [max(map(len, got))], "the decode loop ran past the last eos"


# -- arguments and sharding -----------------------------------------------------------------------


def test_bad_arguments_are_refused():
    _, model = tiny_pair("gpt2")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="learned positions"):
        generate(model, [[1] * 40], max_new_tokens=30)  # GPT-2 here has 64 positions
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, VOCAB]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=4, temperature=1.0, top_p=0.0)
    assert generate(model, [[1, 2], [3]], max_new_tokens=0) == [[], []]


def test_generation_on_a_mesh_equals_single_device():
    _, model = tiny_pair("llama3")
    prompts = make_prompts(seed=6)  # 3 rows on 4 batch shards: one dummy row is added
    want = generate(model, prompts, max_new_tokens=12)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        assert generate(nnx.merge(graphdef, state), prompts, max_new_tokens=12) == want
