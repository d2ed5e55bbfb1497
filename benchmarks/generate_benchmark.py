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
unless two logits are within float rounding of each other. The "target" column holds the
speed-ups asked of imitax (>= 1.3x at batch 1, >= 3x at batch 8).

Then each batch's decode loop, captured from ``generate`` with its prefilled cache, runs
once more under ``jax.profiler`` (:mod:`benchmarks.profiling`): each HLO op's own time,
summed by kind of work (matmuls with the layers' weights, with the LM head, attention's
dots, copies, everything else) and divided by the steps; the tracer adds a little time of
its own to every op, so "ms/step" there runs above the untraced calls'. "weights GB/s" is
the weights' bytes over the time of the matmuls that read them. For a target that is
missed, a note gives what bounds it from the same run: how long the whole call may take,
how long the decode loop and the rest took, and how fast the call would be if every step
read its weights at the copy bandwidth measured in the same rounds.

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
step should take if only attention's reads grew with the cache. Targets: decoding at >= 80%
of the copy bandwidth, and ms/token within 5% of "predicted" (the growth is attention's
share). The decode loops of the first and last lengths are profiled as above, and a note
says which kinds of work the step's growth went to.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import tempfile
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

from benchmarks import common, profiling  # noqa: E402
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

HEADERS = [
    "model",
    "impl",
    "batch",
    "prompt tokens",
    "new tokens",
    "tokens/s",
    "vs torch",
    "target",
    "median s",
    "spread",
]
# Speed-up over transformers' generate that each batch size should reach.
TARGETS = {1: 1.3, 8: 3.0}
BANDWIDTH_TARGET = 0.8  # of the measured copy bandwidth, decoding at batch 1
GROWTH_SLACK = 0.05  # a length's ms/token "grows only by attention's share" within 5% of the prediction
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
    "target",
]
PROFILE_HEADERS = [
    "decode loop",
    "ms/step",
    "projections",
    "LM head",
    "attention",
    "copies",
    "other",
    "weights GB/s",
    "of copy bw",
]
# How the profile's kinds of work (benchmarks/profiling.py) group into the columns above.
PROFILE_COLUMNS = {
    "matmul: projections": "projections",
    "matmul: LM head": "LM head",
    "matmul: attention": "attention",
    "copies, transposes, slices": "copies",
}


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


def weight_bytes(cfg: models.TransformerConfig) -> float:
    """Bytes of the weights a decode step multiplies by: every layer's projections and the LM head."""
    return common.matmul_params(cfg) * np.dtype(cfg.param_dtype).itemsize


def target_cell(batch: int, speedup: float) -> str:
    target = TARGETS.get(batch)
    return "-" if target is None else f">= {target}x: {'met' if speedup >= target else 'missed'}"


def bench_batch(hf, model, batch: int, prompt_len: int, new_tokens: int, iters: int):
    """Times one batch size and profiles its decode loop; returns its table rows, profile row and notes.

    The copy-bandwidth probe runs in the same rounds, for the profile's "of copy bw".
    """
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
    probes, moved = common.copy_probes()
    timings = common.time_interleaved(fns | probes, warmup=0, iters=iters)
    bandwidth = moved / timings["copy xla"].median
    speedup = common.paired_speedup(timings["imitax"], timings["torch"])
    rows = []
    for name in fns:
        timing = timings[name]
        rows.append(
            [
                model_name(model.cfg),
                name,
                batch,
                f"{sum(map(len, prompts))}",
                f"{batch * new_tokens}",
                f"{batch * new_tokens / timing.median:.0f}",
                f"{common.paired_speedup(timing, timings['torch']):.2f}x",
                target_cell(batch, speedup) if name == "imitax" else "-",
                f"{timing.median:.2f}",
                f"{timing.spread:.0%}",
            ]
        )
    steps = new_tokens - 1  # the first new token comes from the prompt's pass
    decode, bound = capture_decode(model, prompts, steps)
    weights = weight_bytes(model.cfg)
    profile_row, ms = profile_decode(decode, bound, steps, model.cfg.vocab_size, weights, bandwidth)
    notes.append(f"batch {batch}: copy bandwidth in the same rounds {bandwidth / 1e9:.1f} GB/s (XLA, read + write)")
    if batch in TARGETS and speedup < TARGETS[batch]:
        notes.append(bound_note(batch, speedup, timings, ms, steps, weights, bandwidth))
    return rows, [f"batch {batch}", *profile_row], notes


