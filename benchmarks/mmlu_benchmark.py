r"""MMLU 5-shot scoring: imitax vs the lm-evaluation-harness ``hf`` backend, same model, questions and CPU.

  python benchmarks/mmlu_benchmark.py                         # 4 subjects x 32 questions: ~10 min of 2-core CPU
  python benchmarks/mmlu_benchmark.py --subjects=8 --questions=8 --plain    # the DESIGN.md note's 8 per subject
  python benchmarks/mmlu_benchmark.py --smoke                 # tiny model and data: checks that it runs

Needs ``pip install lm-eval`` (a benchmark-only reference; not a dependency of imitax).

The model: GPT-2-124M shaped (12 layers, 768 wide, 50,257-token vocabulary,
1,024 positions), randomly initialized by transformers (``initializer_range``
0.02, float32); its weights are copied into imitax, so both sides score the
same function. Random logits are spread enough (std ~0.5) that the 4 choices
are never near ties.

The data (no download): synthetic MMLU-shaped questions in the ``cais/mmlu``
schema, written as ``dev.jsonl``/``test.jsonl`` to a temporary directory.
The first ``--subjects`` of eight real subject names (so the prompts carry the
real descriptions: anatomy, college_medicine, marketing,
high_school_us_history, abstract_algebra, jurisprudence, world_religions,
professional_law), each with 5 dev questions and ``--questions`` test
questions. Text is pseudo-English: words drawn (Zipf, exponent 1.1) from
6,000 pseudo-words of 1-4 random syllables (seed 0); a question is 1-4
sentences of lognormal length (median 25 words, sigma 0.5) times a per-subject
factor (0.7 to 1.2; 2.2 for professional_law, whose prompts nearly all exceed
the window, as real law and history prompts do); each of the 4 choices is a
phrase of lognormal length (median 7 words, sigma 0.7); answers are uniform
over A-D. A byte-level BPE tokenizer (8,192 tokens) is trained on that text.
With 4 subjects the 5-shot prompts average ~830 tokens (real MMLU: 844) and
their common prefix within a subject is ~85% of them (real: 84%); prompts
past the 1,024-token window are left-truncated by both sides, and counted.

What is timed, end to end (wall clock, and the process's CPU time, which a
shared machine's load distorts less):

* imitax: ``tasks.get('mmlu')(data_dir=...).run(lm)``: reading the files,
  building the prompts, tokenizing, compiling and scoring (first call, so
  compilation is included; the compiled-program count is reported).
* harness: ``HFLM(pretrained=<the torch model>, tokenizer=...)
  .loglikelihood(instances)`` on the same (context, continuation) requests,
  which the harness tokenizes and scores (its ``_loglikelihood_tokens``, one
  forward per question thanks to its one-token-continuation grouping).

Both use every CPU core (torch threads = CPU count; XLA's default). The
machine is shared, so the load average is printed with the results; the runs
are sequential (each takes minutes), imitax first.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from imitax import models  # noqa: E402
from imitax.convert import core  # noqa: E402
from imitax.eval import tasks  # noqa: E402
from imitax.eval.lm import LM  # noqa: E402
from imitax.eval.tasks import mmlu  # noqa: E402

_SUBJECTS = flags.DEFINE_integer("subjects", 4, "Subjects (at most 8; the 8th has prompts past the window).")
_QUESTIONS = flags.DEFINE_integer("questions", 32, "Test questions per subject.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "imitax rows per forward pass.")
_HARNESS_BATCH = flags.DEFINE_integer("harness_batch_size", 1, "The harness's batch_size (its CLI default is 1).")
_SKIP_HARNESS = flags.DEFINE_bool("skip_harness", False, "Time imitax only.")
_PLAIN = flags.DEFINE_bool("plain", False, "Also time imitax without shared prefixes (one forward per question).")
_SMOKE = flags.DEFINE_bool("smoke", False, "A 2-layer 64-wide model and 2 subjects x 3 questions.")

# Real subject names and a question-length factor for each.
SUBJECTS = {
    "anatomy": 0.9,
    "college_medicine": 1.1,
    "marketing": 0.9,
    "high_school_us_history": 1.2,
    "abstract_algebra": 0.7,
    "jurisprudence": 1.0,
    "world_religions": 0.7,
    "professional_law": 2.2,  # nearly every prompt exceeds the window, as law and history prompts do
}
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


# -- synthetic data ------------------------------------------------------------------------------


class TextMaker:
    """Pseudo-English from a seeded Zipfian vocabulary of pseudo-words."""

    def __init__(self, seed: int, vocab: int = 6000):
        self.rs = np.random.RandomState(seed)
        words = set()
        while len(words) < vocab:
            words.add("".join(self.rs.choice(SYLLABLES, self.rs.randint(1, 5))))
        self.words = sorted(words)
        self.rs.shuffle(self.words)
        weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
        self.p = weights / weights.sum()

    def phrase(self, median: float, sigma: float = 0.5) -> str:
        n = max(1, int(round(self.rs.lognormal(math.log(median), sigma))))
        return " ".join(self.rs.choice(self.words, n, p=self.p))

    def question(self, factor: float) -> str:
        sentences = [self.phrase(25 * factor) for _ in range(self.rs.randint(1, 5))]
        sentences = [s[0].upper() + s[1:] for s in sentences]
        return ". ".join(sentences[:-1] + [sentences[-1] + "?"]) if len(sentences) > 1 else sentences[0] + "?"

    def doc(self, subject: str, factor: float) -> dict:
        choices = [self.phrase(7, 0.7) for _ in range(4)]
        return {"question": self.question(factor), "subject": subject, "choices": choices, "answer": self.rs.randint(4)}


def write_data(directory: str, subjects: int, questions: int, seed: int = 0) -> list[str]:
    """Writes ``dev.jsonl`` and ``test.jsonl``; returns every text written (the tokenizer's corpus)."""
    maker = TextMaker(seed)
    splits = {"dev": [], "test": []}
    for subject, factor in list(SUBJECTS.items())[:subjects]:
        splits["dev"] += [maker.doc(subject, factor) for _ in range(5)]
        splits["test"] += [maker.doc(subject, factor) for _ in range(questions)]
    corpus = []
    for split, docs in splits.items():
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
                corpus += [doc["question"], *doc["choices"]]
    return corpus


def train_tokenizer(corpus: list[str], vocab_size: int = 8192) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``corpus`` (``<|endoftext|>`` = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus + ["Answer: A B C D The following are multiple choice questions"], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_models(smoke: bool):
    if smoke:
        hf_config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=1024)
    else:
        hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(hf_config).eval()
    cfg = models.config_from_hf(hf_config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return torch_model, core.model_from_params(cfg, core.params_from_hf(cfg, state_dict))


# -- the runs --------------------------------------------------------------------------------------


def run_harness(torch_model, tokenizer, requests, batch_size: int):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=torch_model, tokenizer=tokenizer, batch_size=batch_size, max_length=1024, device="cpu")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i % 4) for i, r in enumerate(requests)]
    start, cpu = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return out, time.perf_counter() - start, time.process_time() - cpu


