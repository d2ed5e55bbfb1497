r"""Data-scaling sweeps: finetune every base model on every imitation source at every token budget,
evaluate each cell, and draw the study's figures. Rerunning the same command resumes.

  python scripts/sweep.py --config=configs/demo.py --workdir=out/demo
  python scripts/sweep.py --config=configs/paper/sweep.py:models=llama_7b --workdir=gs://bucket/sweep \
      --config.base_models.llama_7b.init_from=/weights/llama-7b --config.token_budgets=0,300K,1M ...
  python scripts/sweep.py --report_only --workdir=out/demo      # redraw the table and plots
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imitax import xla_backend

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before main() imports JAX
config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/demo.py, configs/paper/...).")
flags.DEFINE_string("workdir", None, "Where the cells, results and plots go (local path or gs://).", required=True)
flags.DEFINE_bool("report_only", False, "Only redraw results/ (table, plots) from the finished cells.")
flags.DEFINE_bool("stop_on_error", False, "Stop at the first failed cell (default: record it and go on).")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Run in a workdir whose sweep had a different config: keep finished cells whose settings are unchanged.",
)
FLAGS = flags.FLAGS


class _QuietLibraries:
    """Drops INFO records of Orbax (one per file it writes), keeping imitax's own lines."""

    def filter(self, record):
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def _log(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from imitax import distributed, sweep
    from imitax.convert import ConversionError
    from imitax.data import DataError
    from imitax.train.loop import TrainingError

    try:
        if FLAGS.report_only:
            paths = sweep.report(FLAGS.workdir, FLAGS.config)
            _log(f"results: {paths['markdown']}; plots in {paths['plots']}")
            return
        if FLAGS.config is None:
            raise sweep.SweepError("--config is required (e.g. --config=configs/demo.py), unless --report_only")
        distributed.initialize(FLAGS.config.train.distributed)  # several processes: one per host
        if FLAGS.config.compilation_cache:  # one cache for every cell, and for a rerun
            distributed.use_compilation_cache(f"{FLAGS.workdir.rstrip('/')}/jax_cache")
        summary = sweep.run(
            FLAGS.config,
            FLAGS.workdir,
            stop_on_error=FLAGS.stop_on_error,
            allow_config_change=FLAGS.allow_config_change,
            log=_log,
        )
    except (sweep.SweepError, TrainingError, ConversionError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if summary.get("failed"):
        sys.exit(f"error: {len(summary['failed'])} cells failed: {', '.join(summary['failed'])} (see their cell.json)")


if __name__ == "__main__":
    from imitax import cli

    app.run(main, flags_parser=cli.parse_flags)
