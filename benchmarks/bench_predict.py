"""Inference of one full-size case, plain nnU-Net against the extension, stage by stage.

The case: HeartPlans' 3d_fullres configuration (benchmarks/data/HeartPlans_fullsize.json:
spacing 0.5 x 0.433 x 0.433 mm), a preprocessed image of 340 x 467 x 467 voxels whose original is
340 x 512 x 512 at 0.5 x 0.395 x 0.395 mm (a full-size AICUP case).

Stages, each with nnU-Net's own code (imported from the installed nnunetv2) and the extension's:
1. sliding window + fold sum (`predict_logits_from_preprocessed_data`, what nnUNetv2_predict calls
   per case): nnU-Net's `nnUNetPredictor` (trainer nnUNetTrainer) against the same predictor of a
   HeartTrainer model, which the hook turns into HeartPredictor; the same random-weight folds,
   mirroring on. On the CPU a small network and a large patch keep it to a few windows; on a GPU
   (`--predict-device cuda`) nnU-Net's ResEnc M of HeartPlans with its patch (96 x 160 x 160).
2. export without probabilities (logits -> the label map file): nnU-Net's
   `export_prediction_from_logits` with the plans' resampling set to nnU-Net's default
   (`resample_data_or_seg_to_shape`), to its torch resampling (`resample_torch_fornnunet`, its
   `*_torchres` planners), to the extension's Numba resampler (HeartPlans before this change),
   and the extension's export (fused resample + argmax); on a GPU also the export on the device.
3. export with probabilities (`--save_probabilities`: .npz + .pkl + label map): nnU-Net's default
   and the extension's.
Labels: agreement of the extension's label map with nnU-Net's default export (fraction of voxels
and Dice per class).

`python -m benchmarks --only predict [--quick] [--predict-device cuda] [--predict-folds 5]`
"""
import json
import os
import shutil
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, report

PLANS = Path(__file__).resolve().parent / "data" / "HeartPlans_fullsize.json"
DATASET_JSON = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
                "labels": {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}}
CASE_SPACING = (0.5, 0.395, 0.395)


def add_arguments(parser):
    parser.add_argument("--predict-device", default="cpu", help="cpu or cuda (sliding window and device export)")
    parser.add_argument("--predict-folds", type=int, default=2, help="folds averaged in the sliding-window stage")
    parser.add_argument("--predict-skip-default", action="store_true",
                        help="leave out nnU-Net's default export rows (the slowest, ~30-90 s each)")
    parser.add_argument("--predict-stages", default=None,
                        help="window,export,device_export (default: window,export on the CPU; window,device_export "
                             "on cuda, where SimpleITK may be missing: no files are written there)")


