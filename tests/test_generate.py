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
from imitax.models import layers

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


@pytest.fixture
def fresh_programs():
    """Clears JAX's compiled programs before and after: a test that patches a trace-time constant needs new ones."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def stacked_greedy(model, prompts: list[list[int]], max_new_tokens: int, cache_len: int) -> list[list[int]]:
    """Greedy decoding of left-padded prompts through ``Transformer.extend`` on the stacked cache (``init_cache``).

    ``generate`` on one CPU device carries a per-layer decoding cache instead; the stacked one,
    and its blocked reads, serve scoring and the serving engine.
    """
    graphdef, state = nnx.split(model)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    tokens, positions, segments = (np.zeros((len(prompts), width), np.int32) for _ in range(3))
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt) :] = prompt
        positions[i, width - len(prompt) :] = np.arange(len(prompt))
        segments[i, width - len(prompt) :] = 1

    @jax.jit
    def extend(state, tokens_bt, positions_bt, segment_ids_bt, cache):
        logits_btv, cache = nnx.merge(graphdef, state).extend(tokens_bt, cache, positions_bt, segment_ids_bt)
        return jnp.argmax(logits_btv[:, -1], axis=-1).astype(jnp.int32), cache

    token_b, cache = extend(state, tokens, positions, segments, model.init_cache(len(prompts), cache_len))
    out = [token_b]
    for step in range(1, max_new_tokens):
        token_b, cache = extend(state, token_b[:, None], (lengths + step - 1)[:, None], segments[:, -1:], cache)
        out.append(token_b)
    return np.stack(out, axis=1).tolist()


# A cache of 80 slots: blocks of 16 divide it; with blocks of 28 the last block
# (slots 52..79) overlaps the one before it, whose slots it must not count twice.
@pytest.mark.parametrize("block", [16, 28])
@pytest.mark.parametrize("kind", ["gpt2", "mistral"])  # per-layer softmax scale; sliding window + grouped KV heads
def test_blocked_cache_reads_match_transformers(kind, block, monkeypatch, fresh_programs):
    """Attention reading the stacked cache in blocks with an online softmax (the CPU path past CACHE_BLOCK slots)."""
    torch_model, model = tiny_pair(kind)
    prompts = make_prompts(seed=7)
    monkeypatch.setattr(layers, "CACHE_BLOCK", block)
    reads = []
    attend = layers.cached_attention
    monkeypatch.setattr(layers, "cached_attention", lambda *a, **k: reads.append(a[1].shape[3]) or attend(*a, **k))
    assert stacked_greedy(model, prompts, NEW_TOKENS, cache_len=80) == hf_greedy(torch_model, prompts)
    assert reads and all(s == 80 > block for s in reads), "the blocked path did not run"


def test_blocked_cache_reads_on_a_mesh(monkeypatch, fresh_programs):
    """The block loop under sharding: batch over data and fsdp, KV heads over tensor."""
    torch_model, model = tiny_pair("llama3")  # grouped KV heads: 2, one per tensor shard
    prompts = make_prompts(seed=10)
    want = hf_greedy(torch_model, prompts)
    monkeypatch.setattr(layers, "CACHE_BLOCK", 28)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        assert generate(nnx.merge(graphdef, state), prompts, max_new_tokens=NEW_TOKENS, bucket=40) == want


@pytest.mark.parametrize("rows", [1, 8])  # at one row XLA once fused the cache's update into a copy of it
def test_decode_updates_the_donated_cache_in_place(rows, monkeypatch):
    """The compiled decode loop writes new keys and values into the donated cache: it never copies or zero-fills one."""
    _, model = tiny_pair("llama")
    calls = []

    def decode(*args, **kwargs):
        abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a
        calls.append((jax.tree.map(abstract, args), kwargs))
        return _decode(*args, **kwargs)

    monkeypatch.setattr(generate_module, "_decode", decode)
    # 1,024 slots: a layer's keys outweigh a layer's weights and the output layer, which the loop does copy.
    generate(model, make_prompts(lengths=(5,) * rows), max_new_tokens=100, bucket=512)
    ((args, kwargs),) = calls
    compiled = _decode.lower(*args, **kwargs).compile()
    k_layers = args[3]["k"]
    # On one CPU device the loop carries one array per layer (Transformer.init_decoding_cache).
    assert isinstance(k_layers, tuple) and len(k_layers) == model.cfg.num_layers
    layer_bytes = k_layers[0].size * k_layers[0].dtype.itemsize
    stats = compiled.memory_analysis()
    # The keys and values come back as outputs in the buffers they came in.
    assert stats.alias_size_in_bytes >= 2 * model.cfg.num_layers * layer_bytes
    # No temporary the size of a layer's keys: no zero-filled cache, no copy of any part of it.
    assert stats.temp_size_in_bytes < layer_bytes, (stats.temp_size_in_bytes, layer_bytes)
    shape = "f32[" + ",".join(map(str, k_layers[0].shape)) + "]"
    lines = compiled.as_text().splitlines()
    made = [line for line in lines if f"= {shape}" in line and ("copy(" in line or "broadcast(" in line)]
    assert not made, made


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
        out, num_steps, cache = _decode(*args, **kwargs)
        steps.append(int(num_steps))
        return out, num_steps, cache

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


# -- lengths beyond the model's positions ----------------------------------------------------------


def test_lengths_beyond_learned_positions_are_refused_before_compiling(monkeypatch):
    torch_model, model = tiny_pair("gpt2")  # 64 learned positions
    assert model.cfg.max_position_embeddings == 64
    compiled = []
    monkeypatch.setattr(generate_module, "_prefill", lambda *a, **k: compiled.append(1))
    for prompts, new in (([[1] * 40], 25), ([[1] * 3, [2] * 60], 5), ([[1] * 65], 1)):
        longest = max(map(len, prompts))
        with pytest.raises(ValueError) as info:
            generate(model, prompts, max_new_tokens=new)
        message = str(info.value)
        # What was asked, the limit, why, and what to change.
        assert f"longest prompt ({longest} tokens) plus max_new_tokens ({new}): {longest + new}" in message
        assert "64 learned positions" in message and "no embedding" in message
        assert "set len(longest prompt) + max_new_tokens to at most 64" in message
    assert not compiled, "the length was checked after compiling"


def test_lengths_up_to_learned_positions_generate():
    torch_model, model = tiny_pair("gpt2")
    prompts = make_prompts(seed=8, lengths=(40, 7))
    # 40 + 24 = 64 positions: the whole table, the last row of it included.
    assert generate(model, prompts, max_new_tokens=24) == hf_greedy(torch_model, prompts, max_new_tokens=24)


def test_rope_lengths_beyond_max_positions_warn_and_run():
    torch_model, model = tiny_pair("llama")
    limit = model.cfg.max_position_embeddings
    prompts = make_prompts(seed=9, lengths=(limit - 4,))
    with pytest.warns(UserWarning, match="not trained at that length"):
        got = generate(model, prompts, max_new_tokens=8)
    assert got == hf_greedy(torch_model, prompts, max_new_tokens=8)
