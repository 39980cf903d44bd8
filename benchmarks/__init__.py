"""Kernel microbenchmarks. `python -m benchmarks` runs every `bench_*.py` here."""
