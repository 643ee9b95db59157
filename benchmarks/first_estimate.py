"""Slider -> first estimate on every page, in a browser against a `make app`-style server on a CPU.

Issue 12's CPU target: any slider move shows an updated page within 1.5 s, at least as a first estimate.
For each page and slider below, one browser session (a fresh context) opens the page on the quick demo and
moves the slider --moves times, always one step the same way, so every move asks for a value not seen
before. Per move, from the key press (the page's own clock):
- first:  when the page first shows the moved value's result. On the Merge and Loss Landscape pages on a
          CPU that is the first estimate (its "First estimate on 8 examples per task" caption appears once
          the chart is sent); on the other pages, and where no estimate is made, the end of the run;
- final:  the end of the run the press started (Merge and Loss Landscape wait there for the refinement
          on the full live subsample, so this is when the refined numbers are on screen).
Per move it also reads how many CPU seconds the server process and the browser's processes spent from the
key press to the first view (`CpuClock`): on 2 cores a headless Chromium (software compositing, no GPU)
animating the page's spinners takes a share of the CPU the server's merge would use.
`--dwell S`: seconds a user looks at each final view before the next press (default 0: the next press comes
as soon as the page is idle). The Merge page merges the knob values one step away in the background once a
view is final (ui/speculate.py), so a step after a dwell finds its merge done; PageDown (a jump of a tenth of
the slider's range) shows what a move that no speculation serves costs on its first press, and a sweep of
jumps after it (the speculation merges the same jump again first).
`--press-after-first S`: the next press comes S seconds after each first view, while that view's refinement
(or on the Merge page the merge of the next step ahead) still runs, as a user who moves on before the refined
numbers land; the role's last move waits for its refined numbers (final), where such a sweep stops.
Baseline, in the same run: a second server with `MERGESCOPE_FIRST_ESTIMATE=0` (each move scores the full
live subsample before drawing), the same pages and moves, interleaved page by page with the first.
`--code-rev REV` serves an earlier commit's app (a temporary git worktree) for a before/after.

    python benchmarks/first_estimate.py [--moves 3] [--preset quick] [--pages Merge,Spectra] [--json out.json]
    python benchmarks/first_estimate.py --pages Merge --code-rev HEAD~1      # the same, on an earlier commit
    python benchmarks/first_estimate.py --pages Loss_Landscape --press-after-first 1 --no-baseline
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from sessions import (RECORDER, RUN_ENDED, RUN_START, RUN_TIMEOUT_S, Session, check, open_role,  # noqa: E402
                      run_end_ms, settle, slider_input)
from test_browser import CHROMIUM, CHROMIUM_ARGS, free_port, start_app_cmd, stop_server, wait_healthy  # noqa: E402

# (page in the URL, slider label, Merge method or None, key that moves to an unseen value)
ROLES = [
    ("Spectra", "Rank fraction", None, "ArrowRight"),
    ("Interference", "Rank fraction kept per task", None, "ArrowRight"),
    ("Merge", "alpha", "task_arithmetic", "ArrowRight"),
    ("Merge", "rank fraction", "tsv_m", "ArrowRight"),   # from 1/T up: capped fractions, one merge (tsv.py)
    ("Merge", "rank fraction", "tsv_m", "ArrowLeft"),    # down from 1/T: every move a new rank
    ("Merge", "rank fraction", "tsv_m", "PageDown"),     # a jump: PageDown moves a tenth of the range, so
                                                         # 1/T → 0.025 → 0.005, the minimum: two moves at most
    ("Merge", "common fraction", "iso_cts", "ArrowLeft"),
    ("Merge", "common fraction", "iso_cts", "ArrowRight"),   # up from 0.8: the first step is a new split
    ("Merge", "common fraction", "iso_cts", "PageDown"),   # a jump (0.1, 10 steps): the first one unserved
    ("Loss_Landscape", "λ points", None, "ArrowRight"),
    ("Alignment", "Points on the path", None, "ArrowRight"),
]
TARGET_S = 1.5
WAYS = {"ArrowRight": "up", "ArrowLeft": "down", "PageDown": "jump down"}
CAPTION = "First estimate on"
# when the first-estimate caption is added to the page (its text node or an element holding it)
ESTIMATE_RECORDER = RECORDER + """
window.__msEstimate = [];
new MutationObserver(ms => { for (const m of ms) {
    const nodes = m.type === 'characterData' ? [m.target] : Array.from(m.addedNodes);
    if (nodes.some(n => (n.textContent || '').includes('%s'))) { window.__msEstimate.push(performance.now()); return; }
  } }).observe(document, {childList: true, characterData: true, subtree: true});
