"""The `make app` server on a CPU: idle CPU with one browser tab open, and
seconds from SIGTERM to exit.

Starts `<python> -m streamlit run app.py` from the project root (so the
server reads .streamlit/config.toml, as `make app` does; a project-local
.venv is then inside the watched folder, as on a user's machine), opens the
home page in headless Chromium (a session: Streamlit only watches files for
sessions), waits until the page is idle, samples the server's CPU time
(/proc/<pid>/stat, all threads) over --seconds, then sends SIGTERM and times
the exit. Each variant is one server; the first is the baseline the others
are compared with.

    python benchmarks/server.py                               # config as committed
    python benchmarks/server.py --variant "watcher auto:--server.fileWatcherType auto" \
        --variant "watcher poll:--server.fileWatcherType poll"
    python benchmarks/server.py --cache ~/.cache/mergescope --sigterm-while-busy 2 \
        --variant "no exit hook:MERGESCOPE_EXIT_HOOK=0"
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import CHROMIUM, CHROMIUM_ARGS, free_port, start_app_cmd, wait_healthy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(python: str, extra: list[str], seconds: float, cache: Path, log: Path, browser: bool,
            busy_after: float | None = None, env_extra: dict | None = None) -> dict:
    port = free_port()
    env = {**os.environ, "MERGESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(start_app_cmd(port, python) + extra, cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    out = {}
    try:
        wait_healthy(proc, port, log)
        pw = page = None
        if browser:
            from playwright.sync_api import sync_playwright
            pw = sync_playwright().start()
            b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = b.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector('[data-testid="stMain"] h1', timeout=120_000)
        if busy_after is not None:                     # SIGTERM while the page still works (reads the demo)
            if page is not None:
                page.wait_for_selector("text=Loaded set", timeout=300_000)   # the summary starts reading
            time.sleep(busy_after)
            out["idle_cpu_percent"] = float("nan")
        else:
            time.sleep(5)                              # let the first run and any watcher setup settle
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(proc.pid), time.perf_counter()
            out["idle_cpu_percent"] = 100 * (c1 - c0) / (t1 - t0)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
            out["sigterm_to_exit_s"] = time.perf_counter() - t0
            out["exit_status"] = proc.returncode            # -6: SIGABRT (a daemon thread unwound at exit)
        except subprocess.TimeoutExpired:
            out["sigterm_to_exit_s"] = float("inf")   # still running after 30 s
        if pw is not None:
            pw.stop()
        text = log.read_text(errors="replace")
        out["inotify_overflow_lines"] = text.count("Inotify queue overflowed")
        out["log_lines"] = len(text.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the interpreter `make app` uses (default: the project's .venv)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-browser", action="store_true", help="no session: the server alone")
    ap.add_argument("--variant", action="append", default=[],
                    help="'label:extra streamlit flags' (VAR=value words set environment variables); the committed "
                         "config always runs first")
    ap.add_argument("--cache", type=Path, default=None,
                    help="MERGESCOPE_CACHE for the server (default: an empty folder: the home page only)")
    ap.add_argument("--sigterm-while-busy", type=float, default=None, metavar="S",
                    help="send SIGTERM S seconds after the home page shows 'Loaded set' (--cache must hold a "
                         "demo; the page is then still reading its task vectors) instead of sampling idle CPU")
    args = ap.parse_args(argv)
    if not Path(args.python).exists():
        args.python = sys.executable
    variants = [("config as committed", [])] + [(v.split(":", 1)[0], shlex.split(v.split(":", 1)[1])) for v in args.variant]
    if args.sigterm_while_busy is not None:
        print("SIGTERM while busy: idle CPU not sampled")
    print(f"python {args.python}; load average {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ms-server-") as tmp:
        for i, (label, words) in enumerate(variants):
            env_extra = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
            extra = [w for w in words if not ("=" in w and not w.startswith("-"))]
            r = measure(args.python, extra, args.seconds, args.cache or Path(tmp) / "cache", Path(tmp) / f"log{i}.txt",
                        not args.no_browser, args.sigterm_while_busy, env_extra)
            rows.append((label, r))
            print(f"{label}: {r}", flush=True)
    base = rows[0][1]
    print(f"\n| server | idle CPU % of one core ({args.seconds:.0f} s) | SIGTERM -> exit s | exit status | "
          "'Inotify queue overflowed' lines |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['idle_cpu_percent']:.1f} | {r['sigterm_to_exit_s']:.2f} | {r.get('exit_status')} | "
              f"{r['inotify_overflow_lines']} |")
    if len(rows) > 1:
        for label, r in rows[1:]:
            print(f"{label}: idle CPU {r['idle_cpu_percent'] / max(base['idle_cpu_percent'], 1e-9):.1f}x the "
                  f"baseline ({rows[0][0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
