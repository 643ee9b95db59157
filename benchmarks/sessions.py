"""Many users on one server: N concurrent browser sessions moving sliders on
different pages; slider latency against one session alone, in the same run.

One `streamlit run app.py` (as `make app` starts it, MERGESCOPE_LOG=INFO so
the engine logs each computation) and one headless Chromium with one
context per session (each context is a separate Streamlit session). Each
session opens Home (which loads the demo into that session), goes to its
page through the sidebar, and, for Merge sessions, picks its own method.

  1. cold start: every session opens its page at once, on empty caches;
  2. alone: each session in turn moves its slider MOVES times while the
     others sit idle (the baseline);
  3. together: every session moves its slider for --seconds at once.

Latency of a move: from the key press to the end of the script run it
triggers, read from the page's own clock (Streamlit's `stApp` element
carries the script state; a MutationObserver records its changes).
A press that neither moves the slider nor starts a run within 20 s is pressed
again; a move whose slider moved while no run was seen (under load the
browser can apply a run's start and end in one render) is not timed. Both
are counted in the summary.
Checks, any failure is reported and makes the exit status 1: no exception
box on any page; each Merge session's chart is titled with its own method
after every move, and its exported HTML report lists only its own
configurations (plus the task_arithmetic default it opened with); other
sessions' Report pages have nothing to compare; each shared cache (SVD
factors of a set, statistics of a task) computed once, counted from the
server's log.

    python benchmarks/sessions.py                        # the tiny demo, built in a temporary folder
    python benchmarks/sessions.py --cache ~/.cache/mergescope --seconds 120
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_browser import (CHROMIUM, CHROMIUM_ARGS, EXCEPTION, free_port, start_app_cmd, stop_server,  # noqa: E402
                          wait_healthy)

# (page file name in the URL, slider label, Merge method or None)
ROLES = [
    ("Merge", "alpha", "task_arithmetic"),
    ("Merge", "alpha", "ties"),
    ("Merge", "alpha", "tsv_m"),
    ("Merge", "alpha", "iso_c"),
    ("Spectra", "Rank fraction kept per task", None),
    ("Interference", "Rank fraction kept per task", None),
    ("Loss_Landscape", "λ points", None),
    ("Alignment", "Points on the path", None),
]
DEFAULT_METHOD = "task_arithmetic"   # what the Merge page opens with
RUN_TIMEOUT_S = float(os.environ.get("SESSIONS_RUN_TIMEOUT_S", 300))
# a press that neither moved the slider nor started a run within LOST_PRESS_S is pressed again (counted)
LOST_PRESS_S, LOST_PRESS_RETRIES = 20.0, 2
RECORDER = """
window.__msRuns = [];
new MutationObserver(ms => { for (const m of ms) window.__msRuns.push(
    [performance.now(), m.target.getAttribute('data-test-script-state')]); })
  .observe(document, {attributes: true, subtree: true, attributeFilter: ['data-test-script-state']});
