"""Seconds from opening the Spectra page to its first figure, on a set seen for the first time.

The quick demo is linked into an empty cache folder, so no spectral factors are on
disk: the page must decompose every layer. A `make app`-style server is started
(its own config), Home loads the demo in headless Chromium, then the Spectra link
is clicked and the clock starts. Recorded per run:
- first figure: the first plotly chart in the page (now: the chosen layer's spectrum,
  from one batched svdvals of that layer);
- all figures: the page idle with every figure drawn (every layer decomposed);
- warm: the same in a new server once the factors are on disk.
Baseline, measured in the same run: the same steps against the project at
`--baseline-rev` (default: the commit before visible-layers-first), checked out in a
temporary git worktree and run with this interpreter.

    python benchmarks/spectra_first_figure.py [--repeat 2] [--baseline-rev fd1876c~1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import (CHROMIUM, CHROMIUM_ARGS, free_port, quick_demo_cache, start_app_cmd,  # noqa: E402
                          stop_server, wait_healthy, wait_idle)

CHART = '[data-testid="stMain"] [data-testid="stPlotlyChart"]'


def one_visit(root: Path, cache: Path, log: Path, timeout: float) -> dict:
    """Start a server from `root`, load the demo on Home, click Spectra; seconds to the first chart and to idle."""
    from playwright.sync_api import sync_playwright
    port = free_port()
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(start_app_cmd(port, root=root), cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, 300)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("text=Loaded set", timeout=timeout * 1000)
            wait_idle(page, timeout)
            link = page.locator('[data-testid="stSidebarNav"] a[href$="/Spectra"]')
            t0 = time.perf_counter()
            link.click()
            page.wait_for_selector(CHART, timeout=timeout * 1000)
            first = time.perf_counter() - t0
            wait_idle(page, timeout)
            done = time.perf_counter() - t0
            charts = page.locator(CHART).count()
            errors = page.locator('[data-testid="stException"]').count()
            browser.close()
        deadline = time.time() + timeout   # the factor file is written in the background: let it land
        while not list((cache / "spectra").glob("svd-*.safetensors")) and time.time() < deadline:
            time.sleep(1)
        return {"first_figure_s": round(first, 2), "all_figures_s": round(done, 2), "charts": charts,
                "exceptions": errors}
    finally:
        stop_server(proc, 20)


def cold_and_warm(root: Path, tmp: Path, tag: str, timeout: float) -> dict:
    cache = quick_demo_cache(tmp / tag)
    if cache is None:
        raise SystemExit("the quick demo is not built (python -m analysis.zoo build --quick)")
    cold = one_visit(root, cache, tmp / f"{tag}-cold.log", timeout)
    warm = one_visit(root, cache, tmp / f"{tag}-warm.log", timeout)
    return {"cold": cold, "warm": warm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--baseline-rev", default="fd1876c~1")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list] = {"baseline": [], "now": []}
    with tempfile.TemporaryDirectory(prefix="ms-first-figure-") as tmp_s:
        tmp = Path(tmp_s)
        old = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for i in range(args.repeat):   # interleaved, so drift on a shared machine hits both alike
                for name, root in (("baseline", old), ("now", ROOT)):
                    res = cold_and_warm(root, tmp, f"{name}{i}", args.timeout)
                    runs[name].append(res)
                    print(f"{name} run {i + 1}: {json.dumps(res)}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    print(f"\nSpectra page, quick demo, {os.cpu_count()} CPUs; now = {rev}, baseline = {args.baseline_rev}")
    print("| code | factors | first figure s (median) | all figures s (median) | runs |")
    print("|---|---|---|---|---|")
    med = {}
    for name in ("baseline", "now"):
        for state in ("cold", "warm"):
            f = [r[state]["first_figure_s"] for r in runs[name]]
            a = [r[state]["all_figures_s"] for r in runs[name]]
            med[name, state] = statistics.median(f)
            print(f"| {name} | {'none on disk' if state == 'cold' else 'on disk'} | {statistics.median(f):.2f} | "
                  f"{statistics.median(a):.2f} | {', '.join(f'{x:.2f}/{y:.2f}' for x, y in zip(f, a))} |")
    for state in ("cold", "warm"):
        print(f"first figure, {state}: now / baseline = {med['now', state] / med['baseline', state]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