def accuracy(lls: list[float], docs: list[dict]) -> float:
    return float(np.mean([int(np.argmax(lls[4 * i : 4 * i + 4])) == d["answer"] for i, d in enumerate(docs)]))


def main(_):
    torch.set_num_threads(os.cpu_count())
    subjects, questions = (2, 3) if _SMOKE.value else (min(_SUBJECTS.value, len(SUBJECTS)), _QUESTIONS.value)
    with tempfile.TemporaryDirectory() as data_dir:
        corpus = write_data(data_dir, subjects, questions)
        tokenizer = train_tokenizer(corpus)
        torch_model, model = build_models(_SMOKE.value)
        task = tasks.get("mmlu")(num_fewshot=5, data_dir=data_dir)
        docs, shots, _ = task.load()
        contexts = [mmlu.prompt(d, shots[d["subject"]]) for d in docs]
        requests = [(c, f" {x}") for c in contexts for x in "ABCD"]
        lengths = [len(ids) for ids in tokenizer(contexts)["input_ids"]]
        print(
            f"{len(docs)} questions ({subjects} subjects x {questions}), {len(requests)} requests; 5-shot prompts "
            f"{np.mean(lengths):.0f} tokens on average (max {max(lengths)}; {sum(n > 1023 for n in lengths)} "
            f"longer than the 1,024-token window)"
        )
        print(common.environment())

        rows = []
        lm = LM(model, tokenizer, batch_size=_BATCH.value)
        start, cpu = time.perf_counter(), time.process_time()
        result = task.run(lm, progress=False)
        imitax_s, imitax_cpu = time.perf_counter() - start, time.process_time() - cpu
        ours = [ll for s in result.samples for ll in s["loglikelihoods"]]
        greedy = [g for s in result.samples for g in s["is_greedy"]]
        stats = result.info["scoring"]
        print(f"imitax: {imitax_s:.1f} s; scoring stats {stats}")
        runs = [("imitax (shared prefixes)", imitax_s, imitax_cpu, result.metrics["acc"], stats)]
        if _PLAIN.value:
            plain_lm = LM(model, tokenizer, batch_size=_BATCH.value, share_prefix=False)
            start, cpu = time.perf_counter(), time.process_time()
            plain = task.run(plain_lm, progress=False)
            plain_s, plain_cpu = time.perf_counter() - start, time.process_time() - cpu
            plain_ll = [ll for s in plain.samples for ll in s["loglikelihoods"]]
            print(f"imitax plain: {plain_s:.1f} s; max |ll - shared| {max(np.abs(np.subtract(plain_ll, ours))):.2e}")
            runs.append(("imitax (plain)", plain_s, plain_cpu, plain.metrics["acc"], plain.info["scoring"]))

        harness = None
        if not _SKIP_HARNESS.value:
            harness, harness_s, harness_cpu = run_harness(torch_model, tokenizer, requests, _HARNESS_BATCH.value)
            print(f"harness: {harness_s:.1f} s")
            theirs = [ll for ll, _ in harness]
            name = f"lm-eval hf (batch {_HARNESS_BATCH.value})"
            runs.append((name, harness_s, harness_cpu, accuracy(theirs, docs), None))

        for name, seconds, cpu_seconds, acc, s in runs:
            rows.append(
                [
                    name,
                    f"{seconds:.1f}",
                    f"{cpu_seconds:.1f}",
                    f"{len(docs) / seconds:.2f}",
                    f"{(s or {}).get('computed_tokens', stats['input_tokens']):,}",
                    f"{(s or {}).get('padded_tokens', stats['input_tokens']):,}",
                    s["programs"] if s else "-",
                    f"{acc:.4f}",
                    f"{runs[-1][1] / seconds:.2f}x / {runs[-1][2] / cpu_seconds:.2f}x" if harness is not None else "-",
                ]
            )
        print()
        headers = ["run", "wall s", "CPU s", "questions/s", "tokens run", "with padding", "programs", "acc"]
        print(common.format_table([*headers, "speed-up vs harness (wall / CPU)"], rows))
        print()
        print(
            f"requests {stats['requests']}, distinct inputs {stats['rows']}, truncated {stats['truncated']}, "
            f"input tokens {stats['input_tokens']:,}, shared-prefix groups {stats['prefix_groups']} "
            f"({stats['shared_prefix_tokens']:,} prefix tokens), padded tokens {stats['padded_tokens']:,}"
        )
        if harness is not None:
            diff = np.abs(np.subtract(ours, [ll for ll, _ in harness]))
            same_greedy = sum(g == h for g, (_, h) in zip(greedy, harness, strict=True))
            print(
                f"per-choice log-likelihoods vs harness: max |diff| {diff.max():.2e} (mean {diff.mean():.1e}); "
                f"is_greedy equal on {same_greedy}/{len(greedy)}; accuracy equal: "
                f"{accuracy(ours, docs) == accuracy([ll for ll, _ in harness], docs)}"
            )
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    app.run(main)
