"""The app in real headless Chromium (Debian's /usr/bin/chromium; never `playwright install`).

Starts `streamlit run app.py` on a free local port with MERGESCOPE_CACHE
pointing at a folder that holds the zoo's tiny demo, opens every page through
the sidebar (one browser session, so the loaded workspace is kept), moves a
slider on the Loss Landscape page and times slider -> re-rendered figure,
screenshots every page, fails on any Streamlit exception box, and opens the
exported HTML report in the browser.

`test_screenshots_of_the_quick_demo` takes the README's screenshots of every
page on the built quick demo (skipped when it is not built); with
MERGESCOPE_SCREENSHOTS=1 it writes them to docs/screenshots/.

Also a script, for the screenshots and timings in docs/results_app.md:
    python tests/test_browser.py --cache ~/.cache/mergescope --out docs/screenshots
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXCEPTION = '[data-testid="stException"]'
PAGE_TIMEOUT = 90.0  # seconds a page may run; the script mode raises it (first SVDs of the real demo)
START_TIMEOUT = 60.0  # seconds the server may take to answer; raised for the real demo on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app_cmd(port: int, python: str | None = None, root: Path = ROOT) -> list[str]:
    """`streamlit run app.py` as `make app` runs it: settings from .streamlit/config.toml (the file watcher
    included: users get what this test sees), only the port, address and telemetry given here. `root`: the
    project to serve (a benchmark's git worktree of an earlier commit; run it with cwd=root)."""
    return [python or sys.executable, "-m", "streamlit", "run", str(root / "app.py"), "--server.port", str(port),
            "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
            # streamlit run from outside site-packages (a wheel unpacked on a bare GPU box) assumes
            # development mode, which refuses --server.port
            "--global.developmentMode", "false"]


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"streamlit did not answer on port {port} within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_app(cache: Path, port: int, log: Path, **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **extra_env}
    proc = subprocess.Popen(start_app_cmd(port), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log, START_TIMEOUT)
    return proc


def wait_idle(page, timeout: float | None = None) -> None:
    """Until the script run is over: no 'running' status widget for a moment, and the page has content."""
    timeout = timeout or PAGE_TIMEOUT
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=timeout * 1000)
    deadline, quiet = time.time() + timeout, 0
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0 and \
            page.locator('[data-testid="stStatusWidget"]').first.is_visible()
        busy = page.locator('[data-testid="stSpinner"], [data-testid="stProgress"]').count() > 0
        quiet = 0 if (running or busy) else quiet + 1
        if quiet >= 3:
            return
        time.sleep(0.25)
    raise AssertionError("the page kept running for more than %.0f s" % timeout)


def check_no_exception(page, where: str) -> None:
    boxes = page.locator(EXCEPTION)
    if boxes.count():
        raise AssertionError(f"Streamlit exception on {where}: {boxes.first.inner_text()[:2000]}")


def page_height(page) -> int:
    """Height in px of the page's content (Streamlit scrolls inside its main container)."""
    return int(page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                             " return m ? m.scrollHeight : document.body.scrollHeight; }"))


def full_screenshot(page, path: Path, width: int = 1400, max_height: int = 6000) -> None:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to its height."""
    height = page_height(page)
    page.set_viewport_size({"width": width, "height": int(min(max(900, height), max_height))})
    time.sleep(0.5)  # let plotly settle at the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 900})


def page_links(page) -> list[tuple[str, str]]:
    """(label, href) of the sidebar's page links, in order."""
    links = page.locator('[data-testid="stSidebarNav"] a')
    return [(links.nth(i).inner_text().strip(), links.nth(i).get_attribute("href")) for i in range(links.count())]


def drive(cache: Path, out: Path, log: Path, moves: int = 1) -> dict:
    """Run the whole tour; returns timings and the screenshots written."""
    from playwright.sync_api import sync_playwright
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_app(cache, port, log)
    results = {"screenshots": [], "pages": [], "slider_to_figure_s": [], "heights": {}}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            wait_idle(page)
            page.wait_for_selector("text=Loaded set", timeout=60_000)
            wait_idle(page)
            check_no_exception(page, "Home")
            shot = out / "0_Home.png"
            full_screenshot(page, shot)
            results["screenshots"].append(str(shot))
            for label, href in page_links(page)[1:]:
                t_page = time.perf_counter()
                page.locator(f'[data-testid="stSidebarNav"] a[href="{href}"]').click()
                page.wait_for_url(re.compile(re.escape(href) + r"(\?.*)?$"), timeout=30_000)
                wait_idle(page)
                check_no_exception(page, label)
                name = href.rstrip("/").rsplit("/", 1)[-1]
                if name == "Loss_Landscape":
                    results["slider_to_figure_s"] = move_points_slider(page, moves)
                    print(f"slider -> figure: {results['slider_to_figure_s']}", flush=True)
                    check_no_exception(page, f"{label} after a slider move")
                if name == "Report":
                    results["html_report"] = open_exported_report(page, ctx, out)
                    check_no_exception(page, f"{label} after the export")
                idx = len(results["pages"]) + 1
                results["heights"][name] = page_height(page)
                shot = out / f"{idx}_{name}.png"
                full_screenshot(page, shot)
                results["screenshots"].append(str(shot))
                results["pages"].append(name)
                results.setdefault("page_seconds", {})[name] = round(time.perf_counter() - t_page, 2)
                print(f"{name}: {results['page_seconds'][name]} s", flush=True)
            browser.close()
    finally:
        stop_server(proc, 10)
    return results


