"""scripts/collect.py and imitax.collect against OpenAI-compatible teachers on loopback.

The fake teacher is a FastAPI app under uvicorn in a thread of this process. Its answers are a
pure function of the messages it receives (so a resumed run must equal an uninterrupted one), it
records every request (so a test sees what the teacher was shown), and user turns holding a
marker script its faults: ``FAIL429`` (first attempt: 429 with ``Retry-After: 1``), ``FAIL500``
(first two: 500), ``SLOW`` (first: 3 s, past the client's 1 s timeout), ``DROP`` (first: the
connection is closed mid-response), ``ALWAYS500`` (every attempt).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import fastapi
import pytest
import uvicorn
from fastapi.responses import JSONResponse, Response

from imitax.collect import (
    RateLimiter,
    Sampling,
    StoreError,
    Teacher,
    TeacherError,
    collect,
    nq_synthetic,
    open_teacher,
    read_prompts,
    store,
)
from imitax.data import DataError
from tests import train_helpers as th

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "collect.py"
SECRET = "sk-test-0123456789-secret"


def fake_answer(messages: list[dict]) -> str:
    """The fake teacher's answer: which turn it is, and the last user turn reversed word by word."""
    turn = sum(m["role"] == "assistant" for m in messages)
    return f"answer {turn}: " + " ".join(reversed(messages[-1]["content"].split()))


class _Dropped(Response):
    """Declares a 1000-byte body, sends 7 bytes and ends: uvicorn closes the connection mid-response."""

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"id": ', "more_body": False})


