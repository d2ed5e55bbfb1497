"""imitax.train: sharded and accumulated steps, the loss mask, optimizers, the loop's failure modes.

Two kinds of tests. The step tests build the pieces (model, optimizer, state, jitted step) on
meshes of the 8 virtual devices and compare numbers. The run tests go through
``run(config, workdir)`` and ``scripts/train.py`` on the shipped data; they share one reference
run of 40 steps (:func:`reference`) that the others copy, resume or compare against bitwise.

Compiling dominates these tests on a 2-core CPU, so the module compiles with
``train_helpers.compile_settings`` (a persistent compilation cache in a temporary directory, also
handed to the subprocesses, and LLVM's optimizations off): the many runs of the same tiny model
compile each program once, and faster.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import train_helpers as th
import transformers
from flax import nnx

from imitax import data, models, sharding
from imitax.convert import core
from imitax.data.formats import TEACHER, USER, Conversation
from imitax.train import optim
from imitax.train import state as train_state
from imitax.train import step as train_step
from imitax.train.loop import TrainingError, run

TOTAL_STEPS = 40  # the reference run's length
MESHES = ["fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """This module's compile settings (``train_helpers.compile_settings``); yields the cache dir."""
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return th.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def overrides(tok_dir):
    """The reference run's settings; tests derive theirs from these.

    With dropout and a chunked cross-entropy (64 positions in chunks of 24, the last one padded):
    the resume tests then show that a resumed run draws the same masks as an uninterrupted one.
    """
    return th.base_overrides(tok_dir) | {
        "total_steps": TOTAL_STEPS,
        "checkpoint_every": 10,
        "dropout": 0.1,
        "loss_chunk_len": 24,
    }


@pytest.fixture(scope="module")
def reference(compile_cache, overrides, tmp_path_factory):
    """One uninterrupted run of the reference settings: ``(workdir, result, final params)``."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = run(th.make_config(overrides), str(workdir))
    return workdir, result, th.checkpoint_params(workdir)


@pytest.fixture(scope="module")
def batches(tokenizer, tmp_path_factory):
    """Packed batches (8 rows of 64 tokens) of the shipped data, as the trainer makes them."""
    cfg = data.DataConfig(train=th.TRAIN_FILES.split(","), seq_len=64, cache_dir=str(tmp_path_factory.mktemp("c")))
    splits = data.build_datasets(cfg, tokenizer, progress=False)
    return data.PackedBatches(splits.train, seq_len=64, batch_size=8, seed=0)


def tiny_model_config() -> models.TransformerConfig:
    return models.preset("llama-7b", **th.TINY_LLAMA, dtype="float32")


def optimizer_config(**changes) -> ml_collections.ConfigDict:
    """``configs/finetune.py``'s optimizer section, with ``changes``."""
    cfg = th.make_config({}).optimizer
    cfg.update(changes)
    return cfg


def train(model, mesh, optimizer, batch_list, *, grad_accum_steps=1, schedule=None, loss_chunk_len=0):
    """Runs the train step over ``batch_list`` on ``mesh``: ``(final params, [metrics per step])``.

    ``model``'s weights are copied onto ``mesh``: one random init serves every mesh (the init is
    the slowest of these programs to compile). The cross-entropy is unchunked unless
    ``loss_chunk_len`` says otherwise.
    """
    graphdef, weights = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(weights, sharding.state_shardings(weights, mesh)))
    shardings = train_state.state_shardings(model, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        state = train_state.create_train_state(model, optimizer, shardings, seed=0)
        fn = train_step.make_train_step(
            graphdef, optimizer, schedule or (lambda step: 0.0), grad_accum_steps, loss_chunk_len=loss_chunk_len
        )
        step_fn = train_step.jit_train_step(fn, shardings, batch_sharding)
        history = []
        for batch in batch_list:
            state, metrics = step_fn(state, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()})
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.tree.map(np.asarray, state.params), history


def one_device_mesh():
    return sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])


def with_dropout(model, rate: float):
    """The same weights (shared, not copied) with every dropout rate set to ``rate``."""
    out = nnx.merge(*nnx.split(model))
    out.cfg = out.cfg.replace(embed_dropout=rate, attention_dropout=rate, residual_dropout=rate)
    return out


