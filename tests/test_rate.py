"""Rating studies: concurrent raters on SQLite and a real PostgreSQL server, bad input, results.

The browser and the command line are tested in tests/test_rate_browser.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imitax.rate import local_postgres, results, store
from imitax.rate.app import MAX_BODY, create_app, render_markdown
from imitax.rate.models import Answer, Assignment, Item, Judgment, Prompt, System, open_database

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("alpha", "beta")


def _spec(name: str, prompts: int, raters: int, per_item: int = 3, attention: int = 1) -> store.StudySpec:
    keys = [f"p{i}" for i in range(prompts)]
    return store.StudySpec(
        name=name,
        prompts={k: f"Question {k}?" for k in keys},
        answers={s: {k: f"{s[0].upper()}-answer to {k}" for k in keys} for s in SYSTEMS},
        sources={s: f"{s}.jsonl" for s in SYSTEMS},
        pairs=[SYSTEMS],
        per_item=per_item,
        raters=raters,
        attention_checks=[(f"Check {i}: what is 2+2?", "4", "purple seven") for i in range(attention)],
    )


@contextlib.contextmanager
def serving(app):
    """An ASGI app on a real HTTP server (uvicorn, in a thread) at a free port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server: $IMITAX_TEST_POSTGRES_URL, else one started here (CI never skips)."""
    if os.environ.get("IMITAX_TEST_POSTGRES_URL"):
        yield os.environ["IMITAX_TEST_POSTGRES_URL"]
        return
    if local_postgres.server_binaries() is None:
        message = "PostgreSQL server binaries not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with local_postgres.local_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = open_database(f"sqlite:///{tmp_path}/ratings.db")
        yield engine
        engine.dispose()
        return
    with local_postgres.fresh_database(request.getfixturevalue("postgres_server")) as url:
        engine = open_database(url)
        yield engine
        engine.dispose()


def _count(engine, model) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count(model.id)))


def test_twenty_raters_in_parallel_give_exactly_three_judgments_per_item(engine):
    tokens = store.create_study(engine, _spec("parallel", prompts=24, raters=20))
    recorded, errors, barrier = {}, [], threading.Barrier(len(tokens.raters))

    def rater(label: str, token: str, base: str) -> None:
        try:
            work(label, token, base)
        except Exception as e:  # noqa: BLE001 -- reported by the test below
            errors.append(f"{label}: {e!r}")

    def work(label: str, token: str, base: str) -> None:
        rng = random.Random(label)
        mine = recorded[label] = {}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            barrier.wait()
            while (response := client.get("/api/next")).status_code == 200:
                item = response.json()
                assert set(item) >= {"item_id", "prompt", "a", "b"} and not any(s in response.text for s in SYSTEMS)
                choice = rng.choice(store.CHOICES)
                body = {"item_id": item["item_id"], "choice": choice, "reason": f"{label} says {choice}"}
                assert client.post("/api/rate", json=body).json() == {"status": "recorded"}
                if rng.random() < 0.3:  # a double submit is accepted once and stored once
                    assert client.post("/api/rate", json=body).json() == {"status": "already recorded"}
                mine[item["item_id"]] = choice
            assert response.status_code == 204

    with serving(create_app(engine)) as base:
        threads = [threading.Thread(target=rater, args=(label, token, base)) for label, token in tokens.raters]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors and len(recorded) == 20

    with Session(engine) as session:
        rows = session.execute(
            select(Assignment.item_id, Item.expected, Judgment.choice, Judgment.reason)
            .join(Judgment, Judgment.assignment_id == Assignment.id)
            .join(Item, Item.id == Assignment.item_id)
        ).all()
        regular_items = session.scalars(select(Item.id).where(Item.expected.is_(None))).all()
    per_item = {item: 0 for item in regular_items}
    for item, expected, _choice, _reason in rows:
        if expected is None:
            per_item[item] += 1
    assert len(regular_items) == 24 and set(per_item.values()) == {3}  # exactly three each
    # None lost: every judgment a client saw recorded is in the database, as made, and nothing else.
    stored = sorted((reason.split()[0], item, choice) for item, _, choice, reason in rows)
    sent = sorted((label, item, choice) for label, mine in recorded.items() for item, choice in mine.items())
    assert stored == sent
    assert len(rows) == 24 * 3 + 20  # plus each rater's attention check


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small SQLite study behind an in-process client, for the refusal cases."""
    from fastapi.testclient import TestClient

    engine = open_database(f"sqlite:///{tmp_path_factory.mktemp('rate')}/ratings.db")
    tokens = store.create_study(engine, _spec("refusals", prompts=4, raters=3, attention=1))
    with TestClient(create_app(engine)) as client:
        yield engine, tokens, client
    engine.dispose()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_api_refusals_store_nothing(study):
    engine, tokens, client = study
    (_, mine), (_, other), _ = tokens.raters
    item = client.get("/api/next", headers=_bearer(mine)).json()["item_id"]
    ok = {"item_id": item, "choice": "a", "reason": "clearer"}

    def refused(status: int, **request) -> None:
        before = _count(engine, Judgment)
        response = client.post("/api/rate", **request)
        assert response.status_code == status, response.text
        assert _count(engine, Judgment) == before

    refused(401, json=ok)  # no token
    refused(401, json=ok, headers=_bearer("x" * 43))  # unknown token
    refused(401, json=ok, headers=_bearer(tokens.admin))  # the admin token is no rater's
    refused(403, json=ok, headers=_bearer(other))  # an item of another rater
    with Session(engine) as session:
        check = session.scalar(select(Item.id).where(Item.expected.is_not(None)))
    refused(403, json={**ok, "item_id": check}, headers=_bearer(mine))  # an attention check not shown yet
    refused(422, json={**ok, "choice": "A is better"}, headers=_bearer(mine))
    refused(422, json={"item_id": item}, headers=_bearer(mine))
    refused(422, json={**ok, "reason": "x" * (store.MAX_REASON + 1)}, headers=_bearer(mine))
    refused(413, content=json.dumps({**ok, "reason": "x" * MAX_BODY}), headers=_bearer(mine))
    refused(413, content=iter([b"{" + b" " * MAX_BODY]), headers=_bearer(mine))  # chunked: no Content-Length

    assert client.post("/api/rate", json=ok, headers=_bearer(mine)).json() == {"status": "recorded"}
    assert client.post("/api/rate", json=ok, headers=_bearer(mine)).json() == {"status": "already recorded"}
    assert _count(engine, Judgment) == 1
    refused(409, json={**ok, "choice": "b"}, headers=_bearer(mine))  # changed after submission
    refused(409, json={**ok, "reason": "changed my mind"}, headers=_bearer(mine))
    _, judgments = store.judgments(engine, "refusals")
    assert [(j["item_id"], j["choice"], j["reason"]) for j in judgments] == [(item, "a", "clearer")]

    # The admin views refuse rater tokens and forged tokens.
    assert client.get("/api/admin/progress", headers=_bearer(mine)).status_code == 401
    assert client.get("/admin/" + "y" * 43).status_code == 401
    progress = client.get("/api/admin/progress", headers=_bearer(tokens.admin)).json()
    assert (progress["judgments"], progress["judgments_wanted"]) == (1, 12)
    assert [r["done"] for r in progress["raters"]] == [1, 0, 0]


