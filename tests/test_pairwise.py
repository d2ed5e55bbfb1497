"""The pairwise judge task against a scripted fake judge endpoint, with metrics computed by hand.

The fake judge (FastAPI under uvicorn on loopback) reads which answer is the model's (they start
with "model") and replies with a scripted text per question and position: consistent wins and
losses, a tie, a position-biased judge, replies without a verdict or with two, and a request that
always fails. The evaluated model is a stand-in LM that returns scripted answers for the rendered
prompts, so every expected number below follows from the script by hand.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import threading
import time

import fastapi
import numpy as np
import pytest
import transformers
import uvicorn
from fastapi.responses import JSONResponse

from imitax.eval import evaluator
from imitax.eval.tasks import pairwise
from tests import train_helpers as th

# question -> (reply when the model's answer is A, reply when it is B); None: HTTP 500 every time.
SCRIPT = {
    "q0": ("Model is better. [[A]]", "[[B]]"),  # win
    "q1": ("[[A]]", "[[A]]"),  # position bias: win, then loss -> tie
    "q2": ("[[C]]", "[[C]]"),  # tie
    "q3": ("[[B]]", "[[A]]"),  # loss
    "q4": ("A is better", "[[B]]"),  # no verdict in the first order -> unparseable item
    "q5": ("[[A]] no wait [[B]]", "[[A]] [[B]]"),  # two verdicts, twice -> unparseable
    "q6": ("[[A]]", "[[B]], and again [[B]]"),  # win (one distinct verdict, repeated)
    "q7": ("[[B]]", "[[A]]"),  # loss
    "q8": ("[[A]]", None),  # the judge fails in the second order -> unparseable
}
# Model answers and references of different lengths: d = len(answer) - len(reference).
ANSWERS = {f"q{i}": ("model " + "x" * (3 * i)).strip() for i in range(9)}
REFERENCES = {f"q{i}": "reference " + "y" * (17 - 2 * i) for i in range(9)}


def judge_app():
    app = fastapi.FastAPI()
    app.state.requests = []

    def section(text: str, start: str, end: str) -> str:
        return text.split(start, 1)[1].split(end, 1)[0]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-judge", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = await request.json()
        app.state.requests.append(body)
        text = body["messages"][-1]["content"]
        question = section(text, "[User Question]\n", "\n\n")
        answer_a = section(text, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
        reply = SCRIPT[question][0 if answer_a.startswith("model") else 1]
        if reply is None:
            return JSONResponse({"error": {"message": "scripted", "type": "server_error"}}, status_code=500)
        message = {"role": "assistant", "content": reply}
        return {"id": "j", "object": "chat.completion", "created": 0, "model": "fake-judge",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip

    return app


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port in a thread; yields its ``/v1`` base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class ScriptedLM:
    """An LM stand-in: answers each rendered prompt with :data:`ANSWERS` (what it was asked is kept)."""

    def __init__(self):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(th.DATA / "tokenizer"))
        self.requests = []

    def generate_until(self, requests):
        self.requests += requests
        # The koala prompt is 'BEGINNING OF CONVERSATION: USER: {prompt} GPT:'; a stop string after the answer.
        return [ANSWERS[context.split("USER: ")[1].split(" GPT:")[0]] + "</s>ignored" for context, _ in requests]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairwise")
    prompts, references = root / "prompts.jsonl", root / "references.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{q}", "prompt": q}) + "\n" for q in SCRIPT))
    references.write_text("".join(json.dumps({"id": f"p{q}", "response": REFERENCES[q]}) + "\n" for q in SCRIPT))
    app, lm = judge_app(), ScriptedLM()
    with running(app) as url:
        config = {"data_file": str(prompts), "reference_file": str(references), "judge": url, "judge_max_retries": 0}
        out = evaluator.evaluate(lm, {"pairwise": config}, root / "eval", progress=False)
    return out["results"]["pairwise"], app, lm, root


def test_outcomes_and_rates_match_the_script(judged):
    result, _, _, root = judged
    samples = [json.loads(line) for line in (root / "eval" / "samples_pairwise.jsonl").read_text().splitlines()]
    assert [s["outcome"] for s in samples] == ["win", "tie", "tie", "loss", None, None, "win", "loss", None]
    assert samples[4]["verdicts"] == [None, "B"] and samples[8]["judge_replies"] == ["[[A]]", None]
    m, se = result["metrics"], result["stderr"]
    # Judged: q0 win, q1 tie, q2 tie, q3 loss, q6 win, q7 loss.
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"]) == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    assert m["as_good_or_better"] == pytest.approx(4 / 6) and m["preference"] == pytest.approx(3 / 6)
    # Sample standard deviation / sqrt(6) of the 0/1 indicators [1,0,0,0,1,0] and [1,1,1,0,1,0].
    assert se["win_rate"] == pytest.approx(math.sqrt((2 * (2 / 3) ** 2 + 4 * (1 / 3) ** 2) / 5 / 6))
    assert se["as_good_or_better"] == pytest.approx(math.sqrt((4 * (1 / 3) ** 2 + 2 * (2 / 3) ** 2) / 5 / 6))
    # Verdicts without one [[X]]: q4 once, q5 twice, q8's failed request once: 4 of 18.
    assert (m["unparseable"], m["unparseable_rate"], m["judged"]) == (4, pytest.approx(4 / 18), 6)
    assert m["consistency"] == pytest.approx(5 / 6)  # all but q1 of the six with two verdicts
    assert result["info"]["judge_model"] == "fake-judge" and result["info"]["judge_failed"] == 1


def test_the_judge_sees_both_orders_with_the_mt_bench_prompt(judged):
    _, app, lm, _ = judged
    assert len(lm.requests) == 9 and lm.requests[0][1]["until"][0] == "</s>"
    asked = [r for r in app.state.requests if "[User Question]\nq0\n" in r["messages"][-1]["content"]]
    assert [r["messages"][0] for r in asked] == [{"role": "system", "content": pairwise.JUDGE_SYSTEM}] * 2
    assert {r["temperature"] for r in asked} == {0.0}
    first = pairwise.JUDGE_USER.format(question="q0", answer_a=ANSWERS["q0"], answer_b=REFERENCES["q0"])
    second = pairwise.JUDGE_USER.format(question="q0", answer_a=REFERENCES["q0"], answer_b=ANSWERS["q0"])
    assert sorted(r["messages"][1]["content"] for r in asked) == sorted([first, second])


def newton_logistic(y, d, ridge=pairwise.RIDGE, steps=50):
    """Reference fit: Newton-Raphson on the same penalized likelihood, then the delta-method stderr."""
    x = np.stack([np.ones(len(d)), np.tanh(np.asarray(d) / np.std(d, ddof=1))], axis=1)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + 2 * ridge * np.eye(2)
        w -= np.linalg.solve(hessian, x.T @ (p - y) + 2 * ridge * w)
    p = 1 / (1 + np.exp(-x @ w))
    hessian = x.T @ (x * (p * (1 - p))[:, None]) + 2 * ridge * np.eye(2)
    p0 = 1 / (1 + np.exp(-w[0]))
    return p0, p0 * (1 - p0) * math.sqrt(np.linalg.inv(hessian)[0, 0])


def test_length_controlled_win_rate(judged):
    result, *_ = judged
    judged_items = ["q0", "q1", "q2", "q3", "q6", "q7"]
    y = np.array([1, 0.5, 0.5, 0, 1, 0])
    d = [len(ANSWERS[q]) - len(REFERENCES[q]) for q in judged_items]
    expected, expected_se = newton_logistic(y, d)
    assert result["metrics"]["lc_win_rate"] == pytest.approx(expected, abs=1e-6)
    assert result["stderr"]["lc_win_rate"] == pytest.approx(expected_se, rel=1e-4)
    # Equal lengths: the length term is 0 and the fit returns the mean preference (up to the tiny ridge).
    assert pairwise.length_controlled([1, 0.5, 0, 1], [3, 3, 3, 3])[0] == pytest.approx(0.625, abs=1e-3)
    # A model that wins exactly when its answer is longer: at equal length its preference is lower.
    lengths = [-40, -30, -20, -10, 10, 20, 30, 45, 50, 60]
    wins = [0, 0, 1, 0, 1, 1, 0, 1, 1, 1]
    assert pairwise.length_controlled(wins, lengths)[0] < np.mean(wins)


def test_verdicts_are_parsed_strictly():
    assert [pairwise.verdict(t) for t in ("[[A]]", "so [[C]].", "[[B]] [[B]]", "[[A]][[B]]", "A", "[A]", None)] == [
        "A", "C", "B", None, None, None, None
    ]  # fmt: skip
    assert pairwise.combine("A", "B") == "win" and pairwise.combine("A", "A") == "tie"
    assert pairwise.combine("C", "A") == "tie" and pairwise.combine(None, "B") is None


def test_bad_input(tmp_path):
    prompts, references = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    references.write_text('{"id": "a", "response": "z"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl has no reference for 1 prompt id\(s\) of .*p\.jsonl: 'b'"):
        pairwise.Pairwise(data_file=prompts, reference_file=references, judge=str(tmp_path)).load()
    with pytest.raises(ValueError, match="needs reference_file= and judge="):
        pairwise.Pairwise(data_file=prompts, reference_file=references)
    script = th.ROOT / "scripts" / "evaluate.py"
    args = [f"--model={tmp_path}", f"--output_dir={tmp_path / 'out'}", "--tasks=pairwise"]
    args += [f"--pairwise_prompts={prompts}", f"--pairwise_reference={references}", "--judge=http://127.0.0.1:9/v1"]
    references.write_text('{"id": "a", "response": "z"}\n{"id": "b", "response": "w"}\n')
    done = subprocess.run(
        [sys.executable, str(script), *args], env=th.subprocess_env(1), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "judge: http://127.0.0.1:9/v1 is unreachable" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_references_from_collected_records(tmp_path):
    """A file scripts/collect.py wrote is a reference file as it is: the first teacher turn, by id."""
    collected = tmp_path / "collected.jsonl"
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "first"},
             {"from": "human", "value": "q2"}, {"from": "gpt", "value": "second"}]  # fmt: skip
    rows = [{"id": "a", "conversations": turns, "teacher": {"model": "t"}}, {"id": 7, "response": "plain"}]
    collected.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pairwise.read_references(collected) == {"a": "first", "7": "plain"}
    collected.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    with pytest.raises(ValueError, match=r"record 2: id 'a' appears twice"):
        pairwise.read_references(collected)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA with the test tokenizer, saved as a Hugging Face directory (model and judge)."""
    import torch

    from tests.hf_models import randomize, tiny_hf_config

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = 320, 512  # the tokenizer has 300 ids
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(th.DATA / "tokenizer")).save_pretrained(path)
    return path


