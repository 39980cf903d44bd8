"""Resampling: nnU-Net's default vs `resample_torch_fornnunet` vs the Numba kernel, one process.

On a CT-like 300 x 512 x 512 int16 case (spacing 0.55 x 0.43 x 0.43 mm) resampled to the
dataset's median spacing 0.5 x 0.395 x 0.395 (-> 330 x 557 x 557): the image (order 3), the
segmentation (order 1, 4 labels), and at export 4-class probabilities resampled back (order 1).
Also the first-call compile time (fresh process, empty Numba cache) and the load time from the
cache, and one whole `run_case_npy` with nnU-Net's plan (DefaultPreprocessor, default resampling)
and with HeartPlans' (HeartPreprocessor, Numba resampling).

`python -m benchmarks --only resample [--quick]`
"""
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np

from benchmarks.common import RESULTS_DIR, report, time_call

CASE_SPACING = (0.55, 0.43, 0.43)
MEDIAN_SPACING = (0.5, 0.395, 0.395)


def make_ct_case(shape=(300, 512, 512), seed: int = 0):
    """An int16 CT-like volume (air, a body ellipse of soft tissue with noise, a contrast-filled
    heart) and its int8 labels 0-3 (myocardium shell, aortic valve, calcification specks)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    zc, yc, xc = (s / 2 for s in shape)
    body = ((y - yc) / (0.42 * shape[1])) ** 2 + ((x - xc) / (0.46 * shape[2])) ** 2 < 1
    body = np.broadcast_to(body, shape)
    r = np.sqrt(((z - zc) / (0.3 * shape[0])) ** 2 + ((y - yc) / (0.22 * shape[1])) ** 2
                + ((x - xc) / (0.2 * shape[2])) ** 2)
    img = np.full(shape, -1024, dtype=np.int16)
    img[body] = 40
    seg = np.zeros(shape, dtype=np.int8)
    seg[(r > 0.7) & (r < 1)] = 1
    img[r < 1] = 300
    img[seg == 1] = 120
    valve = np.sqrt(((z - zc) / (0.05 * shape[0])) ** 2 + ((y - yc) / (0.04 * shape[1])) ** 2
                    + ((x - xc - 0.15 * shape[2]) / (0.04 * shape[2])) ** 2) < 1
    seg[valve] = 2
    img[valve] = 200
    for _ in range(6):
        c = [int(rng.integers(s // 3, 2 * s // 3)) for s in shape]
        sl = tuple(slice(ci, ci + 3) for ci in c)
        seg[sl] = 3
        img[sl] = 900
    img += rng.normal(0, 20, size=shape).astype(np.int16) * body
    return img[None], seg[None]


def heart_plans(data_fn: str, preprocessor: str, shape, spacing):
    """A plans dict with one 3d_fullres configuration (only what preprocessing reads)."""
    kw_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    kw_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    kw_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "bench", "preprocessor_name": preprocessor, "batch_size": 2,
        "patch_size": [128, 128, 128], "median_image_size_in_voxels": list(shape), "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": data_fn, "resampling_fn_seg": data_fn, "resampling_fn_probabilities": data_fn,
        "resampling_fn_data_kwargs": kw_data, "resampling_fn_seg_kwargs": kw_seg,
        "resampling_fn_probabilities_kwargs": kw_prob, "batch_dice": False,
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
    }
    return {
        "dataset_name": "Dataset100_Heart", "plans_name": "bench", "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(shape), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
        "experiment_planner_used": "bench", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1000.0, "mean": 150.0, "median": 120.0, "min": -100.0, "percentile_00_5": -31.0,
            "percentile_99_5": 478.0, "std": 90.0}},
    }


DATASET_JSON = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
                "labels": {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}}


def run_case_npy(plans: dict, img, seg):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    import nnunetv2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing"), cm.preprocessor_name,
                                      "nnunetv2.preprocessing")
    props = {"spacing": list(CASE_SPACING)}
    return cls(verbose=False).run_case_npy(img, seg, props, pm, cm, deepcopy(DATASET_JSON))


_COMPILE_PROBE = """
import time, numpy as np
t0 = time.perf_counter()
from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba as f
t1 = time.perf_counter()
x = np.random.rand(1, 9, 10, 11).astype(np.float32)
f(x, (11, 12, 13), [1, 1, 1], [1, 1, 1], False, 3)
f(x, (11, 12, 13), [1, 1, 1], [1, 1, 1], False, 1)
f((x * 3).astype(np.int8), (11, 12, 13), [1, 1, 1], [1, 1, 1], True, 1)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def first_call_seconds(cache_dir: str) -> float:
    """Seconds of the first image (order 3 and 1) and segmentation call in a fresh process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def add_arguments(parser):
    parser.add_argument("--resample-repeat", type=int, default=3, help="repeats of the fast methods")


def main(args):
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba

    torch.set_num_threads(os.cpu_count())
    quick = getattr(args, "quick", False)
    repeat = 1 if quick else getattr(args, "resample_repeat", 3)
    shape = (60, 128, 128) if quick else (300, 512, 512)
    img, seg = make_ct_case(shape)
    new_shape = tuple(int(i) for i in compute_new_shape(shape, CASE_SPACING, MEDIAN_SPACING))
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, *new_shape)).astype(np.float32)

    methods = {
        "nnunet_default": lambda d, s, **kw: resample_data_or_seg_to_shape(d, s, MEDIAN_SPACING, MEDIAN_SPACING, **kw),
        "resample_torch_fornnunet": lambda d, s, **kw: resample_torch_fornnunet(
            d, s, MEDIAN_SPACING, MEDIAN_SPACING, is_seg=kw["is_seg"], num_threads=os.cpu_count(), device="cpu"),
        "numba": lambda d, s, **kw: resample_data_or_seg_to_shape_numba(d, s, CASE_SPACING, MEDIAN_SPACING, **kw),
    }
    tasks = {
        "image order 3 (int16)": (img, new_shape, dict(is_seg=False, order=3, order_z=0, force_separate_z=None)),
        "segmentation order 1": (seg, new_shape, dict(is_seg=True, order=1, order_z=0, force_separate_z=None)),
        "probabilities order 1 (4 classes)": (logits, shape, dict(is_seg=False, order=1, order_z=0,
                                                                  force_separate_z=None)),
    }
    # warm the Numba kernels for every dtype used (compile time is reported separately)
    for data, target, kw in tasks.values():
        small = data[:, :8, :8, :8]
        resample_data_or_seg_to_shape_numba(small, (9, 9, 9), CASE_SPACING, MEDIAN_SPACING, **kw)

    rows = []
    for task, (data, target, kw) in tasks.items():
        base = None
        for name, fn in methods.items():
            n = 1 if name == "nnunet_default" else repeat
            t = time_call(lambda: fn(data, target, **kw), repeat=n, warmup=0 if name == "nnunet_default" else 1)
            base = base or t["min_s"]
            rows.append({"task": task, "method": name, "in_shape": str(tuple(data.shape)), "out_shape": str(target),
                         "min_s": t["min_s"], "median_s": t["median_s"], "repeat": n,
                         "speedup_vs_default": base / t["min_s"]})
            print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as cache:
        compile_s = first_call_seconds(cache)
        cached_s = first_call_seconds(cache)
    rows.append({"task": "first call in a fresh process (3 kernels, small input)", "method": "numba, empty cache",
                 "in_shape": "(1, 9, 10, 11)", "out_shape": "(11, 12, 13)", "min_s": compile_s, "median_s": compile_s,
                 "repeat": 1, "speedup_vs_default": None})
    rows.append({"task": "first call in a fresh process (3 kernels, small input)", "method": "numba, warm cache",
                 "in_shape": "(1, 9, 10, 11)", "out_shape": "(11, 12, 13)", "min_s": cached_s, "median_s": cached_s,
                 "repeat": 1, "speedup_vs_default": None})

    plans = {"nnunet_default": heart_plans("resample_data_or_seg_to_shape", "DefaultPreprocessor", shape,
                                           MEDIAN_SPACING),
             "heart": heart_plans("resample_data_or_seg_to_shape_numba", "HeartPreprocessor", shape, MEDIAN_SPACING)}
    small = (img[:, :20, :40, :40].copy(), seg[:, :20, :40, :40].copy())
    run_case_npy(plans["heart"], *small)  # the crop's and float32-seg kernels, compiled or loaded
    base = None
    for name, p in plans.items():
        n = 1 if name == "nnunet_default" else repeat
        t = time_call(lambda: run_case_npy(p, img, seg), repeat=n, warmup=0)
        base = base or t["min_s"]
        rows.append({"task": "whole run_case_npy", "method": name, "in_shape": str(tuple(img.shape)),
                     "out_shape": str(new_shape), "min_s": t["min_s"], "median_s": t["median_s"], "repeat": n,
                     "speedup_vs_default": base / t["min_s"]})
        print(rows[-1], flush=True)

    report("resample", rows, title="Resampling and preprocessing, one process (seconds)",
           results_dir=getattr(args, "out", None) or RESULTS_DIR,
           extra={"quick": quick, "case_spacing": CASE_SPACING, "target_spacing": MEDIAN_SPACING,
                  "numba_threads": __import__("numba").get_num_threads(),
                  "load_average_at_end": os.getloadavg()})