def fake_teacher_app(delay: float = 0.0, key: str | None = None):
    app = fastapi.FastAPI()
    app.state.requests, app.state.in_flight, app.state.most_in_flight = [], 0, 0
    attempts = collections.Counter()

    def refused(request: fastapi.Request):
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        bad = refused(request)
        return bad or {
            "object": "list",
            "data": [{"id": "fake-teacher", "object": "model", "created": 0, "owned_by": "t"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        app.state.in_flight += 1
        app.state.most_in_flight = max(app.state.most_in_flight, app.state.in_flight)
        try:
            return await answer(request)
        finally:
            app.state.in_flight -= 1

    async def answer(request: fastapi.Request):
        if bad := refused(request):
            return bad
        body = await request.json()
        messages, last = body["messages"], body["messages"][-1]["content"]
        attempts[json.dumps(messages)] += 1
        attempt = attempts[json.dumps(messages)]
        app.state.requests.append({"time": time.monotonic(), "body": body, "attempt": attempt})
        error = {"error": {"message": "scripted", "type": "server_error"}}
        if "FAIL429" in last and attempt == 1:
            return JSONResponse(error, status_code=429, headers={"Retry-After": "1"})
        if ("FAIL500" in last and attempt <= 2) or "ALWAYS500" in last:
            return JSONResponse(error, status_code=500)
        if "SLOW" in last and attempt == 1:
            await asyncio.sleep(3)
        if "DROP" in last and attempt == 1:
            return _Dropped()
        await asyncio.sleep(delay)
        answer = fake_answer(messages)
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake-teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(answer.split()),
                "total_tokens": prompt_tokens + len(answer.split()),
            },
        }

    return app


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port in a thread; yields its ``/v1`` base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def teacher():
    app = fake_teacher_app(delay=0.1)
    with running(app) as url:
        yield app, url


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stable(record: dict) -> dict:
    """A record without what differs between runs of the same collection (its timing)."""
    teacher = {k: v for k, v in record["teacher"].items() if k not in ("seconds", "collected_at")}
    return {**record, "teacher": teacher}


def script_env(**extra: str) -> dict[str, str]:
    """collect.py's environment: offline, CPU, no API key unless given, XLA left to --xla_backend."""
    env = {k: v for k, v in th.subprocess_env().items() if k not in ("XLA_FLAGS", "OPENAI_API_KEY")}
    return env | extra


def run_script(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = script_env(**(env or {}))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one-line error of a run that must have failed on bad input (absl's INFO lines may come before it)."""
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def run_in_process(url: str, prompts_file, out, max_retries: int = 3, max_tokens: int = 64, **kwargs) -> object:
    prompts, _ = read_prompts(str(prompts_file))
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0, seed=1)
    teacher = Teacher(url, None, None, sampling, max_retries=max_retries, timeout=1.0)

    async def go():
        await teacher.check()
        return await collect(teacher, prompts, out, f"{out}.failures", progress=False, **kwargs)

    return asyncio.run(go())


def test_sigkill_then_rerun_collects_every_prompt_once_as_an_uninterrupted_run(teacher, tmp_path):
    app, url = teacher
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"question number {i} please"} for i in range(60)]
    )
    out = tmp_path / "out.jsonl"
    args = [f"--teacher={url}", f"--prompts={prompts}", f"--out={out}", "--concurrency=8", "--max_tokens=64"]
    args += ["--temperature=0", "--seed=1", "--timeout=1", "--max_retries=3", "--noprogress"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=script_env(), cwd=ROOT, stderr=subprocess.PIPE)
    try:
        while not out.exists() or out.read_text().count("\n") < 16:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = out.read_text()
    assert 16 <= partial.count("\n") < 60, "the kill must land partway"
    # As a kill inside write() would leave it: the start of a record without its newline.
    with open(out, "a") as f:
        f.write('{"id": "p59", "conversations": [{"from": "hu')

    done = run_script(*args)
    assert done.returncode == 0, done.stderr
    assert f"already in {out}" in done.stdout
    resumed = store.read(out)
    assert sorted(r["id"] for r in resumed) == sorted(f"p{i}" for i in range(60))  # each exactly once
    assert out.read_text().startswith(partial)  # nothing collected before the kill was rewritten
    assert not (tmp_path / "out.failures.jsonl").exists()  # no failures: no (stale) failures file

    reference = tmp_path / "reference.jsonl"
    app.state.most_in_flight = 0
    outcome = run_in_process(url, prompts, reference, concurrency=8)
    assert outcome.collected == 60 and outcome.failed == 0
    assert app.state.most_in_flight == 8  # bounded, and the bound is used
    by_id = {r["id"]: stable(r) for r in store.read(reference)}
    assert {r["id"]: stable(r) for r in resumed} == by_id
    record = by_id["p7"]
    assert record["conversations"] == [
        {"from": "human", "value": "question number 7 please"},
        {"from": "gpt", "value": "answer 0: please 7 number question"},
    ]
    assert record["teacher"]["model"] == "fake-teacher" and record["teacher"]["endpoint"] == url
    assert record["teacher"]["sampling"] == {"max_tokens": 64, "temperature": 0.0, "seed": 1}
    assert record["teacher"]["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_faults_are_retried_and_final_failures_recorded(tmp_path):
    app = fake_teacher_app()
    markers = ["FAIL429", "FAIL500", "SLOW", "DROP", "ALWAYS500", "fine"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": m, "prompt": f"{m} here"} for m in markers])
    out = tmp_path / "out.jsonl"
    with running(app) as url:
        outcome = run_in_process(url, prompts, out, concurrency=8)
    got = {r["id"]: r for r in store.read(out)}
    assert sorted(got) == sorted(set(markers) - {"ALWAYS500"})
    assert got["DROP"]["conversations"][1]["value"] == "answer 0: here DROP"
    failures = [json.loads(line) for line in open(f"{out}.failures")]
    assert failures == [{"id": "ALWAYS500", "error": failures[0]["error"], "status": 500}]
    assert outcome.collected == 5 and outcome.failed == 1

    attempts = collections.defaultdict(list)
    for r in app.state.requests:
        attempts[r["body"]["messages"][-1]["content"].split()[0]].append(r["time"])
    assert {m: len(t) for m, t in attempts.items()} == {
        "FAIL429": 2, "FAIL500": 3, "SLOW": 2, "DROP": 2, "ALWAYS500": 4, "fine": 1
    }  # fmt: skip
    assert attempts["FAIL429"][1] - attempts["FAIL429"][0] >= 1.0  # Retry-After: 1 honoured

    # The failed prompt is asked again by a rerun; the collected ones are not.
    before = len(app.state.requests)
    with running(app) as url:
        again = run_in_process(url, prompts, out, max_retries=0, concurrency=8)
    assert (again.skipped, again.failed, len(app.state.requests) - before) == (5, 1, 1)


def test_multi_turn_conversations_are_recollected_in_order(teacher, tmp_path):
    app, url = teacher
    conversation = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "first user turn"},
        {"from": "gpt", "value": "the old teacher's answer, replaced"},
        {"from": "human", "value": "second user turn"},
        {"from": "gpt", "value": "another old answer"},
    ]
    sharegpt = tmp_path / "chat.json"
    sharegpt.write_text(json.dumps([{"id": "mt", "conversations": conversation}]))
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "only turn"}]}])
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add.", "input": "1 and 2"}]))
    out = tmp_path / "out.jsonl"
    before = len(app.state.requests)
    outcome = run_in_process(url, f"{sharegpt},{messages},{alpaca}", out, concurrency=4)
    assert outcome.collected == 3
    got = {r["id"]: r["conversations"] for r in store.read(out)}
    first, second = "answer 0: turn user first", "answer 1: turn user second"
    assert got["mt"] == [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "first user turn"},
        {"from": "gpt", "value": first},
        {"from": "human", "value": "second user turn"},
        {"from": "gpt", "value": second},
    ]
    assert got["m.jsonl:0"][1]["value"] == "answer 0: turn only"
    assert got["a.json:0"][0]["value"] == "Add.\n\n1 and 2"
    seen = [r["body"]["messages"] for r in app.state.requests[before:]]
    assert [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first user turn"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "second user turn"},
    ] in seen


