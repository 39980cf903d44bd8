"""What every benchmark shares: timing, the machine record, a printed table, JSON and PNG output.

A benchmark module defines `main(args) -> None` and calls `report(name, rows, ...)`, where rows
are dicts with the same keys. Results go to `benchmarks/results/<name>.json` (+ `.png`), written
atomically, with the machine they came from.
"""
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where the numbers came from: CPU, cores, GPU if any, library versions."""
    info = {"host_cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["host_cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for lib in ("triton", "numba", "cc3d", "nnunetv2"):
        try:
            from importlib.metadata import version
            info[lib] = version({"cc3d": "connected-components-3d"}.get(lib, lib))
        except Exception:
            pass
    return info


def time_call(fn, repeat: int = 5, warmup: int = 1, sync=None) -> dict:
    """Min/median/max seconds of `fn()` over `repeat` runs after `warmup` runs.
    `sync` (e.g. torch.cuda.synchronize) is called before each clock read."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "repeat": repeat}


def print_table(rows: list, title: str = "") -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    if title:
        print(f"\n## {title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def report(name: str, rows: list, title: str = "", plot=None, extra: dict = None,
           results_dir: Path = RESULTS_DIR) -> Path:
    """Print `rows` as a table, write `<results_dir>/<name>.json`, and `<name>.png` when `plot`
    (a function `plot(rows, ax)` drawing on a matplotlib Axes) is given."""
    print_table(rows, title or name)
    payload = {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {}),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(results_dir) / f"{name}.json"
    atomic_write_bytes(out, json.dumps(payload, indent=2).encode())
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        plot(rows, ax)
        ax.set_title(title or name)
        fig.tight_layout()
        png = out.with_suffix(".png")
        tmp = png.with_name(f".{png.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, png)
    print(f"results: {out}")
    return out