// a caption already on screen (a press before the refinement landed) is not added again: the new run re-sends
// it, which turns its element container's data-stale back to false
new MutationObserver(ms => { for (const m of ms) {
    if (m.target.getAttribute('data-stale') === 'false' && (m.target.textContent || '').includes('%s')) {
      window.__msEstimate.push(performance.now()); return; }
  } }).observe(document, {attributes: true, subtree: true, attributeFilter: ['data-stale']});
""" % (CAPTION, CAPTION)
FIRST_VIEW = """([t0, state0]) => { const m = window.__msEstimate.filter(t => t >= t0);
  if (m.length) return Math.min(...m) - t0; return (%s)([t0, state0]); }""" % RUN_ENDED


async def thumb_value(s: Session) -> str:
    box = s.page.locator('[data-testid="stSlider"]', has_text=s.slider).first
    return (await box.locator('[data-testid="stSliderThumbValue"]').first.inner_text()).strip()


class CpuClock:
    """CPU seconds (user + system) of the server process and of the browser's processes, sampled every 0.1 s
    on a thread with the wall clock, so a move's share of each can be read between two instants. Only the
    known processes are read each tick (the process list is rescanned once a second): the sampler itself
    costs little of the CPU it measures."""
    TICK_S, RESCAN_S = 0.1, 1.0
    _ticks = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int):
        self.server_pid, self.samples, self._stop = server_pid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _stat(pid) -> tuple[str, float] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()
        return text[text.index("(") + 1:text.rindex(")")], (int(fields[11]) + int(fields[12])) / CpuClock._ticks

    def _run(self) -> None:
        browser, scanned, last = [], 0.0, {}     # last: each browser process's CPU when last read (kept once it exits)
        while not self._stop.is_set():
            now = time.time()
            if now - scanned > self.RESCAN_S:
                browser = [int(p) for p in os.listdir("/proc") if p.isdigit()
                           and "chrom" in ((self._stat(p) or ("", 0))[0]).lower()]
                scanned = now
            server = self._stat(self.server_pid)
            for pid in browser:
                st = self._stat(pid)
                if st is not None:
                    last[pid] = st[1]
            self.samples.append((now, server[1] if server else 0.0, sum(last.values())))
            self._stop.wait(self.TICK_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(server, browser) CPU seconds between wall instants t0 and t1 (nearest samples: ±0.1 s of CPU)."""
        if not self.samples:
            return float("nan"), float("nan")
        near = lambda t: min(self.samples, key=lambda x: abs(x[0] - t))   # noqa: E731
        a, b = near(t0), near(t1)
        return b[1] - a[1], b[2] - a[2]


async def at_the_end(s: Session, key: str) -> bool:
    """Whether the slider already sits where `key` cannot move it (its minimum for ArrowLeft / PageDown)."""
    slider = slider_input(s)
    if not await slider.count():
        return False
    value, low, high = await slider.evaluate("el => [el.value, el.min, el.max]")
    return float(value) <= float(low) if key in ("ArrowLeft", "PageDown") else float(value) >= float(high)


