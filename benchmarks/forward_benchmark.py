r"""Forward-pass throughput of imitax vs transformers' PyTorch model, same weights, one run.

  python benchmarks/forward_benchmark.py                       # gpt2 and llama1b, 5 timed rounds
  python benchmarks/forward_benchmark.py --model=gpt2 --iters=9 --xla_backends=ynn,eigen
  python benchmarks/forward_benchmark.py --smoke               # tiny shapes: checks the script runs

One process measures, in this order: the float32 matmul peak of each XLA dot
backend and of PyTorch (MFU is quoted against the fastest of them); then, per
model shape, a randomly initialized transformers model (eval mode, float32,
sdpa attention) is built from the imitax config, its weights are copied into
imitax, the two are checked to give the same logits, and both forward passes
(``batch x seq`` random tokens -> float32 logits) are timed round-robin after
warm-up. Times are medians; "vs torch" is the median over rounds of the paired
ratio torch time / imitax time. Compile time is excluded and printed apart.
FLOPs are counted as in :class:`common.ForwardFlops`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import models  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.models import layers  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "all", ["gpt2", "llama1b", "all"], "Which model shape to benchmark.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed rounds (each runs every implementation once).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds before timing.")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: 8 for gpt2, 2 for llama1b).")
_SEQ = flags.DEFINE_integer("seq", 512, "Sequence length.")
_XLA_BACKENDS = flags.DEFINE_list(
    "xla_backends",
    ["ynn", "eigen"],
    f"XLA dot backends to run imitax with, of {sorted(common.XLA_DOT_BACKENDS)} (see benchmarks/common.py).",
)
_CAUSAL_BLOCK = flags.DEFINE_integer(
    "causal_block", None, "imitax causal attention block (layers.CAUSAL_BLOCK; 0: no blocks; default: the library's)."
)
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "imitax: lax.scan over the layers (False: unrolled).")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["2048", "4096"], "Square matmul sizes for the peak (empty: skip).")
_PEAK_ITERS = flags.DEFINE_integer("peak_iters", 5, "Timed repetitions per matmul size and library.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: one per CPU).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes and two rounds: checks that the script runs.")

HEADERS = ["model", "impl", "batch x seq", "tokens/s", "GFLOP/s", "MFU", "vs torch", "median s", "spread"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cfg: models.TransformerConfig
    batch: int
    seq: int


def cases(smoke: bool) -> list[Case]:
    """The model shapes, random-initialized from configs (nothing is downloaded)."""
    gpt2 = models.preset("gpt2")
    # LLaMA-shaped, 0.95B parameters: TinyLlama's widths, 16 layers, full multi-head attention.
    llama = models.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=32,
        head_dim=64,
        mlp_dim=5632,
        max_position_embeddings=2048,
        norm_eps=1e-5,
    )
    batch, seq = _BATCH.value, _SEQ.value
    if smoke:
        gpt2 = gpt2.replace(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=256)
        llama = llama.replace(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=160)
        # 192 tokens: more than one causal attention block.
        batch, seq = batch or 2, min(seq, 192)
    out = {"gpt2": Case("gpt2-124m", gpt2, batch or 8, seq), "llama1b": Case("llama-1b", llama, batch or 2, seq)}
    return [out[m] for m in (["gpt2", "llama1b"] if _MODEL.value == "all" else [_MODEL.value])]


def build_models(cfg: models.TransformerConfig):
    """A random transformers model (eval, float32, sdpa) and an imitax model holding its weights."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg.to_hf_config(), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    # .numpy() shares torch's memory; the imitax arrays are the only copy made.
    params = core.params_from_hf(cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    return hf, core.model_from_params(cfg, params)


def bench_case(case: Case, roofline: float, iters: int) -> tuple[list[list[str]], list[str]]:
    """Times one model shape; returns its table rows and notes."""
    cfg = case.cfg.replace(scan_layers=_SCAN_LAYERS.value)
    start = time.perf_counter()
    hf, model = build_models(cfg)
    notes = [f"{case.name}: {cfg.num_params() / 1e6:.0f}M params, models built in {time.perf_counter() - start:.0f} s"]
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (case.batch, case.seq), dtype=np.int32)
    tokens_pt, tokens_jx = torch.from_numpy(tokens_np.astype(np.int64)), jnp.asarray(tokens_np)

    def torch_forward():
        with torch.inference_mode():
            return hf(input_ids=tokens_pt).logits

    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    ref, first_call = common.timed(torch_forward)
    notes.append(f"{case.name} torch: first call {first_call:.1f} s")
    fns = {}
    for backend in _XLA_BACKENDS.value:
        start = time.perf_counter()
        jitted = jax.jit(forward, compiler_options=common.XLA_DOT_BACKENDS[backend])
        compiled = jitted.lower(state, tokens_jx).compile()
        compile_s = time.perf_counter() - start
        # The same weights must give the same logits, or the timing compares different work.
        diff = float(np.abs(np.asarray(compiled(state, tokens_jx)) - ref.numpy()).max())
        notes.append(f"{case.name} imitax[{backend}]: lower+compile {compile_s:.1f} s, max |logit diff| {diff:.1e}")
        fns[f"imitax[{backend}]"] = lambda c=compiled: c(state, tokens_jx)
    fns["torch"] = torch_forward
    del ref

    timings = common.time_interleaved(fns, warmup=_WARMUP.value, iters=iters)
    flops = common.forward_flops(cfg, case.batch, case.seq)
    tokens = case.batch * case.seq
    rows = []
    for name, timing in timings.items():
        gflops = flops.total / timing.median / 1e9
        rows.append(
            [
                case.name,
                name,
                f"{case.batch}x{case.seq}",
                f"{tokens / timing.median:.0f}",
                f"{gflops:.0f}",
                f"{gflops / roofline:.0%}",
                f"{common.paired_speedup(timing, timings['torch']):.2f}x",
                f"{timing.median:.2f}",
                f"{timing.spread:.0%}",
            ]
        )
    share = flops.attention / flops.total
    notes.append(f"{case.name}: {flops.total / 1e12:.3f} TFLOP per forward pass ({share:.0%} of it attention)")
    return rows, notes


