"""A rater in a real browser (Debian's Chromium through Selenium), end to end through scripts/rate.py.

create prints the links, serve runs the app, the browser reads the instructions and rates five
items by mouse and by keyboard with a reload halfway, and export must hold exactly those
judgments with the right systems. One answer holds a script and an onerror image: neither runs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PWN = '<script>window.__pwned = "script"</script>\n\n<img src="x" onerror="window.__pwned = \'img\'">'


def _rate(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"{ROOT}/scripts/rate.py", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile; CI never skips (the browser must be installed)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given, Selenium Manager downloads nothing
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A five-item study (alpha vs beta) created and served by scripts/rate.py; yields its details."""
    tmp = tmp_path_factory.mktemp("study")
    prompts = {f"q{i}": f"Question number {i}: how do I boil an egg?" for i in range(5)}
    answers = {
        "alpha": {k: f"First kind of reply, {k}. **Boil** it for 7 minutes." for k in prompts},
        "beta": {k: f"Second kind of reply, {k}.\n\n- a list\n- of steps" for k in prompts},
    }
    answers["beta"]["q2"] += "\n\n" + PWN
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in prompts.items()))
    for system, texts in answers.items():
        rows = [json.dumps({"id": k, "response": r}) + "\n" for k, r in reversed(texts.items())]  # any order
        (tmp / f"{system}.jsonl").write_text("".join(rows))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db, base = f"sqlite:///{tmp}/ratings.db", f"http://127.0.0.1:{port}"
    created = _rate("create", f"--db={db}", "--study=eggs", f"--prompts={tmp}/prompts.jsonl",
                    f"--system=alpha={tmp}/alpha.jsonl", f"--system=beta={tmp}/beta.jsonl",
                    "--per_item=1", "--raters=1", f"--base_url={base}")  # fmt: skip
    assert created.returncode == 0, created.stderr
    (link,) = re.findall(r"^rater r001: (\S+)$", created.stdout, re.M)
    (admin,) = re.findall(r"^admin: (\S+)$", created.stdout, re.M)
    # Two worker processes, as a deployment runs them (which one answers a request is up to the kernel).
    server = subprocess.Popen(
        [sys.executable, f"{ROOT}/scripts/rate.py", "serve", f"--db={db}", f"--port={port}", "--workers=2"]
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/static/rate.css", timeout=1)
            break
        except httpx.TransportError:
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
    yield {"db": db, "tmp": tmp, "link": link, "admin": admin, "answers": answers, "prompts": prompts}
    server.terminate()
    server.wait(30)


def _screenshot(driver, tmp_path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 0
    if os.environ.get("IMITAX_TEST_ARTIFACTS"):
        os.makedirs(os.environ["IMITAX_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(path, os.environ["IMITAX_TEST_ARTIFACTS"])


def test_rater_in_a_browser_rates_five_items_and_the_export_holds_them(browser, study, tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.wait import WebDriverWait

    driver = browser
    find = lambda css: driver.find_element(By.CSS_SELECTOR, css)
    driver.set_window_size(390, 844)  # a phone, until the reload
    driver.get(study["link"])
    assert "Which answer is better?" in find("h1").text and "random order" in find("#instructions").text

    def wait_for(condition) -> None:
        ignored = (NoSuchElementException, StaleElementReferenceException)  # the page is changing
        WebDriverWait(driver, 30, poll_frequency=0.05, ignored_exceptions=ignored).until(lambda _: condition())

    def current() -> dict:
        """The item on screen: its id, and which system wrote answer A (from the answers' text)."""
        a_text = find("#answer-a").text
        prompt_id = next(k for k in study["prompts"] if f"reply, {k}." in a_text)
        a_system = "alpha" if a_text.startswith("First kind") else "beta"
        return {"item": find("input[name=item_id]").get_attribute("value"), "prompt_id": prompt_id, "a": a_system}

    def progress() -> str:
        return find("#progress-text").text

    find("#start").click()
    wait_for(lambda: driver.find_elements(By.ID, "answer-a"))
    _screenshot(driver, tmp_path, "rate_item_phone.png")

    # (how, key or button, reason): items 1-2 by mouse, a reload, items 3-5 by keyboard.
    plan = [("mouse", "#choose-a", "A explains the time"), ("mouse", "#choose-tie", ""), ("reload", None, None),
            ("keys", "3", ""), ("keys", "t", "both fine"), ("keys", "a", "")]  # fmt: skip
    expected, seen = [], set()
    for how, what, reason in plan:
        if how == "reload":
            before = current()
            assert progress() == "2 of 5 done"
            driver.set_window_size(1200, 1000)
            driver.refresh()
            assert current() == before and progress() == "2 of 5 done"  # resumes on the same item
            continue
        item = current()
        assert item["prompt_id"] not in seen and not re.search(r"alpha|beta", driver.page_source)
        seen.add(item["prompt_id"])
        if item["prompt_id"] == "q2":  # the answer with a script and an onerror image: shown as text, inert
            assert '<script>window.__pwned = "script"</script>' in find("#answer-a").text + find("#answer-b").text
            assert driver.execute_script("return typeof window.__pwned") == "undefined"
            _screenshot(driver, tmp_path, "rate_item.png")
        if reason:
            find("#reason").send_keys(reason)
        if how == "mouse":
            ActionChains(driver).move_to_element(find(what)).click().perform()
        else:
            # Typed into the reason box, "t" and "b" were text; Tab leaves it, and keys are shortcuts again.
            ActionChains(driver).send_keys(Keys.TAB if reason else "", what).perform()
        choice = {"#choose-a": "a", "#choose-tie": "tie", "3": "b", "t": "tie", "a": "a"}[what]
        b_system = "beta" if item["a"] == "alpha" else "alpha"
        preferred = {"a": item["a"], "b": b_system, "tie": "tie"}[choice]
        expected.append((item["prompt_id"], item["a"], choice, preferred, reason))
        wait_for(lambda shown=item["item"]: driver.find_elements(By.ID, "done") or current()["item"] != shown)
    assert find("#done").text == "Thank you!"
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    driver.set_window_size(390, 844)
    driver.get(study["admin"])
    assert "5 of 5 judgments" in find("#study-progress").text
    _screenshot(driver, tmp_path, "rate_admin_phone.png")

    out = study["tmp"] / "export"
    exported = _rate("export", f"--db={study['db']}", "--study=eggs", f"--out={out}")
    assert exported.returncode == 0, exported.stderr
    with open(out / "ratings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = [(r["prompt_id"], r["system_a"], r["choice"], r["preferred"], r["reason"]) for r in rows]
    assert got == expected and {r["rater"] for r in rows} == {"r001"}
    assert all({r["system_a"], r["system_b"]} == {"alpha", "beta"} for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    (pair,) = summary["pairs"]
    wins = sum(p == "alpha" for *_, p, _ in expected) / 5
    assert (pair["system_x"], pair["system_y"], pair["judgments"]) == ("alpha", "beta", 5)
    assert pair["win"] == pytest.approx(wins)
