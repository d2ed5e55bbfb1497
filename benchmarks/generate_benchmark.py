r"""Greedy generation tokens/s: imitax ``generate`` vs transformers' ``generate``, same model, one run.

  python benchmarks/generate_benchmark.py                     # GPT-2-124M shape, batch 1 and 8
  python benchmarks/generate_benchmark.py --batches=1,4,16 --new_tokens=64 --iters=3
  python benchmarks/generate_benchmark.py --smoke             # tiny model: checks that the script runs

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

What is timed: the whole call, from token lists to new tokens on the host (imitax: padding,
prefill, decode, transfer; transformers: the same on torch tensors), after one untimed
warm-up call that compiles imitax's two programs (compile time printed apart). The
implementations run round-robin, medians reported; "vs torch" is the median over rounds
of the paired ratio. tokens/s counts new tokens only (batch x new tokens). The two
outputs are compared token for token: greedy decoding of the same weights should agree
unless two logits are within float rounding of each other.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import models  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.eval.generate import generate  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (one table row pair each).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Longest prompt, tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed rounds (each runs both implementations once).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: one per CPU).")
_SMOKE = flags.DEFINE_bool("smoke", False, "A 2-layer 64-wide model, short prompts: checks that the script runs.")

HEADERS = ["model", "impl", "batch", "prompt tokens", "new tokens", "tokens/s", "vs torch", "median s", "spread"]


def build_models(smoke: bool):
    """A random transformers GPT-2 (eval, float32, sdpa) and the imitax model holding its weights."""
    if smoke:
        hf_config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=1024)
    else:
        hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    hf = hf.eval()
    cfg = models.config_from_hf(hf_config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, core.model_from_params(cfg, core.params_from_hf(cfg, state_dict))


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
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, width:].tolist()


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
                "gpt2-124m" if model.cfg.num_layers == 12 else "gpt2-tiny",
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


def main(argv):
    del argv
    torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
    smoke = _SMOKE.value
    iters = 2 if smoke else _ITERS.value
    prompt_len, new_tokens = (16, 8) if smoke else (_PROMPT_LEN.value, _NEW_TOKENS.value)
    print(common.environment(), flush=True)
    hf, model = build_models(smoke)
    rows, notes = [], []
    for batch in map(int, _BATCHES.value):
        batch_rows, batch_notes = bench_batch(hf, model, batch, prompt_len, new_tokens, iters)
        print(common.format_table(HEADERS, batch_rows), flush=True)
        rows += batch_rows
        notes += batch_notes
    print(f"\ngreedy generation, float32, whole calls, medians of {iters} rounds after 1 warm-up:")
    print(common.format_table(HEADERS, rows))
    print("\n".join(["", *notes, common.environment()]))


if __name__ == "__main__":
    app.run(main)
