"""Keep-largest-component postprocessing on 300 x 512 x 512 heart predictions (78.6 M voxels):
plain nnU-Net against nnU-Net's function with the extension installed and the extension's kernel.

Cases (full 26-connectivity, as nnU-Net uses), each a prediction postprocessing exists for:
  clean          a myocardium shell (1) around a valve (2), calcifications (3) on the wall, and
                 120 spurious boxes of every label (sides 2-8), near the heart and anywhere
  noisy_voxels   clean plus 1,500 isolated one-voxel false positives of every label
  noisy_blobs    clean plus 400 more spurious boxes (sides 1-6) anywhere
and the labels kept: [1, 2, 3] (the whole foreground, nnU-Net's first try) for every case, and
[1, 2] (myocardium and valve, one of the combinations nnU-Net's search tries) on noisy_voxels.

CPU rows, run in turn each round so that load from other processes hits all alike:
  nnunet_default          nnU-Net's own remove_all_but_largest_component_from_segmentation, the
                          function object plain nnU-Net runs (NNUNET_HEART_EXT_DISABLE=1 runs the
                          same code; here it is the replacement's __wrapped__), acvl_utils inside
  nnunet_with_extension   the same call with the extension installed: the function nnU-Net's
                          module holds (the hook's replacement), NNUNET_HEART_EXT_CC_DEVICE=cpu
  ext_segmentation_cpu    nnunet_heart_ext.kernels.connected_components'
                          remove_all_but_largest_component_from_segmentation (numpy)
  ext_binary_cpu          the kernel's remove_all_but_largest_component on the foreground mask
  acvl_binary             acvl_utils' remove_all_but_largest_component on that mask (only where
                          nnU-Net's module does not import: then it is the baseline)
  cc3d_label              cc3d.connected_components of that mask alone (clean only): what
                          labelling the whole volume costs, the floor of any path that does
GPU rows (when CUDA is there, [1, 2, 3]): the kernel's label and binary keep-largest (clean only)
and segmentation function on CUDA tensors (kernel time: inputs and outputs stay on the GPU), the
segmentation function with the host/device copies (numpy in, numpy out), and nnU-Net's function
with the extension and NNUNET_HEART_EXT_CC_DEVICE=cuda.
speedup = nnunet_default's median / the row's median, within the same case and labels. Every
path's output is checked equal to nnU-Net's before anything is timed.
Where nnunetv2's postprocessing module cannot be imported (it needs SimpleITK), the nnU-Net rows
are left out and acvl_binary, the labelling nnU-Net calls, is the baseline (`baseline` in the JSON).
`python -m benchmarks --only cc [--quick]`.
"""
import os
import statistics
import time

import cc3d
import numpy as np

from benchmarks.common import RESULTS_DIR, report

SHAPE = (300, 512, 512)
QUICK_SHAPE = (80, 192, 192)
# (case, labels_or_regions)
RUNS = [("clean", [1, 2, 3]), ("noisy_voxels", [1, 2, 3]), ("noisy_blobs", [1, 2, 3]), ("noisy_voxels", [1, 2])]


def add_arguments(parser):
    parser.add_argument("--cc-repeat", type=int, default=5, help="timed rounds (cc)")


def heart_segmentation(shape, seed=0):
    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(-1, 1, complex(0, s)) for s in shape)]
    radius = np.sqrt(sum(((a.astype(np.float32) - c) / r) ** 2
                         for a, c, r in zip(axes, (0.0, 0.05, -0.05), (0.35, 0.3, 0.28))))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(radius < 1) & (radius > 0.7)] = 1
    seg[radius < 0.3] = 2
    wall = np.argwhere((radius > 0.9) & (radius < 1.0))
    for z, y, x in wall[rng.choice(len(wall), size=min(40, len(wall)), replace=False)]:
        seg[z:z + 2, y:y + 2, x:x + 2] = 3
    for i in range(120):  # spurious blobs: half near the heart, half anywhere
        spread = 0.6 if i % 2 else 1.0
        centre = [int(s / 2 + rng.uniform(-spread, spread) * s / 2) for s in shape]
        half = rng.integers(1, 5, size=3)
        seg[tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, half))] = rng.integers(1, 4)
    return seg


