"""Where a page's time goes: py-spy samples of its script thread (Streamlit AppTest, built demo).

Times a page's first render (fresh spectral-cache folder unless --warm-cache) and
a few slider moves, sampling the process with py-spy (https://github.com/benfred/py-spy,
`pip install py-spy`, a static binary: `--py-spy` points at it on a machine without pip),
then prints the functions with the most inclusive samples in the page's script thread.
A diagnostic, not a benchmark: the sampler itself costs a few percent.

    python benchmarks/page_profile.py --page 1_Spectra.py                     # first render
    python benchmarks/page_profile.py --page 2_Interference.py --key interference_rank_fraction \\
        --values 0.05,0.2,0.5 --device cuda
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def top_frames(raw: Path, n: int, phase_marker: str = "_run_script_thread") -> tuple[int, list[tuple[int, str]]]:
    """Inclusive samples per function (once per stack) over the stacks of the page's script thread."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if phase_marker not in stack or not k.isdigit():
            continue
        total += int(k)
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.rsplit("(", 1)[-1].split(":")[0].rsplit("/", 1)[-1] if "(" in frame else ""
            key = f"{name} [{where}]"
            if key not in seen:
                seen.add(key)
                counts[key] += int(k)
    skip = ("threading.py", "script_runner.py", "exec_code.py", "local_script_runner.py")
    return total, [(c, k) for k, c in counts.most_common(n + 20) if not any(s in k for s in skip)][:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", required=True)
    ap.add_argument("--key", default=None, help="slider key (substring) to move; none: the first render only")
    ap.add_argument("--values", default="", help="comma list of slider values, moved in order")
    ap.add_argument("--query", default="", help="the page's URL query, e.g. method=tsv_m&rank_fraction=0.125")
    ap.add_argument("--build", choices=["quick", "full"], default="quick")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warm-cache", action="store_true", help="keep $MERGESCOPE_CACHE (spectral factors on disk)")
    beside = Path(sys.executable).parent / "py-spy"        # a venv's py-spy, not on PATH
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or (str(beside) if beside.exists() else "py-spy"))
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None, help="folder for the raw samples (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.device:
        os.environ["MERGESCOPE_DEVICE"] = args.device
    os.environ.setdefault("MERGESCOPE_FIRST_ESTIMATE", "0")
    from analysis.zoo import load_demo
    from app_sliders import find_slider
    from pagetest import run_page
    from ui.state import Workspace

    demo = load_demo(None, quick=args.build == "quick")
    if not args.warm_cache:
        os.environ["MERGESCOPE_CACHE"] = tempfile.mkdtemp(prefix="ms-profile-")   # nothing computed yet
    ws = Workspace(name="demo", tvs=demo.tvs, evaluator=demo.evaluator, reference=demo.reference)
    out = Path(args.out or tempfile.mkdtemp(prefix="ms-pyspy-"))
    out.mkdir(parents=True, exist_ok=True)
    values = [float(v) if "." in v else int(v) for v in args.values.split(",") if v]

    def sampled(label: str, fn):
        raw = out / f"{Path(args.page).stem}-{label}.txt"
        spy = subprocess.Popen([args.py_spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw),
                                "--pid", str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)                                     # py-spy attaches
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        return result, seconds, raw

    from urllib.parse import parse_qsl
    query = dict(parse_qsl(args.query))
    at, first_s, raw_first = sampled("first", lambda: run_page(args.page, ws, query, timeout=1200))
    print(f"{args.page}: first render {first_s:.2f} s (device {ws.evaluator.device})")
    raws = [("first render", raw_first)]
    if args.key and values:
        times = []

        def moves():
            nonlocal at
            for v in values:
                t0 = time.perf_counter()
                at = find_slider(at, args.key).set_value(v).run(timeout=600)
                times.append(time.perf_counter() - t0)
        _, _, raw_moves = sampled("moves", moves)
        print(f"moves of {args.key} to {values}: {', '.join(f'{t:.3f}' for t in times)} s")
        raws.append(("moves", raw_moves))
    for label, raw in raws:
        if not raw.exists():
            print(f"{label}: no samples ({args.py_spy} did not run?)")
            continue
        total, rows = top_frames(raw, args.top)
        print(f"\n{label}: {total} samples of the script thread at {args.rate} Hz; inclusive share")
        for count, key in rows:
            print(f"{100 * count / max(total, 1):5.1f} %  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