def bound_note(batch: int, speedup: float, timings, ms: dict, steps: int, weights: float, bandwidth: float) -> str:
    """What keeps a batch size from its target, from the same run's figures."""
    need = timings["torch"].median / TARGETS[batch]
    ours = timings["imitax"].median
    loop = ms["step"] * steps / 1e3
    rest = max(ours - loop, 0.0)
    floor_ms = weights / bandwidth * 1e3  # the weights read once at the copy bandwidth
    best = rest + floor_ms * steps / 1e3
    return (
        f"batch {batch}: target missed ({speedup:.2f}x against {TARGETS[batch]}x): it needs a whole call within "
        f"{need:.2f} s; imitax took {ours:.2f} s, of which the traced decode loop {loop:.2f} s ({ms['step']:.1f} ms a "
        f"step over {steps} steps) and the rest (the prompt's pass, padding, transfers) {rest:.2f} s. Of a step, the "
        f"matmuls with weights took {ms['projections'] + ms['LM head']:.1f} ms; reading the {weights / 1e6:.0f} MB of "
        f"weights once at the copy bandwidth takes {floor_ms:.1f} ms, so even decode steps at that floor would make "
        f"the call {best:.2f} s, {timings['torch'].median / best:.2f}x"
    )


# -- decode time vs cache length -------------------------------------------------------------


def llama_config(smoke: bool) -> models.TransformerConfig:
    """LLaMA-2 architecture at GPT-2-124M widths (multi-head KV, as LLaMA-2-7B), 4,096 positions."""
    if smoke:
        widths = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128)
    else:
        widths = dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=2048)
    return models.preset("llama2-7b", max_position_embeddings=4096, **widths)


def capture_decode(model, prompts: list[list[int]], steps: int):
    """``generate``'s compiled decode loop for ``prompts`` and its bound arguments, cache prefilled."""
    decode, captured = generate_module._decode, {}

    def spy(*args, **kwargs):
        # Copied before the call: the decode loop may donate (and so delete) its cache.
        captured["bound"] = inspect.signature(decode).bind(*jax.tree.map(jnp.copy, args), **kwargs)
        return decode(*args, **kwargs)

    generate_module._decode = spy
    try:
        generate(model, prompts, max_new_tokens=steps + 1)
    finally:
        generate_module._decode = decode
    return decode, captured["bound"]


def decode_call(decode, bound, max_new_tokens: int) -> Callable[[], Any]:
    """A call of the captured decode loop for ``max_new_tokens`` tokens, on a fresh copy of its cache."""

    def run():
        args = bound.arguments | {"cache": jax.tree.map(jnp.copy, bound.arguments["cache"])}
        args["max_new_tokens"] = np.int32(max_new_tokens)
        return decode(**args)[0]  # the tokens: an array, which the timer waits for

    return run


def profile_decode(decode, bound, steps: int, vocab_size: int, weight_bytes: float, bandwidth: float) -> list:
    """One traced call of the captured decode loop: its table row (ms a step by kind of work) and its figures.

    Each HLO op is charged its own time (:mod:`benchmarks.profiling`); the loop's copy of the
    cache made before the call is not traced. Returns ``(row, {column: ms a step})``.
    """
    ops = profiling.parse_hlo(decode.lower(**bound.arguments).compile().as_text(), vocab_size)
    run = decode_call(decode, bound, steps + 1)
    common.block(run())  # compiled, caches warm
    with tempfile.TemporaryDirectory() as logdir:
        times, wall = profiling.traced_op_times(run, logdir)
    ms = dict.fromkeys([*PROFILE_COLUMNS.values(), "other"], 0.0)  # every column, even one with no op
    for name, (_, seconds) in times.items():
        category = ops[name].category if name in ops else ""
        ms[PROFILE_COLUMNS.get(category, "other")] += seconds * 1e3 / steps
    ms["step"] = wall * 1e3 / steps
    matmul_ms = ms["projections"] + ms["LM head"]
    gbps = weight_bytes / matmul_ms / 1e6
    row = [f"{ms['step']:.1f}"] + [f"{ms[c]:.1f}" for c in ("projections", "LM head", "attention", "copies", "other")]
    return row + [f"{gbps:.1f}", f"{gbps * 1e9 / bandwidth:.0%}"], ms


def decode_step_timers(model, length: int, steps: int):
    """Two timers of ``generate``'s decode loop with ``length`` slots prefilled, batch 1: 1 and ``steps + 1`` tokens.

    Also returns the captured loop and its arguments, for :func:`profile_decode`.
    """
    prompt = np.random.RandomState(length).randint(0, model.cfg.vocab_size, length).tolist()
    decode, bound = capture_decode(model, [prompt], steps)
    timers = {
        f"{length} first": decode_call(decode, bound, 1),
        f"{length} steps": decode_call(decode, bound, steps + 1),
    }
    return timers, (decode, bound)


