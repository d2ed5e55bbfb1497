"""The main workflow end to end, through the scripts a user runs.

A Hugging Face directory (a tiny random LLaMA-style model with attention and MLP biases, saved
with safetensors, and the BPE tokenizer shipped in ``tests/data/tokenizer``) is finetuned with
``scripts/train.py --config=configs/finetune.py:tiny --config.init_from=HF_DIR``, the workdir is
exported with ``scripts/convert.py --export --ckpt=WORKDIR``, and the export is loaded back with
transformers' ``AutoModelForCausalLM`` and ``AutoTokenizer``. Each step runs as its own process,
as the README has users run them, so a flag, a default or a file one step writes and the next
reads cannot drift apart unnoticed.

Every parameter of the starting model is random (``hf_models.randomize``: norm scales around 1,
biases non-zero): transformers' initialization (biases 0, norm scales 1) would let a bias or a
norm that training or export drops pass unnoticed.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
import train_helpers as th
import transformers
from hf_models import randomize

from imitax import convert

ROOT = th.ROOT
TOKENIZER = ROOT / "tests" / "data" / "tokenizer"
TRAIN_DATA = ROOT / "tests" / "data" / "sharegpt.json"
STEPS = 8
TOL = 1e-4
# Text for the tokenizer comparison: ASCII, the end-of-text special token, non-ASCII bytes (the
# byte-level BPE's fallback) and the Koala turn markers the trainer writes.
SAMPLE_TEXT = (
    "BEGINNING OF CONVERSATION: USER: What is a teacher? GPT: Someone who explains.<|endoftext|> "
    "Ünïcödé, tabs\tand  double  spaces."
)


def _build_hf_dir(directory: pathlib.Path) -> pathlib.Path:
    """A LLaMA-style model with every optional bias, random weights, and the shipped tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = transformers.LlamaConfig(
        vocab_size=320,  # above the tokenizer's 300 tokens, as a real model's padded vocabulary is
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,  # the tiny config's seq_len
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def _run(args: list[str], timeout: float = 600) -> str:
    """Runs a script to completion from the repository root; returns its standard output."""
    # One CPU device: the tiny model gains nothing from sharding, and one device compiles fastest.
    proc = th.run_script(args, env=th.subprocess_env(device_count=1), timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args[1:])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """HF dir -> scripts/train.py -> scripts/convert.py --export; returns the three directories."""
    root = tmp_path_factory.mktemp("workflow")
    hf_dir = _build_hf_dir(root / "hf")
    workdir, export = root / "run", root / "export"
    _run(
        [
            sys.executable,
            "scripts/train.py",
            "--config=configs/finetune.py:tiny",
            f"--workdir={workdir}",
            f"--config.init_from={hf_dir}",
            f"--config.data.train={TRAIN_DATA}",
            f"--config.total_steps={STEPS}",
            # A larger learning rate than the tiny config's, so that eight steps visibly lower the loss.
            "--config.optimizer.lr=1e-2",
            "--config.optimizer.warmup_steps=1",
            "--config.log_every=1",
            "--config.checkpoint_every=4",  # a checkpoint before the last: the export must pick the newest
            "--config.progress=False",
        ]
    )
    out = _run([sys.executable, "scripts/convert.py", "--export", f"--ckpt={workdir}", f"--out={export}"])
    assert f"wrote Hugging Face model directory {export}" in out, out
    return hf_dir, workdir, export


def test_training_ran_from_the_hf_weights(flow):
    _, workdir, _ = flow
    steps = th.checkpoint_steps(workdir)
    assert 4 in steps and steps[-1] == STEPS, steps
    assert convert.resolve(workdir) == workdir / "checkpoints" / str(STEPS)
    losses = th.losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, losses  # the optimizer moved the model toward the data


def test_trained_weights_differ_from_the_initial_ones(flow):
    hf_dir, _, export = flow
    initial = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    trained = safetensors.numpy.load_file(export / "model.safetensors")
    assert initial.keys() == trained.keys()
    for name, before in initial.items():
        after = trained[name]
        assert after.shape == before.shape and after.dtype == np.float32, name
        change = np.linalg.norm(after - before) / np.linalg.norm(before)
        # Every tensor moved (biases and norms included), and by less than its own size: the run
        # continued from the HF weights (a fresh random init would differ by more than 100%).
        assert 0 < change < 0.5, f"{name}: relative change {change:.3g}"


def test_transformers_loads_the_export_with_imitax_logits(flow):
    _, workdir, export = flow
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] and config["mlp_bias"]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        export, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = convert.load_checkpoint(workdir)  # the workdir's newest checkpoint, as the export read it
    assert model.cfg.param_dtype == "float32"

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    text = tokenizer(SAMPLE_TEXT)["input_ids"][:40]
    tokens = np.stack([text, np.random.default_rng(0).integers(0, 320, len(text))])  # 320: the padded vocab too
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
    logits = np.asarray(model(tokens))
    assert logits.dtype == np.float32 and logits.shape == expected.shape == (2, len(text), 320)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_export_carries_the_original_tokenizer(flow):
    hf_dir, workdir, export = flow
    original = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    exported = transformers.AutoTokenizer.from_pretrained(str(export))
    assert exported.get_vocab() == original.get_vocab()
    assert len(exported) == len(original) == 300
    assert exported.special_tokens_map == original.special_tokens_map
    assert exported.all_special_ids == original.all_special_ids == [0]
    assert exported.eos_token == original.eos_token == th.EOS
    ids = original(SAMPLE_TEXT)["input_ids"]
    assert exported(SAMPLE_TEXT)["input_ids"] == ids
    assert ids.count(original.eos_token_id) == 1  # the special token is one token, not split into bytes
    assert exported.decode(ids) == original.decode(ids) == SAMPLE_TEXT
    # The files themselves: the HF directory's, copied into the run's workdir and on into the export.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        copies = [(d / name).read_bytes() for d in (hf_dir, workdir / "tokenizer", export)]
        assert copies[0] == copies[1] == copies[2], name
