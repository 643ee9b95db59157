"""The app's server as `make app` runs it (settings from .streamlit/config.toml): it stops promptly and
cleanly on SIGTERM, also while a page is busy inside torch; and it watches no files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, start_app_cmd, wait_healthy

EXIT_WITHIN_S = 5.0


def _serve(script: Path, cache: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = start_app_cmd(port)
    cmd[cmd.index(str(ROOT / "app.py"))] = str(script)
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MERGESCOPE_EXIT_HOOK", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log, timeout=120)
    return proc, port


def _sigterm(proc: subprocess.Popen, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the server was still running 30 s after SIGTERM; log: {log.read_text()[-2000:]}")
    return time.perf_counter() - t0, proc.returncode


def test_config_watches_no_files():
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["fileWatcherType"] == "none" and server["runOnSave"] is False
    assert ".venv" in server["folderWatchBlacklist"]


@pytest.mark.timeout(180)
def test_server_stops_promptly_on_sigterm(tmp_path):
    proc, _ = _serve(ROOT / "app.py", tmp_path / "cache", tmp_path / "log.txt")
    seconds, status = _sigterm(proc, tmp_path / "log.txt")
    assert status == 0 and seconds < EXIT_WITHIN_S, (status, seconds)


BUSY_PAGE = '''
import sys, pathlib
sys.path.insert(0, {root!r})
import ui.state          # what every page imports first: installs ui.shutdown's exit hook
import streamlit as st
import torch
st.title("busy")
pathlib.Path({marker!r}).write_text("busy")
a = torch.randn(600, 600)
while True:              # torch work for as long as the server lives (the GIL released inside)
    a = torch.tanh(a @ a.T / 600.0)
'''


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_server_stops_cleanly_on_sigterm_while_a_page_runs_torch(tmp_path):
    """Before ui/shutdown.py such a server died of SIGABRT (exit status -6): the page's daemon thread,
    coming back from torch during interpreter finalisation, was unwound through pybind11's frames."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    marker = tmp_path / "busy.txt"
    script = tmp_path / "busy_page.py"
    script.write_text(BUSY_PAGE.format(root=str(ROOT), marker=str(marker)))
    log = tmp_path / "log.txt"
    proc, port = _serve(script, tmp_path / "cache", log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            deadline = time.time() + 120
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.2)
            assert marker.exists(), log.read_text()[-2000:]
            time.sleep(1.0)
            seconds, status = _sigterm(proc, log)
            browser.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "terminate called" not in log.read_text()
    assert status == 0 and seconds < EXIT_WITHIN_S, (status, seconds, log.read_text()[-1000:])


BUILD_PAGE = '''
import dataclasses, pathlib, sys, time
sys.path.insert(0, {root!r})
import ui.state          # installs ui.shutdown's exit hook, as every page does
import streamlit as st
from analysis.zoo.builder import build, preset
from ui.jobs import BackgroundJob
st.title("build")
log = pathlib.Path({marker!r})


@st.cache_resource
def job():
    config = dataclasses.replace(preset("tiny"), tasks={tasks!r}, mnist_dataset=None)

    def run(report):
        def logged(fraction, message):
            with log.open("a") as fh:
                fh.write(message + "\\n")
            if "test accuracy" in log.read_text():
                time.sleep(0.5)   # tiny tasks finish in well under a second: keep the build running for SIGTERM
            report(fraction, message)
        return build(config, {cache!r}, progress=logged)
    return BackgroundJob(run, "build-demo")


job()
'''
BUILD_TASKS = ("toy_sentiment", "toy_topic", "toy_animal")


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_a_demo_build_cleanly_and_the_next_build_resumes(tmp_path):
    """A server running the demo build as a background job (the Home page's 'Build' button does the same):
    SIGTERM stops it within 5 s with status 0, and the next build keeps every finished task."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    import dataclasses
    from playwright.sync_api import sync_playwright
    from analysis.zoo.builder import build, preset
    cache, marker = tmp_path / "zoo", tmp_path / "progress.txt"
    script = tmp_path / "build_page.py"
    script.write_text(BUILD_PAGE.format(root=str(ROOT), marker=str(marker), cache=str(cache), tasks=BUILD_TASKS))
    log = tmp_path / "log.txt"
    proc, port = _serve(script, tmp_path / "cache", log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            browser.new_page().goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            deadline = time.time() + 300
            while time.time() < deadline and "toy_sentiment: test accuracy" not in (
                    marker.read_text() if marker.exists() else ""):
                time.sleep(0.2)
            assert "toy_sentiment: test accuracy" in marker.read_text(), log.read_text()[-2000:]
            seconds, status = _sigterm(proc, log)
            browser.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    print(f"SIGTERM -> exit {seconds:.2f} s, status {status}; {[l for l in text.splitlines() if 'background job' in l]}")
    assert status == 0 and seconds < EXIT_WITHIN_S, (status, seconds, text[-1000:])
    assert "terminate called" not in text and "background job build-demo" in text
    work = next(cache.glob(".building-zoo-tiny-*"))
    assert (work / "tasks" / "toy_sentiment" / "reference.json").is_file()
    assert not list(cache.glob("zoo-tiny-*"))                       # never a half build under the final name
    config = dataclasses.replace(preset("tiny"), tasks=BUILD_TASKS, mnist_dataset=None)
    messages = []
    folder = build(config, cache, progress=lambda f, m: messages.append(m))
    assert "toy_sentiment: already built" in messages               # resumed, not redone
    manifest = (folder / "manifest.json").read_text()
    assert all(t in manifest for t in BUILD_TASKS)
