"""Shared helpers for the benchmark scripts: timing, matmul peaks, FLOP counts, tables.

The development machine is shared and noisy, so every helper here is built to
compare things *within one run*: :func:`time_interleaved` runs the contenders
round-robin (a load spike hits all of them alike) and reports medians, and the
matmul peaks that MFU is quoted against are measured in the same process.

XLA's CPU backend can send dots to different kernel libraries. The options in
:data:`XLA_DOT_BACKENDS` are passed per compilation (``jax.jit(...,
compiler_options=...)``), so one process can time several of them side by side;
:func:`xla_flags_for` gives the equivalent ``XLA_FLAGS`` string for users, which
must be set before JAX initializes its CPU backend.

Every script runs where JAX and PyTorch find an accelerator (JAX's default device; PyTorch's
``cuda`` when available, see :func:`torch_device`) and in the ``--dtype`` that
:func:`define_dtype_flag` defines: float32 by default, as on CPU, or bfloat16. The dot backends
above are XLA:CPU options; on a GPU only ``ynn`` (no options) applies.

Importing this module applies the allocator setting that imitax's scripts apply at start-up
(:func:`imitax.allocator.keep_freed_memory`), so that both imitax and PyTorch run with what a
user of the scripts gets; :func:`environment` says whether it was applied.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from imitax import allocator, xla_backend

# As scripts/train.py and the other scripts do at start-up (skipped when MALLOC_* is set).
KEEP_FREED_MEMORY = allocator.keep_freed_memory()

# Dot kernel libraries of jaxlib 0.10's CPU backend, as per-compile DebugOptions: the library's
# table (imitax.xla_backend), which the scripts' --xla_backend sets through XLA_FLAGS instead.
# 'ynn' is the default (YNNPACK fusions of single dots and of some reductions). Clearing the YNN
# fusion list leaves plain HLO dots, which the runtime runs with Eigen ('eigen'), or which the
# oneDNN fusion pass claims when it is switched on ('onednn').
XLA_DOT_BACKENDS: dict[str, dict[str, Any]] = xla_backend.COMPILE_OPTIONS

# The same settings spelled for the XLA_FLAGS environment variable.
_FLAG_VALUES = {"": "", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT": "individual_dot", True: "true", False: "false"}


def xla_flags_for(options: Mapping[str, Any]) -> str:
    """The ``XLA_FLAGS`` string equivalent to per-compile ``options``."""
    return " ".join(f"--{k}={_FLAG_VALUES.get(v, v)}" for k, v in options.items())


def check_xla_flags() -> None:
    """Refuses an ``XLA_FLAGS`` that picks a dot library: it would leak into every backend compared.

    Per-compile options only override the fields they name, and ``'ynn'`` names none (it is
    XLA's default): under ``XLA_FLAGS=--xla_cpu_use_onednn=true`` the 'ynn' rows would time oneDNN.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    names = {name for options in XLA_DOT_BACKENDS.values() for name in options}
    if any(f"--{name}=" in flags for name in names):
        raise SystemExit(f"error: XLA_FLAGS={flags!r} picks a dot library; unset it: the backends are set per compile")


# -- dtype and device ------------------------------------------------------------------

DTYPES = ("float32", "bfloat16")


def define_dtype_flag() -> flags.FlagHolder[str]:
    """The scripts' ``--dtype``: the models' compute dtype (float32: the CPU default, unchanged)."""
    return flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype of both implementations.")


def torch_dtype(dtype: str):
    """PyTorch's dtype of the same name."""
    import torch

    return getattr(torch, dtype)


def torch_device():
    """``cuda`` when PyTorch sees a GPU, else ``cpu``: PyTorch runs on the same kind of device as JAX."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cast_params(params: Any, dtype: str) -> Any:
    """``params`` (numpy arrays, as ``core.params_from_hf`` makes them) in ``dtype``; float32 is left as is."""
    return params if dtype == "float32" else jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)


def device_summary() -> str:
    """JAX's devices and PyTorch's GPU, if any: one line."""
    line = f"JAX on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}, {jax.device_count()} devices)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        line += f", torch on cuda ({torch.cuda.get_device_name()})"
    return line


# -- timing ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Samples of one callable, in seconds: wall clock, and CPU time of the whole process.

    CPU time (all threads) is a second opinion on a loaded machine: waiting for a
    core inflates wall time but not CPU time (spin-waiting threads inflate both).
    """

    samples: tuple[float, ...]
    cpu_samples: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples) if self.cpu_samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the samples were."""
        return (max(self.samples) - min(self.samples)) / self.median


def block(x: Any) -> Any:
    """Waits for JAX's asynchronous dispatch, and for PyTorch's CUDA stream (CPU results are already done)."""
    torch = sys.modules.get("torch")  # only when a script uses torch: it is not imported here for nothing
    if torch is not None and torch.is_tensor(x) and x.is_cuda:
        torch.cuda.synchronize(x.device)
    return jax.block_until_ready(x) if isinstance(x, jax.Array) else x


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, iters: int = 5) -> dict[str, Timing]:
    """Times each callable ``iters`` times after ``warmup`` untimed calls, round-robin.

    Each round runs every callable once, so slow phases of a shared machine are
    spread over all contenders instead of landing on whichever ran then.
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            block(fn())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: Timing(tuple(wall[name]), tuple(cpu[name])) for name in fns}


