r"""Train-step time and memory of full finetuning, LoRA, and distillation (online and from a top-k cache).

  python benchmarks/distill_benchmark.py                  # GPT-2-124M, 2 x 512 tokens a step
  python benchmarks/distill_benchmark.py --iters=5 --out=benchmarks/results/distill.md
  python benchmarks/distill_benchmark.py --smoke          # tiny shapes, seconds

Every case is the trainer's own step (``step.make_train_step`` and ``step.jit_train_step``: AdamW,
explicit shardings, a donated state) on one CPU device, float32, on the same random batch with
every position carrying loss:

- ``full``: supervised finetuning of every weight (the reference of the ratios), its
  cross-entropy over the vocabulary 256 positions at a time (the trainer's default);
- ``full, loss unchunked``: the same with all 512 positions' logits at once (``loss_chunk_len=0``);
- ``full, remat``: the same as ``full`` with ``remat='full'`` (each layer's activations recomputed
  in the backward pass instead of kept);
- ``lora r16``: ``full`` with rank-16 adapters on the attention and MLP projections (alpha 32),
  the base weights frozen beside the state; ``lora r16, remat``: the same with ``remat='full'``;
- ``kd online``: full finetuning on the forward KL to a same-size teacher run inside the step;
- ``kd cache``: the same loss against a top-k cache (k = 64) read with the batch (both KD cases
  take the logits, the student's and the teacher's, in chunks of 256 positions like ``full``);
- ``gkd``: online KD where every batch is on-policy (``lambda_ = 1``): the student first samples
  every position left to right with its KV cache (512 decode steps), then trains on the teacher's
  divergence on its samples (GKD's cost; at ``lambda_`` < 1 a step costs ``kd online`` or this).

The steps are timed round-robin after a warm-up (compile time apart): "x full" is the median over
rounds of each round's ratio to that round's ``full`` step, in wall time and in this process's CPU
time (the machine is shared: other processes' load slows the wall clock, not the CPU time). Memory is the
compiled step's ``memory_analysis()``: its peak is arguments + outputs - donated (aliased) +
temporaries. "State bytes per base parameter" counts what lives between steps: the train state
(trained weights and their AdamW moments) plus the frozen weights (a LoRA base, a teacher),
divided by the base model's parameter count. Targets: LoRA's peak <= 40% of full finetuning's
(without remat, and with remat on both),
online KD's step <= 1.6x SFT's, cache KD's <= 1.1x. The load average is printed: the machine is
shared.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import models, sharding  # noqa: E402
from imitax.models import lora  # noqa: E402
from imitax.train import config as train_config  # noqa: E402
from imitax.train import distill, optim  # noqa: E402
from imitax.train import gkd as gkd_lib  # noqa: E402
from imitax.train import state as train_state  # noqa: E402
from imitax.train import step as train_step  # noqa: E402

_ITERS = flags.DEFINE_integer("iters", 3, "Timed steps per case (after one warm-up step).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes: checks that the benchmark runs.")
_OUT = flags.DEFINE_string("out", "", "Also write the table to this markdown file.")
TOP_K = 64
KD = distill.KDConfig(loss="forward_kl", temperature=1.0)


def model_config(smoke: bool) -> tuple[models.TransformerConfig, int, int]:
    """``(config, rows, length)``: GPT-2-124M at 2 x 512, or a tiny GPT-2 for ``--smoke``."""
    if smoke:
        tiny = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=256)
        return models.preset("gpt2-124m", **tiny, vocab_size=512, dtype="float32"), 2, 64
    return models.preset("gpt2-124m", dtype="float32"), 2, 512


def batch_of(cfg, rows: int, length: int, cached: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32)
    batch = dict(
        inputs=x,
        targets=np.roll(x, -1, 1),
        loss_mask=np.ones(x.shape, np.float32),
        segment_ids=np.ones_like(x),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), x.shape).copy(),
    )
    if cached:
        ids = np.stack([rng.choice(cfg.vocab_size, TOP_K, replace=False) for _ in range(rows * length)])
        logits = rng.normal(0, 2, (rows * length, TOP_K + 1))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        batch |= {
            "teacher_ids": ids.reshape(rows, length, TOP_K).astype(np.int32),
            "teacher_logp": logp.reshape(rows, length, TOP_K + 1).astype(np.float32),
        }
    return batch


class Case:
    """One compiled step and its state, stepped in place."""

    def __init__(
        self,
        name: str,
        cfg,
        batch,
        *,
        rank: int = 0,
        kd: bool = False,
        online: bool = False,
        gkd=None,
        remat: str = "none",
        chunk_len: int = train_step.LOSS_CHUNK_LEN,
    ):
        self.name = name
        cfg = cfg.replace(remat=remat)
        mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
        opt_cfg = train_config.default_config().optimizer
        opt_cfg.name, opt_cfg.warmup_steps = "adamw", 10
        optimizer, schedule = optim.make_optimizer(opt_cfg, 100)
        model = models.init_model(cfg, mesh=mesh, seed=0)
        self.base_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        trainable, frozen = nnx.Param, {}
        if rank:
            lora.add_adapters(model, lora.LoRAConfig(rank=rank, alpha=2.0 * rank), mesh=mesh)
            trainable, frozen = nnx.LoRAParam, {"base": nnx.state(model, lora.BASE).to_pure_dict()}
        teacher_graphdef = None
        if online:
            teacher = models.init_model(cfg, mesh=mesh, seed=1)
            teacher_graphdef, frozen["teacher"] = nnx.graphdef(teacher), nnx.state(teacher).to_pure_dict()
        shardings = train_state.state_shardings(model, optimizer, mesh, trainable)
        batch_sharding = sharding.batch_sharding(mesh)
        with jax.set_mesh(mesh):
            self.state = train_state.create_train_state(model, optimizer, shardings, 0, trainable)
            fn = train_step.make_train_step(
                nnx.graphdef(model),
                optimizer,
                schedule,
                loss_chunk_len=chunk_len,
                kd=KD if kd else None,
                teacher_graphdef=teacher_graphdef,
                on_policy=gkd,
            )
            frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen) if frozen else None
            jitted = train_step.jit_train_step(
                fn, shardings, batch_sharding, frozen_shardings, cached_teacher="teacher_ids" in batch
            )
            self.batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            self.args = (frozen,) if frozen else ()
            lowered = jitted.lower(self.state, self.batch, *self.args)
            self.compiled, self.compile_s = common.timed(lowered.compile)
        m = self.compiled.memory_analysis()
        self.arguments, self.temporaries = m.argument_size_in_bytes, m.temp_size_in_bytes
        self.peak = self.arguments + m.output_size_in_bytes - m.alias_size_in_bytes + self.temporaries
        live = jax.tree.leaves((self.state.params, self.state.opt_state, frozen))
        self.state_bytes = sum(x.size * x.dtype.itemsize for x in live)

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch, *self.args)
        return metrics["loss"]


def main(argv):
    del argv
    cfg, rows, length = model_config(_SMOKE.value)
    plain, cached = batch_of(cfg, rows, length, False), batch_of(cfg, rows, length, True)
    cases = [
        Case("full", cfg, plain),
        Case("full, loss unchunked", cfg, plain, chunk_len=0),
        Case("full, remat", cfg, plain, remat="full"),
        Case("lora r16", cfg, plain, rank=16),
        Case("lora r16, remat", cfg, plain, rank=16, remat="full"),
        Case("kd online", cfg, plain, kd=True, online=True),
        Case("kd cache", cfg, cached, kd=True),
        Case("gkd", cfg, plain, kd=True, online=True, gkd=gkd_lib.GKDConfig(lambda_=1.0)),
    ]
    load_before = os.getloadavg()
    timings = common.time_interleaved({c.name: c.step for c in cases}, warmup=1, iters=_ITERS.value)
    load_after = os.getloadavg()
    full = cases[0]
    tokens = rows * length
    lines = [
        f"{cfg.model_type}, {full.base_params / 1e6:.1f}M parameters, {rows} x {length} tokens a step, float32, "
        f"1 CPU device ({os.cpu_count()} cores), {_ITERS.value} timed steps each",
        f"load average before {load_before[0]:.1f} / after {load_after[0]:.1f} (1 min)",
        "",
        "| case | step (s, median) | tokens/s | x full step | x full CPU time | state bytes / base param "
        "| arguments (MiB) | temporaries (MiB) | peak memory (MiB) | x full peak | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = timings["full"]
    ratios = {c.name: common.paired_speedup(ref, timings[c.name]) for c in cases}
    for c in cases:
        t, cpu = timings[c.name], timings[c.name].cpu_samples
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu, ref.cpu_samples, strict=True))
        lines.append(
            f"| {c.name} | {t.median:.3f} | {tokens / t.median:,.0f} | {ratios[c.name]:.2f} | {cpu_ratio:.2f} "
            f"| {c.state_bytes / c.base_params:.2f} | {c.arguments / 2**20:,.0f} | {c.temporaries / 2**20:,.0f} "
            f"| {c.peak / 2**20:,.0f} | {c.peak / full.peak:.2f} | {c.compile_s:.1f} |"
        )
    peaks = {c.name: c.peak for c in cases}
    ratios["lora peak"] = peaks["lora r16"] / peaks["full"]
    ratios["lora remat peak"] = peaks["lora r16, remat"] / peaks["full, remat"]
    checks = [
        ("LoRA peak memory", "lora peak", 0.4),
        ("LoRA peak memory, remat on both", "lora remat peak", 0.4),
        ("online KD step", "kd online", 1.6),
        ("cache KD step", "kd cache", 1.1),
    ]
    lines += [
        "",
        "targets (x full finetuning's): "
        + "; ".join(
            f"{what} <= {limit}: {ratios[key]:.2f} ({'met' if ratios[key] <= limit else 'missed'})"
            for what, key, limit in checks
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write("# Distillation and LoRA train steps (benchmarks/distill_benchmark.py)\n\n" + text + "\n")


if __name__ == "__main__":
    app.run(main)
