"""Pairwise judging: a judge model compares the model's answers with reference (teacher) answers.

>>> task = tasks.get("pairwise")(data_file="heldout.jsonl", reference_file="teacher.jsonl",
...                              judge="http://127.0.0.1:8000/v1", judge_model="judge")
>>> result = task.run(lm)
>>> result.metrics["as_good_or_better"], result.metrics["lc_win_rate"]

The study's first instrument, made by a model instead of crowd raters: for each held-out prompt
the evaluated model answers (greedy, the prompt rendered with the training turn template, as the
``style`` task does) and a judge compares that answer with the teacher's.

Data: ``data_file`` holds the prompts, in any format ``scripts/collect.py`` reads (``{"id",
"prompt"}``, ShareGPT, messages, Alpaca; the first user turn is the prompt); ``reference_file``
holds the reference answers matched by id: ``{"id", "response"}`` records, or collected
ShareGPT/messages records (the first teacher turn). A prompt without a reference is an error.

The judge: an OpenAI-compatible endpoint (``judge=URL``, ``judge_model=NAME``, its key in the
environment variable ``judge_api_key_env``) or a local model path (served in-process by
:mod:`imitax.serve`), asked with the MT-bench pairwise prompt (:data:`JUDGE_SYSTEM`,
:data:`JUDGE_USER`; FastChat's ``pair-v2``) at temperature 0. Each comparison is made in both
orders (the model's answer as A, then as B): the same preferred answer in both is the outcome; a
disagreement (position bias) is a tie. A verdict is parsed strictly: exactly one distinct
``[[A]]``/``[[B]]``/``[[C]]`` in the judge's reply; anything else (none, or two different ones),
or a request that failed after retries, is unparseable, and an item with an unparseable verdict
in either order is left out of the rates and counted.

Metrics over the judged items (each with its standard error):

* ``win_rate``, ``tie_rate``, ``loss_rate``: the model's answer better, tied, worse.
* ``as_good_or_better``: wins plus ties, the study's measure.
* ``preference``: wins plus half the ties (AlpacaEval's win rate).
* ``lc_win_rate``: length-controlled preference, as AlpacaEval 2's: a logistic regression of the
  preference (ties as 1/2) on an intercept and ``tanh(d / sd(d))``, ``d`` the answer's length minus
  the reference's in characters, fitted by maximum likelihood (with a 1e-4 ridge so a separable
  sample stays finite); the metric is the predicted preference at equal length, ``sigmoid(intercept)``,
  and its standard error the delta method's from the inverse Hessian.
* ``unparseable``, ``unparseable_rate`` (share of verdicts), ``consistency`` (share of items whose
  two verdicts parsed and agreed), ``judged``.
"""

from __future__ import annotations

import asyncio
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from imitax.eval import metrics
from imitax.eval.tasks.multiple_choice import read_records
from imitax.eval.tasks.registry import TaskResult, generate_until, register

__all__ = [
    "JUDGE_SYSTEM",
    "JUDGE_USER",
    "Pairwise",
    "combine",
    "length_controlled",
    "outcomes",
    "pairwise_metrics",
    "verdict",
]

JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's instructions "
    "and answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective "
    "as possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
JUDGE_USER = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
RIDGE = 1e-4
OUTCOMES = ("win", "tie", "loss")


def verdict(reply: str | None) -> str | None:
    """``'A'``, ``'B'`` or ``'C'`` when the reply holds exactly one distinct ``[[X]]``, else None."""
    found = set(_VERDICT.findall(reply or ""))
    return found.pop() if len(found) == 1 else None


def outcomes(model_first: str, model_second: str) -> tuple[str, str]:
    """The model's outcome in each order, from the verdicts with its answer as A, then as B."""
    return {"A": "win", "B": "loss", "C": "tie"}[model_first], {"B": "win", "A": "loss", "C": "tie"}[model_second]


def combine(model_first: str | None, model_second: str | None) -> str | None:
    """The model's outcome from the verdicts of both orders (None: unparseable); disagreement is a tie."""
    if model_first is None or model_second is None:
        return None
    first, second = outcomes(model_first, model_second)
    return first if first == second else "tie"


