"""Keep-largest-component postprocessing on a 300 x 512 x 512 heart segmentation (78.6 M voxels):
nnU-Net's default against cc3d and the extension's CPU and GPU paths.

The segmentation: a myocardium shell (1) around a valve (2), calcifications (3) on the wall,
and spurious blobs of every label, near the heart and anywhere in the volume (what the
postprocessing removes). Full 26-connectivity, as nnU-Net uses.

CPU rows (always), run in turn each round so that load from other processes hits all alike:
  nnunet_default        nnunetv2's remove_all_but_largest_component_from_segmentation(seg, [1, 2, 3])
                        as plain nnU-Net runs it (acvl_utils: skimage label + np.isin)
  nnunet_hooked_cpu     the same nnU-Net function with the extension installed (the hook rebinds
                        the acvl_utils name it calls), NNUNET_HEART_EXT_CC_DEVICE=cpu
  ext_segmentation_cpu  nnunet_heart_ext.kernels.connected_components'
                        remove_all_but_largest_component_from_segmentation (numpy)
  acvl_binary           acvl_utils' remove_all_but_largest_component on the foreground mask
  ext_binary_cpu        the extension's remove_all_but_largest_component on that mask (cc3d)
  cc3d_label            cc3d.connected_components alone (the labelling floor)
  ext_label_cpu         the extension's label (cc3d, int32 output)
GPU rows (when CUDA is there): label, binary keep-largest and segmentation function on CUDA
tensors (kernel time: inputs and outputs stay on the GPU), the segmentation function with the
host/device copies (numpy in, numpy out), and nnU-Net's function hooked with
NNUNET_HEART_EXT_CC_DEVICE=cuda. speedup = nnunet_default's median / the row's median.
Where nnunetv2's postprocessing module cannot be imported (it needs SimpleITK), the nnU-Net rows
are left out and acvl_binary, the labelling nnU-Net calls, is the baseline (`baseline` in the JSON).
`python -m benchmarks --only cc [--quick]`.
"""
import os
import statistics
import time

import cc3d
import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, report

SHAPE = (300, 512, 512)
QUICK_SHAPE = (80, 192, 192)


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


def _rounds(candidates: dict, repeat: int, sync=None) -> dict:
    """Time each candidate once per round, candidates in turn; seconds by name."""
    sync = sync or (lambda: None)
    for fn in candidates.values():  # warm-up: imports, Triton compilation, caches
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


def _rows(times: dict, device: str, baseline_s: float, voxels: int) -> list:
    rows = []
    for name, t in times.items():
        median = statistics.median(t)
        rows.append({"path": name, "device": device, "median_s": median, "min_s": min(t),
                     "speedup_vs_nnunet": baseline_s / median, "Mvoxel_per_s": voxels / median / 1e6,
                     "repeat": len(t)})
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


def cpu_candidates(seg, nnunet_module, acvl_keep_largest, hooked_keep_largest):
    from nnunet_heart_ext.kernels import connected_components as ext

    foreground = [1, 2, 3]
    mask = seg != 0

    def nnunet_with(keep_largest):
        def run():
            nnunet_module.remove_all_but_largest_component = keep_largest
            return nnunet_module.remove_all_but_largest_component_from_segmentation(seg, foreground)
        return run

    candidates = {}
    if nnunet_module is not None:
        candidates["nnunet_default"] = nnunet_with(acvl_keep_largest)
        candidates["nnunet_hooked_cpu"] = _with_device("cpu", nnunet_with(hooked_keep_largest))
    return {
        **candidates,
        "ext_segmentation_cpu": lambda: ext.remove_all_but_largest_component_from_segmentation(seg, foreground),
        "acvl_binary": lambda: acvl_keep_largest(mask),
        "ext_binary_cpu": lambda: ext.remove_all_but_largest_component(mask),
        "cc3d_label": lambda: cc3d.connected_components(mask, connectivity=26),
        "ext_label_cpu": lambda: ext.label(mask),
    }


