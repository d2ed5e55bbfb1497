r"""Train-step throughput and memory of imitax vs transformers + PyTorch AdamW, in one run.

  python benchmarks/train_benchmark.py                       # GPT-2-124M 8x512, LLaMA-1B 2x512
  python benchmarks/train_benchmark.py --model=gpt2 --iters=3
  python benchmarks/train_benchmark.py --model=llama1b --llama_layers=4   # less memory
  python benchmarks/train_benchmark.py --model=llama1b_full  # all 16 layers (imitax alone needs ~21 GiB)
  python benchmarks/train_benchmark.py --model=gpt2 --xla_backends=ynn,onednn --profile   # where the time goes
  python benchmarks/train_benchmark.py --smoke               # tiny shapes, seconds
  python benchmarks/train_benchmark.py --model=llama1b_full --dtype=bfloat16 --peak_sizes=8192   # on a GPU

What one run measures, in this order:

1. The float32 matmul peak of each XLA dot backend and of PyTorch: MFU is quoted against the
   faster of them (the machine's real limit, measured now: the machine is shared and noisy).
2. Per model: a randomly initialized transformers model (float32, SDPA attention, dropout off)
   and an imitax model holding the same weights. imitax's train step is the trainer's own:
   ``optim.make_optimizer`` (AdamW with global-norm clipping 1.0), ``state.create_train_state``,
   ``step.jit_train_step`` (explicit shardings, donated state), on one CPU device. PyTorch's is
   ``zero_grad; loss = model(input_ids, labels=input_ids).loss; backward; clip_grad_norm_(1.0);
   AdamW.step()`` with the same hyperparameters. Both see the same batch of random tokens and
   put the loss on the same ``seq - 1`` next-token targets per row; their first losses must agree.
3. Steps are timed round-robin after warm-up, medians reported (compile time excluded, shown
   apart), with a matmul probe in every round (each step's MFU is against its round's rate).
   FLOPs per token are the trainer's own count (``metrics.train_flops_per_token``: 6 x matmul
   weights + the full seq x seq attention), the same for both implementations. Beside the
   targets (>= 1.2x PyTorch's step at >= 65% MFU): each step's process CPU seconds, kernel
   seconds and minor page faults (``getrusage``), which tell work from waiting on a loaded machine.
4. Memory: imitax's compiled step's memory analysis (arguments, outputs aliased to the donated
   inputs, temporaries) in bytes per parameter; the bytes of live JAX arrays before and after the
   timed steps (the same: one train state at a time, each step's output replacing its donated
   input); PyTorch's parameter + gradient + AdamW-state bytes per parameter.

When both implementations of a model do not fit in memory together (``MemAvailable``), they run
one after the other (imitax first, freed, then PyTorch with the same seed's weights) instead of
round-robin (``--order`` forces either); the notes say so. A phase that would not fit at all is
skipped with a note.

``--profile`` then times the step's parts compiled apart (forward + loss, forward + backward,
the optimizer update) and traces whole steps with ``jax.profiler``: XLA:CPU records one event
per executed HLO op, and each op's own time is filed by kind (matmuls by role, other fusions,
buffer fills, copies) and phase (forward, backward, update) read from the compiled HLO.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common, profiling  # noqa: E402
from imitax import models, sharding  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.train import metrics, optim  # noqa: E402
from imitax.train import state as train_state  # noqa: E402
from imitax.train import step as train_step  # noqa: E402

_MODEL = flags.DEFINE_enum(
    "model",
    "all",
    ["gpt2", "llama1b", "llama1b_full", "all"],
    "Which model shape: llama1b has --llama_layers layers, llama1b_full all 16 (~0.95B parameters); all: gpt2 and "
    "llama1b.",
)
_ITERS = flags.DEFINE_integer("iters", 3, "Timed steps per implementation (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps per implementation before timing.")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: 8 for gpt2, 2 for llama1b).")
_SEQ = flags.DEFINE_integer("seq", 512, "Sequence length.")
_LLAMA_LAYERS = flags.DEFINE_integer("llama_layers", 16, "Layers of the LLaMA shape (16: ~0.95B parameters).")
_XLA_BACKENDS = flags.DEFINE_list(
    "xla_backends", ["ynn"], f"XLA dot backends to compile imitax's step with (of {sorted(common.XLA_DOT_BACKENDS)})."
)
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["2048"], "Square matmul sizes for the peak (the largest: the probe).")
_PROBE_REPS = flags.DEFINE_integer("probe_reps", 5, "Matmuls per library per round in the roofline probe.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: one per CPU).")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "imitax rematerialization.")
_ORDER = flags.DEFINE_enum(
    "order",
    "auto",
    ["auto", "round_robin", "sequential"],
    "auto: round-robin when both implementations fit in memory together, else one after the other.",
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes and few iterations: checks that the script runs.")
# bfloat16: mixed precision on both sides (float32 weights and AdamW state, bfloat16 compute; torch.autocast).
_DTYPE = common.define_dtype_flag()
_PROFILE = flags.DEFINE_bool(
    "profile",
    False,
    "After the timing, per XLA dot backend: time the step's parts apart (forward + loss, forward + backward, "
    "optimizer update) and trace whole steps for each HLO op's own time, by kind of work.",
)
_PROFILE_ITERS = flags.DEFINE_integer("profile_iters", 3, "Timed rounds of the parts, and traced steps, per backend.")

# The targets: imitax's step against PyTorch's (raw time ratio, same run) and its MFU.
TARGET_SPEEDUP, TARGET_MFU = 1.2, 0.65


def target(name: str, timings: dict[str, common.Timing], mfu: dict[str, float]) -> str:
    """Whether an imitax row meets both targets ('-' for torch, or without a torch row to compare with)."""
    if name == "torch" or "torch" not in timings:
        return "-"
    speedup = timings["torch"].median / timings[name].median
    missed = [what for what, ok in (("speed", speedup >= TARGET_SPEEDUP), ("MFU", mfu[name] >= TARGET_MFU)) if not ok]
    return "met" if not missed else "missed: " + ", ".join(missed)


# AdamW as both implementations run it (PyTorch's default betas and decay, clipping as the trainer).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1.0
GIB = 2**30
# How far the two first losses may differ before the notes warn (bfloat16 rounds each matmul's inputs).
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cfg: models.TransformerConfig
    batch: int
    seq: int


def cases(smoke: bool) -> list[Case]:
    """The model shapes (random weights; nothing is downloaded)."""
    gpt2 = models.preset("gpt2")
    # LLaMA-shaped, ~0.95B parameters with 16 layers: TinyLlama's widths, full multi-head attention.
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
        llama = llama.replace(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=160)
        batch, seq = batch or 2, min(seq, 64)
    options = dict(dtype=_DTYPE.value, param_dtype="float32", scan_layers=True, remat=_REMAT.value)
    full = llama.replace(num_layers=2 if smoke else 16)
    out = {
        "gpt2": Case(f"gpt2-{gpt2.num_params() / 1e6:.0f}m", gpt2.replace(**options), batch or 8, seq),
        "llama1b": Case(f"llama-{llama.num_params() / 1e6:.0f}m", llama.replace(**options), batch or 2, seq),
        "llama1b_full": Case(f"llama-{full.num_params() / 1e6:.0f}m", full.replace(**options), batch or 2, seq),
    }
    return [out[m] for m in (["gpt2", "llama1b"] if _MODEL.value == "all" else [_MODEL.value])]


def mem_available() -> int:
    """Bytes the kernel could give this process now (``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def hf_model(cfg: models.TransformerConfig) -> torch.nn.Module:
    """transformers' model of ``cfg``, float32 weights, SDPA attention, no dropout; seeded (same weights every call).

    On PyTorch's device (:func:`common.torch_device`); :class:`TorchStep` computes in ``--dtype`` with autocast.
    """
    torch.manual_seed(0)
    hf_cfg = cfg.to_hf_config()
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(hf_cfg, name):
            setattr(hf_cfg, name, 0.0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.to(common.torch_device()).train()


def batches(case: Case) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """One batch of random tokens for both: the loss on each row's ``seq - 1`` next tokens."""
    tokens = np.random.default_rng(0).integers(0, case.cfg.vocab_size, (case.batch, case.seq), dtype=np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.ones(tokens.shape, np.float32)
    mask[:, -1] = 0  # transformers' labels=input_ids shifts the same way: no target after the last token
    batch = {
        "inputs": tokens,
        "targets": targets,
        "loss_mask": mask,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(case.seq, dtype=np.int32), tokens.shape).copy(),
    }
    return batch, torch.from_numpy(tokens.astype(np.int64)).to(common.torch_device())


def optimizer_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=LR,
            schedule="constant",
            warmup_steps=0,
            final_lr_fraction=0.0,
            weight_decay=WEIGHT_DECAY,
            b1=BETAS[0],
            b2=BETAS[1],
            eps=EPS,
            clip_norm=CLIP,
            mu_dtype="float32",
        )
    )


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