def with_single_voxels(seg, n=1500, seed=1):
    """`seg` plus `n` one-voxel false positives of random labels, each with no foreground among
    its 26 neighbours (so each is a component of its own)."""
    rng = np.random.default_rng(seed)
    seg = seg.copy()
    placed = 0
    while placed < n:
        z, y, x = (int(rng.integers(1, s - 1)) for s in seg.shape)
        if not seg[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].any():
            seg[z, y, x] = rng.integers(1, 4)
            placed += 1
    return seg


def with_blobs(seg, n=400, seed=2):
    """`seg` plus `n` boxes of random labels and sides 1-6 anywhere (touching whatever is there)."""
    rng = np.random.default_rng(seed)
    seg = seg.copy()
    for _ in range(n):
        corner = [int(rng.integers(0, s)) for s in seg.shape]
        side = rng.integers(1, 7, size=3)
        seg[tuple(slice(c, c + d) for c, d in zip(corner, side))] = rng.integers(1, 4)
    return seg


def cases(shape) -> dict:
    clean = heart_segmentation(shape)
    n_voxels = 1500 if shape == SHAPE else 200
    return {"clean": clean, "noisy_voxels": with_single_voxels(clean, n_voxels),
            "noisy_blobs": with_blobs(clean, 400 if shape == SHAPE else 60)}


def _rounds(candidates: dict, repeat: int, sync=None, warmup=True) -> dict:
    """Time each candidate once per round, candidates in turn; seconds by name."""
    sync = sync or (lambda: None)
    if warmup:  # imports, Triton compilation, caches
        for fn in candidates.values():
            fn()
    sync()
    times = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _rows(times: dict, device: str, baseline_s: float, voxels: int, case: str, labels) -> list:
    rows = []
    for name, t in times.items():
        median = statistics.median(t)
        rows.append({"case": case, "labels": str(labels), "path": name, "device": device, "median_s": median,
                     "min_s": min(t), "speedup_vs_nnunet": baseline_s / median,
                     "Mvoxel_per_s": voxels / median / 1e6, "repeat": len(t)})
    return rows


def _with_device(choice, fn):
    def run():
        before = os.environ.get("NNUNET_HEART_EXT_CC_DEVICE")
        os.environ["NNUNET_HEART_EXT_CC_DEVICE"] = choice
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["NNUNET_HEART_EXT_CC_DEVICE"]
            else:
                os.environ["NNUNET_HEART_EXT_CC_DEVICE"] = before
    return run


def cpu_candidates(seg, labels, nnunet, acvl_keep_largest, binary_rows: bool) -> dict:
    from nnunet_heart_ext.kernels import connected_components as ext

    candidates = {}
    if nnunet is not None:
        default, with_extension = nnunet
        candidates["nnunet_default"] = lambda: default(seg, labels)
        candidates["nnunet_with_extension"] = _with_device("cpu", lambda: with_extension(seg, labels))
    candidates["ext_segmentation_cpu"] = lambda: ext.remove_all_but_largest_component_from_segmentation(seg, labels)
    if labels == [1, 2, 3]:
        mask = seg != 0
        candidates["ext_binary_cpu"] = lambda: ext.remove_all_but_largest_component(mask)
        if nnunet is None:
            candidates["acvl_binary"] = lambda: acvl_keep_largest(mask)
        if binary_rows:
            candidates["cc3d_label"] = lambda: cc3d.connected_components(mask, connectivity=26)
    return candidates


