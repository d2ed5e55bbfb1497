r"""Blinded pairwise rating studies: create one, serve it to raters, export the judgments.

  python scripts/rate.py create --db=sqlite:///ratings.db --study=NAME --prompts=FILE \
      --system=NAME=ANSWERS_FILE_OR_URL_OR_MODEL_PATH ... [--pairs=A:B,...] [--per_item=3] \
      [--raters=N] [--attention_checks=FILE] [--base_url=http://127.0.0.1:8080]
  python scripts/rate.py serve --db=sqlite:///ratings.db [--host=127.0.0.1] [--port=8080] [--workers=1]
  python scripts/rate.py export --db=sqlite:///ratings.db --study=NAME --out=DIR

Prompts are JSONL {"id", "prompt"}; a system's answers JSONL {"id", "response"}, matched by id,
or generated on the spot from an OpenAI-compatible URL or a model path (greedy, --max_tokens);
attention checks JSONL {"prompt", "good", "broken"}. ``create`` prints one secret link per rater
and the admin link (they are shown once: only their hashes are stored). ``--db`` is a SQLAlchemy
URL: sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB. ``export`` writes DIR/ratings.csv
(one row per judgment) and DIR/summary.json (rates, intervals, agreement). Bad input is one line
on stderr and exit status 1, with nothing written. See docs/rating.md.
"""

import csv
import io
import os
import sys

# A model-path system is converted and served by imitax, which needs no torch; transformers imports
# it whenever it is installed (seconds and hundreds of MB) unless a None entry makes it look absent.
sys.modules.setdefault("torch", None)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags  # noqa: E402

from imitax import allocator, cli, records, xla_backend  # noqa: E402

xla_backend.define_flag()  # --xla_backend, for a model-path system served while creating the study
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)

_DB = flags.DEFINE_string("db", "sqlite:///ratings.db", "SQLAlchemy URL: sqlite:///FILE or postgresql://...")
_STUDY = flags.DEFINE_string("study", None, "Study name (create, export).")
_PROMPTS = flags.DEFINE_string("prompts", None, 'Prompts, JSONL {"id", "prompt"} (create).')
_SYSTEM = flags.DEFINE_multi_string(
    "system",
    [],
    'NAME=SOURCE: a system and its answers: a JSONL file {"id", "response"}, or an OpenAI-compatible URL or an '
    "imitax/Hugging Face model path to generate them from.",
)
_SERVED_MODEL = flags.DEFINE_multi_string(
    "served_model", [], "NAME=MODEL: the model to ask at a URL system's endpoint (default: its only model)."
)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "Longest generated answer, in tokens (URL or model systems).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Requests in flight when generating answers.")
_PAIRS = flags.DEFINE_string("pairs", "", "Pairs to compare, A:B,... (default: every pair of systems).")
_PER_ITEM = flags.DEFINE_integer("per_item", 3, "Raters who judge each item.")
_RATERS = flags.DEFINE_integer("raters", 10, "Rater links to create.")
_ATTENTION = flags.DEFINE_string("attention_checks", None, 'Attention checks, JSONL {"prompt", "good", "broken"}.')
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the side assignment, item order and attention-check placement.")
_BASE_URL = flags.DEFINE_string("base_url", "http://127.0.0.1:8080", "Where raters reach `serve`, for the links.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address `serve` listens on.")
_PORT = flags.DEFINE_integer("port", 8080, "Port `serve` listens on.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Server processes `serve` runs (they share the database).")
_OUT = flags.DEFINE_string("out", None, "Directory for ratings.csv and summary.json (export).")
_INCLUDE_FAILED = flags.DEFINE_bool("include_failed", False, "Keep raters who failed attention checks (export).")
_MAX_MISSED = flags.DEFINE_integer("max_missed", 0, "Attention checks a rater may miss and still count (export).")

COMMANDS = ("create", "serve", "export")


