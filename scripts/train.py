r"""Imitation finetuning. Rerunning the same command on the same workdir resumes.

  python scripts/train.py --config=configs/finetune.py --workdir=DIR \
      --config.init_from=PATH --config.data.train=FILES [--config.data.token_budget=20M]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imitax import allocator, xla_backend

xla_backend.define_flag(xla_backend.TRAIN_DEFAULT)  # --xla_backend, applied as flags are parsed, before JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
config_flags.DEFINE_config_file("config", "configs/finetune.py", "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the token cache go.", required=True)
FLAGS = flags.FLAGS


class _QuietLibraries:
    """Drops INFO records of Orbax (one per file it writes), keeping imitax's own progress lines."""

    def filter(self, record):
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from imitax import distributed
    from imitax.convert import ConversionError
    from imitax.data import DataError
    from imitax.train import TrainingError, run

    try:
        distributed.initialize(FLAGS.config.distributed)  # several processes: one per host
        result = run(FLAGS.config, FLAGS.workdir)
    except (TrainingError, ConversionError, DataError, ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    logging.info("finished: %s", result)


if __name__ == "__main__":
    from imitax import cli

    app.run(main, flags_parser=cli.parse_flags)
