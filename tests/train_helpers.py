"""Fixtures for the trainer's tests: a local tokenizer, the shipped data, configs, run outputs.

Everything here is built offline from ``tests/data``: the tokenizer is a small byte-level BPE
trained on those files with ``tokenizers``, and configs come from ``configs/finetune.py`` (its
``tiny`` variant) with overrides given as dotted keys, the way ``--config.a.b=value`` flags name
them. :func:`script_args` turns the same overrides into ``scripts/train.py`` flags, so an in-process
``run(config, workdir)`` and a subprocess can be given exactly the same run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
CONFIG_FILE = ROOT / "configs" / "finetune.py"

# The conversation files (ShareGPT, OpenAI messages, Alpaca, HC3), the plain text documents and
# a two-shard directory: every shipped reader, about 500 tokens with the tokenizer below.
TRAIN_FILES = ",".join(
    str(DATA / name)
    for name in ("sharegpt.json", "messages.jsonl", "alpaca.json", "hc3.parquet", "text.jsonl", "shards")
)
EOS = "<|endoftext|>"
TOKENIZER_VOCAB = 300  # below every tiny model's vocab_size (320)
MODEL_VOCAB = 320  # divisible by the tensor axis sizes used in the tests

# A tiny llama-family shape: grouped KV heads (2 of 4) still split over tensor=2, and a gated MLP.
TINY_LLAMA = dict(
    vocab_size=MODEL_VOCAB,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    max_position_embeddings=128,
)


def make_tokenizer(directory: str | os.PathLike, vocab_size: int = TOKENIZER_VOCAB) -> pathlib.Path:
    """Trains a byte-level BPE tokenizer on the shipped data and saves it like transformers does.

    Training is deterministic (same files, same merges), so every call writes the same tokenizer.
    """
    import tokenizers
    import transformers

    texts = [p.read_text(errors="replace") for p in sorted(DATA.rglob("*.json*"))]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts * 3, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    directory = pathlib.Path(directory)
    tok.save_pretrained(directory)
    return directory


def _load_config_module():
    spec = importlib.util.spec_from_file_location("imitax_finetune_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_overrides(tokenizer: str | os.PathLike) -> dict[str, Any]:
    """The tests' common run: tiny llama, float32, 8 rows of 64 tokens, AdamW, no progress bar."""
    overrides = {f"model_overrides.{k}": v for k, v in TINY_LLAMA.items()}
    return {
        **overrides,
        "tokenizer": str(tokenizer),
        "data.train": TRAIN_FILES,
        "seq_len": 64,
        "batch_size": 8,
        "total_steps": 8,
        "optimizer.name": "adamw",
        "optimizer.lr": 3e-3,
        "optimizer.warmup_steps": 2,
        "optimizer.weight_decay": 0.0,
        "checkpoint_every": 4,
        "log_every": 1,
        "progress": False,
    }


def config_arg(model: str = "llama-7b") -> str:
    """The ``--config`` argument the tests use: the ``tiny`` variant of a preset's family."""
    return f"{CONFIG_FILE}:model={model},tiny"


def make_config(overrides: Mapping[str, Any], model: str = "llama-7b") -> ml_collections.ConfigDict:
    """``configs/finetune.py:model=MODEL,tiny`` with ``{'a.b': value}`` overrides applied."""
    config = _load_config_module().get_config(f"model={model},tiny")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def script_args(overrides: Mapping[str, Any], workdir: str | os.PathLike, model: str = "llama-7b") -> list[str]:
    """``scripts/train.py`` argv for the same run as ``make_config(overrides, model)``."""
    args = [sys.executable, str(TRAIN_SCRIPT), f"--config={config_arg(model)}", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def subprocess_env(device_count: int = 8, **extra: str) -> dict[str, str]:
    """The environment for a trainer subprocess: CPU, ``device_count`` virtual devices, offline."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={device_count}"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    return env


# Compile settings for the trainer tests, in pytest's process and in the scripts they start: the
# persistent compilation cache (so that the many runs of one tiny model compile each program once)
# and LLVM's optimizations off. The programs under test are the same either way and every
# comparison is between runs compiled alike; unoptimized, the tiny model's random init compiled
# 3-4x faster on the shared 2-core machine (6-8 s instead of 22-30 s).
COMPILE_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_disable_most_optimizations": True,
}


def session_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One compilation cache directory per pytest session, so the trainer test modules share programs.

    Only the directory is session-wide; :func:`compile_settings` applies the settings module by
    module, so other test modules run with JAX's defaults.
    """
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def compile_settings(cache_dir: str | os.PathLike) -> Iterator[str]:
    """Applies :data:`COMPILE_SETTINGS` with a compilation cache in ``cache_dir``, then restores JAX's."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(cache_dir), **COMPILE_SETTINGS}
    # _read: the one getter that also covers flags (jax_disable_most_optimizations is one).
    previous = {name: jax.config._read(name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up once per process: make it see the new dir
    try:
        yield str(cache_dir)
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def script_env(cache_dir: str | os.PathLike, device_count: int = 8, **extra: str) -> dict[str, str]:
    """A trainer subprocess's environment with :data:`COMPILE_SETTINGS` and the cache in ``cache_dir``."""
    return subprocess_env(
        device_count,
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        **extra,
    )


def run_script(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300):
    """Runs ``scripts/train.py`` to completion; returns the ``CompletedProcess`` (text output)."""
    return subprocess.run(
        list(args), env=dict(env or subprocess_env()), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``WORKDIR/metrics.jsonl``, in the order they were written."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(workdir: str | os.PathLike) -> dict[int, float]:
    """``{step: training loss}`` from the metrics (a resumed run's rows overwrite earlier ones)."""
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished (renamed into place) checkpoint steps of a training workdir."""
    root = pathlib.Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def checkpoint_params(workdir: str | os.PathLike, step: int | None = None) -> dict[str, np.ndarray]:
    """A training checkpoint's parameters as flat ``{'a/b/c': numpy array}`` (default: newest step)."""
    import jax
    from flax import nnx

    from imitax import convert

    path = pathlib.Path(workdir) / "checkpoints" / str(step) if step is not None else workdir
    model = convert.load_checkpoint(path)
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in flat}


def assert_params_bitwise_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    """Every parameter array is present in both and bitwise identical."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differing = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert not differing, f"parameters differ: {differing}"