class ImitaxStep:
    """imitax's train step on one device, compiled per XLA dot backend, sharing one train state.

    Compiled against abstract shapes first, so that its exact memory needs are known before
    anything big is allocated; :meth:`load` then creates the train state.
    """

    def __init__(self, case: Case, notes: list[str]):
        self.case = case
        abstract = models.abstract_model(case.cfg)
        self.mesh = sharding.make_mesh("fsdp=-1", devices=jax.devices()[:1])
        self.optimizer, schedule = optim.make_optimizer(optimizer_config(), total_steps=1000)
        self.shardings = train_state.state_shardings(abstract, self.optimizer, self.mesh)
        batch_sharding = sharding.batch_sharding(self.mesh)
        np_batch, _ = batches(case)
        with jax.set_mesh(self.mesh):
            self.batch = {k: jax.device_put(v, batch_sharding) for k, v in np_batch.items()}
            fn = train_step.make_train_step(nnx.graphdef(abstract), self.optimizer, schedule)
            jitted = train_step.jit_train_step(fn, self.shardings, batch_sharding)
            abstract_state = train_state.abstract_train_state(abstract, self.optimizer, self.shardings)
            start = time.perf_counter()
            lowered = jitted.lower(abstract_state, self.batch)
            self.compiled = {}
            for backend in _XLA_BACKENDS.value:
                self.compiled[backend] = lowered.compile(compiler_options=dict(common.XLA_DOT_BACKENDS[backend]))
                notes.append(f"{case.name} imitax[{backend}]: lower+compile {time.perf_counter() - start:.1f} s")
                start = time.perf_counter()
        self.analysis = self.compiled[_XLA_BACKENDS.value[0]].memory_analysis()
        a = self.analysis
        self.peak = a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes
        self.state = None

    def load(self, params: dict) -> None:
        """Creates the train state around ``params`` (numpy, as ``core.params_from_hf`` makes them)."""
        model = core.model_from_params(self.case.cfg, params)
        with jax.set_mesh(self.mesh):
            self.state = train_state.create_train_state(model, self.optimizer, self.shardings, seed=0)
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))

    def load_random(self) -> None:
        """Creates the train state around imitax's own random initialization (no second copy of the weights)."""
        with jax.set_mesh(self.mesh):
            model = models.init_model(self.case.cfg, mesh=self.mesh, seed=0)
            self.state = train_state.create_train_state(model, self.optimizer, self.shardings, seed=0)
        del model
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))

    def step(self, backend: str) -> float:
        """One step (the state is donated and replaced); returns the loss of the weights it started from."""
        with jax.set_mesh(self.mesh):
            old = jax.tree.leaves(self.state)[0]
            self.state, out = self.compiled[backend](self.state, self.batch)
            jax.block_until_ready((self.state, out))
        assert old.is_deleted(), "the train state was not donated: two copies were alive"
        return float(out["loss"])


