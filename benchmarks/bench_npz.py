"""Writing nnU-Net's probability files: `np.savez_compressed` (what nnU-Net's export_prediction
calls) against `nnunet_heart_ext.kernels.npz.savez_compressed` (ISA-L, chunks in a thread pool)
and the same writer on its zlib fallback (both with threads = the usable cores), and with isal on
one thread (what the chunking alone gives).

Input: 4-class softmax probabilities of a full-size heart case, (4, 340, 512, 512) float32 (1.4 GB),
the softmax of smooth logits (plus a little voxel noise): background confident almost everywhere,
a myocardium shell, a valve blob and small calcium blobs; stored as nnU-Net hands it over at
export, a transposed (non-contiguous) view of a (4, 512, 512, 340) C-contiguous array. Two
contents: "confident" logits (background exactly 1.0 in most voxels: compresses ~3x) and the
same logits x0.3 ("less confident": compresses ~1.5x, and zlib level 6 is ~3x slower on it).
Every row writes to the same folder, reads the file back with `np.load(f)['probabilities']` and
checks it equal to the input (bit for bit, dtype, shape) and loaded in the array order numpy's
own file loads in (`read_back_ok`). speedup = np.savez_compressed's seconds / the row's, same
content. `python -m benchmarks --only npz [--quick]`.
"""
import os
import tempfile
import time

import numpy as np

from benchmarks.common import RESULTS_DIR, report, time_call

SHAPE = (4, 340, 512, 512)
QUICK_SHAPE = (4, 68, 128, 128)


def add_arguments(parser):
    parser.add_argument("--npz-repeat", type=int, default=2, help="timed runs of the new writer (npz)")