def bench_cache_lengths(lengths: list[int], steps: int, iters: int, smoke: bool):
    """The cache table's rows, the profile rows of its first and last lengths, and its notes.

    Every length's two timers and the bandwidth probes run round-robin in one
    :func:`common.time_interleaved`, so a change of load between lengths lands
    on all of them instead of on the growth with length.
    """
    cfg = llama_config(smoke)
    model = models.init_model(cfg)
    fns, moved = common.copy_probes()
    captured = {}
    for length in lengths:
        timers, captured[length] = decode_step_timers(model, length, steps)
        fns |= timers
    timings = common.time_interleaved(fns, warmup=1, iters=iters)
    bandwidth = {name: moved / timings[name].median for name in ("copy xla", "copy numpy")}
    bw = bandwidth["copy xla"]
    itemsize = np.dtype(cfg.dtype).itemsize
    weights = weight_bytes(cfg)
    rows, first = [], None
    for length in lengths:
        firsts, full = timings[f"{length} first"].samples, timings[f"{length} steps"].samples
        per_step = [(s - f) / steps for f, s in zip(firsts, full, strict=True)]
        seconds = statistics.median(per_step)
        # Keys and values of every layer, at the mean filled length of the timed steps.
        cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * (length + steps / 2)
        first = first or (seconds, cache_bytes)
        predicted = first[0] + (cache_bytes - first[1]) / bw
        achieved = (weights + cache_bytes) / seconds
        target = f"bw {'met' if achieved >= BANDWIDTH_TARGET * bw else 'missed'}"
        if length != lengths[0]:
            target += f", growth {'met' if seconds <= predicted * (1 + GROWTH_SLACK) else 'missed'}"
        rows.append(
            [
                length,
                f"{seconds * 1e3:.2f}",
                f"{predicted * 1e3:.2f}",
                f"{seconds / first[0]:.2f}x",
                f"{weights / 1e6:.0f}",
                f"{cache_bytes / 1e6:.1f}",
                f"{achieved / 1e9:.1f}",
                f"{achieved / bw:.0%}",
                f"{(max(per_step) - min(per_step)) / seconds:.0%}",
                target,
            ]
        )
    profiled = {
        length: profile_decode(*captured[length], steps, cfg.vocab_size, weights, bw)
        for length in dict.fromkeys((lengths[0], lengths[-1]))  # one length: profiled once
    }
    profile_rows = [[f"batch 1, {length} slots", *row] for length, (row, _) in profiled.items()]
    first_ms, last_ms = profiled[lengths[0]][1], profiled[lengths[-1]][1]
    name = "llama-style tiny" if smoke else "llama-style 124M-wide"
    grown = {c: last_ms[c] - first_ms[c] for c in first_ms}
    notes = [
        f"{name}: {cfg.num_params() / 1e6:.0f}M parameters, {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads "
        f"x {cfg.head_dim}, {cfg.dtype}; weights read per token: all projections and the LM head",
        f"copy bandwidth (STREAM copy, 256 MiB, read + write, timed in the same rounds): "
        f"XLA {bandwidth['copy xla'] / 1e9:.1f} GB/s, NumPy {bandwidth['copy numpy'] / 1e9:.1f} GB/s; "
        "'of copy bw' and 'predicted' use XLA's",
        f"targets: >= {BANDWIDTH_TARGET:.0%} of the copy bandwidth; 'growth' met when ms/token is within "
        f"{GROWTH_SLACK:.0%} of 'predicted'",
        f"traced, {lengths[0]} -> {lengths[-1]} slots: a step grew {grown['step']:+.1f} ms; attention's dots "
        f"{grown['attention']:+.1f}, copies {grown['copies']:+.1f}, other ops (softmax, masks, the cache's update) "
        f"{grown['other']:+.1f}, matmuls with weights {grown['projections'] + grown['LM head']:+.1f} ms",
    ]
    return rows, profile_rows, notes


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
        rows, profile_rows, notes = [], [], []
        for batch in map(int, _BATCHES.value):
            batch_rows, profile_row, batch_notes = bench_batch(hf, model, batch, prompt_len, new_tokens, iters)
            print(common.format_table(HEADERS, batch_rows), flush=True)
            rows += batch_rows
            profile_rows.append(profile_row)
            notes += batch_notes
        summary += [f"\ngreedy generation, {_DTYPE.value}, whole calls, medians of {iters} rounds after 1 warm-up:"]
        summary += [common.format_table(HEADERS, rows)]
        summary += ["\nimitax's decode loops of those calls, one traced call each, ms a step by kind of work:"]
        summary += [common.format_table(PROFILE_HEADERS, profile_rows), "", *notes]
    if "cache" in _SECTIONS.value:
        lengths = [64, 128] if smoke else [int(n) for n in _CACHE_LENGTHS.value]
        steps = 4 if smoke else _CACHE_STEPS.value
        rows, profile_rows, notes = bench_cache_lengths(lengths, steps, iters, smoke)
        summary += [f"\ndecode time per token vs cache length, batch 1, {steps} steps, medians of {iters} rounds:"]
        summary += [common.format_table(CACHE_HEADERS, rows)]
        summary += ["\nthe decode loops of the first and last lengths, one traced call each, ms a step:"]
        summary += [common.format_table(PROFILE_HEADERS, profile_rows), "", *notes]
    print("\n".join([*summary, "", common.environment()]))


if __name__ == "__main__":
    app.run(main)