def _fail(message: str) -> None:
    print(f"rate.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def _require(*flag_holders) -> None:
    for holder in flag_holders:
        if not holder.value:
            _fail(f"--{holder.name} is required")


def study_spec():
    """The study the flags describe, every file read and checked, answers generated where asked."""
    from imitax.rate import store

    _require(_STUDY, _PROMPTS)
    prompts = store.read_prompts(_PROMPTS.value)
    sources = {}
    for entry in _SYSTEM.value:
        name, sep, source = entry.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise store.StudyError(f"--system={entry}: expected NAME=ANSWERS_FILE (or NAME=URL, NAME=MODEL_PATH)")
        if name in sources:
            raise store.StudyError(f"--system: {name!r} is named twice")
        sources[name] = source
    served = dict(entry.partition("=")[::2] for entry in _SERVED_MODEL.value)
    unknown = [name for name in served if name not in sources]
    if unknown:
        raise store.StudyError(f"--served_model: {', '.join(unknown)} is not a --system")
    # Files first; a URL or model system stands in with empty answers until every other check passed.
    generated = [name for name, source in sources.items() if store.is_model_source(source)]
    answers = {
        name: {key: "" for key in prompts} if name in generated else store.read_answers(source)
        for name, source in sources.items()
    }
    spec = store.StudySpec(
        name=_STUDY.value,
        prompts=prompts,
        answers=answers,
        sources=sources,
        pairs=store.parse_pairs(_PAIRS.value, list(sources)),
        per_item=_PER_ITEM.value,
        raters=_RATERS.value,
        attention_checks=store.read_attention_checks(_ATTENTION.value) if _ATTENTION.value else [],
        seed=_SEED.value,
    )
    store.check(spec)
    if generated:
        from imitax.rate import generate  # the openai client (and, for a model path, JAX): only when asked
    for name in generated:
        answers[name] = generate.generate_answers(
            name, sources[name], prompts, served.get(name), _MAX_TOKENS.value, _CONCURRENCY.value
        )
    return spec


def create() -> None:
    from imitax.rate import models, store

    spec = study_spec()  # checked before the database is opened (and, for SQLite, created)
    tokens = store.create_study(models.open_database(_DB.value), spec)
    base = _BASE_URL.value.rstrip("/")
    print(f"study {spec.name}: {len(spec.prompts)} prompts x {len(spec.pairs)} pair(s), {spec.per_item} per item")
    for label, token in tokens.raters:
        print(f"rater {label}: {base}/r/{token}")
    print(f"admin: {base}/admin/{tokens.admin}")


def serve() -> None:
    import uvicorn

    from imitax.rate import models

    models.open_database(_DB.value).dispose()  # the tables, made once before any worker starts
    os.environ["IMITAX_RATE_DB"] = _DB.value  # what each worker process opens
    uvicorn.run(
        "imitax.rate.app:from_environment",
        factory=True,
        host=_HOST.value,
        port=_PORT.value,
        workers=_WORKERS.value,
        log_level="warning",
    )


def export() -> None:
    import sqlalchemy

    from imitax.rate import models, results, store

    _require(_STUDY, _OUT)
    url = sqlalchemy.make_url(models.database_url(_DB.value))
    if url.get_backend_name() == "sqlite" and not os.path.exists(url.database or ""):
        _fail(f"--db={_DB.value}: no such database file (create the study first)")
    study, rows = store.judgments(models.open_database(_DB.value, create=False), _STUDY.value)
    summary = results.summarize(rows, include_failed=_INCLUDE_FAILED.value, max_missed=_MAX_MISSED.value)
    summary = {"study": study.name, "per_item": study.per_item, **summary, "provenance": records.provenance()}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["judgment_id"])
    writer.writeheader()
    writer.writerows(rows)
    records.write_lines(f"{_OUT.value}/ratings.csv", [text.getvalue()])
    records.write_json(f"{_OUT.value}/summary.json", summary)
    print(f"{len(rows)} judgments -> {_OUT.value}/ratings.csv, {_OUT.value}/summary.json")


def main(argv: list[str]) -> None:
    import sqlalchemy.exc

    from imitax.rate import store

    if len(argv) != 2 or argv[1] not in COMMANDS:
        _fail(f"give one command: {' | '.join(COMMANDS)} (got {' '.join(argv[1:]) or 'none'})")
    try:
        {"create": create, "serve": serve, "export": export}[argv[1]]()
    except store.StudyError as e:
        _fail(str(e))
    except sqlalchemy.exc.SQLAlchemyError as e:
        _fail(f"--db={_DB.value}: {cli.error_line(e.orig if getattr(e, 'orig', None) else e)}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
