r"""Compiled temporary memory of a LLaMA-1B-shaped train step, per attention implementation.

  python benchmarks/attention_memory.py                  # 4K and 8K tokens, batch 1, remat full
  python benchmarks/attention_memory.py --seqs=2048,4096 --layers=4

Nothing is allocated: the model is ``models.abstract_model`` (shapes only), the
tokens a ``jax.ShapeDtypeStruct``, and each step is only lowered and compiled;
``compiled.memory_analysis()`` reports what XLA plans for the step's
temporaries (activations saved for the backward pass, attention logits and
probabilities, gradients before they are outputs), arguments and outputs.

The step is a gradient step: ``value_and_grad`` of the mean next-token
cross-entropy over the parameters (no optimizer update, whose memory does not
depend on the attention implementation). The shape is Llama-3.2-1B's trunk
(16 layers, hidden 2048, 32 query heads of 64, 8 KV heads, MLP 8192) with a
32,000-token vocabulary (Llama 3's 128,256 would add ~4 GB of float32 logits
per 8K row that have nothing to do with attention); bfloat16 compute, float32
parameters, ``remat='full'``, ``scan_layers=True``.

Rows, per length:

- ``xla``: imitax's XLA attention (``layers.dot_product_attention``: float32
  logits per query block of ``CAUSAL_BLOCK`` rows, keys after the block skipped).
- ``jax.nn xla (cuDNN call)``: the call the ``cudnn`` path makes,
  ``jax.nn.dot_product_attention``, with ``implementation='xla'`` (the
  platform stood in for as the tests do): the whole ``[b, h, t, s]`` float32
  logits at once. Not selectable; shown because it is what the cuDNN path's
  call costs wherever cuDNN itself is absent.
- ``cudnn``, ``splash``: need a GPU (cuDNN's custom call) and a TPU (the Mosaic
  kernel) to compile; on other machines the table says so.

On the 2-core CPU development machine (JAX 0.10.2, 16 layers, batch 1)::

    tokens  attention                 temp GiB  args GiB  out GiB compile s
      4096  xla                           5.32      4.11     4.11      47.6
      4096  jax.nn xla (cuDNN call)       9.95      4.11     4.11      13.1
      4096  cudnn                    needs a GPU to compile (this is cpu)
      4096  splash                   needs a TPU to compile (this is cpu)
      8192  xla                          18.98      4.11     4.11     127.9
      8192  jax.nn xla (cuDNN call)      37.75      4.11     4.11       7.5
      8192  cudnn                    needs a GPU to compile (this is cpu)
      8192  splash                   needs a TPU to compile (this is cpu)

The XLA path's temporaries grow 3.6x from 4K to 8K: quadratic, its per-block
float32 logits and probabilities of one (rematerialized) layer (32 heads x
t^2 / 2 x 4 bytes = 4.3 GiB at 8K for the logits alone) held together for the
backward pass. The flash kernels keep per-row softmax statistics instead; the
cuDNN path adds only its ``[b, 1, t, s]`` bias (128 MiB per row at 8K in
bfloat16, per layer).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from imitax import models  # noqa: E402
from imitax.models import layers  # noqa: E402

GIB = 2**30

_SEQS = flags.DEFINE_list("seqs", ["4096", "8192"], "Tokens per row, one table block each.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per step.")
_LAYERS = flags.DEFINE_integer("layers", 16, "Layers of the LLaMA-1B shape.")


def llama1b(num_layers: int, attention_impl: str) -> models.TransformerConfig:
    """Llama-3.2-1B's trunk with a 32,000-token vocabulary (see the module docstring)."""
    return models.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=num_layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        max_position_embeddings=131072,
        norm_eps=1e-5,
        rope_theta=500000.0,
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        scan_layers=True,
        attention_impl=attention_impl,
    )


def compiled_memory(cfg: models.TransformerConfig, seq: int, batch: int):
    """``(memory_analysis, compile seconds)`` of the gradient step, compiled from shapes only."""
    graphdef, params = nnx.split(models.abstract_model(cfg))

    def step(params, tokens_bt):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens_bt)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_bt[:, 1:]).mean()

        return jax.value_and_grad(loss_fn)(params)

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, tokens).compile()
    return compiled.memory_analysis(), time.perf_counter() - start


def variants():
    """``(row name, attention_impl, platform stand-in or None, why it cannot compile here or None)``."""
    platform = jax.default_backend()
    return [
        ("xla", "xla", None, None),
        ("jax.nn xla (cuDNN call)", "cudnn", "gpu", None),
        ("cudnn", "cudnn", None, None if platform == "gpu" else f"needs a GPU to compile (this is {platform})"),
        ("splash", "splash", None, None if platform == "tpu" else f"needs a TPU to compile (this is {platform})"),
    ]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    seqs = [int(s) for s in _SEQS.value]
    batch, num_layers = _BATCH.value, _LAYERS.value

    print(f"JAX {jax.__version__} on {jax.default_backend()}; LLaMA-1B shape, {num_layers} layers, batch {batch}")
    print(f"{'tokens':>6}  {'attention':<24} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>8} {'compile s':>9}")
    for seq in seqs:
        for name, impl, stand_in, missing in variants():
            if missing:
                print(f"{seq:>6}  {name:<24} {missing}")
                continue
            saved = layers._platform, layers._CUDNN_IMPLEMENTATION
            if stand_in:
                layers._platform, layers._CUDNN_IMPLEMENTATION = (lambda p=stand_in: p), "xla"
            try:
                mem, seconds = compiled_memory(llama1b(num_layers, impl), seq, batch)
            finally:
                layers._platform, layers._CUDNN_IMPLEMENTATION = saved
            print(
                f"{seq:>6}  {name:<24} {mem.temp_size_in_bytes / GIB:>9.2f} {mem.argument_size_in_bytes / GIB:>9.2f}"
                f" {mem.output_size_in_bytes / GIB:>8.2f} {seconds:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
