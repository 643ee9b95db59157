"""`python -m analysis.zoo build [--quick] [--cache-dir D]` (the demo, then the Alignment page's transformer zoo
of the same preset; `--no-transformers`: the demo only);
`python -m analysis.zoo build-transformers [--quick] [--cache-dir D]` (the transformer zoo only);
`python -m analysis.zoo atm|cold-fusion [--quick|--full]` (iterative merging on the built demo: analysis/iterative)."""
from __future__ import annotations

import argparse
import sys
import time

from analysis.errors import MergescopeError
from analysis.zoo.builder import build, default_cache_dir, preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.zoo", description="Build mergescope's built-in benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fine-tune the text backbone on every task, train the MNIST MLPs, then the "
                                     "transformer zoo of the same preset")
    b.add_argument("--quick", action="store_true", help="the CPU-friendly preset (short sequences, few steps)")
    b.add_argument("--tiny", action="store_true", help="the seconds-long toy preset used by tests")
    b.add_argument("--cache-dir", default=None, help=f"cache folder (default $MERGESCOPE_CACHE or {default_cache_dir()})")
    b.add_argument("--device", default=None, help="cuda | mps | cpu (default: the best available)")
    b.add_argument("--csv", action="append", default=[], metavar="PATH",
                   help="add your own task: a CSV with text,label columns (repeatable; task name = file stem)")
    b.add_argument("--no-transformers", action="store_true",
                   help="skip the Alignment page's transformer zoo (build it later with build-transformers)")
    t = sub.add_parser("build-transformers", help="train small BERT-style encoders from several seeds on the text "
                                                  "tasks (the Alignment page's transformer zoo)")
    t.add_argument("--quick", action="store_true", help="the CPU-friendly preset (minutes)")
    t.add_argument("--tiny", action="store_true", help="the seconds-long toy preset used by tests")
    t.add_argument("--cache-dir", default=None, help=f"cache folder (default $MERGESCOPE_CACHE or {default_cache_dir()})")
    from analysis.iterative.cli import add_parsers
    add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "build-transformers":
        return _build_transformers(args)
    if hasattr(args, "handler"):
        return args.handler(args)

    import dataclasses
    config = preset("tiny" if args.tiny else "quick" if args.quick else "full")
    if args.device:
        config = dataclasses.replace(config, device=args.device)
    if args.csv:
        from pathlib import Path
        config = dataclasses.replace(config, user_csvs=tuple(str(Path(p).expanduser().resolve()) for p in args.csv))
    t0 = time.time()

    def progress(fraction: float, message: str) -> None:
        print(f"[{time.time() - t0:7.1f} s {100 * fraction:5.1f}%] {message}", flush=True)

    try:
        if args.no_transformers:
            print(build(config, args.cache_dir, progress=progress))
        else:
            from analysis.zoo.transformers import build_demo_and_transformer_zoo
            print(*build_demo_and_transformer_zoo(config, args.cache_dir, progress=progress), sep="\n")
    except MergescopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _build_transformers(args) -> int:
    from analysis.zoo.transformers import build_transformer_zoo
    t0 = time.time()

    def progress(fraction: float, message: str) -> None:
        print(f"[{time.time() - t0:7.1f} s {100 * fraction:5.1f}%] {message}", flush=True)

    try:
        folder = build_transformer_zoo("tiny" if args.tiny else "quick" if args.quick else "full", args.cache_dir,
                                       progress=progress)
    except MergescopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