def paired_speedup(faster: Timing, baseline: Timing) -> float:
    """Median over rounds of ``baseline / faster`` wall time (samples from one interleaved run).

    Pairing each round's samples cancels load changes slower than one round,
    which a ratio of the two medians does not.
    """
    return statistics.median(b / f for f, b in zip(faster.samples, baseline.samples, strict=True))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``, waiting for the result."""
    start = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - start


# -- matmul peaks --------------------------------------------------------------------


def matmul_peaks(
    sizes: Sequence[int],
    *,
    xla_backends: Mapping[str, Mapping[str, Any]] = XLA_DOT_BACKENDS,
    torch_threads: int | None = None,
    iters: int = 5,
    dtype: str = "float32",
) -> dict[str, dict[int, float]]:
    """Median GFLOP/s of an ``n x n @ n x n`` matmul per library and size.

    Args:
      sizes: the ``n`` values.
      xla_backends: name -> XLA compile options for ``jnp.dot`` (one entry per kernel library).
      torch_threads: threads for ``torch.matmul`` (None: do not time PyTorch).
      iters: timed repetitions per size and library (after one warm-up).
      dtype: operand dtype ("float32" or "bfloat16").

    Returns:
      ``{'xla:<backend>' or 'torch': {n: GFLOP/s}}``.
    """
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, float]] = {}
    for n in sizes:
        a_np, b_np = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        for name, timing in _time_matmuls(a_np, b_np, xla_backends, torch_threads, iters, dtype).items():
            out.setdefault(name, {})[n] = 2 * n**3 / timing.median / 1e9
    return out


def _time_matmuls(a_np, b_np, xla_backends, torch_threads, iters, dtype) -> dict[str, Timing]:
    a, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
    fns: dict[str, Callable[[], Any]] = {}
    for name, options in xla_backends.items():
        compiled = jax.jit(jnp.dot, compiler_options=dict(options)).lower(a, b).compile()
        fns[f"xla:{name}"] = lambda c=compiled: c(a, b)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
        ta, tb = (torch.from_numpy(x).to(torch_device(), torch_dtype(dtype)) for x in (a_np, b_np))
        fns["torch"] = lambda: torch.matmul(ta, tb)
    return time_interleaved(fns, warmup=1, iters=iters)


# -- memory bandwidth ------------------------------------------------------------------


def copy_probes(nbytes: int = 256 * 2**20) -> tuple[dict[str, Callable[[], Any]], int]:
    """STREAM-style copies of ``nbytes`` of float32, to time alongside other work; and the bytes each moves.

    Returns ``({'copy xla': ..., 'copy numpy': ...}, bytes read plus bytes
    written)``: XLA's compiled copy into a donated array of the same size (so it
    writes into existing memory, as STREAM does, instead of faulting in a new
    output each call), and NumPy's ``copyto``.
    """
    n = nbytes // 4
    src = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda s, d: d.at[:].set(s), donate_argnums=1)
    dst = [copy(src, jnp.zeros(n, jnp.float32))]

    def xla_copy():
        dst[0] = copy(src, dst[0])
        return dst[0]

    src_np, dst_np = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    return {"copy xla": xla_copy, "copy numpy": lambda: np.copyto(dst_np, src_np)}, 2 * n * 4


def copy_bandwidth(nbytes: int = 256 * 2**20, iters: int = 5) -> dict[str, float]:
    """Median bytes/s of :func:`copy_probes`' copies: ``{'copy xla': ..., 'copy numpy': ...}``."""
    probes, moved = copy_probes(nbytes)
    return {name: moved / t.median for name, t in time_interleaved(probes, warmup=1, iters=iters).items()}


