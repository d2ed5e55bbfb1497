"""Knowledge distillation: the divergences against float64 torch, the online teacher in the step, resume."""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_helpers as th
from flax import nnx
from test_train import _start, _wait_for_checkpoint

from imitax import convert, models, sharding
from imitax.models import lora
from imitax.train import ConfigError, TrainingError, check, distill, gkd, optim, run
from imitax.train import state as train_state
from imitax.train import step as train_step

VOCAB = 11


def torch_divergence(s, t, loss: str, beta: float, temperature: float) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (per position, float64), and plain KLs, written with torch's kl_div.

    ``F.kl_div(input, target)`` is ``KL(target || input)``: TRL's beta = 0 branch,
    ``kl_div(student, teacher)``, is the forward KL(teacher || student).
    """
    logq = F.log_softmax(s / temperature, dim=-1)
    logp = F.log_softmax(t / temperature, dim=-1)

    def kl_div(inp, target):  # KL(target || inp), summed over the vocabulary
        return F.kl_div(inp, target, reduction="none", log_target=True).sum(-1)

    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return kl_div(logq, logp)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return kl_div(logp, logq)
    b = torch.tensor(beta, dtype=torch.float64)
    logm = torch.logsumexp(torch.stack([logq + torch.log(1 - b), logp + torch.log(b)]), dim=0)
    return beta * kl_div(logm, logp) + (1 - beta) * kl_div(logm, logq)


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0.0, 1e-3, 0.5, 0.999, 1.0)]


@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("loss,beta", CASES)
def test_divergence_and_its_gradient_match_float64_torch(loss, beta, temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (2, 5, VOCAB)), rng.normal(0, 2, (2, 5, VOCAB))
    s_torch = torch.tensor(s, requires_grad=True)
    expected = torch_divergence(s_torch, torch.tensor(t), loss, beta, temperature)
    expected.sum().backward()

    def ours(s):
        return distill.token_divergence(s, t.astype(np.float32), loss, beta, temperature)

    value = np.asarray(ours(s.astype(np.float32)))
    grad = np.asarray(jax.grad(lambda x: ours(x).sum())(s.astype(np.float32)))
    scale = float(expected.detach().abs().max())
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=2e-4, atol=2e-6 * max(scale, 1))
    g_scale = float(s_torch.grad.abs().max())
    np.testing.assert_allclose(grad, s_torch.grad.numpy(), rtol=2e-3, atol=2e-5 * max(g_scale, 1))


def test_beta_ends_are_the_two_kls():
    """beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher), and they differ."""
    rng = np.random.default_rng(1)
    s, t = rng.normal(0, 2, (3, VOCAB)).astype(np.float32), rng.normal(0, 2, (3, VOCAB)).astype(np.float32)
    p, q = (np.exp(x - np.log(np.exp(x).sum(-1, keepdims=True))) for x in (t.astype(float), s.astype(float)))
    forward, reverse = (a * np.log(a / b) for a, b in ((p, q), (q, p)))
    np.testing.assert_allclose(distill.token_divergence(s, t, "jsd", 0.0, 1.0), forward.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(distill.token_divergence(s, t, "jsd", 1.0, 1.0), reverse.sum(-1), rtol=1e-5)
    assert np.abs(forward.sum(-1) - reverse.sum(-1)).min() > 1e-3


def test_topk_with_every_token_equals_full_and_fewer_is_bounded():
    rng = np.random.default_rng(2)
    s, t = rng.normal(0, 2, (4, VOCAB)).astype(np.float32), rng.normal(0, 2, (4, VOCAB)).astype(np.float32)
    for loss, beta in CASES:
        full = np.asarray(distill.token_divergence(s, t, loss, beta, 1.0))
        ids, logp = distill.topk_log_probs(t, VOCAB)
        cached = np.asarray(distill.topk_token_divergence(s, ids, logp, loss, beta, 1.0))
        np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
        ids, logp = distill.topk_log_probs(t, 4)
        cached = np.asarray(distill.topk_token_divergence(s, ids, logp, loss, beta, 1.0))
        assert (cached <= full + 1e-6).all() and (cached >= -1e-7).all()  # coarsening never adds divergence
    # Forward KL: the gap is exactly rest * KL(teacher tail || student tail) (the chain rule).
    p = np.exp(t.astype(float)) / np.exp(t.astype(float)).sum(-1, keepdims=True)
    q = np.exp(s.astype(float)) / np.exp(s.astype(float)).sum(-1, keepdims=True)
    tail = np.argsort(-p, axis=-1)[:, 4:]
    p_tail, q_tail = np.take_along_axis(p, tail, -1), np.take_along_axis(q, tail, -1)
    rest = p_tail.sum(-1)
    p_cond, q_cond = p_tail / rest[:, None], q_tail / q_tail.sum(-1)[:, None]
    gap = rest * (p_cond * np.log(p_cond / q_cond)).sum(-1)
    full = np.asarray(distill.token_divergence(s, t, "forward_kl", 0.5, 1.0))
    cached = np.asarray(distill.topk_token_divergence(s, *distill.topk_log_probs(t, 4), "forward_kl", 0.5, 1.0))
    np.testing.assert_allclose(full - cached, gap, rtol=1e-4, atol=1e-6)


# -- the online teacher in the train step -------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return th.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny_llama(seed: int = 0, **changes) -> models.Transformer:
    return models.init_model(models.preset("llama-7b", **(th.TINY_LLAMA | changes), dtype="float32"), seed=seed)


def batch_of(vocab: int, rows: int = 8, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).integers(0, vocab, (rows, length)).astype(np.int32)
    mask = (np.arange(length) >= length // 3).astype(np.float32)  # only the "teacher turn" carries loss
    return dict(
        inputs=x,
        targets=np.roll(x, -1, 1),
        loss_mask=np.broadcast_to(mask, x.shape).copy(),
        segment_ids=np.ones_like(x),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), x.shape).copy(),
    )


@pytest.fixture(scope="module")
def student_and_teacher(compile_cache):
    """Two tiny LLaMAs of the same vocabulary (random inits), on the host."""
    return tiny_llama(), tiny_llama(seed=7)


def test_a_teacher_identical_to_the_student_gives_zero_loss_and_gradient(student_and_teacher):
    model = student_and_teacher[0]
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param).to_pure_dict()
    batch = batch_of(model.cfg.vocab_size)

    def loss_sum(p, loss):
        kd = distill.KDConfig(loss=loss, beta=0.5, temperature=2.0)
        frozen = {"teacher": params}
        return train_step.kd_loss_terms(graphdef, p, batch, kd=kd, teacher_graphdef=graphdef, frozen=frozen)[0]

    results = jax.jit(lambda p: [jax.value_and_grad(loss_sum)(p, loss) for loss in distill.LOSSES])(params)
    for value, grads in results:
        assert abs(float(value)) < 1e-5
        assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6


def test_kd_in_chunks_equals_one_pass(student_and_teacher):
    """KD's loss, its parts and gradients with the logits in chunks of 6 positions (the last of the 16
    padded) equal one pass over all positions: online (jsd, the teacher's logits chunked too) and
    from a top-k cache (forward KL), both mixed with the cross-entropy (alpha 0.3).

    Tolerance: float32 sums taken in another order: the sums within 1e-6 of their value, each
    gradient within 1e-5 of its parameter's largest entry (as for the chunked cross-entropy; a
    wrong mask, padding or teacher chunk is off by whole per-token terms).
    """
    student, teacher = student_and_teacher
    graphdef, params = nnx.graphdef(student), nnx.state(student, nnx.Param).to_pure_dict()
    frozen = {"teacher": nnx.state(teacher, nnx.Param).to_pure_dict()}
    batch = batch_of(student.cfg.vocab_size)
    top_k = distill.topk_log_probs(teacher(batch["inputs"]), 8)
    cached = batch | dict(zip(train_step.TEACHER_KEYS, top_k, strict=True))
    cases = [(batch, distill.KDConfig(loss="jsd", beta=0.3, alpha=0.3, temperature=2.0))]
    cases += [(cached, distill.KDConfig(loss="forward_kl", alpha=0.3))]

    def terms(p, chunk_len):
        def loss(p, b, kd):
            return train_step.kd_loss_terms(
                graphdef, p, b, kd=kd, teacher_graphdef=nnx.graphdef(teacher), frozen=frozen, chunk_len=chunk_len
            )

        return [jax.grad(loss, has_aux=True)(p, b, kd) for b, kd in cases]

    whole, chunked = jax.device_get(jax.jit(lambda p: (terms(p, 0), terms(p, 6)))(params))
    for (grads, aux), (chunked_grads, chunked_aux) in zip(whole, chunked, strict=True):
        assert aux["tokens"] == 8 * 11 and aux["kd_sum"] > 0.05 and aux["ce_sum"] > 1.0  # both terms count
        for key in ("loss_sum", "kd_sum", "ce_sum"):
            np.testing.assert_allclose(chunked_aux[key], aux[key], rtol=1e-6)
        assert chunked_aux["correct"] == aux["correct"]
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0), chunked_grads, grads
        )


def test_sampled_turns_follow_the_student_left_to_right(student_and_teacher):
    """Each masked target is the student's sample given the sequence so far (checked without the KV cache)."""
    model = student_and_teacher[0]
    batch = batch_of(model.cfg.vocab_size, rows=2, length=24)
    batch["segment_ids"][:, 16:] = 2  # a second example in each row, its own positions
    batch["positions"][:, 16:] -= 16
    batch["loss_mask"][:, 15] = 0  # the first example's last target crosses into the next: no loss
    key = gkd.step_key(jax.random.key_data(jax.random.key(3)), 5)
    new = jax.jit(lambda b: gkd.sample_teacher_turns(model, b, key, 0.7))(batch)
    new = {k: np.asarray(v) for k, v in new.items()}
    mask = batch["loss_mask"] > 0
    np.testing.assert_array_equal(new["targets"][~mask], batch["targets"][~mask])
    np.testing.assert_array_equal(new["inputs"][:, 1:][mask[:, :-1]], new["targets"][:, :-1][mask[:, :-1]])
    np.testing.assert_array_equal(new["inputs"][:, 1:][~mask[:, :-1]], batch["inputs"][:, 1:][~mask[:, :-1]])
    assert (new["targets"][mask] != batch["targets"][mask]).mean() > 0.5  # they were resampled
    logits = np.asarray(model(new["inputs"], new["positions"], new["segment_ids"]))
    row_keys = [jax.random.fold_in(jax.random.fold_in(key, 1), r) for r in range(2)]
    for r, i in zip(*np.nonzero(mask), strict=True):
        expected = jax.random.categorical(jax.random.fold_in(row_keys[r], i), logits[r, i] / 0.7)
        assert new["targets"][r, i] == int(expected), (r, i)