def gpu_candidates(seg, nnunet_module, hooked_keep_largest, device="cuda"):
    from nnunet_heart_ext.kernels import connected_components as ext

    foreground = [1, 2, 3]
    seg_gpu = torch.from_numpy(seg).to(device)
    mask_gpu = seg_gpu != 0

    def hooked():
        nnunet_module.remove_all_but_largest_component = hooked_keep_largest
        return nnunet_module.remove_all_but_largest_component_from_segmentation(seg, foreground)

    candidates = {
        "ext_label_gpu_kernel": lambda: ext.label(mask_gpu),
        "ext_binary_gpu_kernel": lambda: ext.remove_all_but_largest_component(mask_gpu),
        "ext_segmentation_gpu_kernel": lambda: ext.remove_all_but_largest_component_from_segmentation(
            seg_gpu, foreground),
        "ext_segmentation_gpu_with_copies": lambda: ext.remove_all_but_largest_component_from_segmentation(
            torch.from_numpy(seg).to(device), foreground).cpu().numpy(),
    }
    if nnunet_module is not None:
        candidates["nnunet_hooked_gpu"] = _with_device(device, hooked)
    return candidates


def main(args):
    try:
        import nnunetv2.postprocessing.remove_connected_components as nnunet_module
    except ImportError as e:
        nnunet_module, missing = None, f"{type(e).__name__}: {e}"
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component as acvl_keep_largest

    from nnunet_heart_ext.kernels.connected_components import label, remove_all_but_largest_component_from_segmentation
    from nnunet_heart_ext.postprocessing import remove_all_but_largest_component_like_acvl as hooked

    quick = getattr(args, "quick", False)
    repeat = 2 if quick else getattr(args, "cc_repeat", 5)
    shape = QUICK_SHAPE if quick else SHAPE
    seg = heart_segmentation(shape)
    voxels = seg.size
    bound_before = getattr(nnunet_module, "remove_all_but_largest_component", None)
    extra = {}
    try:
        # outputs first: a fast path that is wrong is not reported
        expected = remove_all_but_largest_component_from_segmentation(seg, [1, 2, 3])
        assert np.array_equal(expected != 0, acvl_keep_largest(seg != 0))
        if nnunet_module is not None:
            nnunet_module.remove_all_but_largest_component = acvl_keep_largest
            assert np.array_equal(nnunet_module.remove_all_but_largest_component_from_segmentation(seg, [1, 2, 3]),
                                  expected)
            extra["baseline"] = "nnunet_default"
        else:
            extra["baseline"] = f"acvl_binary (nnunetv2's postprocessing not importable: {missing})"
        times = _rounds(cpu_candidates(seg, nnunet_module, acvl_keep_largest, hooked), repeat)
        baseline = statistics.median(times["nnunet_default" if nnunet_module is not None else "acvl_binary"])
        rows = _rows(times, "cpu", baseline, voxels)
        if torch.cuda.is_available():
            result = remove_all_but_largest_component_from_segmentation(torch.from_numpy(seg).cuda(), [1, 2, 3])
            assert np.array_equal(result.cpu().numpy(), expected), "GPU output differs from nnU-Net's"
            times = _rounds(gpu_candidates(seg, nnunet_module, hooked), max(repeat, 10), torch.cuda.synchronize)
            rows += _rows(times, torch.cuda.get_device_name(0), baseline, voxels)
    finally:
        if nnunet_module is not None:
            nnunet_module.remove_all_but_largest_component = bound_before
    extra |= {"shape": list(shape), "foreground_voxels": int((seg != 0).sum()),
             "components_26": label(seg)[1], "labels_or_regions": [1, 2, 3], "torch_threads": torch.get_num_threads()}
    report("cc", rows, title=f"keep largest component, {'x'.join(map(str, shape))} segmentation", extra=extra,
           plot=_plot, results_dir=getattr(args, "out", RESULTS_DIR))


def _plot(rows, ax):
    names = [f"{r['path']} ({r['device'][:12]})" for r in rows]
    ax.barh(names, [r["median_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("median seconds (log)")
    ax.invert_yaxis()