def probabilities(shape=SHAPE, scale: float = 1.0, jitter: float = 0.05, seed: int = 0) -> np.ndarray:
    """Softmax probabilities (C, Z, Y, X) float32, returned as a non-contiguous transposed view
    (memory order C, Y, X, Z), computed slab by slab to stay cheap. The logits (margins up to
    about 24 between background and the rest far from the heart) are multiplied by `scale`, plus
    Gaussian noise of standard deviation `jitter` (a network's voxel-to-voxel variation)."""
    c, nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    calcium = [(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)) for _ in range(8)]
    y = np.linspace(0, 1, ny, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, nx, dtype=np.float32)[None, :, None]
    z = np.linspace(0, 1, nz, dtype=np.float32)[None, None, :]
    out = np.empty((c, ny, nx, nz), dtype=np.float32)  # nnU-Net's array before transpose_backward
    step = max(1, ny // 16)
    for s in range(0, ny, step):
        yy = y[s:s + step]
        r = np.sqrt(((yy - 0.5) / 0.22) ** 2 + ((x - 0.52) / 0.2) ** 2 + ((z - 0.5) / 0.3) ** 2)
        logits = np.empty((c,) + r.shape, dtype=np.float32)
        logits[0] = 12 * (np.abs(r - 0.85) - 0.15) + 2 * np.sin(7 * x + 5 * yy) * np.cos(4 * z)
        logits[1] = 12 * (0.15 - np.abs(r - 0.85))
        logits[2] = 10 * (1 - np.sqrt(((yy - 0.5) / 0.04) ** 2 + ((x - 0.67) / 0.04) ** 2 + ((z - 0.5) / 0.05) ** 2))
        d = np.full(r.shape, np.inf, dtype=np.float32)
        for cy, cx, cz in calcium:
            np.minimum(d, ((yy - cy) ** 2 + (x - cx) ** 2 + (z - cz) ** 2) / 0.012 ** 2, out=d)
        logits[3] = 8 * (1 - d) - 4
        logits *= scale
        if jitter:
            logits += jitter * rng.standard_normal(logits.shape, dtype=np.float32)
        logits -= logits.max(axis=0, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0, keepdims=True)
        out[:, s:s + step] = logits
    return out.transpose(0, 3, 1, 2)


# logit scale: 1 leaves background exactly 1.0 in ~74 % of voxels (a file 0.35x the array);
# 0.3 in ~1.5 % (0.66x), where np.savez_compressed takes the ~60 s a case seen on nnU-Net's outputs
CONTENTS = {"confident (logits x1)": 1.0, "less confident (logits x0.3)": 0.3}


def main(args):
    from nnunet_heart_ext.data import npz_file
    from nnunet_heart_ext.kernels import npz
    from nnunet_heart_ext.kernels.cores import usable_cores

    quick = getattr(args, "quick", False)
    shape = QUICK_SHAPE if quick else SHAPE
    repeat = 1 if quick else getattr(args, "npz_repeat", 2)
    threads = usable_cores()
    isal = npz._zlib_module
    zlib_only = lambda: __import__("zlib")  # noqa: E731

    def new_writer(backend, threads=threads):
        def write(f, **arrays):
            saved, npz._zlib_module = npz._zlib_module, backend
            try:
                npz_file.savez_compressed(f, threads=threads, **arrays)
            finally:
                npz._zlib_module = saved
        return write

    methods = [("np.savez_compressed (nnU-Net)", np.savez_compressed, 1),
               (f"npz isal, {threads} threads", new_writer(isal), repeat),
               ("npz isal, 1 thread", new_writer(isal, 1), repeat),
               (f"npz zlib fallback, {threads} threads", new_writer(zlib_only), repeat)]
    if isal().__name__ == "zlib":
        print("isal is not installed: the isal row runs on zlib too")
    rows = []
    for content, scale in CONTENTS.items():
        t0 = time.perf_counter()
        probs = probabilities(shape, scale)
        print(f"{content}: {probs.shape} {probs.dtype} C-contiguous={probs.flags.c_contiguous} "
              f"({probs.nbytes / 2 ** 20:.0f} MiB, background exactly 1 in {(probs[0] == 1).mean():.1%}) "
              f"made in {time.perf_counter() - t0:.1f} s", flush=True)
        base = order = None
        with tempfile.TemporaryDirectory() as folder:
            for name, fn, n in methods:
                path = os.path.join(folder, "case.npz")
                t = time_call(lambda: fn(path, probabilities=probs), repeat=n, warmup=0)
                t1 = time.perf_counter()
                with np.load(path) as f:
                    back = f["probabilities"]
                read_s = time.perf_counter() - t1
                order = order or (back.flags.c_contiguous, back.flags.f_contiguous)  # as numpy's file loads
                ok = (back.dtype == probs.dtype and back.shape == probs.shape and np.array_equal(back, probs)
                      and (back.flags.c_contiguous, back.flags.f_contiguous) == order)
                del back
                base = base or t["min_s"]
                rows.append({"content": content, "method": name, "min_s": t["min_s"], "median_s": t["median_s"],
                             "repeat": n, "speedup": base / t["min_s"], "file_MB": os.path.getsize(path) / 1e6,
                             "np_load_s": read_s, "read_back_ok": bool(ok)})
                print(rows[-1], flush=True)
        del probs

    def plot(rows, ax):
        labels = [f"{r['method']}\n{r['content']}" for r in rows]
        ax.barh(labels, [r["min_s"] for r in rows])
        for i, r in enumerate(rows):
            ax.text(r["min_s"], i, f" {r['min_s']:.1f} s, x{r['speedup']:.1f}, {r['file_MB']:.0f} MB", va="center",
                    fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("seconds to write one case (less is better)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(r["min_s"] for r in rows) * 1.7)

    report("npz", rows, title=f"Writing {shape} float32 probabilities (.npz)", plot=plot,
           results_dir=getattr(args, "out", None) or RESULTS_DIR,
           extra={"quick": quick, "shape": shape, "threads": threads, "input_c_contiguous": False,
                  "isal": isal().__name__ != "zlib", "load_average_at_end": os.getloadavg()})
