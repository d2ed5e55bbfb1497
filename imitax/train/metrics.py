"""Throughput accounting (FLOPs, MFU) and metric logging (JSONL + TensorBoard).

FLOPs per trained token (forward + backward = 3x forward), as in the PaLM paper:

    6 * N_matmul + 12 * num_layers * num_heads * head_dim * seq_len

``N_matmul`` counts the parameters that take part in matrix multiplies (every
projection, and the output projection, tied or not; not the embedding lookup,
norms or biases). The attention term counts the full ``seq_len x seq_len``
score and value products, which is what the implementation computes (masked,
not skipped). Rematerialization is not counted: MFU measures useful work.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imitax.models.config import TransformerConfig

# Dense bfloat16 peak FLOP/s per chip (vendor figures), by substring of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def matmul_params(cfg: TransformerConfig) -> int:
    e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = e * d * (2 * h + 2 * k) + e * m * (3 if cfg.gated_mlp else 2)
    return cfg.num_layers * per_layer + e * cfg.vocab_size


def train_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def measure_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """Float32 matmul FLOP/s of this host through XLA (best of ``repeats``)."""
    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_second() -> tuple[float, str]:
    """The whole job's peak FLOP/s and where the figure comes from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        # Virtual CPU devices share the host's cores: the host's peak is the job's peak.
        return measure_cpu_peak() * jax.process_count(), "measured float32 XLA matmul on this host"
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops * jax.device_count(), f"{device.device_kind} bf16 peak x {jax.device_count()}"
    return float("nan"), f"unknown peak for {device.device_kind}"


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

    TensorBoard files are written with tensorboardX, which needs no TensorFlow.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _scalar(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        value = np.asarray(value).item()
    return value
