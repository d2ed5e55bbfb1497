r"""Collects imitation data: asks a teacher to answer prompts, writes one ShareGPT record per prompt.

  python scripts/collect.py --teacher=URL_OR_PATH --prompts=FILE[,FILE] --out=FILE.jsonl [--model=NAME]
      [--concurrency=16] [--max_tokens=N] [--temperature=T] [--top_p=P] [--seed=S]
      [--api_key_env=OPENAI_API_KEY] [--limit=N] [--rpm=N] [--tpm=N] [--recipe=answer|nq_synthetic]

The teacher is any OpenAI-compatible endpoint (``http://HOST:PORT/v1``: imitax's own server,
vLLM, a hosted API) or a local model path (what scripts/evaluate.py accepts), served in-process
by imitax.serve for the run. The API key is read from the environment variable --api_key_env
names (never from a flag, never logged or written). Records are appended as they finish; a
rerun with the same --out skips the ids already there. Prompts that still fail after the
client's retries are listed in OUT.failures.jsonl and asked for again by the next run.

--recipe=nq_synthetic reads --prompts as NQ-style seed pairs ({question, answer: [...]}), sends
--nq_requests prompts of --nq_examples seed pairs each asking for --nq_pairs new ones, and
writes the parsed, deduplicated pairs to OUT.train.jsonl (training conversations) and
OUT.nq.jsonl (scripts/evaluate.py --nq_file). See docs/collecting.md.
"""

import asyncio
import os
import sys

# Unlike scripts/evaluate.py, torch is not blocked here: hf:NAME:SPLIT prompt sources go through
# datasets, whose fingerprinting imports torch whenever "torch" is in sys.modules (a None entry
# there makes it fail).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402

from imitax import allocator, cli, xla_backend  # noqa: E402

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before a local teacher imports JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
_TEACHER = flags.DEFINE_string("teacher", None, "OpenAI-compatible base URL (http://HOST:PORT/v1) or a model path.")
_PROMPTS = flags.DEFINE_list("prompts", None, "Prompt files, directories, globs or hf:NAME:SPLIT, comma-separated.")
_OUT = flags.DEFINE_string("out", None, "The collected records, JSON Lines (appended; a rerun resumes).")
_MODEL = flags.DEFINE_string("model", None, "Model name at the endpoint (default: the one it serves).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Requests in flight at most.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1024, "Longest answer per turn, in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (default: the endpoint's).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling (default: the endpoint's).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed sent with every request; nq_synthetic's example draws.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
_LIMIT = flags.DEFINE_integer("limit", None, "Collect only the first N prompts.")
_RPM = flags.DEFINE_float("rpm", 0, "Requests per minute at most (0: no limit).")
_TPM = flags.DEFINE_float("tpm", 0, "Tokens per minute at most, prompt (estimated) + max_tokens (0: no limit).")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 5, "Retries per request on 429, 5xx, timeouts, lost connections.")
_TIMEOUT = flags.DEFINE_float("timeout", 600, "Seconds before a request times out (and is retried).")
_RECIPE = flags.DEFINE_enum("recipe", "answer", ["answer", "nq_synthetic"], "What to ask the teacher.")
_NQ_REQUESTS = flags.DEFINE_integer("nq_requests", 100, "nq_synthetic: requests to send.")
_NQ_EXAMPLES = flags.DEFINE_integer("nq_examples", 5, "nq_synthetic: seed pairs shown per request.")
_NQ_PAIRS = flags.DEFINE_integer("nq_pairs", 10, "nq_synthetic: new pairs asked for per request.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Local teacher: sequences decoded together.")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "Local teacher: longest sequence (prompt + answer).")
_TEMPLATE = flags.DEFINE_string("template", None, "Local teacher: chat template (default: the model's own).")


def _fail(message: str) -> None:
    print(f"collect.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def _api_key() -> str | None:
    """The key from the environment; an explicitly named variable that is unset is an error."""
    key = os.environ.get(_API_KEY_ENV.value)
    if not key and flags.FLAGS["api_key_env"].present:
        _fail(f"--api_key_env={_API_KEY_ENV.value} but ${_API_KEY_ENV.value} is not set; export the teacher's key")
    return key


def _prompts():
    from imitax.collect import read_prompts

    if _RECIPE.value == "answer":
        prompts, counts = read_prompts(_PROMPTS.value, limit=_LIMIT.value)
        return prompts, counts, None
    from imitax.collect import nq_synthetic  # imports the evaluator (JAX): only for this recipe
    from imitax.eval import tasks

    seed_pairs = []
    for path in _PROMPTS.value:  # the nq_open task's own reader and checks
        seed_pairs += tasks.get("nq_open")(data_file=path, num_fewshot=0).load()[0]
    n = min(_NQ_REQUESTS.value, _LIMIT.value) if _LIMIT.value is not None else _NQ_REQUESTS.value
    prompts = nq_synthetic.build_prompts(seed_pairs, n, _NQ_EXAMPLES.value, _NQ_PAIRS.value, _SEED.value or 0)
    return prompts, {"nq_synthetic": len(prompts)}, seed_pairs


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _TEACHER.value or not _PROMPTS.value or not _OUT.value:
        _fail("--teacher=URL_OR_PATH, --prompts=FILE and --out=FILE.jsonl are required; see --help")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from imitax import collect
    from imitax.collect import store
    from imitax.data import DataError

    api_key = _api_key()
    failures = f"{_OUT.value.removesuffix('.jsonl')}.failures.jsonl"
    try:
        sampling = collect.Sampling(_MAX_TOKENS.value, _TEMPERATURE.value, _TOP_P.value, _SEED.value)
        prompts, counts, seed_pairs = _prompts()
        if not prompts:
            _fail(f"no prompts with a user turn in {','.join(_PROMPTS.value)} ({counts})")
        store.scan(_OUT.value)  # a foreign --out is refused before the teacher is started
        serve = {"template": _TEMPLATE.value, "max_batch": _MAX_BATCH.value, "max_len": _MAX_LEN.value}
        with collect.open_teacher(_TEACHER.value, **serve) as url:
            teacher = collect.Teacher(url, _MODEL.value, api_key, sampling, _MAX_RETRIES.value, _TIMEOUT.value)
            limiter = collect.RateLimiter(_RPM.value, _TPM.value)

            async def run():
                await teacher.check()
                return await collect.collect(
                    teacher, prompts, _OUT.value, failures, _CONCURRENCY.value, limiter, _PROGRESS.value
                )

            outcome = asyncio.run(run())
    except (ValueError, FileNotFoundError, DataError, collect.TeacherError, store.StoreError) as e:
        _fail(cli.error_line(e))
    print(
        f"{outcome.collected} collected, {outcome.skipped} already in {_OUT.value}, {outcome.failed} failed "
        f"({outcome.completion_tokens / max(outcome.seconds, 1e-9):.1f} generated tokens/s)"
    )
    if seed_pairs is not None:
        from imitax.collect import nq_synthetic

        train_file, nq_file = nq_synthetic.output_paths(_OUT.value)
        counts = nq_synthetic.write_outputs(store.read(_OUT.value), seed_pairs, train_file, nq_file)
        print(f"nq_synthetic: {counts['kept']} unique pairs of {counts['parsed']} parsed -> {train_file}, {nq_file}")
    if outcome.failed:
        print(f"failures: {failures} (rerun the same command to ask for them again)")
        sys.exit(2)  # incomplete: distinct from bad input (1), so a pipeline can stop or rerun


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
