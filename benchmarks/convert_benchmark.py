r"""Peak memory and wall time of HF -> imitax conversion on a ~1B-parameter LLaMA.

  .venv/bin/python benchmarks/convert_benchmark.py                 # TinyLlama-1.1B shape, float32
  .venv/bin/python benchmarks/convert_benchmark.py --dtype=bfloat16
  .venv/bin/python benchmarks/convert_benchmark.py --size=tiny     # a few seconds, smoke test

Writes a random LLaMA-shaped checkpoint (safetensors shards + config.json, with
numpy, so no torch is involved) and then runs ``scripts/convert.py`` in a fresh
child process, exactly as a user would. The child's peak resident memory comes
from ``wait4``'s rusage (the kernel's exact high-water mark, which also counts
mapped file pages), compared with the checkpoint's size on disk; the target is
at most 1.3x. A second child that only imports the libraries measures the fixed
cost of the interpreter, JAX, Orbax and transformers' config code.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SIZE = flags.DEFINE_enum("size", "1b", ["1b", "tiny"], "1b: TinyLlama-1.1B shape; tiny: a smoke test.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the HF checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write (default: a temporary directory, deleted after).")
_SHARD_GB = flags.DEFINE_float("shard_gb", 2.0, "Size of the HF safetensors shards, in GB.")
_WRITE_ONLY = flags.DEFINE_string("write_only", None, "Internal: only write the HF checkpoint to this directory.")

SHAPES = {
    # TinyLlama-1.1B: 1,100,048,384 parameters.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256),
}  # fmt: skip


def llama_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """HF LLaMA tensor names -> shapes."""
    e, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = e // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (e,),
            f"{p}.self_attn.q_proj.weight": (e, e),
            f"{p}.self_attn.k_proj.weight": (kv, e),
            f"{p}.self_attn.v_proj.weight": (kv, e),
            f"{p}.self_attn.o_proj.weight": (e, e),
            f"{p}.post_attention_layernorm.weight": (e,),
            f"{p}.mlp.gate_proj.weight": (m, e),
            f"{p}.mlp.up_proj.weight": (m, e),
            f"{p}.mlp.down_proj.weight": (e, m),
        }
    return shapes | {"model.norm.weight": (e,), "lm_head.weight": (v, e)}


def write_checkpoint(hf_dir: pathlib.Path, size: str, dtype: str, shard_bytes: int) -> int:
    """Writes a random HF LLaMA checkpoint shard by shard; returns its bytes on disk."""
    import ml_dtypes

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                  max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False, dtype=dtype,
                  bos_token_id=1, eos_token_id=2, **SHAPES[size])  # fmt: skip
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    shards, current, current_bytes = [], {}, 0
    for name, shape in llama_tensors(SHAPES[size]).items():
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        if current and current_bytes + nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = shape
        current_bytes += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (rng.standard_normal(s, np.float32) * 0.02).astype(np_dtype) for n, s in shard.items()}
        save_file(tensors, hf_dir / file, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map |= dict.fromkeys(shard, file)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))


def measure(argv: list[str]) -> tuple[float, int, int]:
    """Runs ``argv``; returns (wall seconds, peak RSS bytes, exit status).

    The kernel carries the parent's high-water mark into a vfork+exec'd child,
    so this process must stay small: the checkpoint is written by another child.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, rusage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in KiB


def main(argv):
    del argv
    if _WRITE_ONLY.value:
        disk = write_checkpoint(pathlib.Path(_WRITE_ONLY.value), _SIZE.value, _DTYPE.value, int(_SHARD_GB.value * 1e9))
        print(disk)
        return
    workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="convert_benchmark_"))
    hf_dir, ckpt = workdir / "hf", workdir / "ckpt"
    try:
        shutil.rmtree(hf_dir, ignore_errors=True)
        t0 = time.perf_counter()
        writer = [sys.executable, __file__, f"--write_only={hf_dir}", f"--size={_SIZE.value}"]
        writer += [f"--dtype={_DTYPE.value}", f"--shard_gb={_SHARD_GB.value}"]
        disk = int(subprocess.run(writer, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"wrote {hf_dir} ({disk / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)

        imports = "import sys; sys.modules['torch'] = None; import imitax.convert, transformers.models.llama"
        _, base_rss, _ = measure([sys.executable, "-c", imports])
        wall, rss, rc = measure(
            [sys.executable, str(ROOT / "scripts/convert.py"), f"--hf_dir={hf_dir}", f"--out={ckpt}", "--overwrite"]
        )
        if rc:
            sys.exit(f"conversion failed with exit status {rc}")
        out_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())

        parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert parent_rss < base_rss, "the parent's peak RSS would leak into the children's"
        gb = lambda n: f"{n / 1e9:.2f} GB"
        rows = [
            ("model", f"LLaMA {_SIZE.value}, {_DTYPE.value}"),
            ("HF checkpoint on disk", gb(disk)),
            ("imitax checkpoint on disk", gb(out_bytes)),
            ("peak RSS of the conversion", gb(rss)),
            ("peak RSS / checkpoint size", f"{rss / disk:.2f}x (target <= 1.30x)"),
            ("fixed cost (imports only)", gb(base_rss)),
            ("(peak RSS - fixed) / size", f"{(rss - base_rss) / disk:.2f}x"),
            ("wall time", f"{wall:.1f} s"),
            ("throughput", f"{disk / 1e6 / wall:.0f} MB/s"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
    finally:
        if _WORKDIR.value is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
