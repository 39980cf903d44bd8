"""Run every kernel microbenchmark: `python -m benchmarks [--only loss,cc] [--quick] [--out DIR]`.

Each `benchmarks/bench_<name>.py` has `add_arguments(parser)` (optional) and `main(args)`.
"""
import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import benchmarks
from benchmarks.common import RESULTS_DIR


def discover() -> list:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_"))


def main(argv=None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", default=",".join(names), help=f"comma-separated subset of {names}")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for reporting)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    for name in names:  # each benchmark's own options
        module = importlib.import_module(f"benchmarks.bench_{name}")
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"bench_{name}"))
    args = parser.parse_args(argv)
    failed = []
    for name in args.only.split(","):
        if name not in names:
            parser.error(f"unknown benchmark {name!r}; known: {names}")
        print(f"\n===== bench_{name} =====", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        try:
            module.main(args)
        except Exception as e:  # one failing benchmark should not hide the others' numbers
            print(f"bench_{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