def plans_with(resampling: str) -> dict:
    plans = json.loads(PLANS.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["resampling_fn_probabilities"] = resampling
    config["resampling_fn_probabilities_kwargs"] = (
        {"is_seg": False, "force_separate_z": None, "memefficient_seg_resampling": False}
        if resampling == "resample_torch_fornnunet" else
        {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None})
    return plans


def make_logits(shape, seed=0):
    """Smooth 4-class logits: background outside a shell (myocardium), a valve blob, calcium specks."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    r = np.sqrt(((z - shape[0] / 2) / (0.3 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.25 * shape[1])) ** 2
                + ((x - shape[2] / 2) / (0.25 * shape[2])) ** 2)
    logits = np.empty((4, *shape), np.float16)
    logits[0] = 4 * (np.abs(r - 0.85) - 0.12)
    logits[1] = -logits[0]
    valve = np.sqrt(((z - shape[0] / 2) / 12.0) ** 2 + ((y - shape[1] / 2) / 14.0) ** 2
                    + ((x - 0.62 * shape[2]) / 14.0) ** 2)
    logits[2] = 3 * (1 - valve)
    calc = np.full(shape, -3.0, np.float32)
    for _ in range(8):
        c = [int(rng.integers(s // 3, 2 * s // 3)) for s in shape]
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        np.maximum(calc, 3 - d, out=calc)
    logits[3] = calc
    logits += rng.normal(scale=0.2, size=(1, *shape[1:])).astype(np.float16)  # cheap texture
    return logits


def properties(shape_after, shape_before):
    return {"spacing": list(CASE_SPACING), "shape_before_cropping": list(shape_before),
            "bbox_used_for_cropping": [[0, s] for s in shape_before],
            "shape_after_cropping_and_before_resampling": list(shape_before),
            "sitk_stuff": {"spacing": tuple(reversed(CASE_SPACING)), "origin": (0.0, 0.0, 0.0),
                           "direction": tuple(np.eye(3).ravel())},
            "list_of_data_files": ["bench_0000.nii.gz"]}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def dice_per_class(a, b, labels=(1, 2, 3)):
    out = {}
    for c in labels:
        pa, pb = a == c, b == c
        denom = pa.sum() + pb.sum()
        out[c] = float(2 * (pa & pb).sum() / denom) if denom else 1.0
    return out


def export_rows(args, logits, shape_before, quick):
    import SimpleITK as sitk
    from nnunetv2.inference.export_prediction import export_prediction_from_logits as nnunet_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_heart_ext._hook  # noqa: F401
    from nnunet_heart_ext.nnunet import prediction_export

    props = properties(logits.shape[1:], shape_before)
    rows, labels = [], {}
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    variants = [("nnU-Net default", "resample_data_or_seg_to_shape", nnunet_export),
                ("nnU-Net torchres", "resample_torch_fornnunet", nnunet_export),
                ("nnU-Net + extension's Numba resampler", "resample_data_or_seg_to_shape_numba", nnunet_export),
                ("extension (fused)", "resample_data_or_seg_to_shape_numba",
                 prediction_export.export_prediction_from_logits)]
    if args.predict_skip_default:
        variants = variants[1:]
    small = logits[:, :12, :20, :20].copy()  # compile / load the Numba kernels outside the timings
    warm = PlansManager(plans_with(variants[-1][1]))
    for probabilities in (False, True):
        prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(
            small, warm, warm.get_configuration("3d_fullres"), warm.get_label_manager(DATASET_JSON),
            properties(small.shape[1:], (12, 22, 22)), probabilities)
    for probabilities in (False, True):
        for name, resampling, export in variants:
            if probabilities and name not in ("nnU-Net default", "extension (fused)", "nnU-Net torchres"):
                continue
            pm = PlansManager(plans_with(resampling))
            cm = pm.get_configuration("3d_fullres")
            out = work / f"{len(rows)}"
            out.mkdir()
            seconds, _ = timed(lambda: export(logits, deepcopy(props), cm, pm, DATASET_JSON, str(out / "case"),
                                              probabilities))
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
            key = (name, probabilities)
            labels[key] = seg
            row = {"stage": "export + probabilities (.npz)" if probabilities else "export (label map)",
                   "method": name, "seconds": seconds,
                   "npz_MB": (out / "case.npz").stat().st_size / 2 ** 20 if probabilities else None}
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(out)
    shutil.rmtree(work, ignore_errors=True)
    # speed-ups and label agreement, side by side in this run
    for row in rows:
        probabilities = row["stage"].startswith("export +")
        base = next((r["seconds"] for r in rows if r["stage"] == row["stage"] and r["method"] == "nnU-Net default"),
                    None)
        torchres = next(r["seconds"] for r in rows if r["stage"] == row["stage"] and r["method"] == "nnU-Net torchres")
        row["speedup_vs_default"] = base / row["seconds"] if base else None
        row["speedup_vs_torchres"] = torchres / row["seconds"]
        ref = labels.get(("nnU-Net default", probabilities))
        seg = labels[(row["method"], probabilities)]
        if ref is not None:
            row["voxels_equal_to_default"] = float((seg == ref).mean())
            row["dice_vs_default"] = dice_per_class(seg, ref)
    return rows


def sliding_window_rows(args, quick):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_heart_ext._hook  # noqa: F401

    device = torch.device(args.predict_device)
    plans = json.loads(PLANS.read_text())
    config = plans["configurations"]["3d_fullres"]
    shape = (48, 96, 96) if quick else (340, 467, 467)
    if device.type == "cpu":  # a small network and a large patch: a few windows on 2 cores
        config["patch_size"] = [32, 64, 64] if quick else [128, 256, 256]

        def build():
            return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                       torch.nn.Conv3d(4, 4, 1))
    else:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        def build():
            a = config["architecture"]
            return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 4,
                                          deep_supervision=False)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    weights = []
    for fold in range(args.predict_folds):
        torch.manual_seed(fold)
        weights.append(build().state_dict())
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32))
    rows = []
    for trainer, name in (("nnUNetTrainer", "nnU-Net"), ("HeartTrainer", "extension")):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=device, allow_tqdm=False)
        predictor.manual_initialization(build(), pm, cm, deepcopy(weights), DATASET_JSON, trainer, (0, 1, 2))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        n_windows = len(predictor._internal_get_sliding_window_slicers(shape))

        def run():
            out = predictor.predict_logits_from_preprocessed_data(data)
            sync()
            return out

        if device.type == "cuda":
            run()  # cudnn autotuning, allocator
        seconds, logits = timed(run)
        rows.append({"stage": f"sliding window + {args.predict_folds} folds, mirroring", "method": name,
                     "seconds": seconds, "windows": n_windows, "device": str(device),
                     "patch": str(tuple(config["patch_size"])), "predictor": type(predictor).__name__})
        print(rows[-1], flush=True)
        del logits
    rows[1]["speedup_vs_default"] = rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def plot(rows, ax):
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j, s in enumerate(stages) if any(r["stage"] == s and r["method"] == m for r in rows)]
        ys = [next(r["seconds"] for r in rows if r["stage"] == s and r["method"] == m) for s in stages
              if any(r["stage"] == s and r["method"] == m for r in rows)]
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))])
    ax.set_xticklabels([s.replace(", ", "\n") for s in stages], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.legend(fontsize=6)


def device_export_rows(args, logits, shape_before):
    """The export's computation without writing files (the GPU machine has no SimpleITK): nnU-Net's
    convert on the CPU (default and torchres plans) against the extension's on the device."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape \
        as nnunet_convert
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_heart_ext._hook  # noqa: F401
    from nnunet_heart_ext.nnunet import prediction_export

    device = torch.device(args.predict_device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    props = properties(logits.shape[1:], shape_before)
    rows, segs = [], {}
    for probabilities in (False, True):
        variants = [("nnU-Net torchres (CPU)", "resample_torch_fornnunet", "cpu"),
                    ("extension on the device", "resample_data_or_seg_to_shape_numba", "device")]
        if not args.predict_skip_default:
            variants.insert(0, ("nnU-Net default (CPU)", "resample_data_or_seg_to_shape", "cpu"))
        for name, resampling, where in variants:
            pm = PlansManager(plans_with(resampling))
            cm, lm = pm.get_configuration("3d_fullres"), pm.get_label_manager(DATASET_JSON)
            if where == "cpu":
                def run():
                    return nnunet_convert(logits, pm, cm, lm, deepcopy(props), probabilities)
            else:
                on_device = torch.from_numpy(logits).to(device)  # where the predictor leaves the logits

                def run():
                    out = prediction_export.convert_on_device(on_device, pm, cm, lm, deepcopy(props), probabilities)
                    sync()
                    return out
                run()  # allocator, kernels
            seconds, out = timed(run)
            segs[(name, probabilities)] = np.asarray(out[0] if probabilities else out)
            rows.append({"stage": "export computation" + (" + probabilities" if probabilities else "") + ", no files",
                         "method": name, "seconds": seconds})
            print(rows[-1], flush=True)
    for row in rows:
        probabilities = "probabilities" in row["stage"]
        torchres = next(r["seconds"] for r in rows if r["stage"] == row["stage"] and r["method"].startswith(
            "nnU-Net torchres"))
        row["speedup_vs_torchres"] = torchres / row["seconds"]
        ref = segs.get(("nnU-Net default (CPU)", probabilities))
        if ref is not None:
            seg = segs[(row["method"], probabilities)]
            row["voxels_equal_to_default"] = float((seg == ref).mean())
            row["dice_vs_default"] = dice_per_class(seg, ref)
    return rows


def main(args):
    import torch

    quick = getattr(args, "quick", False)
    if not hasattr(args, "predict_device"):
        args.predict_device, args.predict_folds, args.predict_skip_default = "cpu", 2, False
        args.predict_stages = None
    stages = (args.predict_stages or ("window,export" if args.predict_device == "cpu" else "window,device_export"))
    stages = stages.split(",")
    torch.set_num_threads(os.cpu_count())
    rows = sliding_window_rows(args, quick) if "window" in stages else []
    shape_after, shape_before = ((40, 64, 64), (40, 70, 70)) if quick else ((340, 467, 467), (340, 512, 512))
    logits = make_logits(shape_after) if "export" in stages or "device_export" in stages else None
    if "export" in stages:
        rows += export_rows(args, logits, shape_before, quick)
    if "device_export" in stages:
        rows += device_export_rows(args, logits, shape_before)
    default = "window,export" if args.predict_device == "cpu" else "window,device_export"
    name = "predict" + ("" if args.predict_device == "cpu" else f"_{args.predict_device}") + \
        ("" if ",".join(stages) == default else "_" + "_".join(stages))
    report(name, rows,
           title="One full-size case: plain nnU-Net against the extension (seconds)",
           results_dir=getattr(args, "out", None) or RESULTS_DIR, plot=plot,
           extra={"quick": quick, "logits_shape": [4, *shape_after], "label_shape": list(shape_before),
                  "folds": args.predict_folds, "threads": torch.get_num_threads(),
                  "load_average_at_end": os.getloadavg()})