def test_forms_need_the_csrf_token_of_their_session(study):
    engine, tokens, client = study
    _, _, (_, token) = tokens.raters
    page = client.get(f"/r/{token}")
    assert page.status_code == 200 and "Which answer is better?" in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert client.post(f"/r/{token}/start", data={}, follow_redirects=False).status_code == 403
    assert client.post(f"/r/{token}/start", data={"csrf": "0" * 64}, follow_redirects=False).status_code == 403
    cookie = client.cookies.get("imitax_session")
    client.cookies.clear()
    client.cookies.set("imitax_session", "another-session")  # a token from someone else's session
    assert client.post(f"/r/{token}/start", data={"csrf": csrf}, follow_redirects=False).status_code == 403
    assert not store.has_started(engine, token)
    client.cookies.clear()
    client.cookies.set("imitax_session", cookie)
    # Another server process over the same database accepts the form: the signing key is shared.
    from fastapi.testclient import TestClient

    with TestClient(create_app(engine), cookies={"imitax_session": cookie}) as another:
        assert another.post(f"/r/{token}/start", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    page = client.get(f"/r/{token}")
    item = int(page.text.split('name="item_id" value="')[1].split('"')[0])
    assert not any(s in page.text for s in SYSTEMS)  # blinded
    before = _count(engine, Judgment)
    form = {"item_id": item, "choice": "tie", "reason": ""}
    assert client.post(f"/r/{token}/rate", data={**form, "csrf": "f" * 64}).status_code == 403
    assert client.post(f"/r/{token}/rate", data={**form, "csrf": csrf, "choice": "x"}).status_code == 400
    assert _count(engine, Judgment) == before
    assert client.post(f"/r/{token}/rate", data={**form, "csrf": csrf}, follow_redirects=False).status_code == 303
    assert _count(engine, Judgment) == before + 1


def test_markdown_is_sanitized():
    text = "**bold** <script>alert(1)</script> <img src=x onerror=alert(2)> [x](javascript:alert(3)) [y](https://e.org)"
    html = str(render_markdown(text))
    assert "<strong>bold</strong>" in html and '<a href="https://e.org" rel="noopener noreferrer">y</a>' in html
    assert "&lt;script&gt;alert(1)" in html  # shown as text
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html


def _run_create(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.Popen(
        [sys.executable, f"{ROOT}/scripts/rate.py", "create", f"--db=sqlite:///{tmp_path}/r.db", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _error_line(stderr: str) -> str:
    """The one-line error of a failed run: its last line (absl's INFO lines, e.g. --xla_backend's, come first)."""
    assert "Traceback" not in stderr, stderr
    *info, last = stderr.strip().splitlines()
    assert last.startswith("rate.py: error: ") and all(line.startswith("I") for line in info), stderr
    return last


def test_create_refuses_bad_input_and_writes_nothing(tmp_path):
    write = lambda name, rows: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("prompts.jsonl", [{"id": f"p{i}", "prompt": f"Q{i}"} for i in range(3)])
    write("short.jsonl", [{"id": f"p{i}", "response": "r"} for i in range(2)])
    write("full.jsonl", [{"id": f"p{i}", "response": "r"} for i in range(3)])
    write("dup.jsonl", [{"id": "p0", "response": "r"}, {"id": "p1", "response": "r"}, {"id": "p0", "response": "s"}])
    common = ["--study=s", f"--prompts={tmp_path}/prompts.jsonl", "--raters=3"]
    cases = {
        "no answer for 1 prompt id(s): 'p2'": [
            f"--system=a={tmp_path}/full.jsonl",
            f"--system=b={tmp_path}/short.jsonl",
        ],
        "dup.jsonl:3: duplicate id 'p0' (first on line 1)": [
            f"--system=a={tmp_path}/full.jsonl",
            f"--system=b={tmp_path}/dup.jsonl",
        ],
        "'a' is named twice": [f"--system=a={tmp_path}/full.jsonl", f"--system=a={tmp_path}/short.jsonl"],
    }
    runs = {expected: _run_create(tmp_path, *common, *flags) for expected, flags in cases.items()}
    for expected, run in runs.items():
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 1 and stdout == ""
        assert expected in _error_line(stderr), stderr
    assert not (tmp_path / "r.db").exists()  # the files are checked before the database is opened

    # A failure inside the database transaction (the study exists) leaves the database as it was.
    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    store.create_study(engine, _spec("s", prompts=2, raters=3))
    counts = [_count(engine, m) for m in (Item, Assignment)]
    with pytest.raises(store.StudyError, match="already exists"):
        store.create_study(engine, _spec("s", prompts=5, raters=4))
    assert [_count(engine, m) for m in (Item, Assignment)] == counts
    engine.dispose()


# ------------------------------------------------------------------------------------------------
# Results against hand-computed values


def _rows(judged: dict[int, list[tuple[str, str]]], attention: dict[str, str]) -> list[dict]:
    """Export rows of pair X:Y: ``judged[item] = [(rater, outcome in win/tie/loss)]``."""
    rows = []
    for item, judgments in judged.items():
        for rater, outcome in judgments:
            preferred = {"win": "X", "tie": "tie", "loss": "Y"}[outcome]
            rows.append({"rater": rater, "item_id": item, "attention_check": False, "system_x": "X",
                         "system_y": "Y", "preferred": preferred, "choice": "", "expected": ""})  # fmt: skip
    for rater, choice in attention.items():
        rows.append({"rater": rater, "item_id": 99, "attention_check": True, "choice": choice, "expected": "a"})
    return rows


def _exact_bootstrap_interval(values: list[float]) -> list[float]:
    """The 2.5% and 97.5% quantiles of the exact bootstrap distribution of the mean (all n**n draws)."""
    means = np.sort([np.mean(draw) for draw in itertools.product(values, repeat=len(values))])
    cdf = np.arange(1, len(means) + 1) / len(means)
    quantiles = []
    for q in (0.025, 0.975):
        value = means[np.searchsorted(cdf, q)]
        # Far from an atom's edge, so 10,000 random draws must land on the same value.
        below, upto = np.mean(means < value), np.mean(means <= value)
        assert below + 0.005 < q < upto - 0.005
        quantiles.append(float(value))
    return quantiles


def test_results_match_hand_computed_rates_intervals_and_agreement():
    judged = {
        1: [("r1", "win"), ("r2", "win")],
        2: [("r1", "win"), ("r2", "tie"), ("r3", "loss")],
        3: [("r1", "tie"), ("r2", "tie")],
        4: [("r1", "loss"), ("r2", "loss"), ("r3", "loss")],
    }
    summary = results.summarize(_rows(judged, {"r1": "a", "r2": "a", "r3": "b"}), seed=1)
    assert summary["failed_attention"] == {"r3": 1} and summary["excluded_raters"] == ["r3"]
    (pair,) = summary["pairs"]
    # Items' (win, tie, loss): (1, 0, 0), (.5, .5, 0), (0, 1, 0), (0, 0, 1).
    assert (pair["items"], pair["judgments"]) == (4, 8)
    assert pair["win"] == pytest.approx(0.375) and pair["tie"] == pytest.approx(0.375)
    assert pair["loss"] == pytest.approx(0.25) and pair["as_good_or_better"] == pytest.approx(0.75)
    intervals = pair["interval_95"]
    assert intervals["as_good_or_better"] == pytest.approx(_exact_bootstrap_interval([1, 1, 1, 0]))
    assert intervals["as_good_or_better"] == pytest.approx([0.25, 1.0])
    assert intervals["win"] == pytest.approx(_exact_bootstrap_interval([1, 0.5, 0, 0]))
    assert intervals["loss"] == pytest.approx(_exact_bootstrap_interval([0, 0, 0, 1]))
    # Krippendorff's nominal alpha by hand: coincidences o_XX=2, o_XT=o_TX=1, o_TT=2, o_YY=2 (n=8);
    # n_X=3, n_T=3, n_Y=2; D_o = 2/8, D_e = 2(3*3 + 3*2 + 3*2)/(8*7) = 3/4; alpha = 1 - D_o/D_e = 2/3.
    assert summary["agreement_krippendorff_alpha"] == pytest.approx(2 / 3)

    kept = results.summarize(_rows(judged, {"r1": "a", "r2": "a", "r3": "b"}), include_failed=True)
    # With r3: item 2 is (1/3, 1/3, 1/3), item 4 still (0, 0, 1).
    assert kept["excluded_raters"] == [] and kept["pairs"][0]["win"] == pytest.approx((1 + 1 / 3) / 4)
    assert results.summarize(_rows(judged, {"r3": "b"}), max_missed=1)["excluded_raters"] == []


def _fake_openai_app():
    """An OpenAI-compatible endpoint serving one model that answers "generated: PROMPT"."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "me"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        answer = f"generated: {body['messages'][-1]['content']} ({body['max_tokens']} tokens at most)"
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}

    return app


def test_create_generates_a_systems_answers_from_an_openai_compatible_url(tmp_path):
    prompts = {f"p{i}": f"Question {i}?" for i in range(4)}
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in prompts.items())
    )
    (tmp_path / "file.jsonl").write_text(
        "".join(json.dumps({"id": k, "response": "from a file"}) + "\n" for k in prompts)
    )
    with serving(_fake_openai_app()) as base:
        common = ["--study=g", f"--prompts={tmp_path}/prompts.jsonl", f"--system=file={tmp_path}/file.jsonl"]
        wrong = _run_create(tmp_path, *common, f"--system=url={base}/v1", "--served_model=url=other-model")
        created = _run_create(tmp_path, *common, f"--system=url={base}/v1", "--raters=3", "--max_tokens=7")
        wrong_out, wrong_err = wrong.communicate(timeout=60)
        out, err = created.communicate(timeout=60)
    assert wrong.returncode == 1 and wrong_out == ""
    assert re.fullmatch(
        r"rate.py: error: --system=url=\S+: .*does not serve model 'other-model'.*", _error_line(wrong_err)
    )
    assert created.returncode == 0, err
    assert len(re.findall(r"^rater r00\d: http://\S+/r/\S+$", out, re.M)) == 3
    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    with Session(engine) as session:
        rows = session.execute(
            select(Prompt.key, System.name, Answer.text).join(Answer.prompt).join(Answer.system).order_by(Prompt.key)
        ).all()
    engine.dispose()
    expected = [(k, "url", f"generated: {p} (7 tokens at most)") for k, p in prompts.items()]
    assert sorted(r for r in rows if r[1] == "url") == expected


def test_create_generates_a_systems_answers_from_a_local_model_path(tmp_path):
    """A tiny random model directory as a system: served in-process by imitax.serve, asked greedily."""
    import torch
    import train_helpers as th
    import transformers
    from hf_models import randomize, tiny_hf_config

    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = th.MODEL_VOCAB, 256
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-llama"
    randomize(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(str(th.DATA / "tokenizer")).save_pretrained(model_dir)
    prompts = {f"q{i}": f"Say thing number {i}." for i in range(3)}
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in prompts.items())
    )
    (tmp_path / "file.jsonl").write_text(
        "".join(json.dumps({"id": k, "response": "from a file"}) + "\n" for k in prompts)
    )
    env = th.subprocess_env(device_count=1, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    created = subprocess.run(
        [sys.executable, f"{ROOT}/scripts/rate.py", "create", f"--db=sqlite:///{tmp_path}/r.db", "--study=m",
         f"--prompts={tmp_path}/prompts.jsonl", f"--system=file={tmp_path}/file.jsonl",
         f"--system=tiny={model_dir}", "--raters=3", "--max_tokens=6"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    with Session(engine) as session:
        answers = session.execute(
            select(Prompt.key, Answer.text).join(Answer.prompt).join(Answer.system).where(System.name == "tiny")
        ).all()
        source = session.scalar(select(System.source).where(System.name == "tiny"))
    engine.dispose()
    # Every prompt answered by the model (imitax.serve's correctness is tests/test_serve.py's and test_collect.py's).
    assert sorted(k for k, _ in answers) == sorted(prompts) and source == str(model_dir)
    assert all(isinstance(text, str) and text != "from a file" for _, text in answers)