async def one_move(s: Session, key: str, clock: CpuClock | None = None, dwell: float = 0.0,
                   early: float | None = None) -> dict:
    """One press and its times. `early`: the next press comes that many seconds after this one's first view,
    not after its final one (the refinement still running); final_s is then not measured (None)."""
    slider = slider_input(s)
    await slider.focus()
    before = await thumb_value(s)
    start = await s.page.evaluate(RUN_START)
    await slider.press(key)
    if early is not None:
        handle = await s.page.wait_for_function(FIRST_VIEW, arg=start, timeout=RUN_TIMEOUT_S * 1000, polling=20)
        first = float(await handle.json_value()) / 1000
        row = {"from": before, "first_s": round(first, 3), "estimate_s": None, "final_s": None}
        if clock is not None:
            pressed = (await s.page.evaluate("performance.timeOrigin") + start[0]) / 1000
            server, browser = clock.between(pressed, pressed + first)
            row.update(server_cpu_s=round(server, 2), browser_cpu_s=round(browser, 2))
        await check(s, f"move to {await thumb_value(s)}")
        await asyncio.sleep(early)
        return row
    final = await run_end_ms(s.page, start) / 1000
    marks = await s.page.evaluate("t0 => window.__msEstimate.filter(t => t >= t0)", start[0])
    estimate = (min(marks) - start[0]) / 1000 if marks else None
    first = min(estimate or final, final)
    row = {"from": before, "first_s": round(first, 3),
           "estimate_s": None if estimate is None else round(estimate, 3), "final_s": round(final, 3)}
    if clock is not None:    # the page's clock to the wall clock: performance.timeOrigin is in epoch ms
        pressed = (await s.page.evaluate("performance.timeOrigin") + start[0]) / 1000
        server, browser = clock.between(pressed, pressed + first)
        row.update(server_cpu_s=round(server, 2), browser_cpu_s=round(browser, 2))
    await check(s, f"move to {await thumb_value(s)}")
    await settle(s.page)
    await asyncio.sleep(dwell)
    return row


async def visit(base: str, role: tuple, moves: int, timeout: float,
                clock: CpuClock | None = None, dwell: float = 0.0, early: float | None = None) -> tuple[list[dict], list[str]]:
    from playwright.async_api import async_playwright
    page_name, label, method, key = role
    s = Session(0, page_name, label, method)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
        ctx.set_default_timeout(timeout * 1000)
        await ctx.add_init_script(ESTIMATE_RECORDER)
        s.page = await ctx.new_page()
        await open_role(s, base)
        await asyncio.sleep(dwell)
        rows = []
        for i in range(moves):
            if await at_the_end(s, key):   # a press there would start no run: the role has no more moves
                print(f"{page_name} {method or ''} {label!r}: at the end of its range after {len(rows)} of "
                      f"{moves} moves", flush=True)
                break
            # the last move of a sweep waits for its refined numbers: the cost of merging ahead in a sweep
            rows.append(await one_move(s, key, clock, dwell, early if i < moves - 1 else None))
        await browser.close()
    return rows, s.problems


def preset_cache(cache: Path, preset: str, into: Path) -> Path:
    """A cache folder holding only the newest finished `preset` demo build and its transformer zoo (linked):
    Home opens the full demo when one is there, so the other builds are left out. SVD factors and statistics
    start cold."""
    into.mkdir(parents=True)
    for kind in ("zoo", "transformers"):
        found = sorted((p for p in cache.glob(f"{kind}-{preset}-*") if (p / "manifest.json").is_file()),
                       key=lambda p: p.stat().st_mtime)
        if not found and kind == "zoo":
            raise SystemExit(f"no finished {preset} demo build in {cache}")
        if found:
            (into / found[-1].name).symlink_to(found[-1].resolve(), target_is_directory=True)
    return into


def serve(root: Path, cache: Path, log: Path, first_estimate: bool) -> tuple[subprocess.Popen, str]:
    """A `make app`-style server of the project at `root` (this checkout, or --code-rev's worktree)."""
    port = free_port()
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "MERGESCOPE_FIRST_ESTIMATE": "1" if first_estimate else "0"}
    proc = subprocess.Popen(start_app_cmd(port, root=root), cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log, 300)
    return proc, f"http://127.0.0.1:{port}"


def cpu_shares(moves: list[dict]) -> str:
    if not all("server_cpu_s" in m for m in moves):
        return "–"
    return (f"{statistics.median(m['server_cpu_s'] for m in moves):.2f} / "
            f"{statistics.median(m['browser_cpu_s'] for m in moves):.2f}")