def test_nq_synthetic_parser_on_hand_written_replies():
    reply = (
        "Sure! Here are new ones:\n"
        "1. Q: who painted the mona lisa?\n   A: Leonardo da Vinci\n"
        "**Q:** when did the berlin wall fall\n**A:** 9 November 1989\n"
        "Q: what is the longest river in africa\n"  # no answer line: dropped
        "Q: who wrote the iliad\nA: a blind poet traditionally named Homer of Chios\n"  # 8 words: dropped
        "- Q: where is mount kilimanjaro\n- A: Tanzania\n"
        "A: an answer without a question\n"
    )
    pairs = nq_synthetic.parse_pairs(reply)
    assert pairs == [
        ("who painted the mona lisa", "Leonardo da Vinci"),
        ("when did the berlin wall fall", "9 November 1989"),
        ("where is mount kilimanjaro", "Tanzania"),
    ]
    kept = nq_synthetic.dedupe(
        pairs + [("Who painted the Mona Lisa?", "da Vinci")], exclude=["Where is Mount Kilimanjaro"]
    )
    assert kept == pairs[:2]


def test_nq_synthetic_recipe_writes_training_and_nq_files(tmp_path):
    seeds = [{"question": f"seed question {i}", "answer": [f"seed {i}"]} for i in range(6)]
    seed_file = write_jsonl(tmp_path / "seed.jsonl", seeds)
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "nq-teacher", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        prompt = (await request.json())["messages"][0]["content"]
        shown = prompt.count("\nA: seed")
        text = f"Q: how many examples were shown\nA: {shown}\nQ: seed question 0\nA: seed 0\nQ: a new one?\nA: yes"
        message = {"role": "assistant", "content": text}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "nq-teacher",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip

    out = tmp_path / "nq.jsonl"
    with running(app) as url:
        done = run_script(f"--teacher={url}", f"--prompts={seed_file}", f"--out={out}", "--recipe=nq_synthetic",
                          "--nq_requests=3", "--nq_examples=4", "--nq_pairs=3", "--noprogress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    replies = store.read(out)
    assert sorted(r["id"] for r in replies) == ["nq_synthetic-0", "nq_synthetic-1", "nq_synthetic-2"]
    assert replies[0]["conversations"][0]["value"].count("Q: seed question") == 4
    train_file, nq_file = nq_synthetic.output_paths(out)
    nq = [json.loads(line) for line in open(nq_file)]
    # The seed copy is dropped, and the repeats across the three replies are kept once.
    assert nq == [
        {"question": "how many examples were shown", "answer": ["4"]},
        {"question": "a new one", "answer": ["yes"]},
    ]
    train = [json.loads(line)["conversations"] for line in open(train_file)]
    assert train[1] == [{"from": "human", "value": "a new one"}, {"from": "gpt", "value": "yes"}]
    from imitax.eval import tasks

    docs = tasks.get("nq_open")(data_file=nq_file, fewshot_file=seed_file, num_fewshot=2).load()[0]
    assert [d["question"] for d in docs] == ["how many examples were shown", "a new one"]


def test_api_key_from_the_environment_only_and_never_written(tmp_path):
    """Also reads a hub-style source (``hf:DIR:SPLIT``, a local dataset directory, through ``datasets``)."""
    app = fake_teacher_app(key=SECRET)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "k", "prompt": "keyed prompt"}])
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"id": "h", "prompt": "from the hub"}])
    out = tmp_path / "out.jsonl"
    with running(app) as url:
        args = (f"--teacher={url}", f"--prompts={prompts},hf:{tmp_path / 'hub'}:train", f"--out={out}",
                "--noprogress", "--api_key_env=MY_KEY")  # fmt: skip
        missing = run_script(*args)
        done = run_script(*args, env={"MY_KEY": SECRET, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
        with pytest.raises(TeacherError, match="refused the API key") as refused:
            asyncio.run(Teacher(url, api_key="wrong", max_retries=0).check())
    assert (
        error_line(missing)
        == "collect.py: error: --api_key_env=MY_KEY but $MY_KEY is not set; export the teacher's key"
    )
    assert "wrong" not in str(refused.value)
    assert done.returncode == 0, done.stderr
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert SECRET not in written + done.stdout + done.stderr
    answers = {r["id"]: r["conversations"][1]["value"] for r in store.read(out)}
    assert answers == {"k": "answer 0: prompt keyed", "h": "answer 0: hub the from"}


def test_bad_input_is_one_line_and_keeps_what_was_collected(teacher, tmp_path):
    _, url = teacher
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "kept prompt"}])
    out = tmp_path / "out.jsonl"
    assert run_in_process(url, prompts, out).collected == 1
    collected = out.read_bytes()
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "in no format"}])
    with socket.socket() as s:  # a port nothing listens on: bound, noted, closed
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cases = {
        "unknown format": (
            [f"--teacher={url}", f"--prompts={unknown}"],
            "unknown.jsonl, line 1: unknown prompt format",
        ),
        "unreachable": ([f"--teacher={dead}", f"--prompts={prompts}"], "is unreachable"),
    }
    for name, (args, expected) in cases.items():
        done = run_script(*args, f"--out={out}", "--noprogress", "--max_retries=0")
        assert expected in error_line(done), (name, done.stderr)
        assert out.read_bytes() == collected, name
    # What the script turns into one line the same way (a ValueError or TeacherError), checked in-process.
    with pytest.raises(TeacherError, match="neither an http"), open_teacher("/no/such/model"):
        pass
    with pytest.raises(ValueError, match=r"--top_p must be in \(0, 1\]"):
        Sampling(top_p=0)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "messages": []}])
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: field 'prompt': missing"):
        read_prompts(str(mixed))
    with pytest.raises(DataError, match=r"line 2: id 'a' already used at .*line 1"):
        read_prompts(str(write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}] * 2)))
    with store.Store(out), pytest.raises(StoreError, match="being written by another collection"):
        store.Store(out)
    out.write_bytes(collected + b"not a record\n")
    with pytest.raises(StoreError, match=r"out\.jsonl, line 2: not a collected record"):
        store.Store(out)