def gpu_candidates(seg, labels, nnunet, binary_rows: bool, device="cuda") -> dict:
    import torch

    from nnunet_heart_ext.kernels import connected_components as ext

    seg_gpu = torch.from_numpy(seg).to(device)
    candidates = {}
    if binary_rows:
        mask_gpu = seg_gpu != 0
        candidates["ext_label_gpu_kernel"] = lambda: ext.label(mask_gpu)
        candidates["ext_binary_gpu_kernel"] = lambda: ext.remove_all_but_largest_component(mask_gpu)
    candidates["ext_segmentation_gpu_kernel"] = lambda: ext.remove_all_but_largest_component_from_segmentation(
        seg_gpu, labels)
    candidates["ext_segmentation_gpu_with_copies"] = lambda: ext.remove_all_but_largest_component_from_segmentation(
        torch.from_numpy(seg).to(device), labels).cpu().numpy()
    if nnunet is not None:
        candidates["nnunet_with_extension_gpu"] = _with_device(device, lambda: nnunet[1](seg, labels))
    return candidates


def nnunet_functions():
    """(plain nnU-Net's function, nnU-Net's function as the extension installs it), or None with
    the reason where nnunetv2's postprocessing module does not import."""
    try:
        import nnunetv2.postprocessing.remove_connected_components as module
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    from nnunet_heart_ext.nnunet.postprocessing import keep_largest_like_nnunet

    installed = module.remove_all_but_largest_component_from_segmentation
    default = getattr(installed, "__wrapped__", installed)
    # NNUNET_HEART_EXT_DISABLE=1: no hook ran, build what it would have bound
    with_extension = installed if installed is not default else keep_largest_like_nnunet(default)
    return (default, with_extension), ""


def main(args):
    import torch
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component as acvl_keep_largest

    from nnunet_heart_ext.kernels.connected_components import label, remove_all_but_largest_component_from_segmentation

    nnunet, missing = nnunet_functions()
    quick = getattr(args, "quick", False)
    repeat = 2 if quick else getattr(args, "cc_repeat", 5)
    shape = QUICK_SHAPE if quick else SHAPE
    segmentations = cases(shape)
    rows, described = [], {}
    for case, labels in RUNS:
        if nnunet is None and labels != [1, 2, 3]:
            continue  # the acvl_utils baseline keeps the whole foreground only
        seg = segmentations[case]
        binary_rows = case == "clean"
        # outputs first: a fast path that is wrong is not reported
        expected = remove_all_but_largest_component_from_segmentation(seg, labels)
        if labels == [1, 2, 3]:
            assert np.array_equal(expected != 0, acvl_keep_largest(seg != 0)), case
        if nnunet is not None:
            assert np.array_equal(nnunet[0](seg, labels), expected), case
            assert np.array_equal(_with_device("cpu", lambda: nnunet[1](seg, labels))(), expected), case
        # no warm-up round on the CPU: nothing is compiled, and the checks above ran the slow rows
        times = _rounds(cpu_candidates(seg, labels, nnunet, acvl_keep_largest, binary_rows), repeat, warmup=False)
        baseline = statistics.median(times["nnunet_default" if nnunet is not None else "acvl_binary"])
        rows += _rows(times, "cpu", baseline, seg.size, case, labels)
        if torch.cuda.is_available() and labels == [1, 2, 3]:
            result = remove_all_but_largest_component_from_segmentation(torch.from_numpy(seg).cuda(), labels)
            assert np.array_equal(result.cpu().numpy(), expected), f"{case}: GPU output differs from nnU-Net's"
            times = _rounds(gpu_candidates(seg, labels, nnunet, binary_rows), max(repeat, 10), torch.cuda.synchronize)
            rows += _rows(times, torch.cuda.get_device_name(0), baseline, seg.size, case, labels)
        described[case] = {"foreground_voxels": int((seg != 0).sum()), "components_26": label(seg)[1]}
    extra = {"baseline": "nnunet_default" if nnunet is not None else
             f"acvl_binary (nnunetv2's postprocessing not importable: {missing})",
             "shape": list(shape), "cases": described, "runs": [[c, str(l)] for c, l in RUNS],
             "torch_threads": torch.get_num_threads()}
    report("cc", rows, title=f"keep largest component, {'x'.join(map(str, shape))} predictions", extra=extra,
           plot=_plot, results_dir=getattr(args, "out", RESULTS_DIR))


def _plot(rows, ax):
    names = [f"{r['case']} {r['labels']} {r['path']} ({r['device'][:12]})" for r in rows]
    ax.barh(names, [r["median_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("median seconds (log)")
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()
