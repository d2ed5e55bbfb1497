r"""Greedy generation: imitax ``generate`` vs transformers' ``generate``, and decode time vs cache length.

  python benchmarks/generate_benchmark.py                     # both sections (below)
  python benchmarks/generate_benchmark.py --sections=torch --batches=1,4,16 --new_tokens=64 --iters=3
  python benchmarks/generate_benchmark.py --sections=cache --cache_lengths=128,1024,4096
  python benchmarks/generate_benchmark.py --smoke             # tiny models: checks that the script runs
  python benchmarks/generate_benchmark.py --sections=torch --model=llama1b --dtype=bfloat16   # on a GPU

Section ``torch``: tokens/s of whole ``generate`` calls, imitax vs transformers.

The model: GPT-2-124M shaped (12 layers, 768 wide, 50,257-token vocabulary), randomly
initialized by transformers (float32, eval mode, SDPA attention); its weights are copied
into imitax, so both sides decode the same function. The prompts: random token ids, one
batch per ``--batches`` entry, with lengths drawn uniformly from ``[prompt_len / 2,
prompt_len]`` (a batch of one has ``prompt_len`` tokens), left-padded for transformers
with an attention mask (``generate`` derives the positions from it), as imitax pads them
itself. Both decode greedily exactly ``--new_tokens`` tokens per row (no eos token, so no
row stops early), with their KV caches: imitax's :func:`imitax.eval.generate.generate`
(one jitted prefill and one jitted ``while_loop`` decode; prompt and cache lengths
rounded up to 64), transformers' ``model.generate(do_sample=False)`` with its default
dynamic cache.

``--model=llama1b`` times the 16-layer LLaMA of 1B widths (TinyLlama's: 2,048 wide, 32 heads,
5,632-wide gated MLP, 32,000-token vocabulary) instead of GPT-2. ``--dtype=bfloat16`` casts both
models' weights (and imitax's compute) to bfloat16; both run on the accelerator JAX and PyTorch
find (PyTorch's ``cuda`` when available).

What is timed: the whole call, from token lists to new tokens on the host (imitax: padding,
prefill, decode, transfer; transformers: the same on torch tensors), after one untimed
warm-up call that compiles imitax's two programs (compile time printed apart). The
implementations run round-robin, medians reported; "vs torch" is the median over rounds
of the paired ratio. tokens/s counts new tokens only (batch x new tokens). The two
outputs are compared token for token: greedy decoding of the same weights should agree
unless two logits are within float rounding of each other.

Section ``cache``: milliseconds per generated token against the cache length, batch 1,
on a LLaMA-style model (RoPE, so lengths past GPT-2's 1,024 positions; GPT-2-124M
widths: 12 layers, 768 wide, 12 query and 12 KV heads, 2,048-wide gated MLP, 32,000-token
vocabulary, float32, random weights). For each length a prompt of that many tokens goes
through ``generate`` once, and its compiled decode loop is captured with its arguments
(prefilled cache included) and timed alone: ``max_new_tokens = steps + 1`` against
``max_new_tokens = 1`` (the first token comes from the prefill's logits, so the second
runs no step), paired round by round; the difference over ``steps`` is the time of one
decode step while the cache fills from ``length`` to ``length + steps`` slots. Each call
gets a fresh copy of the cache (the loop donates it); both timings include that copy, so
the difference cancels it. Every length and the bandwidth probe below run round-robin in
the same rounds, so a change of load shows up in the spreads, not as growth with length.

A decode step at batch 1 is a pass over memory: every weight that multiplies the
token (all layers' projections and the LM head) and the filled part of the cache are
read once. The same run measures the memory bandwidth with a STREAM-style copy (a
256 MiB float32 array into a donated one of the same size, compiled by XLA; NumPy's
``copyto`` as a second opinion; bytes read plus bytes written, as STREAM counts), and
the table gives the bandwidth that decoding achieves, (weight bytes + cache bytes at the
mean filled length) / time per token, as a fraction of the copy's. "predicted" is the
time at the first length plus the extra cache bytes at the copy's bandwidth: what the
step should take if only attention's reads grew with the cache.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import models  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.eval.generate import generate  # noqa: E402

generate_module = sys.modules["imitax.eval.generate"]  # `imitax.eval.generate` is the function

_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (one table row pair each).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Longest prompt, tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed rounds (each runs both implementations once).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: one per CPU).")
_SMOKE = flags.DEFINE_bool("smoke", False, "2-layer 64-wide models, short prompts: checks that the script runs.")
_SECTIONS = flags.DEFINE_list("sections", ["torch", "cache"], "torch: imitax vs transformers; cache: ms/token.")
_CACHE_LENGTHS = flags.DEFINE_list(
    "cache_lengths", ["128", "256", "512", "1024", "2048"], "Prompt lengths (cache slots filled) of the cache table."
)
_CACHE_STEPS = flags.DEFINE_integer("cache_steps", 32, "Decode steps timed per cache length.")
_MODEL = flags.DEFINE_enum("model", "gpt2", ["gpt2", "llama1b"], "The torch section's model: GPT-2-124M or LLaMA-1B.")
_DTYPE = common.define_dtype_flag()

HEADERS = ["model", "impl", "batch", "prompt tokens", "new tokens", "tokens/s", "vs torch", "median s", "spread"]
CACHE_HEADERS = [
    "cache length",
    "ms/token",
    "predicted",
    "vs first",
    "weights MB",
    "cache MB",
    "GB/s",
    "of copy bw",
    "spread",
]


def hf_config(model: str, smoke: bool) -> transformers.PretrainedConfig:
    """transformers' config of ``--model`` (2 layers, 64 wide with ``smoke``)."""
    if model == "llama1b":
        widths = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160)
        if not smoke:
            widths = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, intermediate_size=5632)
        return transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, **widths)
    if smoke:
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=1024)
    return transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def build_models(model: str, smoke: bool, dtype: str = "float32"):
    """A random transformers model (eval, sdpa) and the imitax model holding its weights, both in ``dtype``.

    The weights are drawn in float32 and then cast, so both sides round the same values.
    """
    config = hf_config(model, smoke)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    hf = hf.eval()
    cfg = models.config_from_hf(config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = common.cast_params(core.params_from_hf(cfg, state_dict), dtype)
    ours = core.model_from_params(cfg.replace(dtype=dtype, param_dtype=dtype), params)
    return hf.to(common.torch_device(), common.torch_dtype(dtype)), ours


def make_prompts(batch: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    lengths = [longest] if batch == 1 else rs.randint(longest // 2, longest + 1, batch)
    return [rs.randint(0, vocab, n).tolist() for n in lengths]


def torch_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of the left-padded batch; exactly ``new_tokens`` per row."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.inference_mode():
        out = hf.generate(
            torch.from_numpy(ids).to(hf.device),
            attention_mask=torch.from_numpy(mask).to(hf.device),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, width:].tolist()


def model_name(cfg: models.TransformerConfig) -> str:
    """The table's name of the torch section's model."""
    family = "gpt2" if _MODEL.value == "gpt2" else "llama"
    size = "tiny" if _SMOKE.value else f"{cfg.num_params() / 1e6:.0f}m"
    return f"{family}-{size}" + ("" if cfg.dtype == "float32" else f" {cfg.dtype}")


def bench_batch(hf, model, batch: int, prompt_len: int, new_tokens: int, iters: int):
    """Times one batch size; returns its table rows and notes."""
    prompts = make_prompts(batch, prompt_len, model.cfg.vocab_size)
    fns = {
        "imitax": lambda: generate(model, prompts, max_new_tokens=new_tokens),
        "torch": lambda: torch_generate(hf, prompts, new_tokens),
    }
    start = time.perf_counter()
    ours = fns["imitax"]()
    notes = [f"batch {batch}: imitax first call (tracing + compiling 2 programs) {time.perf_counter() - start:.1f} s"]
    theirs = fns["torch"]()
    same = sum(a == b for r, s in zip(ours, theirs, strict=True) for a, b in zip(r, s, strict=True))
    rows_equal = sum(r == s for r, s in zip(ours, theirs, strict=True))
    notes.append(
        f"batch {batch}: greedy tokens equal to transformers' {same}/{batch * new_tokens} "
        f"({rows_equal}/{batch} rows identical)"
    )
    timings = common.time_interleaved(fns, warmup=0, iters=iters)
    rows = []
    for name, timing in timings.items():
        rows.append(
            [
                model_name(model.cfg),
                name,
                batch,
                f"{sum(map(len, prompts))}",
                f"{batch * new_tokens}",
                f"{batch * new_tokens / timing.median:.0f}",
                f"{common.paired_speedup(timing, timings['torch']):.2f}x",
                f"{timing.median:.2f}",
                f"{timing.spread:.0%}",
            ]
        )
    return rows, notes


# -- decode time vs cache length -------------------------------------------------------------


def llama_config(smoke: bool) -> models.TransformerConfig:
    """LLaMA-2 architecture at GPT-2-124M widths (multi-head KV, as LLaMA-2-7B), 4,096 positions."""
    if smoke:
        widths = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128)
    else:
        widths = dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=2048)
    return models.preset("llama2-7b", max_position_embeddings=4096, **widths)


def capture_decode(model, prompt: list[int], steps: int):
    """``generate``'s compiled decode loop for ``prompt`` (batch 1) and its bound arguments, cache prefilled."""
    decode, captured = generate_module._decode, {}

    def spy(*args, **kwargs):
        # Copied before the call: the decode loop may donate (and so delete) its cache.
        captured["bound"] = inspect.signature(decode).bind(*jax.tree.map(jnp.copy, args), **kwargs)
        return decode(*args, **kwargs)

    generate_module._decode = spy
    try:
        generate(model, [prompt], max_new_tokens=steps + 1)
    finally:
        generate_module._decode = decode
    return decode, captured["bound"]


def decode_step_timers(model, length: int, steps: int) -> dict[str, Callable[[], Any]]:
    """Two timers of ``generate``'s decode loop with ``length`` slots prefilled, batch 1: 1 and ``steps + 1`` tokens."""
    prompt = np.random.RandomState(length).randint(0, model.cfg.vocab_size, length).tolist()
    decode, bound = capture_decode(model, prompt, steps)

    def call(max_new_tokens: int):
        def run():
            args = bound.arguments | {"cache": jax.tree.map(jnp.copy, bound.arguments["cache"])}
            args["max_new_tokens"] = np.int32(max_new_tokens)
            return decode(**args)[0]  # the tokens: an array, which the timer waits for

        return run

    return {f"{length} first": call(1), f"{length} steps": call(steps + 1)}


def bench_cache_lengths(lengths: list[int], steps: int, iters: int, smoke: bool):
    """The cache table's rows and its notes (the bandwidth probe, the bytes counted).

    Every length's two timers and the bandwidth probes run round-robin in one
    :func:`common.time_interleaved`, so a change of load between lengths lands
    on all of them instead of on the growth with length.
    """
    cfg = llama_config(smoke)
    model = models.init_model(cfg)
    fns, moved = common.copy_probes()
    for length in lengths:
        fns |= decode_step_timers(model, length, steps)
    timings = common.time_interleaved(fns, warmup=1, iters=iters)
    bandwidth = {name: moved / timings[name].median for name in ("copy xla", "copy numpy")}
    bw = bandwidth["copy xla"]
    itemsize = np.dtype(cfg.dtype).itemsize
    weight_bytes = common.matmul_params(cfg) * np.dtype(cfg.param_dtype).itemsize
    rows, first = [], None
    for length in lengths:
        firsts, full = timings[f"{length} first"].samples, timings[f"{length} steps"].samples
        per_step = [(s - f) / steps for f, s in zip(firsts, full, strict=True)]
        seconds = statistics.median(per_step)
        # Keys and values of every layer, at the mean filled length of the timed steps.
        cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * (length + steps / 2)
        first = first or (seconds, cache_bytes)
        achieved = (weight_bytes + cache_bytes) / seconds
        rows.append(
            [
                length,
                f"{seconds * 1e3:.2f}",
                f"{(first[0] + (cache_bytes - first[1]) / bw) * 1e3:.2f}",
                f"{seconds / first[0]:.2f}x",
                f"{weight_bytes / 1e6:.0f}",
                f"{cache_bytes / 1e6:.1f}",
                f"{achieved / 1e9:.1f}",
                f"{achieved / bw:.0%}",
                f"{(max(per_step) - min(per_step)) / seconds:.0%}",
            ]
        )
    name = "llama-style tiny" if smoke else "llama-style 124M-wide"
    notes = [
        f"{name}: {cfg.num_params() / 1e6:.0f}M parameters, {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads "
        f"x {cfg.head_dim}, {cfg.dtype}; weights read per token: all projections and the LM head",
        f"copy bandwidth (STREAM copy, 256 MiB, read + write, timed in the same rounds): "
        f"XLA {bandwidth['copy xla'] / 1e9:.1f} GB/s, NumPy {bandwidth['copy numpy'] / 1e9:.1f} GB/s; "
        "'of copy bw' and 'predicted' use XLA's",
    ]
    return rows, notes


def main(argv):
    del argv
    torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
    smoke = _SMOKE.value
    iters = 2 if smoke else _ITERS.value
    prompt_len, new_tokens = (16, 8) if smoke else (_PROMPT_LEN.value, _NEW_TOKENS.value)
    print(common.environment(), flush=True)
    summary = []
    if "torch" in _SECTIONS.value:
        hf, model = build_models(_MODEL.value, smoke, _DTYPE.value)
        rows, notes = [], []
        for batch in map(int, _BATCHES.value):
            batch_rows, batch_notes = bench_batch(hf, model, batch, prompt_len, new_tokens, iters)
            print(common.format_table(HEADERS, batch_rows), flush=True)
            rows += batch_rows
            notes += batch_notes
        summary += [f"\ngreedy generation, {_DTYPE.value}, whole calls, medians of {iters} rounds after 1 warm-up:"]
        summary += [common.format_table(HEADERS, rows), "", *notes]
    if "cache" in _SECTIONS.value:
        lengths = [64, 128] if smoke else [int(n) for n in _CACHE_LENGTHS.value]
        steps = 4 if smoke else _CACHE_STEPS.value
        rows, notes = bench_cache_lengths(lengths, steps, iters, smoke)
        summary += [f"\ndecode time per token vs cache length, batch 1, {steps} steps, medians of {iters} rounds:"]
        summary += [common.format_table(CACHE_HEADERS, rows), "", *notes]
    print("\n".join([*summary, "", common.environment()]))


if __name__ == "__main__":
    app.run(main)