def length_controlled(preference: Sequence[float], length_diff: Sequence[float]) -> tuple[float, float]:
    """``(preference at equal length, its standard error)``; see the module docstring.

    scipy's BFGS minimizes the (convex) penalized negative log-likelihood with its analytic
    gradient; a hand-written fit because the model is two parameters and no logistic regression
    with soft (tie = 1/2) labels is among the dependencies.
    """
    from scipy import optimize, special

    y, d = np.asarray(preference, float), np.asarray(length_diff, float)
    if len(y) == 0:
        return math.nan, math.nan
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    x = np.stack([np.ones_like(d), np.tanh(d / sd) if sd > 0 else np.zeros_like(d)], axis=1)

    def loss(w):
        z = x @ w
        nll = np.sum(np.logaddexp(0, z) - y * z) + RIDGE * w @ w
        return nll, x.T @ (special.expit(z) - y) + 2 * RIDGE * w

    w = optimize.minimize(loss, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-10}).x
    p = special.expit(x @ w)
    hessian = (x * (p * (1 - p))[:, None]).T @ x + 2 * RIDGE * np.eye(2)
    p0 = float(special.expit(w[0]))
    se = p0 * (1 - p0) * math.sqrt(np.linalg.inv(hessian)[0, 0]) if len(y) > 1 else math.nan
    return p0, se


