r"""Forward-pass throughput of imitax vs transformers' PyTorch model, same weights, one run.

  python benchmarks/forward_benchmark.py                       # gpt2 and llama1b, 5 timed rounds
  python benchmarks/forward_benchmark.py --model=gpt2 --iters=9 --xla_backends=ynn,eigen
  python benchmarks/forward_benchmark.py --smoke               # tiny shapes: checks the script runs
  python benchmarks/forward_benchmark.py --model=gpt2 --tasks=forward,score,decode --xla_backends=ynn,eigen,onednn
  python benchmarks/forward_benchmark.py --model=gpt2 --tasks=dots --xla_backends=ynn,eigen,onednn   # matmuls alone
  python benchmarks/forward_benchmark.py --tasks=forward --dtype=bfloat16 --peak_sizes=8192   # on a GPU

One process measures, in this order: the float32 matmul peak of each XLA dot
backend and of PyTorch (MFU is quoted against the fastest of them); then, per
model shape, a randomly initialized transformers model (eval mode, float32,
sdpa attention) is built from the imitax config, its weights are copied into
imitax, the two are checked to give the same logits, and both forward passes
(``batch x seq`` random tokens -> float32 logits) are timed round-robin after
warm-up. Times are medians; "vs torch" is the median over rounds of the paired
ratio torch time / imitax time. Compile time is excluded and printed apart.
FLOPs are counted as in :class:`common.ForwardFlops`.
``--dtype=bfloat16`` casts both models' weights (and imitax's compute) to bfloat16 and times
bfloat16 matmuls; both run on the accelerator JAX and PyTorch find (see :mod:`benchmarks.common`).

``--tasks=score,decode`` also times imitax's scoring (``Scorer.loglikelihood_tokens`` on an
MMLU-shaped set: one shared few-shot prefix, questions, four one-token choices) and greedy
decoding (``generate``) per dot backend. Those run jitted functions inside the library, which
cannot take per-compile options, so each backend gets a worker process of its own, started with
``--xla_backend`` (``imitax.xla_backend``: the scripts' own path to ``XLA_FLAGS``); the parent
drives the workers round-robin, one call at a time, and the workers report their own times.
The same seed gives every worker the same random weights; results are compared across them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imitax import xla_backend  # noqa: E402

# Applied while flags are parsed, before JAX starts: how score/decode workers get their dot library.
# The parent leaves XLA's own ('default') and passes each backend's options per compilation.
xla_backend.define_flag(default="default")

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

_MODEL = flags.DEFINE_enum(
    "model",
    "all",
    ["gpt2", "llama1b", "llama1b_full", "all"],
    "Which model shape: llama1b has --llama_layers layers, llama1b_full all 16 (~0.95B parameters); all: gpt2 and "
    "llama1b.",
)
_LLAMA_LAYERS = flags.DEFINE_integer("llama_layers", 16, "Layers of the llama1b shape (16: ~0.95B parameters).")
_TASKS = flags.DEFINE_list(
    "tasks",
    ["forward"],
    "forward (vs transformers), score, decode (imitax per dot backend, in worker processes), dots (the model's "
    "weight matmuls alone, per backend, from 1 row to batch x seq rows).",
)
_SCORE_SHAPE = flags.DEFINE_list(
    "score_shape", ["512", "128", "16"], "Scoring set: shared prefix tokens, question tokens, questions (x4 choices)."
)
_DECODE_SHAPE = flags.DEFINE_list("decode_shape", ["8", "128", "64"], "Decoding: batch, prompt tokens, new tokens.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: serve score/decode calls on stdin (one backend per process).")
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
# The forward pass (--tasks=forward): both models' weights and compute in this dtype.
_DTYPE = common.define_dtype_flag()

HEADERS = [
    "model", "impl", "batch x seq", "tokens/s", "GFLOP/s", "roofline GFLOP/s", "MFU", "vs torch", "target", "median s",
    "spread",
]  # fmt: skip
FORWARD_TARGET = 1.5  # imitax's forward pass vs transformers', same machine and run


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cfg: models.TransformerConfig
    batch: int
    seq: int
    key: str = ""  # its --model value


def cases(smoke: bool) -> list[Case]:
    """The model shapes, random-initialized from configs (nothing is downloaded)."""
    gpt2 = models.preset("gpt2")
    # LLaMA-shaped, 0.95B parameters: TinyLlama's widths, 16 layers, full multi-head attention.
    llama = models.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=_LLAMA_LAYERS.value,
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
    full = llama.replace(num_layers=2 if smoke else 16)
    out = {
        "gpt2": Case("gpt2-124m", gpt2, batch or 8, seq, "gpt2"),
        "llama1b": Case(f"llama-1b-{llama.num_layers}l", llama, batch or 2, seq, "llama1b"),
        "llama1b_full": Case(f"llama-1b-{full.num_layers}l", full, batch or 2, seq, "llama1b_full"),
    }
    return [out[m] for m in (["gpt2", "llama1b"] if _MODEL.value == "all" else [_MODEL.value])]


def build_models(cfg: models.TransformerConfig, dtype: str = "float32"):
    """A random transformers model (eval, sdpa) and an imitax model holding its weights, both in ``dtype``.

    The weights are drawn in float32 on the CPU and then cast, so both sides round the same values;
    transformers' model then moves to PyTorch's device (:func:`common.torch_device`).
    """
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg.to_hf_config(), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    # .numpy() shares torch's memory; the imitax arrays are the only copy made.
    params = core.params_from_hf(cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    model = core.model_from_params(cfg.replace(dtype=dtype, param_dtype=dtype), common.cast_params(params, dtype))
    return hf.to(common.torch_device(), common.torch_dtype(dtype)), model


def bench_case(case: Case, probe: common.MatmulProbe | None, iters: int) -> tuple[list[list[str]], list[str]]:
    """Times one model shape, with ``probe``'s matmuls in every round (MFU: against that round's); rows and notes."""
    cfg = case.cfg.replace(scan_layers=_SCAN_LAYERS.value)
    start = time.perf_counter()
    hf, model = build_models(cfg, _DTYPE.value)
    notes = [f"{case.name}: {cfg.num_params() / 1e6:.0f}M params, models built in {time.perf_counter() - start:.0f} s"]
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (case.batch, case.seq), dtype=np.int32)
    tokens_pt = torch.from_numpy(tokens_np.astype(np.int64)).to(common.torch_device())
    tokens_jx = jnp.asarray(tokens_np)

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
        logits = np.asarray(compiled(state, tokens_jx), np.float32)
        diff = float(np.abs(logits - ref.float().cpu().numpy()).max())
        notes.append(f"{case.name} imitax[{backend}]: lower+compile {compile_s:.1f} s, max |logit diff| {diff:.1e}")
        fns[f"imitax[{backend}]"] = lambda c=compiled: c(state, tokens_jx)
    fns["torch"] = torch_forward
    del ref

    timings = common.time_interleaved({**fns, **(probe.fns if probe else {})}, warmup=_WARMUP.value, iters=iters)
    peaks = probe.peaks(timings) if probe else [float("nan")] * iters
    flops = common.forward_flops(cfg, case.batch, case.seq)
    tokens = case.batch * case.seq
    rows = []
    for name in fns:
        timing = timings[name]
        gflops = flops.total / timing.median / 1e9
        mfu = np.median([flops.total / t / p for t, p in zip(timing.samples, peaks, strict=True)])
        speedup = common.paired_speedup(timing, timings["torch"])
        met = "-" if name == "torch" else f">= {FORWARD_TARGET}x: {'met' if speedup >= FORWARD_TARGET else 'missed'}"
        rows.append(
            [
                case.name,
                name,
                f"{case.batch}x{case.seq}",
                f"{tokens / timing.median:.0f}",
                f"{gflops:.0f}",
                f"{np.median(peaks) / 1e9:.0f}",
                f"{mfu:.0%}",
                f"{speedup:.2f}x",
                met,
                f"{timing.median:.2f}",
                f"{timing.spread:.0%}",
            ]
        )
    share = flops.attention / flops.total
    notes.append(f"{case.name}: {flops.total / 1e12:.3f} TFLOP per forward pass ({share:.0%} of it attention)")
    return rows, notes


# -- scoring and decoding, one worker process per dot backend ---------------------------------------

_PROTOCOL = "@@ "  # prefixes the workers' answers on stdout; anything else there is a library's chatter
# The dot library a compiled 64x64 matmul uses, by backend (read from its HLO).
_DOT_KIND = {"ynn": "__ynn_fusion", "eigen": "dot", "onednn": "__onednn_fusion"}


def dot_library() -> str:
    """Which library this process's XLA runs a float32 matmul with: a fusion kind, or 'dot' (Eigen)."""
    a = jnp.ones((64, 64), jnp.float32)
    hlo = jax.jit(jnp.dot).lower(a, a).compile().as_text()
    return next((k for k in ("__onednn_fusion", "__ynn_fusion") if f'"kind":"{k}"' in hlo), "dot")