def move_points_slider(page, moves: int = 3) -> list[float]:
    """Press → on the 'λ points' slider; time each keypress until the figure holds the new number of points."""
    times = []
    slider = page.locator('[data-testid="stSlider"]', has_text="λ points").locator('input[type="range"]')
    for _ in range(moves):
        n = int(slider.get_attribute("aria-valuetext") or slider.input_value())
        t0 = time.perf_counter()
        slider.focus()
        slider.press("ArrowRight")
        page.wait_for_function(
            "n => { const el = document.querySelector('.js-plotly-plot');"
            " return el && el._fullData && el._fullData.length && el._fullData[0]._length === n; }", arg=n + 1, timeout=120_000)
        times.append(time.perf_counter() - t0)
        wait_idle(page)
    return times


def open_exported_report(page, ctx, out: Path) -> dict:
    """Download the HTML report through its button and open the file in the browser."""
    with page.expect_download(timeout=60_000) as dl:
        page.get_by_role("button", name="Report (self-contained HTML)").click()
    path = out / "report.html"
    dl.value.save_as(str(path))
    report = ctx.new_page()
    errors = []
    report.on("pageerror", lambda e: errors.append(str(e)))
    report.goto(path.resolve().as_uri())
    report.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    plots = report.locator(".js-plotly-plot").count()
    config = json.loads(report.locator("#mergescope-config").inner_text())
    report.screenshot(path=str(out / "report_html.png"), full_page=False)
    report.close()
    assert not errors, errors
    return {"path": str(path), "bytes": path.stat().st_size, "plots": plots, "config_keys": sorted(config)}


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_every_page_in_chromium(tiny_demo_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    res = drive(tiny_demo_dir, tmp_path / "shots", tmp_path / "streamlit.log")
    print(json.dumps(res, indent=1))
    assert "Loss_Landscape" in res["pages"] and "Report" in res["pages"]
    assert len(res["screenshots"]) == len(res["pages"]) + 1
    for shot in res["screenshots"]:
        assert Path(shot).stat().st_size > 10_000  # a rendered page, not a blank one
    assert len(res["slider_to_figure_s"]) == 1
    assert res["html_report"]["plots"] >= 2 and "configurations" in res["html_report"]["config_keys"]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_merge_slider_steps_and_jumps_with_the_cpu_estimate_and_speculation(tiny_demo_dir, tmp_path):
    """As users run it on a CPU: the first estimate and the background merges of the next slider step on
    (the suite's defaults turn both off). A step, a step back, a jump and a step while a speculation may
    be running all end without an exception or a server traceback, and the server then stops on SIGTERM."""
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    log = tmp_path / "streamlit.log"
    port = free_port()
    proc = start_app(tiny_demo_dir, port, log, MERGESCOPE_FIRST_ESTIMATE="1", MERGESCOPE_SPECULATE="1",
                     MERGESCOPE_LOG="INFO")   # the engine logs each merge: requested or background
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"http://127.0.0.1:{port}/Merge?ws=demo-tiny&method=iso_cts&common_fraction=0.5",
                      wait_until="domcontentloaded")
            wait_idle(page)
            check_no_exception(page, "Merge (iso_cts)")
            slider = page.locator('[data-testid="stSlider"]', has_text="common fraction").locator(
                '[role="slider"], input[type="range"]').first
            seen = []
            for key, pause in (("ArrowLeft", 3.0), ("ArrowLeft", 3.0), ("ArrowRight", 3.0), ("PageDown", 0.0),
                               ("ArrowLeft", 0.0)):
                time.sleep(pause)        # a look at the view: the next step is merged meanwhile
                slider.focus()
                slider.press(key)
                wait_idle(page)
                check_no_exception(page, f"Merge after {key}")
                seen.append(slider.get_attribute("aria-valuenow") or slider.input_value())
                assert page.locator(".js-plotly-plot").count() >= 1
            browser.close()
        assert [round(float(v), 2) for v in seen] == [0.49, 0.48, 0.49, 0.39, 0.38], seen
    finally:
        t0 = time.time()
        stop_server(proc, 15)
        stopped_in = time.time() - t0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[text.find("Traceback"):][:3000]
    assert stopped_in < 15, f"the server took {stopped_in:.1f} s to stop on SIGTERM"

    def merges(c: float, kind: str) -> int:
        return len(re.findall(rf'merge: iso_cts {{[^}}]*"common_fraction": {c}[,}}][^\n]* in [\d.]+ s \({kind}\)', text))
    # the steps after a look were never merged on request: 0.49 was merged in the background while the user
    # looked at 0.5; 0.48 too, or (where it splits every rank as 0.49 does) it is 0.49's merge, and the
    # speculation went on to the next value with another merge
    assert merges(0.49, "background") >= 1 and merges(0.49, "requested") == 0, text[-3000:]
    assert merges(0.48, "requested") == 0 and merges(0.5, "requested") == 1, text[-3000:]
    requested = re.findall(r"merge: iso_cts [^\n]* \(requested\)", text)
    assert len(requested) <= 2, requested           # the page's first view, and at most the jump