def single_row(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One example alone in a row of ``seq_len``: next-token targets, the mask of each target."""
    n = len(ids)
    assert n <= seq_len
    row = {k: np.zeros((1, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    row["loss_mask"] = np.zeros((1, seq_len), np.float32)
    row["inputs"][0, :n] = ids
    row["targets"][0, : n - 1] = ids[1:]
    row["loss_mask"][0, : n - 1] = mask[1:]
    row["segment_ids"][0, :n] = 1
    row["positions"][0, :n] = np.arange(n)
    return row


# -- the step -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(compile_cache):
    """A randomly initialized tiny model on one device (the step tests move it onto their meshes)."""
    return models.init_model(tiny_model_config(), seed=0)


@pytest.fixture(scope="module")
def one_device_losses(tiny_model, batches):
    optimizer, schedule = optim.make_optimizer(optimizer_config(name="adamw", lr=3e-3, warmup_steps=0), 10)
    _, history = train(
        tiny_model, one_device_mesh(), optimizer, [batches.batch_at(s) for s in range(3)], schedule=schedule
    )
    return history


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_steps_match_one_device(spec, tiny_model, one_device_losses, batches):
    """Sharded, with the cross-entropy in chunks of 16 positions; on one device, unchunked."""
    mesh = sharding.make_mesh(spec)
    assert mesh.devices.size == 8
    optimizer, schedule = optim.make_optimizer(optimizer_config(name="adamw", lr=3e-3, warmup_steps=0), 10)
    batch_list = [batches.batch_at(s) for s in range(3)]
    _, history = train(tiny_model, mesh, optimizer, batch_list, schedule=schedule, loss_chunk_len=16)
    expected = [m["loss"] for m in one_device_losses]
    np.testing.assert_allclose([m["loss"] for m in history], expected, atol=1e-5, rtol=0)
    assert expected[2] < expected[0]  # the steps did train: a match of untrained losses proves little


def test_gradient_accumulation_equals_one_big_step(tiny_model, batches):
    """Two micro-batches on 2 devices = one batch on 1 device, with dropout 0.1.

    Each row's dropout masks come from (rng, step, row), so neither the micro-batching nor the
    sharding changes them.
    """
    # Plain SGD: the parameters move by lr * gradient, so they compare the gradients themselves
    # (Adam's normalization would turn float noise in near-zero gradients into whole lr-sized steps).
    model = with_dropout(tiny_model, 0.1)
    batch_list = [batches.batch_at(s) for s in range(2)]
    params, history = train(model, one_device_mesh(), optax.sgd(0.5), batch_list)
    mesh = sharding.make_mesh("fsdp=2", devices=jax.devices()[:2])
    params_acc, history_acc = train(model, mesh, optax.sgd(0.5), batch_list, grad_accum_steps=2)
    for key in ("loss", "accuracy", "loss_tokens", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in history_acc], [m[key] for m in history], atol=1e-5, rtol=0)
    # The micro-batches differ in how many loss tokens they hold: a mean of per-micro-batch means
    # would not equal the step's mean, so this is a real test of the normalization.
    rows = batch_list[0]["loss_mask"].sum(axis=1)
    assert rows[:4].sum() != rows[4:].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params_acc, params)
    # And dropout did act: the first step's loss is not the deterministic loss of the same weights.
    graphdef, weights = nnx.graphdef(tiny_model), nnx.state(tiny_model, nnx.Param).to_pure_dict()
    deterministic = jax.device_get(jax.jit(train_step.make_eval_step(graphdef))(weights, batch_list[0]))
    assert abs(history[0]["loss"] - deterministic["loss_sum"] / deterministic["tokens"]) > 1e-3


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_trains(name, tiny_model, batches):
    optimizer, schedule = optim.make_optimizer(optimizer_config(name=name, lr=3e-3, warmup_steps=0), 10)
    batch = batches.batch_at(0)
    _, history = train(tiny_model, one_device_mesh(), optimizer, [batch] * 4, schedule=schedule)
    losses = [m["loss"] for m in history]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses  # the same batch four times: each optimizer must fit it
    assert history[-1]["learning_rate"] == pytest.approx(3e-3)


def paper_reference(params, grads, *, lr, warmup, b1, b2, weight_decay, clip_norm, decayed):
    """The study's optimizer written out from its definition (float64 numpy, no Optax).

    For step ``t = 1, 2, ...`` with learning rate ``lr_t = lr * min((t - 1) / warmup, 1)`` (linear
    warm-up from 0, counted from step 0):

      g   <- g * min(1, clip_norm / ||g||)           global-norm clipping over all leaves
      b2t  = 1 - t^(-b2)                             Adafactor's second-moment decay schedule
      v   <- b2t * v + (1 - b2t) * g^2               unfactored second moment
      u    = lr_t * max(rms(p), 1e-3) * g / sqrt(v)  update scaled by the weight's RMS (per layer
                                                     for the stacked ``layers/*`` leaves)
      m   <- b1 * m + (1 - b1) * u                   momentum (no bias correction)
      p   <- p - m - lr_t * weight_decay * p         decay only on ``decayed`` leaves
    """
    p = {k: v.astype(np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    history = []
    for t, g in enumerate(grads, start=1):
        lr_t = lr * min((t - 1) / warmup, 1.0)
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        g = {k: x * min(1.0, clip_norm / norm) for k, x in g.items()}
        b2t = 1.0 - t ** (-b2)
        for k in p:
            v[k] = b2t * v[k] + (1 - b2t) * g[k] ** 2
            if k.startswith("layers/"):  # [layers, ...]: each layer's weight is its own block
                rms = np.stack([math.sqrt(np.mean(w**2)) for w in p[k]]).reshape(-1, *[1] * (p[k].ndim - 1))
            else:
                rms = math.sqrt(np.mean(p[k] ** 2))
            u = lr_t * np.maximum(rms, 1e-3) * g[k] / np.sqrt(v[k])
            m[k] = b1 * m[k] + (1 - b1) * u
            p[k] = p[k] - m[k] - (lr_t * weight_decay * p[k] if k in decayed else 0.0)
        history.append(dict(p))
    return history


def test_paper_optimizer_matches_its_formula():
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(0, 0.5, (3, 4)), "bias": rng.normal(0, 0.1, (4,))},
        "norm": {"scale": 1 + rng.normal(0, 0.1, (4,))},
        # Two layers' weights stacked, as the model holds them, of very different magnitudes.
        "layers": {"kernel": rng.normal(0, 1, (2, 3, 4)) * np.array([0.5, 0.02])[:, None, None],
                   "scale": 1 + rng.normal(0, 0.1, (2, 4))},
    }  # fmt: skip
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    flat = lambda tree: {f"{a}/{b}": x for a, sub in tree.items() for b, x in sub.items()}  # noqa: E731
    # Gradient norms above and below clip_norm, so that clipping both acts and stays out of the way.
    grads = [
        jax.tree.map(lambda x, s=s: (s * rng.normal(size=x.shape)).astype(np.float32), params) for s in (3, 0.1, 1)
    ]
    grads.append(jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(np.float32), params))
    settings = dict(lr=0.05, warmup=2, b1=0.9, b2=0.8, weight_decay=0.1, clip_norm=1.0)
    cfg = optimizer_config(
        name="paper",
        lr=settings["lr"],
        warmup_steps=settings["warmup"],
        b1=settings["b1"],
        b2=settings["b2"],
        weight_decay=settings["weight_decay"],
        clip_norm=settings["clip_norm"],
        schedule="constant",
    )
    optimizer, schedule = optim.make_optimizer(cfg, total_steps=100)
    expected = paper_reference(
        flat(params), [flat(g) for g in grads], decayed={"dense/kernel", "layers/kernel"}, **settings
    )
    state = optimizer.init(params)
    current = params
    for t, (g, want) in enumerate(zip(grads, expected, strict=True), start=1):
        updates, state = optimizer.update(g, state, current)
        current = optax.apply_updates(current, updates)
        got = flat(jax.tree.map(np.asarray, current))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=f"step {t}, {k}")
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(settings["lr"])


def test_global_norm_clipping_equals_optaxs():
    rng = np.random.default_rng(1)
    shapes = {"a": (64, 32), "b": (32,), "c": (3, 16, 8)}
    ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    for scale, clipped in ((0.01, False), (10.0, True)):
        grads = {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
        got, _ = jax.jit(ours.update)(grads, ours.init(grads))
        want, _ = theirs.update(grads, theirs.init(grads))
        norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
        assert (norm > 1.0) == clipped
        for k in shapes:
            if clipped:  # one rounding apart: g * (1 / norm) against (g / norm) * 1
                np.testing.assert_allclose(got[k], want[k], rtol=3e-7, atol=0, err_msg=k)
                np.testing.assert_allclose(got[k], grads[k] / norm, rtol=1e-6, err_msg=k)
            else:
                np.testing.assert_array_equal(got[k], grads[k], err_msg=k)


# -- dropout and the chunked cross-entropy -------------------------------------------------------


def test_dropout_at_rate_0_is_bitwise_no_dropout(tiny_model, batches):
    batch = batches.batch_at(0)
    keys = train_step.dropout_keys(jax.random.key_data(jax.random.key(0)), 0, 8)
    graphdef, params = nnx.graphdef(tiny_model), nnx.state(tiny_model, nnx.Param).to_pure_dict()
    cfg = tiny_model.cfg
    assert cfg.residual_dropout == cfg.attention_dropout == cfg.embed_dropout == 0
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p, k: train_step.loss_terms(graphdef, p, batch, dropout_rng=k)[0])
    )
    jax.tree.map(np.testing.assert_array_equal, value_and_grad(params, keys), value_and_grad(params, None))


def test_dropout_follows_the_rng_and_the_step_and_remat_redraws_it(tiny_model, batches):
    """A pure function of (rng, step): the same loss again, another at another step, none in
    evaluation; a rematerialized layer's backward pass recomputes it with the same masks."""
    batch = batches.batch_at(0)
    rng = jax.random.key_data(jax.random.key(0))
    params = nnx.state(tiny_model, nnx.Param).to_pure_dict()
    results = {}
    for remat in ("none", "full"):
        model = with_dropout(tiny_model, 0.1)
        model.cfg = model.cfg.replace(remat=remat)
        graphdef = nnx.graphdef(model)
        value_and_grad = jax.jit(
            jax.value_and_grad(lambda p, k, g=graphdef: train_step.loss_terms(g, p, batch, dropout_rng=k)[0])
        )
        results[remat] = [jax.device_get(value_and_grad(params, train_step.dropout_keys(rng, s, 8))) for s in (0, 1)]
    (at_0, grads), (at_1, _) = results["none"]
    again, grads_remat = results["full"][0]
    assert at_0 == again and at_1 != at_0
    # Recomputation changes float rounding only; a fresh mask would change whole gradient entries.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0), grads_remat, grads)

    evaluated = jax.jit(train_step.make_eval_step(graphdef))(params, batch)
    without = jax.jit(train_step.make_eval_step(nnx.graphdef(tiny_model)))(params, batch)
    assert float(evaluated["loss_sum"]) == float(without["loss_sum"]) != at_0


def test_chunked_cross_entropy_equals_unchunked(tiny_model, batches):
    """Loss, accuracy and gradients with the (tied) vocabulary projection in chunks of 24 positions
    (the last of the 64 padded) equal one pass over all positions. (The sharded step tests compare
    chunks of 16 against one pass with the untied head.)

    Tolerance: float32 sums taken in another order. The loss sums 8 x 64 terms: within 1e-6 of it.
    Each gradient entry sums up to 512 products, per chunk and then across chunks (autodiff sums
    them in one reduction): within 1e-5 of the largest entry of its parameter (about 100 float32
    epsilons; a wrong mask, target or softmax term is off by whole per-token gradients).
    """
    untied = nnx.state(tiny_model, nnx.Param).to_pure_dict()
    params = {k: v for k, v in untied.items() if k != "lm_head"}
    graphdef = nnx.graphdef(core.model_from_params(tiny_model.cfg.replace(tie_embeddings=True), params))
    batch = batches.batch_at(1)

    def terms(chunk_len):
        fn = jax.grad(lambda p: train_step.loss_terms(graphdef, p, batch, chunk_len=chunk_len), has_aux=True)
        return jax.device_get(jax.jit(fn)(params))

    grads, aux = terms(0)
    assert aux["tokens"] > 50  # teacher tokens only: masked positions must add nothing either
    chunked_grads, chunked_aux = terms(24)
    np.testing.assert_allclose(chunked_aux["loss_sum"], aux["loss_sum"], rtol=1e-6)
    assert chunked_aux["tokens"] == aux["tokens"] and chunked_aux["correct"] == aux["correct"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0), chunked_grads, grads
    )


def test_chunked_cross_entropy_bounds_the_steps_memory(compile_cache):
    """The compiled step's temporary memory no longer grows with [batch, length, vocab] logits.

    A one-layer model with a 8192-token vocabulary (logits dominate), compiled, not run. The
    unchunked step's temporaries hold the float32 logits and their gradient; doubling the length of
    the step that goes through them 16 positions at a time adds less than half of the shorter
    batch's logits (what it adds is attention's and the [batch, length, embed] activations' share;
    unchunked, it added 2.3 times those logits).
    """
    shape = th.TINY_LLAMA | dict(vocab_size=8192, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64)
    abstract = models.abstract_model(models.preset("llama-7b", **shape, dtype="float32"))
    mesh = one_device_mesh()
    optimizer = optax.sgd(0.1)
    shardings = train_state.state_shardings(abstract, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    temp = {}
    with jax.set_mesh(mesh):
        state = train_state.abstract_train_state(abstract, optimizer, shardings)
        for chunk_len, length in ((0, 128), (16, 128), (16, 256)):
            fn = train_step.make_train_step(nnx.graphdef(abstract), optimizer, lambda s: 0.1, loss_chunk_len=chunk_len)
            dtypes = {k: np.float32 if k == "loss_mask" else np.int32 for k in train_step.BATCH_KEYS}
            batch = {k: jax.ShapeDtypeStruct((8, length), d, sharding=batch_sharding) for k, d in dtypes.items()}
            compiled = train_step.jit_train_step(fn, shardings, batch_sharding).lower(state, batch).compile()
            temp[chunk_len, length] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 8 * 128 * shape["vocab_size"] * 4  # 32 MiB
    assert temp[0, 128] > 2 * logits_bytes, temp  # the logits, and their gradient
    assert temp[16, 256] - temp[16, 128] < logits_bytes / 2, temp


# -- the loss mask and packing ------------------------------------------------------------------


def test_only_teacher_tokens_carry_loss(tokenizer, tiny_model):
    """Changing only user text changes the inputs, never a loss term.

    The model has its attention output zeroed, so each position's logits depend on its own input
    token only; the summed loss is then a sum of (input, target) terms. The two conversations share
    their teacher turns and the labels before them, so every loss-bearing (input, target) pair is the
    same in both, while their user texts (of different lengths) make different pairs: if any user
    token carried loss, the sums would differ.
    """
    teacher = ("Paris.", "Rome.")
    a = Conversation(((USER, "What is the capital of France?"), (TEACHER, teacher[0]), (USER, "And of Italy?"),
                      (TEACHER, teacher[1])), system="Be brief.")  # fmt: skip
    b = Conversation(((USER, "Name the city that is the capital of Spain, please."), (TEACHER, teacher[0]),
                      (USER, "Italy?"), (TEACHER, teacher[1])), system="Be brief.")  # fmt: skip
    encoder = data.Encoder(tokenizer, "koala")
    rows = [single_row(*encoder.encode(c), seq_len=128) for c in (a, b)]
    assert not np.array_equal(rows[0]["inputs"], rows[1]["inputs"])

    # The loss-bearing targets are exactly the teacher texts and their end-of-turn tokens.
    eos = tokenizer.eos_token_id
    want = [t for text in teacher for t in [*tokenizer.encode(" " + text, add_special_tokens=False), eos]]
    for row in rows:
        assert row["targets"][row["loss_mask"] > 0].tolist() == want

    graphdef, params = nnx.graphdef(tiny_model), nnx.state(tiny_model, nnx.Param).to_pure_dict()
    params["layers"]["attn"]["o_proj"]["kernel"] = jnp.zeros_like(params["layers"]["attn"]["o_proj"]["kernel"])
    loss = jax.jit(lambda p, batch: train_step.loss_terms(graphdef, p, batch)[1])
    out = [jax.device_get(loss(params, row)) for row in rows]
    assert out[0]["tokens"] == out[1]["tokens"] == len(want)
    np.testing.assert_allclose(out[0]["loss_sum"], out[1]["loss_sum"], rtol=1e-6)
    # The check has teeth: with loss on every token, the user text changes the sum.
    everywhere = [loss(params, {**row, "loss_mask": (row["segment_ids"] > 0).astype(np.float32)}) for row in rows]
    assert abs(float(everywhere[0]["loss_sum"]) - float(everywhere[1]["loss_sum"])) > 1e-2

    assert tokenizer.decode(want) == f" Paris.{th.EOS} Rome.{th.EOS}"


def test_teacher_only_loss_through_the_pipeline(tokenizer, tmp_path):
    cfg = data.DataConfig(train=str(th.DATA / "sharegpt.json"), seq_len=128, cache_dir=str(tmp_path))
    splits = data.build_datasets(cfg, tokenizer, progress=False)
    batch = data.PackedBatches(splits.train, 128, 2, seed=0).batch_at(0)  # both conversations, whole
    assert batch["segment_ids"].max() >= 1 and int(batch["loss_mask"].sum()) == splits.stats["train_loss_tokens"]
    text = tokenizer.decode(batch["targets"][batch["loss_mask"] > 0])
    # sharegpt.json's teacher turns, each with its end-of-turn token (its third record has no
    # teacher turn and is dropped): not a token of the system text, the user turns or the labels.
    pieces = [p for p in text.split(th.EOS) if p]
    assert sorted(pieces) == [" Hi there!", " Paris.", " Rome."], text
    assert text.count(th.EOS) == 3


def test_packed_batch_equals_examples_alone(tiny_model, batches):
    # Rows of 128 tokens: most examples fit whole, two to a row.
    packed = data.PackedBatches(batches.dataset, seq_len=128, batch_size=8, seed=0)
    assert packed.num_rows <= 8
    batch = packed.batch_at(0)
    graphdef, params = nnx.graphdef(tiny_model), nnx.state(tiny_model, nnx.Param).to_pure_dict()
    loss = jax.jit(lambda p, b: train_step.loss_terms(graphdef, p, b)[1])

    ds, checked = batches.dataset, 0
    packed_rows = [r for r in range(8) if batch["segment_ids"][r].max() > 1]
    assert packed_rows, "no row holds more than one example"
    for r in packed_rows:
        for segment in range(1, int(batch["segment_ids"][r].max()) + 1):
            where = np.flatnonzero(batch["segment_ids"][r] == segment)
            ids = batch["inputs"][r, where]
            # The example this segment holds, whole (not a chunk of a longer one).
            matches = [e for e in range(len(ds)) if ds.lengths[e] == len(ids) and np.array_equal(ds[e][0], ids)]
            if not matches:
                continue
            alone = single_row(*ds[matches[0]], seq_len=128)
            mask = np.zeros_like(batch["loss_mask"])
            mask[r, where] = batch["loss_mask"][r, where]
            in_pack = jax.device_get(loss(params, {**batch, "loss_mask": mask}))
            by_itself = jax.device_get(loss(params, alone))
            assert in_pack["tokens"] == by_itself["tokens"] > 0
            np.testing.assert_allclose(
                in_pack["loss_sum"] / in_pack["tokens"], by_itself["loss_sum"] / by_itself["tokens"], atol=1e-5
            )
            checked += 1
    assert checked >= 6


# -- the loop: training, resuming, preemption --------------------------------------------------------


def test_loss_falls(reference):
    workdir, result, _ = reference
    losses = th.losses(workdir)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    assert losses[1] == pytest.approx(math.log(th.MODEL_VOCAB), abs=0.3)  # a fresh model: about uniform
    assert losses[TOTAL_STEPS] < 0.5 * losses[1], losses
    assert result["step"] == TOTAL_STEPS
    assert th.checkpoint_steps(workdir)[-1] == TOTAL_STEPS


def _start(args, env, log):
    return subprocess.Popen(args, env=env, cwd=th.ROOT, stdout=subprocess.DEVNULL, stderr=log)


def _wait_for_checkpoint(proc, workdir, at_least: int, timeout: float = 240) -> int:
    """Waits until ``workdir`` has a finished checkpoint at step ``>= at_least``; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = th.checkpoint_steps(workdir)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint >= {at_least} in {workdir} (exit code {proc.poll()})")


def test_kill_9_then_rerun_is_bitwise_identical(reference, overrides, compile_cache, tmp_path, caplog):
    workdir = tmp_path / "run"
    args = th.script_args(overrides, workdir)
    env = th.script_env(compile_cache)
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, env, log)
        _wait_for_checkpoint(proc, workdir, at_least=10)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert th.checkpoint_steps(workdir)[-1] < TOTAL_STEPS  # killed mid-run, not after it

    # The rerun in this process (the script's own start-up is tested by the kill above and the
    # bad-input tests): the same config and compile settings, without a second interpreter's imports.
    caplog.set_level(logging.INFO)
    assert run(th.make_config(overrides), str(workdir))["step"] == TOTAL_STEPS
    assert any("resumed from step" in r.getMessage() for r in caplog.records)
    th.assert_params_bitwise_equal(th.checkpoint_params(workdir), reference[2])
    assert th.losses(workdir) == th.losses(reference[0])  # every logged loss, before and after the kill


def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, overrides, compile_cache, tmp_path):
    workdir = tmp_path / "run"
    # A checkpoint every step: SIGTERM then always lands on a step that was just saved.
    args = th.script_args(overrides | {"checkpoint_every": 1}, workdir)
    env = th.script_env(compile_cache)
    with open(tmp_path / "log", "w") as log:
        proc = _start(args, env, log)
        _wait_for_checkpoint(proc, workdir, at_least=3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    stderr = (tmp_path / "log").read_text()
    assert "Traceback" not in stderr
    assert "SIGTERM: saved a checkpoint at step" in stderr
    stopped = int(stderr.split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
    assert th.checkpoint_steps(workdir)[-1] == stopped < TOTAL_STEPS

    result = run(th.make_config(overrides), str(workdir))  # the same run, resumed
    assert result["step"] == TOTAL_STEPS
    th.assert_params_bitwise_equal(th.checkpoint_params(workdir), reference[2])


# Orbax's failed read leaves a callback for an asyncio loop it already closed; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_falls_back(reference, overrides, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    steps = th.checkpoint_steps(workdir)
    assert steps[-1] == TOTAL_STEPS and len(steps) >= 2
    # Truncate every data file of the newest checkpoint's parameters.
    files = [p for p in (workdir / "checkpoints" / str(TOTAL_STEPS) / "params").rglob("*") if p.is_file()]
    data_files = [p for p in files if p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    caplog.set_level(logging.WARNING)
    result = run(th.make_config(overrides), str(workdir))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"checkpoint at step {TOTAL_STEPS} cannot be restored" in w for w in warnings), warnings
    assert result["step"] == TOTAL_STEPS
    # The damaged step was moved aside, not deleted, and no longer stands in the way of a new save.
    (moved,) = (workdir / "unrestorable_checkpoints").iterdir()
    assert moved.name.startswith(f"{TOTAL_STEPS}-") and (moved / "params").is_dir()
    # The run redid the steps after the previous checkpoint and saved a good final one again.
    th.assert_params_bitwise_equal(th.checkpoint_params(workdir), reference[2])
    assert th.losses(workdir)[TOTAL_STEPS] == th.losses(reference[0])[TOTAL_STEPS]


# -- the loop: bad input ------------------------------------------------------------------------------


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(reference, overrides, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    # Resumed at the reference's end with an absurd learning rate and a checkpoint every step: the
    # first update overflows the parameters, and nothing after it may be saved.
    config = th.make_config(
        overrides
        | {
            "optimizer.lr": 1e30,
            "optimizer.warmup_steps": 0,
            "total_steps": TOTAL_STEPS + 5,
            "checkpoint_every": 1,
            "resume": True,
        }
    )
    with pytest.raises(TrainingError, match=rf"at step {TOTAL_STEPS + 1}\b") as e:
        run(config, str(workdir))
    assert f"last good checkpoint is kept: step {TOTAL_STEPS}" in str(e.value)
    assert th.checkpoint_steps(workdir)[-1] == TOTAL_STEPS
    th.assert_params_bitwise_equal(th.checkpoint_params(workdir), reference[2])


def test_tokenizer_larger_than_the_vocabulary(compile_cache, overrides, tmp_path):
    big = th.make_tokenizer(tmp_path / "tokenizer", vocab_size=th.MODEL_VOCAB + 40)
    config = th.make_config(overrides | {"tokenizer": str(big)})
    with pytest.raises(TrainingError, match=rf"has {th.MODEL_VOCAB + 40} tokens but the model's vocabulary has 320"):
        run(config, str(tmp_path / "run"))


def test_workdir_of_another_run_is_refused_then_resumed_or_moved(reference, overrides, tmp_path):
    # Another turn format: a different run, with the same compiled programs as the reference.
    other = overrides | {"data.template": "vicuna"}
    for name in ("resumed", "replaced"):
        shutil.copytree(reference[0], tmp_path / name)
        with pytest.raises(TrainingError, match=r"holds a run with a different config \(differing keys: data\)"):
            run(th.make_config(other), str(tmp_path / name))
        assert th.checkpoint_steps(tmp_path / name)[-1] == TOTAL_STEPS  # untouched

    result = run(th.make_config(other | {"resume": True}), str(tmp_path / "resumed"))
    assert result["step"] == TOTAL_STEPS  # it continued the old run (already at its end)
    assert '"template": "vicuna"' in (tmp_path / "resumed" / "run_config.json").read_text()

    workdir = tmp_path / "replaced"
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    result = run(th.make_config(other | {"overwrite": True, "total_steps": 2}), str(workdir))
    assert result["step"] == 2
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("replaced.replaced-")]
    assert len(moved) == 1
    assert sorted(str(p.relative_to(moved[0])) for p in moved[0].rglob("*")) == before  # nothing lost
    assert th.checkpoint_steps(workdir) == [1, 2]  # a fresh run
    assert th.checkpoint_steps(moved[0])[-1] == TOTAL_STEPS


def test_malformed_record_then_skip_invalid(compile_cache, overrides, tmp_path):
    bad = str(th.DATA / "bad.jsonl")
    config = th.make_config(overrides | {"data.train": bad, "total_steps": 2})
    with pytest.raises(data.DataError) as e:
        run(config, str(tmp_path / "strict"))
    assert str(e.value) == f"{bad}, line 3: field 'conversations[1].value': expected a string, got int"

    config = th.make_config(overrides | {"data.train": bad, "total_steps": 2, "data.skip_invalid": True})
    result = run(config, str(tmp_path / "lenient"))
    assert result["step"] == 2 and math.isfinite(result["loss"])


def test_budget_larger_than_the_data(compile_cache, overrides, tokenizer, tmp_path):
    cfg = data.DataConfig(train=th.TRAIN_FILES.split(","), seq_len=64, cache_dir=str(tmp_path / "cache"))
    tokens = data.build_datasets(cfg, tokenizer, progress=False).stats["train_tokens"]
    config = th.make_config(overrides | {"data.token_budget": "1M"})
    with pytest.raises(ValueError, match=f"token budget 1,000,000 exceeds the data: {tokens:,} tokens"):
        run(config, str(tmp_path / "run"))


def test_init_from_nothing_valid(overrides, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TrainingError, match=f"config.init_from: {missing} does not exist"):
        run(th.make_config(overrides | {"init_from": str(missing)}), str(tmp_path / "a"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(TrainingError, match=r"config.init_from: .*plain is not a model directory; expected an imitax"):
        run(th.make_config(overrides | {"init_from": str(tmp_path / "plain")}), str(tmp_path / "a"))
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)  # a training workdir that never finished a checkpoint
    with pytest.raises(TrainingError, match=f"{empty} is a training workdir without a finished checkpoint"):
        run(th.make_config(overrides | {"init_from": str(empty)}), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the workdir


def test_script_reports_bad_input_in_one_line(overrides, tmp_path):
    missing = tmp_path / "nowhere"
    proc = th.run_script(th.script_args(overrides | {"init_from": missing}, tmp_path / "run"), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: config.init_from: {missing} does not exist", last


def test_a_run_that_fails_before_its_first_step_does_not_block_the_corrected_command(
    compile_cache, overrides, tmp_path
):
    workdir = tmp_path / "run"
    env = th.script_env(compile_cache)  # the other runs' compile settings and cache: no optimizing compile
    bad = th.script_args(overrides | {"data.train": th.DATA / "bad.jsonl", "total_steps": 2}, workdir)
    proc = th.run_script(bad, env=env, timeout=300)
    assert proc.returncode == 1 and "line 3: field 'conversations[1].value'" in proc.stderr.splitlines()[-1]
    assert not (workdir / "run_config.json").exists() and not (workdir / "checkpoints").exists()
    # The same command with the data fixed: not refused as "a run with a different config".
    good = th.script_args(overrides | {"total_steps": 2}, workdir)
    proc = th.run_script(good, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert th.checkpoint_steps(workdir)[-1] == 2 and (workdir / "run_config.json").exists()