def test_script_with_a_tiny_local_judge(tiny_dir, tmp_path):
    """scripts/evaluate.py end to end, the judge a local model path served in-process: a random judge's
    replies hold no verdict (or a stray one); each is counted as the samples file shows, nothing crashes."""
    prompts, references = tmp_path / "prompts.jsonl", tmp_path / "references.jsonl"
    questions = {"a": "Name a color.", "b": "What is two plus two?"}
    prompts.write_text("".join(json.dumps({"id": i, "prompt": q}) + "\n" for i, q in questions.items()))
    references.write_text("".join(json.dumps({"id": i, "response": f"answer {i}"}) + "\n" for i in questions))
    out = tmp_path / "out"
    args = [f"--model={tiny_dir}", f"--output_dir={out}", "--tasks=pairwise", "--max_gen_toks=8"]
    args += [f"--pairwise_prompts={prompts}", f"--pairwise_reference={references}", f"--judge={tiny_dir}"]
    done = subprocess.run(
        [sys.executable, str(th.ROOT / "scripts" / "evaluate.py"), *args],
        env=th.script_env(tmp_path / "cache", device_count=1), cwd=th.ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pairwise (n=2, 0-shot)" in done.stdout
    result = json.loads((out / "results.json").read_text())["results"]["pairwise"]
    samples = [json.loads(line) for line in (out / "samples_pairwise.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == list(questions) and result["n"] == 2
    assert result["info"]["judge"] == str(tiny_dir) and result["info"]["judge_model"] == "tiny-llama"
    # Every reply came back (none failed); its verdict is its one distinct [[A]], [[B]] or [[C]], else None.
    replies = [r for s in samples for r in s["judge_replies"]]
    assert len(replies) == 4 and all(isinstance(r, str) and r for r in replies)
    expected = [v.pop() if len(v := set(re.findall(r"\[\[([ABC])\]\]", r))) == 1 else None for r in replies]
    assert [v for s in samples for v in s["verdicts"]] == expected
    m = result["metrics"]
    unparseable = sum(v is None for v in expected)
    assert (m["unparseable"], m["unparseable_rate"]) == (unparseable, pytest.approx(unparseable / 4))
    judged = [s["outcome"] for s in samples if None not in s["verdicts"]]
    assert m["judged"] == len(judged) and result["info"]["judge_failed"] == 0
    for outcome in pairwise.OUTCOMES:  # no item judged: no rate (null in strict JSON), not a crash or a 0
        want = judged.count(outcome) / len(judged) if judged else None
        assert m[f"{outcome}_rate"] == (pytest.approx(want) if judged else None)


def test_pairwise_is_a_sweep_eval_task(tmp_path):
    """The sweep validates ``eval.tasks.ALIAS`` as it does before training (imitax.sweep.checks): its open
    field takes the alias, and the evaluator builds and loads the task (files read, judge URL asked)."""
    import ml_collections

    from imitax.sweep import checks
    from imitax.sweep.config import default_config, eval_tasks

    prompts, references = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    references.write_text('{"id": "a", "response": "z"}\n{"id": "b", "response": "w"}\n')
    config = default_config()
    with running(judge_app()) as url:
        spec = {"task": "pairwise", "data_file": str(prompts), "reference_file": str(references), "judge": url}
        config.eval.tasks.judge = ml_collections.ConfigDict(spec)
        checks.check_keys(config, default_config(), "config")
        built = evaluator.build_tasks(eval_tasks(config), load=True)
    assert isinstance(built["judge"], pairwise.Pairwise)
    assert [(i["id"], i["prompt"], i["reference"]) for i in built["judge"].load()] == [("a", "x", "z"), ("b", "y", "w")]
    config.eval.tasks.judge.judge = "http://127.0.0.1:9/v1"  # nothing listens there
    with pytest.raises(ValueError, match=r"^judge: http://127\.0\.0\.1:9/v1 is unreachable .*; start it or fix"):
        evaluator.build_tasks(eval_tasks(config), load=True)