def table(results: dict) -> str:
    lines = ["| page | slider | first estimate on: first s (median, runs) | refined s (median) | "
             "estimate off (baseline): s (median, runs) | first / baseline | every move ≤ 1.5 s | "
             "CPU s to the first view, server / browser (median) |", "|---|---|---|---|---|---|---|---|"]
    for (page, label, method, key), by in results.items():
        if "on" not in by:
            continue
        on, off = by["on"], by.get("off")    # no "off" with --no-baseline
        first = [m["first_s"] for m in on]
        final = [m["final_s"] for m in on if m["final_s"] is not None]
        med = statistics.median(first)
        way = f" ({WAYS[key]})" if sum(r[:3] == (page, label, method) for r in results) > 1 else ""
        if off:
            base = [m["final_s"] for m in off]
            bmed = statistics.median(base)
            baseline = f"{bmed:.2f} ({', '.join(f'{x:.2f}' for x in base)}) | {med / bmed:.2f}×"
        else:
            baseline = "– | –"
        lines.append(f"| {page.replace('_', ' ')} | {f'{method} ' if method else ''}{label}{way} | {med:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in first)}) | {f'{statistics.median(final):.2f}' if final else '–'} | {baseline} | "
                     f"{'yes' if max(first) <= TARGET_S else 'no'} | {cpu_shares(on)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MERGESCOPE_CACHE", "~/.cache/mergescope")))
    ap.add_argument("--preset", choices=["quick", "full", "tiny"], default="quick", help="which demo build")
    ap.add_argument("--moves", type=int, default=3)
    ap.add_argument("--pages", default=None, help="comma list of page names to run, e.g. Merge,Spectra")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--code-rev", default=None,
                    help="serve the app of this commit (a temporary git worktree) instead of this checkout")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dwell", type=float, default=0.0, help="seconds looked at each final view before the next press")
    ap.add_argument("--press-after-first", type=float, default=None, metavar="S",
                    help="press again S seconds after each first view, while its refinement still runs (no final "
                         "times); --dwell then only applies after the page opens")
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy the servers' logs into this folder")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the estimate-off server (for a before/after of two commits, each run on its own)")
    ap.add_argument("--keys", default=None, help="comma list of keys to keep among the roles, e.g. ArrowLeft,PageDown")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a killed run still stops its servers
    roles = [r for r in ROLES if (not args.pages or r[0] in args.pages.split(","))
             and (not args.keys or r[3] in args.keys.split(","))]
    rev = subprocess.run(["git", "rev-parse", "--short", args.code_rev or "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip() + ("" if args.code_rev else " + working tree")
    print(f"commit {rev}; dwell {args.dwell:g} s; press after first {args.press_after_first}; load average {os.getloadavg()}; {os.cpu_count()} CPUs; {args.preset} demo from {args.cache}",
          flush=True)
    results: dict = {r: {} for r in roles}
    variants = ("on",) if args.no_baseline else ("on", "off")
    problems: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ms-first-estimate-") as tmp_s:
        tmp = Path(tmp_s)
        servers, clocks = {}, {}
        root = ROOT
        if args.code_rev:
            root = tmp / "code"
            subprocess.run(["git", "worktree", "add", "--detach", str(root), args.code_rev], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for variant in variants:        # each server its own cold caches (SVD factors, statistics)
                cache = preset_cache(args.cache.expanduser(), args.preset, tmp / f"cache-{variant}")
                served = sorted(p.name for p in cache.iterdir())
                servers[variant] = serve(root, cache, tmp / f"server-{variant}.log", variant == "on")
                clocks[variant] = CpuClock(servers[variant][0].pid)
            for role in roles:              # interleaved page by page: drift on the machine hits both alike
                for variant in variants:
                    rows, bad = asyncio.run(visit(servers[variant][1], role, args.moves, args.timeout,
                                                  clocks[variant], args.dwell, args.press_after_first))
                    results[role][variant] = rows
                    problems += [f"estimate {variant}: {p}" for p in bad]
                    print(f"{role[0]} {role[2] or ''} {role[1]!r}, first estimate {variant}: {json.dumps(rows)}",
                          flush=True)
        finally:
            for clock in clocks.values():
                clock.close()
            for proc, _ in servers.values():
                stop_server(proc)
            if args.code_rev:
                subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=ROOT, capture_output=True)
        for variant in variants:
            text = (tmp / f"server-{variant}.log").read_text(errors="replace")
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                (args.keep_logs / f"server-{variant}.log").write_text(text)
            if "Traceback" in text:
                problems.append(f"server (estimate {variant}) logged a traceback: "
                                + text[text.index("Traceback"):][:1500])
    print(f"\n{args.moves} moves per page, {args.preset} demo (`{', '.join(served)}`), {time.perf_counter() - t0:.0f} s in all; "
          f"load average after {os.getloadavg()}\n")
    print(table(results))
    print(f"\nproblems: {problems or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{r[0]}|{r[2] or ''}|{r[1]}|{r[3]}": v for r, v in results.items()},
                                              indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