def worker_tasks(case: Case) -> dict[str, Callable[[], dict]]:
    """The scoring and decoding calls, on seeded random weights and inputs (the same in every worker)."""
    from imitax.eval.generate import generate
    from imitax.eval.scoring import Scorer

    cfg = case.cfg.replace(scan_layers=_SCAN_LAYERS.value)
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prefix_len, question_len, questions = (int(x) for x in _SCORE_SHAPE.value)
    prefix = rng.integers(0, cfg.vocab_size, prefix_len).tolist()
    requests = []
    for _ in range(questions):
        context = prefix + rng.integers(0, cfg.vocab_size, question_len).tolist()
        requests += [(context, [int(c)]) for c in rng.choice(cfg.vocab_size, 4, replace=False)]
    scorer = Scorer(model, batch_size=8)
    batch, prompt_len, new_tokens = (int(x) for x in _DECODE_SHAPE.value)
    lengths = [prompt_len] if batch == 1 else rng.integers(prompt_len // 2, prompt_len + 1, batch)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)).tolist() for n in lengths]

    def score() -> dict:
        out = scorer.loglikelihood_tokens(requests)
        return {"logprobs": [lp for lp, _ in out], "greedy": [bool(g) for _, g in out]}

    def decode() -> dict:
        return {"tokens": generate(model, prompts, max_new_tokens=new_tokens)}

    return {"score": score, "decode": decode}


def worker_main(case: Case) -> None:
    """Serves one backend's calls: reads a task name per stdin line, answers one JSON line per call."""
    tasks = worker_tasks(case)
    ready = {"dots": dot_library(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(_PROTOCOL + json.dumps(ready), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            return
        start, start_cpu = time.perf_counter(), time.process_time()
        result = tasks[name]()
        result.update(s=time.perf_counter() - start, cpu=time.process_time() - start_cpu)
        print(_PROTOCOL + json.dumps(result), flush=True)


class Worker:
    """A worker process running imitax with one dot backend (``--xla_backend``, set before JAX starts)."""

    def __init__(self, case: Case, backend: str, log_dir: str):
        argv = [
            sys.executable, os.path.abspath(__file__), "--worker", f"--xla_backend={backend}", f"--model={case.key}",
            f"--llama_layers={_LLAMA_LAYERS.value}", f"--scan_layers={_SCAN_LAYERS.value}",
            f"--score_shape={','.join(_SCORE_SHAPE.value)}", f"--decode_shape={','.join(_DECODE_SHAPE.value)}",
            f"--smoke={_SMOKE.value}",
        ]  # fmt: skip
        if _CAUSAL_BLOCK.value is not None:
            argv.append(f"--causal_block={_CAUSAL_BLOCK.value}")
        # The worker's --xla_backend must be what sets its XLA_FLAGS: drop any from this process.
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_backend.MARKER)}
        self.backend, self.log = backend, os.path.join(log_dir, f"worker_{backend}.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        self.ready = self._answer()
        if self.ready["dots"] != _DOT_KIND[backend]:
            raise RuntimeError(f"worker for {backend} runs its dots with {self.ready['dots']} (log: {self.log})")

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_PROTOCOL):
                return json.loads(line[len(_PROTOCOL) :])
        with open(self.log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"worker for {self.backend} exited with {self.proc.wait()}:\n{tail}")

    def call(self, task: str) -> dict:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def bench_workers(case: Case, tasks: list[str], iters: int) -> tuple[list[list[str]], list[str]]:
    """Scoring and decoding per dot backend, round-robin over the backends' workers; rows and notes."""
    import tempfile

    backends = _XLA_BACKENDS.value
    notes = []
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {(t, b): [] for t in tasks for b in backends}
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        workers = {}
        try:
            for b in backends:
                start = time.perf_counter()
                workers[b] = Worker(case, b, log_dir)
                notes.append(
                    f"{case.name} worker[{b}]: started in {time.perf_counter() - start:.0f} s, XLA_FLAGS="
                    f"{workers[b].ready['xla_flags']!r}, its matmuls run as {workers[b].ready['dots']}"
                )
            for round_ in range(_WARMUP.value + iters):
                for task in tasks:
                    for b in backends:
                        out = workers[b].call(task)
                        if round_ < _WARMUP.value:
                            if round_ == 0:
                                notes.append(f"{case.name} {task}[{b}]: first call (compiling) {out['s']:.1f} s")
                            continue
                        samples[(task, b)].append((out["s"], out["cpu"]))
                        results[(task, b)] = out
        finally:
            for w in workers.values():
                w.close()

    prefix_len, question_len, questions = (int(x) for x in _SCORE_SHAPE.value)
    batch, prompt_len, new_tokens = (int(x) for x in _DECODE_SHAPE.value)
    work = {
        "score": (
            f"{questions * 4} requests ({prefix_len}-token shared prefix + {questions} x {question_len})",
            prefix_len + questions * question_len,
        ),
        "decode": (f"{batch} prompts <= {prompt_len} tokens, {new_tokens} new", batch * new_tokens),
    }
    rows = []
    base = backends[0]
    for task in tasks:
        timings = {b: common.Timing(*map(tuple, zip(*samples[(task, b)], strict=True))) for b in backends}
        for b in backends:
            t = timings[b]
            rows.append(
                [
                    case.name,
                    task,
                    f"imitax[{b}]",
                    work[task][0],
                    f"{work[task][1] / t.median:.0f}",
                    f"{common.paired_speedup(t, timings[base]):.2f}x",
                    f"{t.median:.2f}",
                    f"{t.cpu_median:.2f}",
                    f"{t.spread:.0%}",
                ]
            )
        # The same weights and inputs: the backends must agree (float rounding apart).
        ref = results[(task, base)]
        for b in backends[1:]:
            out = results[(task, b)]
            if task == "score":
                diff = max(abs(x - y) for x, y in zip(out["logprobs"], ref["logprobs"], strict=True))
                same = sum(x == y for x, y in zip(out["greedy"], ref["greedy"], strict=True))
                notes.append(
                    f"{case.name} score[{b}] vs [{base}]: max |logprob diff| {diff:.1e}, "
                    f"is_greedy equal {same}/{len(ref['greedy'])}"
                )
            else:
                pairs = [
                    (x, y) for r, q in zip(out["tokens"], ref["tokens"], strict=True) for x, y in zip(r, q, strict=True)
                ]
                same = sum(x == y for x, y in pairs)
                notes.append(f"{case.name} decode[{b}] vs [{base}]: greedy tokens equal {same}/{len(pairs)}")
    return rows, notes


def bench_dots(case: Case, iters: int) -> tuple[list[list[str]], list[str]]:
    """The model's weight matmuls (``rows x hidden @ hidden x out``) alone, per dot backend, round-robin.

    Decoding multiplies a few rows (the batch) by every weight matrix; prefill, scoring and training
    multiply ``batch x seq`` rows. The libraries' per-call costs differ most at few rows.
    """
    cfg = case.cfg
    rng = np.random.default_rng(0)
    rows = []
    for out_dim, what in ((cfg.mlp_dim, "MLP up"), (cfg.vocab_size, "LM head")):
        w = jnp.asarray(rng.standard_normal((cfg.hidden_size, out_dim), dtype=np.float32))
        for m in sorted({1, 8, 64, 256, case.batch * case.seq}):
            x = jnp.asarray(rng.standard_normal((m, cfg.hidden_size), dtype=np.float32))
            flops = 2.0 * m * cfg.hidden_size * out_dim
            reps = max(1, int(2e9 / flops))  # ~2 GFLOP per timed call, so small dots are not all overhead
            fns = {}
            for backend in _XLA_BACKENDS.value:
                dot = jax.jit(jnp.dot, compiler_options=dict(common.XLA_DOT_BACKENDS[backend])).lower(x, w).compile()
                fns[backend] = lambda dot=dot, x=x, w=w, n=reps: jax.block_until_ready([dot(x, w) for _ in range(n)])
            t = common.time_interleaved(fns, warmup=1, iters=iters)
            base = _XLA_BACKENDS.value[0]
            rows.append(
                [case.name, f"{what}: {m}x{cfg.hidden_size} @ {cfg.hidden_size}x{out_dim}"]
                + [f"{t[b].median / reps * 1e3:.2f} ms ({flops * reps / t[b].median / 1e9:.0f})" for b in fns]
                + [f"{common.paired_speedup(t[b], t[base]):.2f}x" for b in list(fns)[1:]]
            )
    return rows, []


WORKER_HEADERS = ["model", "task", "impl", "work", "tokens/s", "vs first", "median s", "CPU s", "spread"]


def main(argv):
    del argv
    unknown = set(_XLA_BACKENDS.value) - set(common.XLA_DOT_BACKENDS)
    if unknown:
        raise app.UsageError(f"unknown --xla_backends {sorted(unknown)}; known: {sorted(common.XLA_DOT_BACKENDS)}")
    tasks = [t for t in ("forward", "dots", "score", "decode") if t in _TASKS.value]
    if set(_TASKS.value) - set(tasks):
        known = "forward, dots, score, decode"
        raise app.UsageError(f"unknown --tasks {sorted(set(_TASKS.value) - set(tasks))}; known: {known}")
    if _CAUSAL_BLOCK.value is not None:
        # Read when the forward pass is traced; 0 turns the blocks off.
        layers.CAUSAL_BLOCK = _CAUSAL_BLOCK.value or 2**31
    if _WORKER.value:
        worker_main(cases(_SMOKE.value)[0])
        return
    common.check_xla_flags()
    threads = _TORCH_THREADS.value or os.cpu_count()
    torch.set_num_threads(threads)
    iters = 2 if _SMOKE.value else _ITERS.value
    print(common.environment(), flush=True)

    notes = []
    if "forward" in tasks:
        sizes = [256] if _SMOKE.value else [int(s) for s in _PEAK_SIZES.value]
        probe = None
        if sizes:
            backends = {b: common.XLA_DOT_BACKENDS[b] for b in _XLA_BACKENDS.value}
            peak_iters = min(iters, _PEAK_ITERS.value)
            peaks = common.matmul_peaks(
                sizes, xla_backends=backends, torch_threads=threads, iters=peak_iters, dtype=_DTYPE.value
            )
            rows = [[lib, *(f"{peaks[lib][n]:.0f}" for n in sizes), f"{max(peaks[lib].values()):.0f}"] for lib in peaks]
            print(f"\n{_DTYPE.value} matmul, GFLOP/s (median of {peak_iters}, round-robin):")
            print(common.format_table(["library", *(f"{n}^3" for n in sizes), "peak"], rows), flush=True)
            # The peak above is one moment's; MFU is against a probe of max(sizes)^3 matmuls run in every
            # round beside the forward passes (the fastest library that round), as the load drifts.
            reps = 1 if _SMOKE.value else 3
            probe = common.MatmulProbe(max(sizes), reps=reps, xla_backends=backends, dtype=_DTYPE.value)
            notes.append(f"MFU: against each round's fastest {max(sizes)}^3 matmul (3 per library per round)")

        rows = []
        for case in cases(_SMOKE.value):
            case_rows, case_notes = bench_case(case, probe, iters)
            rows += case_rows
            notes += case_notes
            print(common.format_table(HEADERS, case_rows), flush=True)
        what = f"{_DTYPE.value} weights and compute"
        print(f"\nforward pass, {what}, medians of {iters} rounds after {_WARMUP.value} warm-up:")
        print(common.format_table(HEADERS, rows), flush=True)

    if "dots" in tasks:
        rows = []
        for case in cases(_SMOKE.value):
            rows += bench_dots(case, iters)[0]
        others = _XLA_BACKENDS.value[1:]
        print(f"\nthe model's weight matmuls alone, ms per dot (GFLOP/s), medians of {iters} round-robin rounds:")
        headers = ["model", "dot", *_XLA_BACKENDS.value, *(f"{b} vs {_XLA_BACKENDS.value[0]}" for b in others)]
        print(common.format_table(headers, rows), flush=True)

    worker_tasks_ = [t for t in tasks if t in ("score", "decode")]
    if worker_tasks_:
        rows = []
        for case in cases(_SMOKE.value):
            case_rows, case_notes = bench_workers(case, worker_tasks_, iters)
            rows += case_rows
            notes += case_notes
        print(
            f"\nscoring and greedy decoding, imitax per dot backend (one worker process each), medians of {iters} "
            f"round-robin rounds after {_WARMUP.value} warm-up; tokens/s: tokens run (score) or generated (decode); "
            f"'vs first': paired speed-up over imitax[{_XLA_BACKENDS.value[0]}]:"
        )
        print(common.format_table(WORKER_HEADERS, rows))
    print("\n".join(["", *notes, common.environment()]))


if __name__ == "__main__":
    app.run(main)