def quick_demo_cache(tmp: Path) -> Path | None:
    """A cache folder that holds only the user's finished quick build and its transformer zoo (linked, not
    copied), or None."""
    real = Path(os.environ.get("MERGESCOPE_REAL_CACHE", Path.home() / ".cache" / "mergescope")).expanduser()
    builds = sorted(p for p in real.glob("zoo-quick-*") if (p / "manifest.json").is_file()) if real.is_dir() else []
    if not builds:
        return None
    cache = tmp / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / builds[-1].name).symlink_to(builds[-1], target_is_directory=True)
    zoos = sorted(p for p in real.glob("transformers-quick-*") if (p / "manifest.json").is_file())
    if zoos:   # the same build command trains it after the demo (the Alignment page's transformer section)
        (cache / zoos[-1].name).symlink_to(zoos[-1], target_is_directory=True)
    return cache


@pytest.mark.browser
@pytest.mark.timeout(3000)
def test_screenshots_of_the_quick_demo(tmp_path):
    """Every page of the built quick demo at the shared plot theme, as the README shows them; the
    Interference page stays of reasonable height with 8 tasks (28 pairs)."""
    global PAGE_TIMEOUT, START_TIMEOUT
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    cache = quick_demo_cache(tmp_path)
    if cache is None:
        pytest.skip("the quick demo is not built (python -m analysis.zoo build --quick)")
    update = os.environ.get("MERGESCOPE_SCREENSHOTS") == "1"
    out = ROOT / "docs" / "screenshots" if update else tmp_path / "shots"
    saved = PAGE_TIMEOUT, START_TIMEOUT
    PAGE_TIMEOUT, START_TIMEOUT = 900.0, 300.0     # first SVDs and scores of the real demo on a shared CPU
    try:
        res = drive(cache, out, tmp_path / "streamlit.log", moves=0)
    finally:
        PAGE_TIMEOUT, START_TIMEOUT = saved
    print(json.dumps(res, indent=1))
    assert res["pages"][:6] == ["Spectra", "Interference", "Merge", "Loss_Landscape", "Report", "Alignment"]
    assert len(res["screenshots"]) == len(res["pages"]) + 1
    for shot in res["screenshots"]:
        assert Path(shot).stat().st_size > 20_000
    assert res["heights"]["Interference"] < 5000, res["heights"]
    if update:
        from PIL import Image  # docs copies: 256-colour palette PNGs, a fraction of the size
        for shot in res["screenshots"] + [str(out / "report_html.png")]:
            Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)
        (out / "report.html").unlink(missing_ok=True)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="MERGESCOPE_CACHE holding a demo build")
    ap.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    ap.add_argument("--moves", type=int, default=5, help="slider moves to time")
    ap.add_argument("--page-timeout", type=float, default=540.0, help="seconds a page may run")
    args = ap.parse_args()
    PAGE_TIMEOUT = args.page_timeout
    res = drive(args.cache.expanduser(), args.out, args.out / "streamlit.log", args.moves)
    from PIL import Image  # docs copies: 256-colour palette PNGs, a fraction of the size
    for shot in res["screenshots"] + [str(args.out / "report_html.png")]:
        Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)
    (args.out / "report.html").unlink(missing_ok=True)
    (args.out / "streamlit.log").unlink(missing_ok=True)
    print(json.dumps(res, indent=1))
