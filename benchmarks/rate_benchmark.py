r"""Load test of a rating study: simulated raters against ``scripts/rate.py serve``, SQLite and PostgreSQL.

  .venv/bin/python benchmarks/rate_benchmark.py                       # 200 raters, 60 s per database
  .venv/bin/python benchmarks/rate_benchmark.py --duration=10 --databases=sqlite

For each database a study is created (two systems, three judgments per item, one attention check
per rater), ``serve`` runs in its own process exactly as a user starts it, and ``--raters``
simulated raters (asyncio tasks over HTTP, each with its own token and connection) loop
``GET /api/next`` -> ``POST /api/rate`` for ``--duration`` seconds. The table gives judgments per
second and the p50/p99 latency of each request, then checks the database itself: judgments the
clients saw recorded but missing (lost), judgments stored twice or items with more than three
(duplicated) must all be 0. PostgreSQL is $IMITAX_TEST_POSTGRES_URL or a server started here with
its default (durable) settings. The machine is shared: the load average is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from absl import app, flags
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imitax.rate import local_postgres, store
from imitax.rate.models import Assignment, Item, Judgment, open_database

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DURATION = flags.DEFINE_float("duration", 60.0, "Seconds of load per database.")
_RATERS = flags.DEFINE_integer("raters", 200, "Simulated raters, all at once.")
_PROMPTS = flags.DEFINE_integer("prompts", 12_000, "Prompts of the study (items: one pair per prompt).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Server processes (serve --workers).")
_DATABASES = flags.DEFINE_list("databases", ["sqlite", "postgresql"], "Databases to run: sqlite, postgresql.")


def _spec(prompts: int, raters: int) -> store.StudySpec:
    keys = [f"p{i}" for i in range(prompts)]
    answer = "An answer with **Markdown**, a list:\n\n- one\n- two\n\nand a closing paragraph. " * 3
    return store.StudySpec(
        name="benchmark",
        prompts={k: f"Prompt {k}: explain something in a few sentences." for k in keys},
        answers={s: {k: f"{s} {answer}" for k in keys} for s in ("x", "y")},
        sources={"x": "x.jsonl", "y": "y.jsonl"},
        pairs=[("x", "y")],
        per_item=3,
        raters=raters,
        attention_checks=[("What is 2 + 2?", "4", "Purple seventeen.")],
    )


async def _rater(base: str, token: str, deadline: float, latencies: dict, recorded: list, seed: int) -> bool:
    """One rater's loop until the deadline; True if they ran out of items before it."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            response = await client.get("/api/next")
            latencies["next"].append(time.perf_counter() - start)
            if response.status_code == 204:
                return True
            response.raise_for_status()
            item = response.json()["item_id"]
            choice = rng.choice(store.CHOICES)
            start = time.perf_counter()
            response = await client.post("/api/rate", json={"item_id": item, "choice": choice, "reason": ""})
            latencies["rate"].append(time.perf_counter() - start)
            response.raise_for_status()
            recorded.append((token, item, choice))
    return False


async def _load(base: str, tokens: list[str], duration: float) -> tuple[dict, list, float, int]:
    latencies, recorded = {"next": [], "rate": []}, []
    start = time.monotonic()
    exhausted = await asyncio.gather(
        *(_rater(base, t, start + duration, latencies, recorded, i) for i, t in enumerate(tokens))
    )
    return latencies, recorded, time.monotonic() - start, sum(exhausted)


def _check(engine, recorded: list) -> dict[str, int]:
    """Lost and duplicated judgments, counted in the database."""
    with Session(engine) as session:
        stored = session.scalar(select(func.count(Judgment.id)))
        distinct = session.scalar(select(func.count(func.distinct(Judgment.assignment_id))))
        judged, raters = func.count(Judgment.id).label("n"), func.count(func.distinct(Assignment.rater_id)).label("r")
        per_item = (
            select(Assignment.item_id, judged, raters)
            .join(Judgment, Judgment.assignment_id == Assignment.id)
            .join(Item, Item.id == Assignment.item_id)
            .where(Item.expected.is_(None))
            .group_by(Assignment.item_id)
            .subquery()
        )
        overfull = session.scalar(
            select(func.count()).select_from(per_item).where((per_item.c.n > 3) | (per_item.c.r < per_item.c.n))
        )
    return {"lost": len(recorded) - stored, "duplicated": stored - distinct + overfull, "stored": stored}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, url: str) -> dict:
    """Creates the study in ``url``, serves it, loads it; returns the row of the table."""
    engine = open_database(url)
    started = time.perf_counter()
    tokens = [token for _, token in store.create_study(engine, _spec(_PROMPTS.value, _RATERS.value)).raters]
    created = time.perf_counter() - started
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            f"{ROOT}/scripts/rate.py",
            "serve",
            f"--db={url}",
            f"--port={port}",
            f"--workers={_WORKERS.value}",
        ],
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{base}/static/rate.css", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        load_before = os.getloadavg()
        latencies, recorded, elapsed, exhausted = asyncio.run(_load(base, tokens, _DURATION.value))
    finally:
        server.terminate()
        server.wait(60)
    counts = _check(engine, recorded)
    engine.dispose()
    ms = lambda values, q: 1000 * float(np.percentile(values, q))
    return {
        "database": name,
        "judgments": len(recorded),
        "per_s": len(recorded) / elapsed,
        "next": (ms(latencies["next"], 50), ms(latencies["next"], 99)),
        "rate": (ms(latencies["rate"], 50), ms(latencies["rate"], 99)),
        "exhausted": exhausted,
        "created_s": created,
        "load": (load_before, os.getloadavg()),
        **counts,
    }


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    print(f"rate benchmark: {_RATERS.value} raters, {_DURATION.value:g} s per database, "
          f"{_PROMPTS.value} items x 3 judgments, "
          f"serve --workers={_WORKERS.value}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    rows = []
    for name in _DATABASES.value:
        if name == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(run("SQLite (WAL)", f"sqlite:///{tmp}/ratings.db"))
        elif name == "postgresql":
            server = os.environ.get("IMITAX_TEST_POSTGRES_URL")
            with contextlib.nullcontext(server) if server else local_postgres.local_server(durable=True) as server_url:
                with local_postgres.fresh_database(server_url) as url:
                    rows.append(run("PostgreSQL 15" if not server else "PostgreSQL", url))
        else:
            raise SystemExit(f"error: --databases: unknown database {name!r} (sqlite, postgresql)")
    print(
        "| database | judgments | judgments/s | next p50 / p99 (ms) | rate p50 / p99 (ms) | lost | duplicated "
        "| load avg (1 min) before -> after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['database']} | {r['judgments']} | {r['per_s']:.0f} | {r['next'][0]:.0f} / {r['next'][1]:.0f} "
              f"| {r['rate'][0]:.0f} / {r['rate'][1]:.0f} | {r['lost']} | {r['duplicated']} "
              f"| {r['load'][0][0]:.2f} -> {r['load'][1][0]:.2f} |")  # fmt: skip
    for r in rows:
        note = f"; {r['exhausted']} raters ran out of items before the end" if r["exhausted"] else ""
        print(f"\n{r['database']}: study created in {r['created_s']:.1f} s; {r['stored']} judgments stored "
              f"(with attention checks){note}")  # fmt: skip
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if any(r["lost"] or r["duplicated"] for r in rows):
        raise SystemExit("error: judgments lost or duplicated")


if __name__ == "__main__":
    app.run(main)
