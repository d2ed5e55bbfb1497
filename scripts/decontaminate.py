r"""Finds imitation-data records that overlap the benchmarks; writes a report and a filtered copy.

  python scripts/decontaminate.py --data=FILE[,FILE] \
      --against=mmlu:DIR,nq_open:FILE,humaneval:FILE,style:FILE [--ngram=13] [--min_tokens=8] \
      [--out=FILE.jsonl] [--report=FILE.json]

--data is what scripts/train.py reads (files, directories, globs, hf:NAME:SPLIT; ShareGPT,
messages, Alpaca, HC3, text). Each benchmark is read by the evaluator's own loader, so the items
compared are the ones evaluated. --out gets every record that overlaps no benchmark item, as
JSON Lines, unchanged; --report (default: beside --out, OUT.contamination.json) lists which
records overlap which items. See imitax/data/decontaminate.py for the matching rules.
"""

import os
import sys

# torch is not blocked as in scripts/evaluate.py: hf:NAME:SPLIT data goes through datasets, whose
# fingerprinting imports torch whenever "torch" is in sys.modules (a None entry makes it fail).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging  # noqa: E402

from imitax import cli, xla_backend  # noqa: E402

xla_backend.define_flag()  # --xla_backend: the evaluator's loaders import JAX
_DATA = flags.DEFINE_list("data", None, "Imitation data: files, directories, globs or hf:NAME:SPLIT.")
_AGAINST = flags.DEFINE_list("against", None, "BENCHMARK:PATH items; benchmarks mmlu, nq_open, humaneval, style.")
_NGRAM = flags.DEFINE_integer("ngram", 13, "Tokens per n-gram.")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 8, "Shortest item text matched (whole, when shorter than --ngram).")
_OUT = flags.DEFINE_string("out", None, "Where the records that overlap nothing go (JSON Lines).")
_REPORT = flags.DEFINE_string("report", None, "The overlap report (JSON; default: OUT.contamination.json).")


def _fail(message: str) -> None:
    print(f"decontaminate.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _DATA.value or not _AGAINST.value:
        _fail("--data=FILE and --against=BENCHMARK:PATH[,...] are required; see --help")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from imitax import records
    from imitax.data import DataError
    from imitax.data import decontaminate as dc

    report_path = _REPORT.value or (f"{_OUT.value.removesuffix('.jsonl')}.contamination.json" if _OUT.value else None)
    try:
        index = dc.Index(dc.load_benchmarks(_AGAINST.value), _NGRAM.value, _MIN_TOKENS.value)
        report, clean = dc.scan(_DATA.value, index)
    except (ValueError, FileNotFoundError, ImportError, DataError) as e:
        _fail(cli.error_line(e))  # nothing is written unless every input was read
    report["data"] = list(_DATA.value)
    if _OUT.value:
        records.write_lines(_OUT.value, [records.dumps(r) + "\n" for r in clean])
    if report_path:
        records.write_json(report_path, report)
    print(f"{report['contaminated']} of {report['records']} records overlap a benchmark ({index.n}-grams)")
    for name, s in report["benchmarks"].items():
        print(
            f"  {name}: {s['items_overlapping']} of {s['items']} items overlapped by {s['records_overlapping']} "
            f"records ({s['too_short']} items too short to match)"
        )
    if _OUT.value:
        print(f"wrote {len(clean)} records to {_OUT.value}")
    if report_path:
        print(f"wrote {report_path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