class TorchStep:
    """transformers + torch.optim.AdamW, the same work as the imitax step."""

    def __init__(self, case: Case, model: torch.nn.Module):
        self.model = model
        _, self.tokens = batches(case)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        device, dtype = self.tokens.device.type, common.torch_dtype(_DTYPE.value)
        with torch.autocast(device, dtype=dtype, enabled=_DTYPE.value != "float32"):
            loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        return float(loss.detach())

    def state_bytes(self) -> int:
        """Parameters, gradients and AdamW's two moments (after at least one step)."""
        total = 0
        for p in self.model.parameters():
            total += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
            for value in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += value.numel() * value.element_size()
        return total


# -- profile: the step's parts, and each HLO op's time ------------------------------------------------


def profile_tables(case: Case, jx: ImitaxStep, iters: int) -> str:
    """The step's parts timed apart, and each backend's traced steps by kind of work (a printable report)."""
    cfg, graphdef = case.cfg, nnx.graphdef(models.abstract_model(case.cfg))
    optimizer = jx.optimizer

    def loss(params, batch):
        return train_step.loss_terms(graphdef, params, batch)[0]

    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    parts = {"forward + loss": loss, "forward + backward": jax.grad(loss), "optimizer update": update}
    fns: dict[str, Callable[[], Any]] = {}
    with jax.set_mesh(jx.mesh):
        params = lambda: jx.state.params  # the step donates and replaces the state: read it at each call
        grads = jax.jit(jax.grad(loss))(jx.state.params, jx.batch)
        args = {
            "forward + loss": lambda: (params(), jx.batch),
            "forward + backward": lambda: (params(), jx.batch),
            "optimizer update": lambda: (grads, jx.state.opt_state, params()),
        }
        for backend in jx.compiled:
            options = dict(common.XLA_DOT_BACKENDS[backend])
            for part, fn in parts.items():
                compiled = jax.jit(fn).lower(*args[part]()).compile(compiler_options=options)
                # Blocks on the whole output: common.block waits for a single array only.
                fns[f"{part} [{backend}]"] = lambda c=compiled, a=args[part]: jax.block_until_ready(c(*a()))
            fns[f"whole step [{backend}]"] = lambda b=backend: jx.step(b)
        timings = common.time_interleaved(fns, warmup=1, iters=iters)

    step_flops = metrics.train_flops_per_token(cfg, case.seq) * case.batch * case.seq
    lines = [f"\n{case.name}: the step's parts, compiled apart, medians of {iters} round-robin rounds:"]
    rows = []
    for backend in jx.compiled:
        whole = timings[f"whole step [{backend}]"].median
        for part in [*parts, "whole step"]:
            t = timings[f"{part} [{backend}]"].median
            rows.append([backend, part, f"{t:.2f}", f"{t / whole:.0%}"])
        fwd, fwd_bwd = (timings[f"{p} [{backend}]"].median for p in ("forward + loss", "forward + backward"))
        upd = timings[f"optimizer update [{backend}]"].median
        rows.append([backend, "backward (fwd+bwd - fwd)", f"{fwd_bwd - fwd:.2f}", f"{(fwd_bwd - fwd) / whole:.0%}"])
        rows.append([backend, "rest (step - fwd+bwd - update)", f"{whole - fwd_bwd - upd:.2f}", ""])
    lines.append(common.format_table(["backend", "part", "median s", "of the step"], rows))

    for backend, compiled in jx.compiled.items():
        if backend == "eigen":
            # Eigen's dots run asynchronously on its thread pool: their events time the dispatch only,
            # and the work lands in whatever op's event is open meanwhile.
            lines.append(f"\n{case.name} imitax[eigen]: no per-op trace (Eigen's dots run asynchronously)")
            continue
        ops = profiling.parse_hlo(compiled.as_text(), cfg.vocab_size)
        totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        phases: dict[tuple[str, str], float] = collections.defaultdict(float)
        per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        walls, unknown = [], 0.0
        with jax.set_mesh(jx.mesh), tempfile.TemporaryDirectory() as logdir:
            for i in range(iters):
                times, wall = profiling.traced_op_times(lambda b=backend: jx.step(b), os.path.join(logdir, str(i)))
                walls.append(wall)
                for name, (calls, seconds) in times.items():
                    op = ops.get(name)
                    if op is None:
                        unknown += seconds
                        continue
                    totals[op.category][0] += seconds
                    totals[op.category][1] += op.flops * calls
                    matmul = "matmul" if op.flops else "other"
                    phases[(op.phase, matmul)] += seconds
                    per_op[name][0] += calls
                    per_op[name][1] += seconds
        op_time = sum(t for t, _ in totals.values()) + unknown
        wall = float(np.median(walls))
        lines.append(
            f"\n{case.name} imitax[{backend}]: {iters} traced steps, median wall {wall:.2f} s; HLO ops' own time "
            f"{op_time / iters:.2f} s per step ({op_time / iters / wall:.0%} of the wall time; the rest: dispatch "
            f"and waiting); {step_flops / 1e12:.2f} TFLOP counted per step (6 x weights + attention)"
        )
        rows = [
            [
                cat,
                f"{t / iters:.2f}",
                f"{t / op_time:.0%}",
                f"{f / iters / 1e9:.0f}",
                f"{f / t / 1e9:.0f}" if f else "-",
            ]
            for cat, (t, f) in sorted(totals.items(), key=lambda kv: -kv[1][0])
        ]
        if unknown:
            rows.append(["(not in the module's text)", f"{unknown / iters:.2f}", f"{unknown / op_time:.0%}", "-", "-"])
        lines.append(common.format_table(["kind of work", "s per step", "share", "GFLOP per step", "GFLOP/s"], rows))
        rows = [
            [phase, f"{phases[(phase, 'matmul')] / iters:.2f}", f"{phases[(phase, 'other')] / iters:.2f}"]
            for phase in ("forward", "backward", "update")
        ]
        lines.append(common.format_table(["phase (from op metadata)", "matmul s", "other s"], rows))
        top = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:15]
        rows = []
        for name, (calls, seconds) in top:
            op = ops[name]
            rate = f"{op.flops * calls / seconds / 1e9:.0f}" if op.flops else "-"
            rows.append([name, op.category, op.phase, op.shape, f"{calls / iters:.0f}", f"{seconds / iters:.3f}", rate])
        lines.append(f"{case.name} imitax[{backend}]: the 15 ops with the most own time (per step):")
        headers = ["HLO op", "kind", "phase", "shape", "runs", "s", "GFLOP/s"]
        lines.append(common.format_table(headers, rows))
    return "\n".join(lines)