def pairwise_metrics(samples: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, stderrs)`` of judged samples (``outcome``, ``verdicts``, ``answer``, ``reference``)."""
    judged = [s for s in samples if s["outcome"] is not None]
    values, stderr = {}, {}
    series = {f"{o}_rate": [float(s["outcome"] == o) for s in judged] for o in OUTCOMES}
    series["as_good_or_better"] = [float(s["outcome"] != "loss") for s in judged]
    preference = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[s["outcome"]] for s in judged]
    series["preference"] = preference
    for name, xs in series.items():
        values[name], stderr[name] = metrics.mean(xs), metrics.mean_stderr(xs)
    diffs = [len(s["answer"]) - len(s["reference"]) for s in judged]
    values["lc_win_rate"], stderr["lc_win_rate"] = length_controlled(preference, diffs)
    verdicts = [v for s in samples for v in s["verdicts"]]
    values["unparseable"] = float(sum(v is None for v in verdicts))
    values["unparseable_rate"] = metrics.mean([float(v is None) for v in verdicts])
    both = [s for s in samples if None not in s["verdicts"]]
    values["consistency"] = metrics.mean([float(len(set(outcomes(*s["verdicts"]))) == 1) for s in both])
    values["judged"] = float(len(judged))
    return values, stderr


def _first_turn(record: Any, where: str, role: str) -> str:
    """The text of a record's first ``role`` turn, through the trainer's parsers."""
    from imitax.data import formats

    try:
        conversations = formats.FORMATS[formats.detect_format(record)][0](record)
    except formats._Invalid as e:  # the trainer's parsers' error, located here as the trainer does
        raise formats.DataError(where, e.message, e.field) from None
    for conversation in conversations:
        for turn_role, text in conversation.turns:
            if turn_role == role:
                return text
    raise ValueError(f"{where}: no {role} turn")


def read_references(path: str | pathlib.Path) -> dict[str, str]:
    """``{id: reference answer}`` from ``{"id", "response"}`` records or collected chat records (first teacher turn)."""
    from imitax.data.formats import TEACHER

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such reference file; pass JSON Lines {{id, response}} or collected records"
        )
    out = {}
    for i, record in enumerate(read_records(path)):
        where = f"{path}, record {i}"
        if not isinstance(record, dict) or not isinstance(record.get("id"), str | int):
            raise ValueError(f"{where}: needs an id")
        response = record.get("response")
        text = response if isinstance(response, str) else _first_turn(record, where, TEACHER)
        if str(record["id"]) in out:
            raise ValueError(f"{where}: id {record['id']!r} appears twice")
        out[str(record["id"])] = text
    return out


@register("pairwise")
class Pairwise:
    """A judge's pairwise preference between the model's answers and reference answers (see the module docstring).

    Args:
      data_file: the prompts (any format ``scripts/collect.py`` reads; ids match ``reference_file``).
      reference_file: the reference answers, ``{"id", "response"}`` or collected chat records.
      judge: an OpenAI-compatible base URL, or a local model path served in-process.
      judge_model: the judge's model name at the endpoint (default: the one it serves).
      judge_api_key_env: the environment variable holding the judge's API key.
      judge_max_tokens: the longest judge reply (its explanation and verdict).
      judge_max_retries: retries of a judge request (429, 5xx, timeouts); still failing, its verdict is unparseable.
      concurrency: judge requests in flight.
      template: the training turn format the model's prompts are rendered with.
      max_gen_toks: the longest model answer, in tokens.
      limit: judge only the first ``limit`` prompts.
      num_fewshot: must be 0.
      seed: sent to the judge with every request.
    """

    def __init__(
        self,
        data_file: str | pathlib.Path,
        reference_file: str | pathlib.Path | None = None,
        judge: str | None = None,
        judge_model: str | None = None,
        judge_api_key_env: str = "OPENAI_API_KEY",
        judge_max_tokens: int = 512,
        judge_max_retries: int = 5,
        concurrency: int = 8,
        template: str = "koala",
        max_gen_toks: int = 256,
        limit: int | None = None,
        num_fewshot: int = 0,
        seed: int = 0,
    ):
        from imitax.eval.tasks.style import Style

        if num_fewshot:
            raise ValueError(f"the pairwise task is zero-shot, got num_fewshot={num_fewshot}")
        if reference_file is None or judge is None:
            raise ValueError("needs reference_file= and judge= (scripts/evaluate.py: --pairwise_reference, --judge)")
        if concurrency < 1 or judge_max_tokens < 1:
            raise ValueError(f"concurrency and judge_max_tokens must be >= 1, got {concurrency}, {judge_max_tokens}")
        # The model's prompts are rendered, and its turn cut, exactly as the style task does.
        self._style = Style(data_file=data_file, template=template, max_gen_toks=max_gen_toks)
        self.data_file, self.reference_file = str(data_file), reference_file
        self.judge, self.judge_model, self.judge_api_key_env = judge, judge_model, judge_api_key_env
        self.judge_max_tokens, self.judge_max_retries = judge_max_tokens, judge_max_retries
        self.concurrency = concurrency
        self.template, self.max_gen_toks, self.limit, self.num_fewshot, self.seed = (
            template,
            max_gen_toks,
            limit,
            0,
            seed,
        )

    def load(self) -> list[dict[str, Any]]:
        """The items ``{id, prompt, system, reference}``, in prompt order; read once.

        Raises:
          ValueError, DataError: bad records, or prompts without a reference (names the first few).
          FileNotFoundError: a missing file.
        """
        if getattr(self, "_loaded", None) is None:
            from imitax.collect.prompts import read_prompts

            prompts, _ = read_prompts(self.data_file, limit=self.limit)
            references = read_references(self.reference_file)
            missing = [p.id for p in prompts if p.id not in references]
            if missing:
                raise ValueError(
                    f"{self.reference_file} has no reference for {len(missing)} prompt id(s) of {self.data_file}: "
                    f"{', '.join(map(repr, missing[:5]))}"
                )
            if not prompts:
                raise ValueError(f"{self.data_file}: no prompts")
            self._check_judge()
            self._loaded = [
                {"id": p.id, "prompt": p.turns[0], "system": p.system, "reference": references[p.id]} for p in prompts
            ]
        return self._loaded

    def _check_judge(self) -> None:
        """Before any answer is generated: a judge URL answers and serves the model; a judge path exists."""
        from imitax.collect import Teacher, TeacherError

        if "://" not in self.judge:
            if not os.path.exists(self.judge):
                raise FileNotFoundError(f"judge {self.judge} is neither an http(s):// URL nor an existing model path")
            return
        judge = Teacher(self.judge, self.judge_model, os.environ.get(self.judge_api_key_env), max_retries=1)

        async def check():
            try:
                return await judge.check()
            finally:
                await judge.close()

        try:
            asyncio.run(check())
        except TeacherError as e:
            raise ValueError(f"judge: {e}") from None

    def answers(self, lm, items: Sequence[dict[str, Any]], progress: bool) -> list[str]:
        """The model's greedy answers, rendered and cut as in the style task."""
        contexts, _ = self._style.contexts(lm.tokenizer, items)
        settings = {
            "until": self._style.stop_sequences(lm.tokenizer),
            "max_gen_toks": self.max_gen_toks,
            "temperature": 0.0,
        }
        outputs = generate_until(lm, [(c, dict(settings)) for c in contexts], progress)
        if len(outputs) != len(contexts):
            raise ValueError(f"the LM returned {len(outputs)} answers for {len(contexts)} prompts")
        answers = []
        for output in outputs:
            for stop in settings["until"]:  # The LM cuts already; cutting again protects against one that does not.
                output = output.split(stop)[0]
            answers.append(output.strip())
        return answers

    def ask_judge(self, items: Sequence[dict[str, Any]], answers: Sequence[str]) -> tuple[list[list[str | None]], dict]:
        """The judge's raw replies, model answer first then second, per item (None: failed after retries)."""
        from imitax.collect import Prompt, RateLimiter, Sampling, Teacher, TeacherError, open_teacher

        questions = []
        for item, answer in zip(items, answers, strict=True):
            for a, b in ((answer, item["reference"]), (item["reference"], answer)):
                questions.append(JUDGE_USER.format(question=item["prompt"], answer_a=a, answer_b=b))
        sampling = Sampling(max_tokens=self.judge_max_tokens, temperature=0.0, seed=self.seed)
        # A local judge gets one cache slot per request in flight: never more than ``concurrency``.
        with open_teacher(self.judge, max_batch=self.concurrency) as url:
            key = os.environ.get(self.judge_api_key_env)
            judge = Teacher(url, self.judge_model, key, sampling, max_retries=self.judge_max_retries)

            async def ask_all():
                import openai

                try:
                    model = await judge.check()
                except TeacherError as e:
                    raise ValueError(f"judge: {e}") from None
                slots, limiter = asyncio.Semaphore(self.concurrency), RateLimiter()

                async def ask(i: int, text: str) -> str | None:
                    async with slots:
                        try:
                            record = await judge.answer(Prompt(str(i), (text,), JUDGE_SYSTEM), limiter)
                        except openai.OpenAIError:
                            return None
                    return record["conversations"][-1]["value"]

                try:
                    return model, await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
                finally:
                    await judge.close()

            model, replies = asyncio.run(ask_all())
        info = {"judge": self.judge if "://" in self.judge else os.path.abspath(self.judge), "judge_model": model}
        return [list(replies[i : i + 2]) for i in range(0, len(replies), 2)], info

    def run(self, lm, progress: bool = True) -> TaskResult:
        items = self.load()
        answers = self.answers(lm, items, progress)
        replies, info = self.ask_judge(items, answers)
        samples = []
        for item, answer, pair in zip(items, answers, replies, strict=True):
            verdicts = [verdict(r) for r in pair]
            samples.append(
                {
                    **item,
                    "answer": answer,
                    "judge_replies": pair,
                    "verdicts": verdicts,
                    "outcome": combine(*verdicts),
                    "judge_failed": sum(r is None for r in pair),
                }  # fmt: skip
            )
        values, stderr = pairwise_metrics(samples)
        info.update(
            template=self.template,
            max_gen_toks=self.max_gen_toks,
            judge_max_tokens=self.judge_max_tokens,
            judge_failed=sum(s["judge_failed"] for s in samples),
        )
        return TaskResult(values, stderr, n=len(samples), num_fewshot=0, samples=samples, info=info)