def test_rate_limiter_spaces_requests_and_tokens():
    now = [0.0]

    async def sleep(seconds):  # a clock that jumps instead of waiting
        now[0] += seconds

    async def go(rpm, tpm, costs):
        limiter = RateLimiter(rpm=rpm, tpm=tpm, clock=lambda: now[0], sleep=sleep)
        for tokens in costs:
            await limiter.acquire(tokens)
        return now[0]

    # 600 tokens a minute: six requests of 100 fit at once; the next 300 need 30 s of refill.
    assert asyncio.run(go(60, 600, [100] * 6 + [300])) == pytest.approx(30.0)
    # 2 requests a minute: the 3rd waits 30 s, the 4th 30 s more; a request over the whole budget waits for it all.
    now[0] = 0.0
    assert asyncio.run(go(2, 0, [1] * 4)) == pytest.approx(60.0)
    now[0] = 0.0
    assert asyncio.run(go(0, 100, [50, 1000])) == pytest.approx(30.0)


def test_real_imitax_server_answers_alike_at_any_concurrency_and_the_file_trains(tmp_path, tmp_path_factory):
    """A local model path as the teacher (served in-process by imitax.serve), greedy, 8 in flight vs 1."""
    import torch
    import transformers
    from hf_models import randomize, tiny_hf_config

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = th.MODEL_VOCAB, 256
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-llama"
    randomize(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(str(th.DATA / "tokenizer")).save_pretrained(model_dir)
    texts = ["What is the capital of France?", "Name a colour.", "Add two and three.", "Say hello.", "Why?"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": t} for i, t in enumerate(texts)])
    chat = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "old"}, {"from": "human", "value": "More."}]
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"id": "chat", "conversations": chat}])
    prompts = f"{prompts},{chats}"
    with (
        th.compile_settings(th.session_cache_dir(tmp_path_factory)),
        open_teacher(str(model_dir), max_batch=8, max_len=128, chunk=64, prefill_rows=1) as url,
    ):
        many = run_in_process(url, prompts, tmp_path / "many.jsonl", max_tokens=12, concurrency=8)
        one = run_in_process(url, prompts, tmp_path / "one.jsonl", max_tokens=12, concurrency=1)
    assert (many.collected, one.collected, many.failed + one.failed) == (6, 6, 0)
    collected = {r["id"]: stable(r) for r in store.read(tmp_path / "many.jsonl")}
    assert collected == {r["id"]: stable(r) for r in store.read(tmp_path / "one.jsonl")}
    assert {r["teacher"]["model"] for r in collected.values()} == {"tiny-llama"}
    assert all(
        0 < r["teacher"]["usage"]["completion_tokens"] <= 12 * len(r["teacher"]["finish_reasons"])
        for r in collected.values()
    )
    assert [t["from"] for t in collected["chat"]["conversations"]] == ["human", "gpt", "human", "gpt"]

    # The trainer's own loop (what scripts/train.py runs) reads the collected file as it is.
    from imitax.train.loop import run

    overrides = th.base_overrides(th.DATA / "tokenizer") | {"data.train": str(tmp_path / "many.jsonl"),
                 "total_steps": 2, "checkpoint_every": 2, "seq_len": 32}  # fmt: skip
    with th.compile_settings(th.session_cache_dir(tmp_path_factory)):
        run(th.make_config(overrides), str(tmp_path / "run"))
    assert sorted(th.losses(tmp_path / "run")) == [1, 2]