def bench_case(case: Case, probe: common.MatmulProbe, iters: int) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """Times one model shape; returns throughput rows, memory rows and notes."""
    cfg = case.cfg
    n = cfg.num_params()
    shape = f"batch {case.batch} x {case.seq}"
    notes = [f"{case.name}: {n / 1e6:.0f}M parameters, {shape}, {cfg.dtype} compute, float32 state"]
    jx = ImitaxStep(case, notes)  # compiled only: its memory analysis tells what it will need
    # PyTorch holds parameters, gradients and two moments (16 B/param) plus activations, taken to be
    # about imitax's temporaries less its gradients (4 B/param, counted in the 16). Building the
    # imitax model from the transformers one holds about 3 copies of the weights at once.
    jax_need = max(jx.peak, 12 * n)
    torch_need = 16 * n + max(jx.analysis.temp_size_in_bytes - 4 * n, 0)
    available = mem_available()
    together = jax_need + torch_need + 4 * n < 0.85 * available
    if _ORDER.value != "auto":
        together = _ORDER.value == "round_robin"
    notes.append(
        f"{case.name}: peaks imitax {jax_need / GIB:.1f} GiB (compiled), torch ~{torch_need / GIB:.1f} GiB; "
        f"{available / GIB:.1f} GiB available: {'round-robin' if together else 'one after the other'}"
    )
    timings: dict[str, common.Timing] = {}
    peaks: dict[str, list[float]] = {}  # each implementation's rounds' rooflines
    first_loss: dict[str, float] = {}
    memory_rows: list[list[str]] = []
    profile: list[str] = []
    usage: dict[str, list[tuple[int, float]]] = {}  # per step: (minor page faults, kernel CPU s)
    warmup = max(_WARMUP.value - 1, 0)  # the first step (checking the loss) is a warm-up step too

    def timed(fns):
        out = common.time_interleaved(
            {**{n: counted(n, f) for n, f in fns.items()}, **probe.fns}, warmup=warmup, iters=iters
        )
        for name in fns:
            timings[name], peaks[name] = out[name], probe.peaks(out)
            usage[name] = usage[name][-iters:]  # the timed calls' (warm-up calls come first)

    def counted(name, fn):
        """``fn``, recording each call's minor page faults and kernel CPU seconds (the whole process's)."""

        def call():
            before = resource.getrusage(resource.RUSAGE_SELF)
            out = fn()
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage.setdefault(name, []).append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
            return out

        return call

    def first_steps() -> float:
        """One untimed step per compiled backend; the first one's loss (later ones start from updated weights)."""
        return [jx.step(backend) for backend in jx.compiled][0]

    def load_imitax(hf) -> None:
        jx.load(core.params_from_hf(cfg, {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}))
        first_loss["imitax"] = first_steps()

    def imitax_memory(before: int) -> None:
        a = jx.analysis
        memory_rows.append(
            [
                case.name,
                "imitax",
                f"{jx.state_bytes / n:.1f}",
                f"{a.alias_size_in_bytes / n:.1f}",
                f"{a.temp_size_in_bytes / n:.1f}",
                f"{jx.peak / n:.1f}",
                f"{before / GIB:.2f} -> {live_bytes() / GIB:.2f}",
            ]
        )

    def torch_memory(runner: TorchStep) -> None:
        memory_rows.append([case.name, "torch", f"{runner.state_bytes() / n:.1f}", "-", "-", "-", "-"])

    imitax_fns = {f"imitax[{b}]": (lambda b=b: jx.step(b)) for b in jx.compiled}
    if together:
        hf = hf_model(cfg)
        load_imitax(hf)
        pt = TorchStep(case, hf)
        first_loss["torch"] = pt.step()
        before = live_bytes()
        timed({**imitax_fns, "torch": pt.step})
        imitax_memory(before)
        torch_memory(pt)
        if _PROFILE.value:
            profile.append(profile_tables(case, jx, _PROFILE_ITERS.value))
    else:
        if jax_need < 0.9 * available:
            if jax_need + 8 * n < 0.9 * available:
                hf = hf_model(cfg)
                load_imitax(hf)
                del hf
                gc.collect()
            else:
                # No room for the transformers model and a numpy copy beside the train state: imitax's
                # own initialization instead, so the two start from different weights (same FLOPs).
                jx.load_random()
                first_steps()
                notes.append(
                    f"{case.name}: imitax initialized at random by itself (no room for a copy of the transformers "
                    "weights), so the first losses are not compared"
                )
            before = live_bytes()
            timed(imitax_fns)
            imitax_memory(before)
            if _PROFILE.value:
                profile.append(profile_tables(case, jx, _PROFILE_ITERS.value))
        else:
            notes.append(f"{case.name}: imitax skipped, it would not fit in {available / GIB:.1f} GiB")
        jx.state = None
        del imitax_fns
        gc.collect()
        if torch_need < 0.9 * mem_available():
            pt = TorchStep(case, hf_model(cfg))
            first_loss["torch"] = pt.step()
            timed({"torch": pt.step})
            torch_memory(pt)
            del pt
            gc.collect()
        else:
            notes.append(f"{case.name}: torch skipped, it would not fit in {mem_available() / GIB:.1f} GiB")

    # The same weights and batch must give the same first loss, or the timing compares different work.
    if len(first_loss) == 2:
        diff = abs(first_loss["imitax"] - first_loss["torch"])
        notes.append(
            f"{case.name}: first loss imitax {first_loss['imitax']:.6f}, torch {first_loss['torch']:.6f}"
            + (" -- WARNING: they differ" if diff > LOSS_TOLERANCE[_DTYPE.value] else "")
        )

    step_flops = metrics.train_flops_per_token(cfg, case.seq) * case.batch * case.seq
    tokens = case.batch * case.seq
    mfu = {
        name: [step_flops / t / p for t, p in zip(timings[name].samples, peaks[name], strict=True)] for name in timings
    }
    mfu_median = {name: float(np.median(v)) for name, v in mfu.items()}
    rows = []
    for name, timing in timings.items():
        vs_torch = "-"
        if "torch" in timings:
            # Raw: median times. Normalized: ratio of MFUs, each against its own rounds' roofline
            # (the fair one when the implementations ran at different times of a drifting load).
            vs_torch = f"{timings['torch'].median / timing.median:.2f}x / {mfu_median[name] / mfu_median['torch']:.2f}x"
        rows.append(
            [
                case.name,
                name,
                f"{case.batch}x{case.seq}",
                f"{tokens / timing.median:.0f}",
                f"{step_flops / timing.median / 1e9:.0f}",
                f"{float(np.median(peaks[name])) / 1e9:.0f}",
                f"{mfu_median[name]:.0%}",
                vs_torch,
                target(name, timings, mfu_median),
                f"{timing.median:.2f}",
                f"{timing.cpu_median:.2f}",
                f"{np.median([st for _, st in usage[name]]):.2f}",
                f"{np.median([f for f, _ in usage[name]]) * resource.getpagesize() / GIB:.2f}",
                f"{timing.spread:.0%}",
            ]
        )
    notes.append(f"{case.name}: {step_flops / 1e12:.2f} TFLOP per train step")
    notes.extend(profile)
    return rows, memory_rows, notes