def _kd_lora_steps(mesh, student, teacher, batches):
    """Three steps of LoRA + KD (jsd) on ``mesh``: the losses and the final adapters."""
    lora.add_adapters(student, lora.LoRAConfig(rank=4, alpha=8.0), mesh=mesh)
    changes = {"optimizer.name": "adamw", "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0}
    optimizer, schedule = optim.make_optimizer(th.make_config(changes).optimizer, 10)
    shardings = train_state.state_shardings(student, optimizer, mesh, nnx.LoRAParam)
    frozen = {"base": nnx.state(student, lora.BASE).to_pure_dict(), "teacher": nnx.state(teacher).to_pure_dict()}
    kd = distill.KDConfig(loss="jsd", beta=0.3, temperature=1.5, alpha=0.25)
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        state = train_state.create_train_state(student, optimizer, shardings, 0, nnx.LoRAParam)
        fn = train_step.make_train_step(
            nnx.graphdef(student), optimizer, schedule, kd=kd, teacher_graphdef=nnx.graphdef(teacher)
        )
        step_fn = train_step.jit_train_step(fn, shardings, batch_sharding, jax.tree.map(lambda x: x.sharding, frozen))
        losses = []
        for batch in batches:
            state, metrics = step_fn(state, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}, frozen)
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


