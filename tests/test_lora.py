"""LoRA: exact at initialization, a frozen base, merged and PEFT exports equal to the adapted model."""

from __future__ import annotations

import json

import hf_models
import jax
import numpy as np
import peft
import pytest
import torch
import train_helpers as th
from flax import nnx

from imitax import convert, models, sharding
from imitax.convert import peft as peft_export
from imitax.models import lora
from imitax.train import TrainingError, optim, run
from imitax.train import state as train_state
from imitax.train import step as train_step


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return th.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny_llama(seed: int = 0) -> models.Transformer:
    return models.init_model(models.preset("llama-7b", **th.TINY_LLAMA, dtype="float32"), seed=seed)


@pytest.fixture(scope="module")
def base_dir(compile_cache, tok_dir, tmp_path_factory):
    """A tiny LLaMA checkpoint with the tests' tokenizer: the base the LoRA runs adapt."""
    return convert.save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", tiny_llama(), tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def lora_run(compile_cache, tok_dir, base_dir, tmp_path_factory):
    """A LoRA run (rank 4, dropout 0.1, attention and MLP) of 8 steps on the base: its workdir."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    overrides = th.base_overrides(tok_dir) | {
        "init_from": str(base_dir),
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "lora.dropout": 0.1,
    }
    run(th.make_config(overrides), str(workdir))
    return workdir


def randomize_adapters(model: models.Transformer, seed: int = 1) -> models.Transformer:
    """Non-zero ``B``s (they start at 0), so that the adapters change the outputs."""
    for i, name in enumerate(lora.adapter_names(model)):
        proj = lora.projections(model)[name]
        proj.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), proj.lora_b.shape)
    return model


def tokens(vocab: int, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, shape).astype(np.int32)


def test_at_initialization_the_adapted_model_is_the_base_exactly(compile_cache):
    model = tiny_llama()
    x = tokens(model.cfg.vocab_size)
    before = np.asarray(model(x))
    names = lora.add_adapters(model, lora.LoRAConfig(rank=4, alpha=8.0))
    assert names == [f"layers/{n}" for n in ("attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj")] + [
        f"layers/mlp/{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    randomize_adapters(model)
    assert np.abs(np.asarray(model(x)) - before).max() > 1e-2  # the adapters are live


def test_adapters_are_sharded_like_their_weights(compile_cache):
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    with jax.set_mesh(mesh):
        model = models.init_model(tiny_llama().cfg, mesh=mesh)
        lora.add_adapters(model, lora.LoRAConfig(rank=4), mesh=mesh)
    q = lora.projections(model)["layers/attn/q_proj"]
    assert q.lora_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # [layers, embed, r]
    assert q.lora_b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)  # [layers, r, heads, d]


def test_the_train_step_trains_only_the_adapters_and_leaves_the_base_bitwise(compile_cache, tok_dir):
    """Adapters in the state (and their moments), the base beside it, unchanged after steps."""
    model = tiny_llama()
    lora.add_adapters(model, lora.LoRAConfig(rank=4, alpha=8.0))
    base = nnx.state(model, lora.BASE).to_pure_dict()
    base_before = jax.tree.map(np.array, base)
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    optimizer, schedule = optim.make_optimizer(th.make_config({"optimizer.name": "adamw"}).optimizer, 10)
    shardings = train_state.state_shardings(model, optimizer, mesh, nnx.LoRAParam)
    with jax.set_mesh(mesh):
        state = train_state.create_train_state(model, optimizer, shardings, 0, nnx.LoRAParam)
        frozen = {"base": base}
        fn = train_step.make_train_step(nnx.graphdef(model), optimizer, schedule, loss_chunk_len=0)
        step_fn = train_step.jit_train_step(
            fn, shardings, sharding.batch_sharding(mesh), jax.tree.map(lambda x: x.sharding, frozen)
        )
        x = tokens(model.cfg.vocab_size, (2, 16))
        batch = dict(
            inputs=x,
            targets=np.roll(x, -1, 1),
            loss_mask=np.ones(x.shape, np.float32),
            segment_ids=np.ones_like(x),
            positions=np.broadcast_to(np.arange(16, dtype=np.int32), x.shape),
        )
        for _ in range(3):
            state, metrics = step_fn(state, batch, frozen)
    n_adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert sum(x.size for x in jax.tree.leaves(state.params)) == n_adapters
    # AdamW's two moments per adapter, nothing of the base's size.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapters
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
    assert float(metrics["grad_norm"]) > 0


def test_lora_run_checkpoints_hold_the_adapters_and_name_their_base(lora_run, base_dir):
    info = convert.lora_info(lora_run)
    assert info["base"] == str(base_dir) and info["rank"] == 4 and len(info["base_fingerprint"]) == 16
    adapted = convert.load_adapted(lora_run)
    saved = th.checkpoint_params(base_dir)
    base_now = {
        jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(adapted, lora.BASE).to_pure_dict())[0]
    }
    th.assert_params_bitwise_equal(base_now, saved)
    assert any(np.abs(np.asarray(p.lora_b[...])).max() > 0 for p in lora.projections(adapted).values() if p.lora_b)


def test_merged_export_equals_the_adapted_model(lora_run, tmp_path):
    adapted = convert.load_adapted(lora_run)
    x = tokens(adapted.cfg.vocab_size)
    expected = np.asarray(adapted(x))
    exported = convert.load_hf(convert.export_hf(lora_run, tmp_path / "hf"))
    assert lora.adapter_names(exported) == []
    np.testing.assert_allclose(np.asarray(exported(x)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_export_loads_in_transformers_and_matches(kind, compile_cache, tmp_path):
    """The adapter directory on transformers' own model (Conv1D with fused q|k|v for GPT-2) gives imitax's logits."""
    torch_model, _ = hf_models.tiny_hf_model(kind)
    torch_model.save_pretrained(tmp_path / "base")
    model = convert.load_hf(tmp_path / "base")
    targets = r"(q|v|o|up|down)_proj$" if kind == "gpt2" else lora.DEFAULT_TARGETS  # k left out: a partial c_attn
    lora.add_adapters(model, lora.LoRAConfig(rank=3, alpha=5.0, targets=targets))
    randomize_adapters(model)
    out = peft_export.save_adapter(model, tmp_path / "adapter", rank=3, alpha=5.0, base=str(tmp_path / "base"))
    loaded = peft.PeftModel.from_pretrained(torch_model, out).eval()
    x = tokens(model.cfg.vocab_size)
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(x).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), theirs, atol=1e-4, rtol=0)


def test_peft_export_of_a_lora_run(lora_run, base_dir, tmp_path):
    out = peft_export.export_peft(lora_run, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["target_modules"] == [f"mlp.{n}_proj" for n in ("down", "gate", "up")] + [
        f"self_attn.{n}_proj" for n in "koqv"
    ]


def test_evaluate_loads_a_lora_workdir(lora_run):
    from imitax.eval.lm import LM

    lm = LM.from_path(lora_run)
    expected = convert.load_adapted(lora_run)
    x = tokens(lm.model.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(lm.model(x)), np.asarray(expected(x)), atol=1e-5, rtol=0)


def test_a_target_regex_that_matches_nothing_is_one_line(compile_cache, tok_dir, base_dir, tmp_path):
    overrides = th.base_overrides(tok_dir) | {"init_from": str(base_dir), "lora.rank": 2, "lora.targets": "c_attn"}
    with pytest.raises(TrainingError) as e:
        run(th.make_config(overrides), str(tmp_path / "run"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("config.lora.targets='c_attn' matches no projection")
    assert "layers/attn/q_proj" in message and "--config.lora.targets=" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_changed_base_is_refused(lora_run, base_dir, tmp_path):
    """A base whose weights changed after the run: loading the run says so."""
    import shutil

    moved = tmp_path / "copy"
    shutil.copytree(lora_run, moved)
    other = convert.save_checkpoint(tmp_path / "other", tiny_llama(seed=5))
    step = th.checkpoint_steps(moved)[-1]
    info_dir = moved / "checkpoints" / str(step) / "lora"
    info_file = next(p for p in info_dir.iterdir() if p.is_file() and "metadata" in p.name)
    info_file.write_text(info_file.read_text().replace(str(base_dir), str(other)))
    with pytest.raises(convert.ConversionError, match="changed since training"):
        convert.load_adapted(moved)