"""
# the run a key press starts has ended: the app went 'notRunning' after it ran and has stayed so for 300 ms
# (a page may rerun itself right away: the Merge page does when its refinement lands). A press during a run
# that is still going records no new 'running': the state at the press counts as the start then.
RUN_START = """() => [performance.now(), (document.querySelector('[data-testid="stApp"]') || document.body)
  .getAttribute('data-test-script-state')]"""
RUN_ENDED = """([t0, state0]) => { let ran = state0 === 'running' || state0 === 'rerunRequested', end = null;
  for (const [t, s] of window.__msRuns) { if (t < t0) continue;
    if (s === 'notRunning') { if (ran && end === null) end = t; } else { if (s === 'running') ran = true; end = null; } }
  return end !== null && performance.now() - end > 300 ? end - t0 : false; }"""

CHART_TITLE = """() => { const el = document.querySelector('.js-plotly-plot');
  return el && el.layout && el.layout.title && el.layout.title.text ? el.layout.title.text : false; }"""


@dataclass
class Session:
    index: int
    page_name: str
    slider: str
    method: str | None
    page: object = None
    alone_ms: list[float] = field(default_factory=list)
    together_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    direction: int = 1
    steps: int = 0
    lost_presses: int = 0
    unobserved: int = 0

    @property
    def label(self) -> str:
        return f"#{self.index} {self.page_name}" + (f" ({self.method})" if self.method else "")


async def run_end_ms(page, start: list, timeout_s: float = RUN_TIMEOUT_S) -> float:
    """ms from `start` (RUN_START, taken just before the input) to the end of the run the input started."""
    handle = await page.wait_for_function(RUN_ENDED, arg=start, timeout=timeout_s * 1000, polling=20)
    return float(await handle.json_value())


def slider_input(s: Session):
    """The session's slider: the range input Streamlit draws it with (its value is the slider's)."""
    return s.page.locator('[data-testid="stSlider"]', has_text=s.slider).first.locator(
        '[role="slider"], input[type="range"]')


async def settle(page) -> None:
    """Until no script run is pending (nothing changes for a moment)."""
    await page.wait_for_selector('[data-testid="stMain"] h1', timeout=RUN_TIMEOUT_S * 1000)
    deadline, quiet = time.monotonic() + RUN_TIMEOUT_S, 0
    while time.monotonic() < deadline and quiet < 4:
        state = await page.evaluate("() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
                                    " return a ? a.getAttribute('data-test-script-state') : null; }")
        busy = await page.locator('[data-testid="stSpinner"], [data-testid="stProgress"]').count()
        quiet = quiet + 1 if state == "notRunning" and not busy else 0
        await asyncio.sleep(0.25)


async def check(s: Session, where: str) -> None:
    boxes = s.page.locator(EXCEPTION)
    if await boxes.count():
        s.problems.append(f"{s.label}: exception on {where}: {(await boxes.first.inner_text())[:300]}")
    if s.method and s.page_name == "Merge":
        handle = await s.page.wait_for_function(CHART_TITLE, timeout=RUN_TIMEOUT_S * 1000)
        title = re.sub(r"<[^>]+>", "", str(await handle.json_value()))
        if re.split(r"\s+", title.strip())[0] != s.method:   # 'tsv_m' or 'tsv_m · …' (the setting may be a subtitle)
            s.problems.append(f"{s.label}: after {where} the chart is titled {title!r}, not {s.method}")


async def open_role(s: Session, base: str) -> None:
    page = s.page
    await page.goto(base + "/", wait_until="domcontentloaded")
    await page.wait_for_selector("text=Loaded set", timeout=RUN_TIMEOUT_S * 1000)
    await settle(page)
    await page.locator(f'[data-testid="stSidebarNav"] a[href$="/{s.page_name}"]').click()
    await page.wait_for_url(re.compile(rf"/{s.page_name}(\?.*)?$"), timeout=60_000)
    await settle(page)
    if s.method and s.method != DEFAULT_METHOD:
        start = await page.evaluate(RUN_START)
        # Streamlit >= 1.5x draws a select box as a react-aria combobox: its button opens the list box
        box = page.locator('[data-testid="stSelectbox"]', has_text="Method").first
        await box.locator('button[aria-haspopup="listbox"], [data-baseweb="select"]').first.click()
        await page.get_by_role("option", name=re.compile(rf"^{re.escape(s.method)}\b")).first.click()
        await run_end_ms(page, start)
        await settle(page)
    await check(s, "opening the page")
    print(f"{s.label}: open", flush=True)


async def _stuck(s: Session, what: str, tag: str) -> RuntimeError:
    """An error naming the session, with a screenshot of what its page showed."""
    shot = Path(tempfile.gettempdir()) / f"sessions-{s.index}-{s.page_name}-{tag}.png"
    await s.page.screenshot(path=str(shot), full_page=True)
    return RuntimeError(f"{s.label}: {what} ({s.page.url}); the page is in {shot}")


async def move(s: Session) -> float | None:
    """One key press on the session's slider (three steps one way, then three back); ms to the run's end."""
    slider = slider_input(s)
    if s.steps and s.steps % 3 == 0:
        s.direction = -s.direction
    s.steps += 1
    try:
        await slider.focus()
    except Exception as exc:
        raise await _stuck(s, f"its {s.slider!r} slider was not found", "slider") from exc
    key = "ArrowRight" if s.direction > 0 else "ArrowLeft"
    before = await slider.input_value()
    for attempt in range(1 + LOST_PRESS_RETRIES):
        start = await s.page.evaluate(RUN_START)
        await slider.press(key)
        try:
            ms = await run_end_ms(s.page, start, LOST_PRESS_S)
            break
        except Exception:
            state = await s.page.evaluate(RUN_START)
            moved = await slider.input_value() != before
            if attempt < LOST_PRESS_RETRIES and state[1] == "notRunning" and not moved:
                # the press changed nothing and started no run (the slider was re-drawn under the focus):
                # counted, and pressed again, as a user would
                s.lost_presses += 1
                await slider.focus()
                continue
            if state[1] == "notRunning" and moved:
                # the slider moved and the page is idle, but no run was seen: under load the browser can
                # apply a run's start and end in one render, so the script state never reads "running".
                # Counted, and left out of the latencies (it was not timed)
                s.unobserved += 1
                await check(s, f"move {s.steps}")
                return None
            try:
                ms = await run_end_ms(s.page, start, RUN_TIMEOUT_S - LOST_PRESS_S)
                break
            except Exception as exc:
                raise await _stuck(s, f"move {s.steps}'s script run did not end", "run") from exc
    await check(s, f"move {s.steps}")
    return ms


async def report_check(s: Session) -> list[str]:
    """The Report page of this session: its own configurations only (from the exported HTML's JSON)."""
    page = s.page
    await page.locator('[data-testid="stSidebarNav"] a[href$="/Report"]').click()
    await page.wait_for_url(re.compile(r"/Report(\?.*)?$"), timeout=60_000)
    await settle(page)
    if s.page_name != "Merge":
        # with reference models the page shows them and says no configuration was tried in this session
        if not await page.get_by_text(re.compile(r"Nothing to compare yet|No merge configuration tried yet "
                                                 r"in this session")).count():
            s.problems.append(f"{s.label}: never merged, yet its Report page has configurations to compare")
        return []
    async with page.expect_download(timeout=RUN_TIMEOUT_S * 1000) as info:
        await page.get_by_role("button", name="Report (self-contained HTML)").click()
    html = Path(await (await info.value).path()).read_text()
    found = re.search(r"<script type='application/json' id='mergescope-config-json'>(.*?)</script>", html, re.S)
    configs = json.loads(found.group(1).replace("<\\/", "</"))["configurations"]
    methods = sorted({c["method"] for c in configs})
    allowed = {s.method, DEFAULT_METHOD}
    if not set(methods) <= allowed or s.method not in methods:
        s.problems.append(f"{s.label}: its report lists methods {methods}, expected {sorted(allowed)}")
    return methods


def pct(values: list[float], q: float) -> float:
    """q-th percentile (linear interpolation)."""
    return float(np.percentile(values, q))


async def drive(base: str, roles, moves: int, seconds: float) -> tuple[list[Session], tuple]:
    """The sessions, and the local wall-clock start and end of their moving together (the server's log is in
    local time)."""
    from playwright.async_api import async_playwright
    sessions = [Session(i, *r) for i, r in enumerate(roles)]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for s in sessions:
            ctx = await browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
            ctx.set_default_timeout(RUN_TIMEOUT_S * 1000)        # a shared 2-core CPU: page loads take a while
            ctx.set_default_navigation_timeout(RUN_TIMEOUT_S * 1000)
            await ctx.add_init_script(RECORDER)
            s.page = await ctx.new_page()
        t0 = time.perf_counter()
        await asyncio.gather(*(open_role(s, base) for s in sessions))          # 1. cold start, all at once
        print(f"cold start: {len(sessions)} sessions opened their pages in {time.perf_counter() - t0:.1f} s", flush=True)
        for s in sessions:                                                      # 2. each alone
            for _ in range(moves):
                if (ms := await move(s)) is not None:
                    s.alone_ms.append(ms)
        print("alone: " + "; ".join(f"{s.label} {np.median(s.alone_ms):.0f} ms" for s in sessions), flush=True)

        async def keep_moving(s: Session, deadline: float) -> None:
            while time.monotonic() < deadline:
                if (ms := await move(s)) is not None:
                    s.together_ms.append(ms)
        deadline = time.monotonic() + seconds                                   # 3. all together
        began = datetime.datetime.now()
        await asyncio.gather(*(keep_moving(s, deadline) for s in sessions))
        ended = datetime.datetime.now()
        for s in sessions:
            await settle(s.page)
            await report_check(s)
        await browser.close()
    return sessions, (began, ended)


def fresh_cache(cache: Path, into: Path) -> Path:
    """A cache folder holding only the demo builds of `cache` (linked, not copied): SVD factors and
    statistics start cold, so the run shows whether concurrent sessions compute each one once."""
    into.mkdir(parents=True)
    builds = [p for p in cache.glob("zoo-*") if (p / "manifest.json").is_file()]
    if not builds:
        raise SystemExit(f"no finished demo build in {cache}")
    for p in builds:
        (into / p.name).symlink_to(p.resolve(), target_is_directory=True)
    return into


def background_merges(log_text: str, window: tuple) -> tuple[int, int]:
    """(all, while the sessions moved together) of the merges the Merge page's speculation ran (ui/speculate.py:
    the engine logs each as 'background'; it merges nothing while the server is crowded, ui/presence.py)."""
    times = [datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f")
             for t in re.findall(r"^(\S+ \S+) INFO analysis\S*: merge: .*\(background\)$", log_text, re.M)]
    inside = sum(1 for t in times if window[0] <= t <= window[1])
    return len(times), inside


def shared_cache_counts(log_text: str) -> tuple[Counter, Counter]:
    svd = Counter(re.findall(r"spectra: decomposed \d+ parameters of \d+ tasks for set (\S+)", log_text))
    stats = Counter(re.findall(r"statistics: computed (\S+ of task \S+) \((\S+)\)", log_text))
    return svd, stats


def run(cache: Path, roles, moves: int, seconds: float, log: Path) -> dict:
    port = free_port()
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "MERGESCOPE_LOG": "INFO"}
    proc = subprocess.Popen(start_app_cmd(port), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, timeout=120)
        sessions, together = asyncio.run(drive(f"http://127.0.0.1:{port}", roles, moves, seconds))
    finally:
        stop_server(proc, 30)
    text = log.read_text(errors="replace")
    svd, stats = shared_cache_counts(text)
    problems = [p for s in sessions for p in s.problems]
    problems += [f"SVD factors of set {k} computed {n} times" for k, n in svd.items() if n > 1]
    problems += [f"statistics {k[0]} computed {n} times" for k, n in stats.items() if n > 1]
    if "Traceback" in text:
        problems.append("a traceback in the server's log: " + text[text.index("Traceback"):][:1500])
    return {"sessions": sessions, "svd": svd, "stats": stats, "problems": problems,
            "background_merges": background_merges(text, together)}