def test_lora_kd_sharded_on_8_devices_equals_one_device(student_and_teacher):
    batches = [batch_of(th.MODEL_VOCAB)] * 3  # the same batch: its loss must fall
    results = []
    for mesh in (sharding.make_mesh("fsdp=1", devices=jax.devices()[:1]), sharding.make_mesh("fsdp=4,tensor=2")):
        placed = []
        for model in student_and_teacher:  # a copy of the host weights in their shards on `mesh`
            graphdef, weights = nnx.split(model)
            placed.append(nnx.merge(graphdef, jax.device_put(weights, sharding.state_shardings(weights, mesh))))
        results.append(_kd_lora_steps(mesh, *placed, batches))
    (one, one_params), (eight, eight_params) = results
    assert one[-1] < one[0] - 0.05  # it learns
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    # Adam divides by the gradient's RMS, so float32 summation order moves a weight by up to ~lr * 1e-3.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5, rtol=0), eight_params, one_params)


# -- runs: resume and bad input -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(compile_cache, tok_dir, tmp_path_factory):
    """``(student base, teacher)`` tiny LLaMA checkpoints with the tests' tokenizer."""
    root = tmp_path_factory.mktemp("models")
    base = convert.save_checkpoint(root / "base", tiny_llama(), tokenizer_dir=tok_dir)
    teacher = convert.save_checkpoint(root / "teacher", tiny_llama(seed=3), tokenizer_dir=tok_dir)
    return base, teacher


