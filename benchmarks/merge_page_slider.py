"""Time slider -> accuracy table on the Merge page over the built demo (AppTest, CPU)."""
import sys, time
sys.path.insert(0, "tests"); sys.path.insert(0, ".")  # run from the repository root
from analysis.zoo import load_demo
from ui.state import Workspace
from pagetest import run_page

demo = load_demo(quick=True)
ws = Workspace(name="demo", tvs=demo.tvs, evaluator=demo.evaluator, reference=demo.reference)
for method, knob, values in (("task_arithmetic", "alpha", (0.4, 0.5, 0.6)), ("tsv_m", "alpha", (0.8, 1.2, 1.4)),
                             ("tsv_m", "rank_fraction", (0.05, 0.1, 0.2))):
    t0 = time.perf_counter()
    at = run_page("3_Merge.py", ws, {"method": method}, timeout=900)
    print(f"{method}: first render {time.perf_counter() - t0:.1f} s, exceptions {len(at.exception)}", flush=True)
    slider = next(s for s in at.slider if knob in s.key)
    for v in values:
        t0 = time.perf_counter()
        at = slider.set_value(v).run(timeout=900)
        slider = next(s for s in at.slider if knob in s.key)
        print(f"  {knob} -> {v}: {time.perf_counter() - t0:.2f} s (exceptions {len(at.exception)})", flush=True)