def main(argv):
    del argv
    unknown = set(_XLA_BACKENDS.value) - set(common.XLA_DOT_BACKENDS)
    if unknown:
        raise app.UsageError(f"unknown --xla_backends {sorted(unknown)}; known: {sorted(common.XLA_DOT_BACKENDS)}")
    if _CAUSAL_BLOCK.value is not None:
        # Read when the forward pass is traced; 0 turns the blocks off.
        layers.CAUSAL_BLOCK = _CAUSAL_BLOCK.value or 2**31
    threads = _TORCH_THREADS.value or os.cpu_count()
    torch.set_num_threads(threads)
    iters = 2 if _SMOKE.value else _ITERS.value
    print(common.environment(), flush=True)

    sizes = [256] if _SMOKE.value else [int(s) for s in _PEAK_SIZES.value]
    roofline, notes = float("nan"), []
    if sizes:
        backends = {b: common.XLA_DOT_BACKENDS[b] for b in _XLA_BACKENDS.value}
        peak_iters = min(iters, _PEAK_ITERS.value)
        peaks = common.matmul_peaks(sizes, xla_backends=backends, torch_threads=threads, iters=peak_iters)
        rows = [[lib, *(f"{peaks[lib][n]:.0f}" for n in sizes), f"{max(peaks[lib].values()):.0f}"] for lib in peaks]
        print(f"\nfloat32 matmul, GFLOP/s (median of {peak_iters}, round-robin):")
        print(common.format_table(["library", *(f"{n}^3" for n in sizes), "peak"], rows), flush=True)
        roofline = max(max(v.values()) for v in peaks.values())
        notes.append(f"MFU is against {roofline:.0f} GFLOP/s, the fastest library's peak above")

    rows = []
    for case in cases(_SMOKE.value):
        case_rows, case_notes = bench_case(case, roofline, iters)
        rows += case_rows
        notes += case_notes
        print(common.format_table(HEADERS, case_rows), flush=True)
    print(f"\nforward pass, float32 logits, medians of {iters} rounds after {_WARMUP.value} warm-up:")
    print(common.format_table(HEADERS, rows))
    print("\n".join(["", *notes, common.environment()]))


if __name__ == "__main__":
    app.run(main)