@pytest.fixture(scope="module")
def kd_overrides(tok_dir, checkpoints):
    """A LoRA + KD run of 12 steps with dropout (on the adapters too), checkpointed every 4."""
    base, teacher = checkpoints
    return th.base_overrides(tok_dir) | {
        "init_from": str(base),
        "method": "kd",
        "teacher": str(teacher),
        "kd.loss": "jsd",
        "kd.beta": 0.2,
        "kd.alpha": 0.3,
        "lora.rank": 4,
        "lora.dropout": 0.1,
        "dropout": 0.1,
        "total_steps": 12,
    }


def test_kill_9_then_rerun_of_a_lora_gkd_run_is_bitwise(compile_cache, kd_overrides, tmp_path, caplog):
    """GKD with LoRA: on-policy batches (sampled) and off-policy ones (kd), dropout, killed and rerun."""
    overrides = kd_overrides | {"method": "gkd", "kd.alpha": 0.0, "gkd.lambda_": 0.5, "gkd.temperature": 0.8}
    reference = tmp_path / "reference"
    result = run(th.make_config(overrides), str(reference))
    assert result["kd_loss"] > 0
    assert {row["on_policy"] for row in th.read_metrics(reference)} == {0.0, 1.0}  # both kinds of batch
    workdir = tmp_path / "run"
    args, env = th.script_args(overrides, workdir), th.script_env(compile_cache)
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, env, log)
        _wait_for_checkpoint(proc, workdir, at_least=4)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert th.checkpoint_steps(workdir)[-1] < 12
    # The rerun in this process, with the killed script's config and compile settings (a second
    # interpreter would only add its imports; test_train runs the script to the end).
    caplog.set_level(logging.INFO)
    assert run(th.make_config(overrides), str(workdir))["step"] == 12
    assert any("resumed from step" in r.getMessage() for r in caplog.records)
    th.assert_params_bitwise_equal(th.checkpoint_params(workdir), th.checkpoint_params(reference))
    assert th.losses(workdir) == th.losses(reference)


def test_a_teacher_with_another_vocabulary_is_refused(compile_cache, kd_overrides, tok_dir, tmp_path):
    other = convert.save_checkpoint(tmp_path / "t", tiny_llama(vocab_size=384), tokenizer_dir=tok_dir)
    with pytest.raises(TrainingError, match="vocabulary of 384 tokens, the student 320") as e:
        run(th.make_config(kd_overrides | {"teacher": str(other)}), str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_with_another_tokenizer_is_refused(compile_cache, kd_overrides, tmp_path):
    other_tok = th.make_tokenizer(tmp_path / "tok", vocab_size=280)
    other = convert.save_checkpoint(tmp_path / "t", tiny_llama(), tokenizer_dir=other_tok)
    with pytest.raises(TrainingError, match="tokenizer in .* differs from the run's"):
        run(th.make_config(kd_overrides | {"teacher": str(other)}), str(tmp_path / "run"))


def test_beta_outside_0_1_is_one_line_and_exit_1(kd_overrides, tmp_path):
    out = th.run_script(th.script_args(kd_overrides | {"kd.beta": 1.5}, tmp_path / "run"), env=th.subprocess_env(1))
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line == "error: config.kd.beta must be in [0, 1] (see docs/distillation.md), got 1.5", out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"gkd.lambda_": -0.1}, "config.gkd.lambda_ must be in [0, 1] (the share of on-policy batches), got -0.1"),
        ({"gkd.lambda_": 1.5}, "config.gkd.lambda_ must be in [0, 1] (the share of on-policy batches), got 1.5"),
        ({"kd.cache": "/somewhere"}, "config.kd.cache: method=gkd scores the student's own samples"),
        ({"kd.alpha": 0.5}, "config.kd.alpha: method=gkd trains on the divergence alone"),
        ({"teacher": ""}, "config.teacher: method=gkd needs a teacher"),
    ],
)
def test_bad_gkd_settings_are_refused_by_the_config_check(changes, message, kd_overrides):
    config = th.make_config(kd_overrides | {"method": "gkd", "kd.alpha": 0.0} | changes)
    with pytest.raises(ConfigError) as e:
        check(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