def per_session(sessions, count: str) -> str:
    """'3 (#1: 2, #6: 1)': a Session counter's total and the sessions it is not 0 for."""
    each = [f"#{s.index}: {getattr(s, count)}" for s in sessions if getattr(s, count)]
    return f"{sum(getattr(s, count) for s in sessions)} ({', '.join(each) or 'none'})"


def summary(result: dict) -> str:
    sessions = result["sessions"]
    alone = [m for s in sessions for m in s.alone_ms]
    together = [m for s in sessions for m in s.together_ms]
    lines = [f"| sessions | moves | p50 ms | p95 ms |", "|---|---|---|---|",
             f"| 1 (each alone, in turn) | {len(alone)} | {pct(alone, 50):.0f} | {pct(alone, 95):.0f} |",
             f"| {len(sessions)} at once | {len(together)} | {pct(together, 50):.0f} | {pct(together, 95):.0f} |",
             "", f"ratio, {len(sessions)} at once / alone: p50 {pct(together, 50) / pct(alone, 50):.1f}x, "
                 f"p95 {pct(together, 95) / pct(alone, 95):.1f}x", "",
             "| session | page | slider | alone p50 ms | together p50 / p95 ms | moves together |", "|---|---|---|---|---|---|"]
    for s in sessions:
        t = s.together_ms or [float("nan")]
        lines.append(f"| {s.index} | {s.page_name}{f' ({s.method})' if s.method else ''} | {s.slider} | "
                     f"{np.median(s.alone_ms):.0f} | {pct(t, 50):.0f} / {pct(t, 95):.0f} | {len(s.together_ms)} |")
    lines += ["", f"SVD factor sets computed: {dict(result['svd'])} (each must be 1)",
              f"task statistics computed: {len(result['stats'])} distinct, max {max(result['stats'].values(), default=0)} "
              "times each (must be 1)",
              "merges speculated in the background (ui/speculate.py): {} in all, {} while the sessions moved "
              "together".format(*result.get("background_merges", ("?", "?"))),
              "key presses that moved nothing and were pressed again: " + per_session(sessions, "lost_presses"),
              f"moves whose run was not seen (the slider moved, the page idle after {LOST_PRESS_S:.0f} s; not timed): "
              + per_session(sessions, "unobserved"),
              f"problems: {result['problems'] or 'none'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None,
                    help="MERGESCOPE_CACHE holding a demo build (default: the tiny demo, built in a temporary folder)")
    ap.add_argument("--sessions", type=int, default=len(ROLES), help=f"at most {len(ROLES)}")
    ap.add_argument("--moves", type=int, default=4, help="moves per session alone (the baseline)")
    ap.add_argument("--seconds", type=float, default=90.0, help="how long the sessions move sliders together")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ms-sessions-") as tmp:
        cache = args.cache
        if cache is None:
            from analysis.zoo import build_tiny_demo
            cache = Path(tmp) / "cache"
            t0 = time.perf_counter()
            build_tiny_demo(cache)
            print(f"tiny demo built in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)
        served = fresh_cache(cache.expanduser(), Path(tmp) / "served")
        result = run(served, ROLES[:args.sessions], args.moves, args.seconds, Path(tmp) / "server.log")
        print(f"load average after: {os.getloadavg()}")
    print(summary(result))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
