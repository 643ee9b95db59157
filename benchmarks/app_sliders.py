"""Slider -> refreshed figure on every page, over the built demo (Streamlit AppTest).

What is timed: `AppTest.run()` after one slider change, i.e. the page's whole
server-side rerun (cached factors re-sliced, models merged and scored, figures
built) up to the moment Streamlit has every element; the browser's drawing of
the plotly JSON is not included (tests/test_browser.py times that for the
landscape page). Baseline, measured in the same run: a rerun of the same page
with nothing changed (Streamlit's own cost plus cached tables re-drawn).

    python benchmarks/app_sliders.py --build quick            # the quick demo (make app builds it)
    python benchmarks/app_sliders.py --build full --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# page, what is moved, widget key (or a substring of it), values, extra session state
MOVES = [
    ("1_Spectra.py", "rank fraction", "spectra_rank_fraction", (0.05, 0.2, 0.5), {}),
    ("2_Interference.py", "rank fraction", "interference_rank_fraction", (0.05, 0.2, 0.5), {}),
    ("3_Merge.py", "task_arithmetic α", "task_arithmetic_alpha", (0.4, 0.5, 0.6), {"method": "task_arithmetic"}),
    ("3_Merge.py", "tsv_m α", "tsv_m_alpha", (0.8, 1.2, 1.4), {"method": "tsv_m"}),
    ("3_Merge.py", "tsv_m rank fraction", "tsv_m_rank_fraction", (0.05, 0.1, 0.2), {"method": "tsv_m"}),
    ("3_Merge.py", "iso_cts common fraction", "iso_cts_common_fraction", (0.6, 0.7, 0.9), {"method": "iso_cts"}),
    ("4_Loss_Landscape.py", "λ points", "ll_points", (6, 7, 9), {}),
    ("6_Alignment.py", "points on the path", "al_lam", (13, 15, 17), {}),
]


def find_slider(at, key: str):
    for s in list(at.slider) + list(at.select_slider):
        if s.key and key in s.key:
            return s
    keys = [s.key for s in list(at.slider) + list(at.select_slider)]
    raise SystemExit(f"no slider whose key contains {key!r} on this page; keys: {keys}")


def time_page(page: str, key: str, values, query: dict, ws, timeout: int) -> dict:
    from pagetest import run_page
    t0 = time.perf_counter()
    at = run_page(page, ws, query, timeout=timeout)
    first = time.perf_counter() - t0
    errors = len(at.exception)
    t0 = time.perf_counter()
    at = at.run(timeout=timeout)
    rerun = time.perf_counter() - t0
    moves = []
    for v in values:
        slider = find_slider(at, key)
        t0 = time.perf_counter()
        at = slider.set_value(v).run(timeout=timeout)
        moves.append(time.perf_counter() - t0)
        errors += len(at.exception)
    return {"first_render_s": first, "rerun_s": rerun, "moves_s": moves, "exceptions": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", choices=["quick", "full", "tiny"], default="quick",
                    help="which demo build to load (tiny: built here in a temporary folder)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default=None, help="cpu / cuda (sets $MERGESCOPE_DEVICE for the pages)")
    ap.add_argument("--pages", default=None, help="comma list of page-file prefixes to run, e.g. 1,3")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.device:
        os.environ["MERGESCOPE_DEVICE"] = args.device
    import torch
    from analysis.device import device_info, get_device
    from analysis.zoo import build_tiny_demo, load_demo
    from ui.state import Workspace

    device = get_device()
    if args.build == "tiny":
        tmp = tempfile.mkdtemp(prefix="ms-sliders-")
        os.environ["MERGESCOPE_CACHE"] = tmp  # the Alignment page finds the tiny build's MLPs here
        demo = build_tiny_demo(tmp, device=device)
    else:
        if args.cache_dir:
            os.environ["MERGESCOPE_CACHE"] = args.cache_dir
        demo = load_demo(args.cache_dir, quick=args.build == "quick", device=device)
    ws = Workspace(name="demo", tvs=demo.tvs, evaluator=demo.evaluator, reference=demo.reference)
    info = {"device": str(device), "device_info": device_info(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "build": str(demo.root)}
    print(json.dumps(info), flush=True)
    wanted = args.pages.split(",") if args.pages else None
    rows = []
    for page, what, key, values, query in MOVES:
        if wanted and not any(page.startswith(p) for p in wanted):
            continue
        r = time_page(page, key, values, query, ws, args.timeout)
        r.update(page=page, control=what, values=list(values))
        rows.append(r)
        med = statistics.median(r["moves_s"])
        print(f"{page:22s} {what:26s} first {r['first_render_s']:7.2f} s  rerun {r['rerun_s']:6.2f} s  "
              f"moves {', '.join(f'{m:.2f}' for m in r['moves_s'])} s  median/rerun {med / r['rerun_s']:5.1f}x  "
              f"exceptions {r['exceptions']}", flush=True)
    print("\n| page | slider | values | first render s | rerun, no change s | slider move s | median move / rerun |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["moves_s"])
        print(f"| {r['page']} | {r['control']} | {', '.join(map(str, r['values']))} | {r['first_render_s']:.2f} | "
              f"{r['rerun_s']:.2f} | {', '.join(f'{m:.2f}' for m in r['moves_s'])} | {med / r['rerun_s']:.1f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 1 if any(r["exceptions"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
