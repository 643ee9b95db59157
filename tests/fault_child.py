"""A child process for tests/test_faults.py: writes one kind of file, so the
test can SIGKILL it mid-write, run two at once, or cap its file size.

    python tests/fault_child.py spectra|statistics|export --dir D [--seed S] [--slow] [--go FILE] [--fsize BYTES]

--slow: the safetensors serializer `analysis.atomic` calls writes its bytes
in 40 chunks with a pause after each (same bytes), after printing
"WRITING <path>", so a kill lands inside a write and not only between
writes. --go: wait until FILE exists (two children start their work
together). --fsize: RLIMIT_FSIZE, so the kernel refuses writes past that
size (EFBIG), a real write failure with no patching.
Prints "DONE" and exits 0 when everything was written.
"""
from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

CHUNKS = 40
PAUSE_S = 0.01
STAT_N = 32


def spectra_set(seed: int = 0):
    """Three tasks, six 96x64 matrices: a ~0.8 MB spectral cache."""
    from analysis.taskvectors import TaskVectorSet
    g = torch.Generator().manual_seed(seed)
    base = {f"blocks.{i}.dense.weight": torch.randn(96, 64, generator=g) for i in range(6)}
    tasks = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b", "c")}
    return TaskVectorSet.from_state_dicts(base, tasks)


def statistics_inputs():
    """The conftest toy set and evaluator, built with one torch thread (identical in every process)."""
    from conftest import ToyBackbone, _toy_models
    from analysis.evaluation import Evaluator
    from analysis.taskvectors import TaskVectorSet
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, finetuned, data, heads = _toy_models()
    finally:
        torch.set_num_threads(threads)
    return TaskVectorSet.from_state_dicts(base, finetuned), Evaluator(ToyBackbone(base), data, heads)


def export_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"encoder.layer.{i}.weight": torch.randn(256, 256, generator=g) for i in range(4)}


def export_config(seed: int) -> dict:
    return {"model_type": "bert", "hidden_size": 256, "seed": seed}


def write_export(out: Path, seed: int) -> Path:
    from analysis.report import write_hf_model
    return write_hf_model(out, export_state(seed), export_config(seed), metadata={"method": "test", "seed": seed})


def _slow_save_file(tensors, filename, metadata=None):
    from safetensors.torch import save
    data = save(tensors, metadata)
    print(f"WRITING {filename}", flush=True)
    step = max(1, -(-len(data) // CHUNKS))
    with open(filename, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(PAUSE_S)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["spectra", "statistics", "export"])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--go", type=Path, default=None)
    ap.add_argument("--fsize", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.slow:
        import analysis.atomic
        analysis.atomic.save_file = _slow_save_file
    if args.fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
    if args.kind == "spectra":
        from analysis.spectra import SpectralCache
        tvs = spectra_set(args.seed)
    elif args.kind == "statistics":
        from analysis.statistics import StatisticsCache
        tvs, evaluator = statistics_inputs()
    print("READY", flush=True)
    if args.go is not None:
        while not args.go.exists():
            time.sleep(0.005)
    if args.kind == "spectra":
        cache = SpectralCache(tvs, device="cpu", cache_dir=args.dir).compute()
        cache.flush()
        print(f"COMPUTED {cache.compute_count}", flush=True)
    elif args.kind == "statistics":
        cache = StatisticsCache(tvs, evaluator, "cpu", cache_dir=args.dir)
        cache.fisher_diagonals(n=STAT_N)
        if cache.write_errors:
            raise cache.write_errors[0]
        print(f"COMPUTED {cache.compute_count}", flush=True)
    else:
        write_export(args.dir, args.seed)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