class MatmulProbe:
    """A few ``n x n`` matmuls (float32, or ``dtype``) per library, timed in the same rounds as the work measured.

    The machine is shared: its free capacity drifts during a run (within minutes, by several
    times). A peak measured once would compare the work with a matmul rate of another moment; a
    probe in every round gives each round its own roofline (the fastest library, that round).
    Add :attr:`fns` to the callables given to :func:`time_interleaved`.
    """

    def __init__(
        self,
        n: int,
        reps: int,
        xla_backends: Mapping[str, Mapping[str, Any]] = XLA_DOT_BACKENDS,
        dtype: str = "float32",
    ):
        import torch

        rng = np.random.default_rng(0)
        a_np, b_np = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        self.flops = 2.0 * n**3 * reps
        self.fns: dict[str, Callable[[], Any]] = {}
        a, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
        for backend, options in xla_backends.items():
            dot = jax.jit(jnp.dot, compiler_options=dict(options)).lower(a, b).compile()
            self.fns[f"matmul[xla:{backend}]"] = lambda dot=dot: jax.block_until_ready([dot(a, b) for _ in range(reps)])
        ta, tb = (torch.from_numpy(x).to(torch_device(), torch_dtype(dtype)) for x in (a_np, b_np))
        self.fns["matmul[torch]"] = lambda: [torch.matmul(ta, tb) for _ in range(reps)][-1]

    def peaks(self, timings: Mapping[str, Timing]) -> list[float]:
        """Each round's roofline, FLOP/s: the fastest library in that round."""
        rates = [[self.flops / t for t in timings[name].samples] for name in self.fns]
        return [max(r) for r in zip(*rates, strict=True)]


# -- FLOP counts -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward pass, split by where they are spent.

    ``matmul``: 2 x (weights that multiply activations) x tokens, i.e. every
    projection in every layer plus the LM head; the embedding lookup, norms,
    biases and activations are not counted. ``attention``: 4 x T x S x heads x
    head_dim per layer and sequence (QK^T and PV), counted over the full T x S
    square (PaLM's convention), although causal kernels may skip the masked half.
    """

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def matmul_params(cfg) -> int:
    """Weights that take part in matmuls: projections of every layer plus the LM head."""
    e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    attn = e * d * (h + 2 * k) + h * d * e
    mlp = e * m * (3 if cfg.gated_mlp else 2)
    return cfg.num_layers * (attn + mlp) + e * cfg.vocab_size


def forward_flops(cfg, batch: int, seq: int) -> ForwardFlops:
    """FLOPs of ``model(tokens[batch, seq])`` for an imitax ``TransformerConfig``."""
    tokens = batch * seq
    attention = 4 * seq * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers * batch
    return ForwardFlops(matmul=2.0 * matmul_params(cfg) * tokens, attention=float(attention))


# -- reporting -----------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (Markdown-compatible pipes)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def environment() -> str:
    """One line naming the software and machine a result came from."""
    import torch
    import transformers

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"load average {load}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, freed memory kept "
        f"(imitax.allocator): {'yes' if KEEP_FREED_MEMORY else 'no'}; {device_summary()}"
    )
