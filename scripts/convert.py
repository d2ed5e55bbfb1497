r"""Converts a Hugging Face model directory to an imitax checkpoint, and back.

  python scripts/convert.py --hf_dir=DIR --out=CKPT [--dtype=float32|bfloat16] [--overwrite]
  python scripts/convert.py --export --ckpt=CKPT --out=HF_DIR [--max_shard_size=5GB] [--overwrite]
  python scripts/convert.py --export --peft --ckpt=LORA_WORKDIR --out=ADAPTER_DIR [--overwrite]

``--export`` of a LoRA run (``--config.lora.rank`` > 0) merges its adapters into its base and
writes a plain model; ``--peft`` writes the adapters alone, as a PEFT adapter directory.

The weights must be safetensors (``model.safetensors`` or a sharded index);
pickled ``.bin`` files are refused. Nothing is written unless the whole
conversion succeeds.
"""

import os
import sys

# The conversion needs no torch, but transformers' config code imports it
# whenever it is installed (modeling_rope_utils): measured 3.8 s and 230 MB of
# RSS. A None entry in sys.modules makes `import torch` fail, and transformers
# then treats torch as absent, as on a machine without it.
sys.modules.setdefault("torch", None)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silences "PyTorch was not found"

from absl import app, flags, logging  # noqa: E402

from imitax import allocator, convert, xla_backend  # noqa: E402

allocator.release_freed_memory()  # freed tensors leave the resident set at once (imitax/allocator.py)

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before JAX starts
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to convert.")
_OUT = flags.DEFINE_string("out", None, "Output directory (an imitax checkpoint, or with --export an HF directory).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: the checkpoint's).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (once the new one is complete).")
_EXPORT = flags.DEFINE_bool("export", False, "Export the imitax checkpoint --ckpt to a Hugging Face directory.")
_CKPT = flags.DEFINE_string("ckpt", None, "imitax checkpoint to export (with --export).")
_PEFT = flags.DEFINE_bool(
    "peft", False, "With --export: write a LoRA run's adapters as a PEFT adapter directory instead."
)
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard written by --export.")


def _fail(message: str, status: int = 1):
    print(f"convert.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
    if _EXPORT.value:
        if not _CKPT.value or not _OUT.value or _HF_DIR.value or _DTYPE.value:
            _fail("--export takes --ckpt=CKPT --out=HF_DIR [--max_shard_size=5GB] [--overwrite]; see --help", 2)
    elif not _HF_DIR.value or not _OUT.value or _CKPT.value or _PEFT.value:
        _fail("use --hf_dir=DIR --out=CKPT [--dtype=...], or --export --ckpt=CKPT --out=HF_DIR; see --help", 2)
    try:
        if _PEFT.value:
            from imitax.convert import peft

            out = peft.export_peft(_CKPT.value, _OUT.value, overwrite=_OVERWRITE.value)
            print(f"wrote PEFT adapter directory {out}")
        elif _EXPORT.value:
            out = convert.export_hf(
                _CKPT.value, _OUT.value, max_shard_size=_MAX_SHARD_SIZE.value, overwrite=_OVERWRITE.value
            )
            print(f"wrote Hugging Face model directory {out}")
        else:
            out = convert.convert_hf_to_checkpoint(
                _HF_DIR.value, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value
            )
            cfg = convert.load_config(out)
            print(f"wrote imitax checkpoint {out}: {cfg.model_type}, {cfg.num_params():,} {cfg.param_dtype} parameters")
    except (convert.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))  # bad input: what and where, without a traceback


if __name__ == "__main__":
    app.run(main)
