r"""Writes a teacher's top-k next-token log-probabilities for a run's rows (``--config.kd.cache``).

  python scripts/teacher_logits.py --config=configs/finetune.py --config.init_from=STUDENT \
      --teacher=PATH --data=FILES --top_k=64 --out=DIR [the run's other --config flags]

Give it the flags of the training run that will read the cache: the rows it scores are that run's
(its data, selection, ``seq_len``, packing and ``kd.temperature``), and the trainer refuses a cache
whose fingerprint (those, and the teacher's files) is not its own. Then train with
``--config.method=kd --config.teacher=PATH --config.kd.cache=DIR``. Nothing is written unless the
whole cache is.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from imitax import allocator, xla_backend

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed, before JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
config_flags.DEFINE_config_file("config", "configs/finetune.py", "The training run's config file.")
_TEACHER = flags.DEFINE_string("teacher", None, "The teacher model (HF directory, imitax checkpoint or workdir).")
_DATA = flags.DEFINE_string("data", None, "The run's data (--config.data.train); default: the config's.")
_TOP_K = flags.DEFINE_integer("top_k", 64, "Tokens kept per scored position (the rest of the mass is one bucket).")
_OUT = flags.DEFINE_string("out", None, "The cache directory to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (once the new one is complete).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    from imitax.convert import ConversionError
    from imitax.data import DataError
    from imitax.train import TrainingError, teacher_cache

    config = FLAGS.config
    config.method = "kd"
    config.teacher = _TEACHER.value or config.teacher
    if _DATA.value:
        config.data.train = _DATA.value
    try:
        out = teacher_cache.build(config, _OUT.value, _TOP_K.value, overwrite=_OVERWRITE.value)
    except (TrainingError, ConversionError, DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote the teacher cache {out}")


if __name__ == "__main__":
    from imitax import cli

    app.run(main, flags_parser=cli.parse_flags)
