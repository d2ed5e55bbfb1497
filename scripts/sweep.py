r"""Data-scaling sweeps: finetune every base model on every imitation source at every token budget,
evaluate each cell, and draw the study's figures. Rerunning the same command resumes.

  python scripts/sweep.py --config=configs/demo.py --workdir=out/demo
  python scripts/sweep.py --config=configs/paper/sweep.py:models=llama_7b --workdir=gs://bucket/sweep \
      --config.base_models.llama_7b.init_from=/weights/llama-7b --config.token_budgets=0,300K,1M ...
  python scripts/sweep.py --report_only --workdir=out/demo      # redraw the table and plots
  python scripts/sweep.py --config=configs/demo.py --workdir=out/demo --dry_run     # print the plan
  python scripts/sweep.py --config=configs/demo.py --workdir=out/demo --executor=ray --max_concurrent_cells=2
  python scripts/sweep.py --config=... --workdir=... --cells=3/8   # one shard (a SLURM array task)
  python scripts/sweep.py --config=... --workdir=... --executor=ray --cell_processes=2 --cell_resources=GPU:8
  python scripts/sweep.py --config=configs/demo_distill.py --workdir=out/demo_distill   # sft, kd, gkd

docs/launch.md has the recipes for Ray clusters (TPU VMs, GPU nodes) and SLURM arrays.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imitax import allocator, xla_backend

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before main() imports JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/demo.py, configs/paper/...).")
flags.DEFINE_string("workdir", None, "Where the cells, results and plots go (local path or gs://).", required=True)
flags.DEFINE_bool("report_only", False, "Only redraw results/ (table, plots) from the finished cells.")
flags.DEFINE_bool("stop_on_error", False, "Stop at the first failed cell (default: record it and go on).")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Run in a workdir whose sweep had a different config: keep finished cells whose settings are unchanged.",
)
flags.DEFINE_enum("executor", "local", ["local", "ray"], "local: one cell at a time in this process; ray: Ray tasks.")
flags.DEFINE_string("ray_address", "local", "--executor=ray: local (start Ray here), auto, or the head's HOST:PORT.")
flags.DEFINE_string("cell_resources", "CPU:1", "--executor=ray: what each cell asks for, e.g. CPU:1, GPU:1, TPU:4.")
flags.DEFINE_integer("max_concurrent_cells", 2, "--executor=ray: cells running at once.")
flags.DEFINE_integer("retries", 2, "--executor=ray: reruns of a cell whose worker died (it resumes).")
flags.DEFINE_integer(
    "cell_processes",
    1,
    "--executor=ray: processes of each cell's JAX job, each with --cell_resources (multi-host cells).",
)
flags.DEFINE_string("cells", "", "Run only the I-th of N shards of the grid, I/N (e.g. a SLURM array task's).")
flags.DEFINE_bool("dry_run", False, "Print the plan (steps, tokens, FLOPs, estimated time) and exit.")
flags.DEFINE_float(
    "throughput", 0.0, "--dry_run: training FLOP/s per cell (default: measured from this workdir's finished cells)."
)
FLAGS = flags.FLAGS


class _QuietLibraries:
    """Drops INFO records of Orbax (one per file it writes), keeping imitax's own lines."""

    def filter(self, record):
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def _log(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def _plan(config, workdir: str) -> str:
    """The plan of the grid (or of the --cells shard) as a table; runs and writes nothing."""
    from etils import epath

    from imitax import sweep
    from imitax.sweep import plan

    workdir = epath.Path(workdir)
    config = sweep.resolved(config, workdir)
    cells = sweep.expand(config)
    if FLAGS.cells:
        cells = plan.shard(cells, *plan.parse_shard(FLAGS.cells))
    flops_per_second, eval_s = plan.measured_throughput(sweep.load_records(workdir))
    flops_per_second = FLAGS.throughput or flops_per_second
    return plan.plan_table(config, workdir, sweep.graph(config, cells), flops_per_second, eval_s)


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
        if FLAGS.dry_run:
            print(_plan(FLAGS.config, FLAGS.workdir))
            return
        distributed.initialize(FLAGS.config.train.distributed)  # several processes: one per host
        if FLAGS.config.compilation_cache:  # one cache for every cell, and for a rerun
            distributed.use_compilation_cache(f"{FLAGS.workdir.rstrip('/')}/jax_cache")
        summary = sweep.run(
            FLAGS.config,
            FLAGS.workdir,
            stop_on_error=FLAGS.stop_on_error,
            allow_config_change=FLAGS.allow_config_change,
            log=_log,
            executor=FLAGS.executor,
            cells=FLAGS.cells,
            ray_address=FLAGS.ray_address,
            cell_resources=FLAGS.cell_resources,
            max_concurrent_cells=FLAGS.max_concurrent_cells,
            retries=FLAGS.retries,
            cell_processes=FLAGS.cell_processes,
        )
    except (sweep.SweepError, TrainingError, ConversionError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if summary.get("failed"):
        sys.exit(f"error: {len(summary['failed'])} cells failed: {', '.join(summary['failed'])} (see their cell.json)")


if __name__ == "__main__":
    from imitax import cli

    app.run(main, flags_parser=cli.parse_flags)