def main(argv):
    del argv
    threads = _TORCH_THREADS.value or os.cpu_count()
    torch.set_num_threads(threads)
    iters = 2 if _SMOKE.value else _ITERS.value
    unknown = set(_XLA_BACKENDS.value) - set(common.XLA_DOT_BACKENDS)
    if unknown:
        raise app.UsageError(f"unknown --xla_backends {sorted(unknown)}; known: {sorted(common.XLA_DOT_BACKENDS)}")
    common.check_xla_flags()
    print(common.environment(), flush=True)

    sizes = [256] if _SMOKE.value else [int(s) for s in _PEAK_SIZES.value]
    backends = {b: common.XLA_DOT_BACKENDS[b] for b in _XLA_BACKENDS.value}
    peaks = common.matmul_peaks(sizes, xla_backends=backends, torch_threads=threads, iters=3, dtype=_DTYPE.value)
    peak_rows = [[lib, *(f"{peaks[lib][n]:.0f}" for n in sizes), f"{max(peaks[lib].values()):.0f}"] for lib in peaks]
    print(f"\n{_DTYPE.value} matmul peak at the start, GFLOP/s (median per size):")
    print(common.format_table(["library", *(f"{n}^3" for n in sizes), "peak"], peak_rows), flush=True)
    reps = 1 if _SMOKE.value else _PROBE_REPS.value
    probe = common.MatmulProbe(max(sizes), reps=reps, xla_backends=backends, dtype=_DTYPE.value)

    headers = [
        "model", "impl", "batch x seq", "tokens/s", "GFLOP/s", "roofline GFLOP/s", "MFU", "vs torch (raw / MFU)",
        f"target >= {TARGET_SPEEDUP}x, >= {TARGET_MFU:.0%}", "median s", "CPU s", "sys s", "faulted GiB", "spread",
    ]  # fmt: skip
    mem_headers = ["model", "impl", "state B/param", "aliased B/param", "temp B/param", "peak B/param", "live GiB"]
    rows, mem_rows, notes = [], [], []
    for case in cases(_SMOKE.value):
        case_rows, case_mem, case_notes = bench_case(case, probe, iters)
        rows += case_rows
        mem_rows += case_mem
        notes += case_notes
        print(common.format_table(headers, case_rows), flush=True)
        gc.collect()
    print(f"\ntrain step (AdamW), {_DTYPE.value} compute, medians of {iters} rounds after {_WARMUP.value} warm-up:")
    print(common.format_table(headers, rows))
    print("\nmemory (imitax: compiled memory analysis; torch: parameters + gradients + AdamW moments):")
    print(common.format_table(mem_headers, mem_rows))
    print("\n".join(["", *notes]))
    print(f"peak RSS of this process: {_max_rss() / GIB:.1f} GiB")
    print(common.environment())


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    app.run(main)
