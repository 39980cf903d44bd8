"""The CPU network paths on trained weights: the demo's trained models of several phantom seeds.

    python -m benchmarks.network_accuracy --runs /tmp/demo_seeds/seed20,/tmp/demo_seeds/seed21
                                          [--option auto] [--predict-step-run /tmp/demo_seeds/seed20]

For each demo run folder (`bash ensemble_pipeline.sh --demo --seed N --work DIR`, or
`python -m benchmarks.demo_seeds`, which leaves them in /tmp/demo_seeds/seedN: the trained fold,
its test images and labels), every test case is preprocessed once (nnU-Net's preprocessor
of the plans) and its logits predicted twice on the same weights, as the demo predicts them (one
fold, no mirroring): by nnU-Net's own `nnUNetPredictor` (the HeartPredictor's `_as_nnunet()`:
nnU-Net's float32 passes) and by the extension with NNUNET_HEART_EXT_CPU_NETWORK=`--option`. Both
go through nnU-Net's export (resampling, arg-max; no decision offsets, no postprocessing), so the
two label maps differ only by the network's path. Reported per seed and class:
- `agreement`: Dice between the extension's labels and nnU-Net's, over the seed's test voxels;
- the test Dice of each against the phantom's labels (nnU-Net's measure: the mean over cases of the
  class's Dice, a case without the class in either left out) and their difference;
- the network's time per case of each.
Bounds (issue 32): agreement >= 0.995 per class, test Dice not lower by more than 0.005.

`--predict-step-run DIR` also times the demo's predict step itself, `nnUNetv2_predict` as the
pipeline runs it on that run's model (4 test cases, -npp 2 -nps 2, --disable_tta), with
NNUNET_HEART_EXT_CPU_NETWORK=float32 (the extension before this path) and with `--option`,
alternating, twice each.
Results: benchmarks/results/network_accuracy.json and a printed table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report

CLASSES = (1, 2, 3)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float("nan") if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def model_of(work: Path):
    info = json.loads((work / "nnUNet_results" / "Dataset100_Heart" / "inference_information.json").read_text())
    model = info["best_model_or_ensemble"]["selected_model_or_models"][0]
    folder = work / "nnUNet_results" / "Dataset100_Heart" / \
        f"{model['trainer']}__{model['plans_identifier']}__{model['configuration']}"
    return folder, [int(f) for f in info["folds"]], model


def seed_rows(seed: str, work: Path, option: str, mirror: bool = False) -> list:
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference import export_prediction as nnunet_export
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import nnunet_heart_ext._hook  # noqa: F401
    from nnunet_heart_ext.nnunet.predictor import HeartPredictor

    folder, folds, _ = model_of(work)
    heart = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirror, device=torch.device("cpu"), allow_tqdm=False)
    heart.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
    assert isinstance(heart, HeartPredictor)
    heart.cpu_network = option
    plain = heart._as_nnunet()
    pm, cm, lm = heart.plans_manager, heart.configuration_manager, heart.label_manager
    images = work / "nnUNet_raw" / "Dataset100_Heart" / "imagesTs"
    truth_dir = work / "phantom" / "testing_label"
    per_case = {"nnunet": {c: [] for c in CLASSES}, "extension": {c: [] for c in CLASSES}}
    pooled = {c: [0, 0] for c in CLASSES}  # intersection, sum of sizes: the extension's against nnU-Net's labels
    seconds = {"nnunet": 0.0, "extension": 0.0}
    cases = sorted(images.glob("*_0000.nii.gz"))
    for image in cases:
        case = image.name[:-len("_0000.nii.gz")]
        data, _, props = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                       heart.dataset_json)
        data = torch.from_numpy(data)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / f"{case}_gt.nii.gz")))
        labels = {}
        for name, predictor in (("nnunet", plain), ("extension", heart)):
            t0 = time.perf_counter()
            logits = predictor.predict_logits_from_preprocessed_data(data)
            seconds[name] += time.perf_counter() - t0
            labels[name] = np.asarray(nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
                logits.float().cpu().numpy(), pm, cm, lm, props))
        for c in CLASSES:
            a, b, t = labels["extension"] == c, labels["nnunet"] == c, truth == c
            pooled[c][0] += int((a & b).sum())
            pooled[c][1] += int(a.sum() + b.sum())
            for name in per_case:
                d = dice(labels[name] == c, t)
                if not np.isnan(d):
                    per_case[name][c].append(d)
    rows = []
    names = {1: "myocardium", 2: "valve", 3: "calcium"}
    for c in CLASSES:
        test = {n: (float(np.mean(per_case[n][c])) if per_case[n][c] else float("nan")) for n in per_case}
        rows.append(dict(seed=seed, fold=folds[0], mirroring=mirror, class_=names[c],
                         agreement=round(2 * pooled[c][0] / pooled[c][1], 5) if pooled[c][1] else None,
                         test_nnunet=round(test["nnunet"], 4), test_extension=round(test["extension"], 4),
                         test_diff=round(test["extension"] - test["nnunet"], 4),
                         network_s_nnunet=round(seconds["nnunet"] / len(cases), 2),
                         network_s_extension=round(seconds["extension"] / len(cases), 2)))
    return rows


def predict_step(seed: str, work: Path, option: str) -> list:
    folder, folds, model = model_of(work)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), NNUNET_HEART_EXT_DECISION="1")
    rows = []
    for rep in range(2):
        for value in ("float32", option):
            out = Path(tempfile.mkdtemp(prefix="predict_step_"))
            cmd = ["nnUNetv2_predict", "-i", str(work / "nnUNet_raw" / "Dataset100_Heart" / "imagesTs"),
                   "-o", str(out), "-d", "100", "-tr", model["trainer"], "-p", model["plans_identifier"],
                   "-c", model["configuration"], "-f", *map(str, folds), "-chk", "checkpoint_final.pth",
                   "-device", "cpu", "-npp", "2", "-nps", "2", "--disable_tta", "--disable_progress_bar"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=dict(env, NNUNET_HEART_EXT_CPU_NETWORK=value), capture_output=True,
                                  text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                raise RuntimeError(f"nnUNetv2_predict failed ({value}):\n{proc.stderr[-2000:]}")
            shutil.rmtree(out)
            rows.append(dict(seed=seed, repeat=rep, cpu_network=value, predict_step_s=round(wall, 1)))
            print(rows[-1], flush=True)
    return rows


def _seed_of(run: Path) -> str:
    """The phantom seed of a demo run folder (its pipeline log's `--seed N`), else the folder's name."""
    import re

    for log in sorted((run / "logs").glob("*.log")) + [run.parent / f"{run.name}.log"]:
        if log.is_file():
            m = re.search(r"--seed (\d+)", log.read_text(errors="replace"))
            if m:
                return m.group(1)
    return run.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.network_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="demo run folders, comma-separated")
    parser.add_argument("--option", default="auto", help="NNUNET_HEART_EXT_CPU_NETWORK value to check (default auto)")
    parser.add_argument("--predict-step-run", type=Path, default=None)
    parser.add_argument("--mirror", action="store_true", help="mirroring on (nnUNetv2_predict's default; the demo "
                                                                "predicts without it)")
    args = parser.parse_args(argv)
    from nnunet_heart_ext.nnunet import network_runtime

    resolved = network_runtime.resolve_cpu(network_runtime.CpuNetwork(args.option)).value
    rows = []
    for run in args.runs.split(","):
        rows += seed_rows(_seed_of(Path(run)), Path(run), args.option, args.mirror)
        for r in rows[-3:]:
            print(r, flush=True)
    step = predict_step(_seed_of(args.predict_step_run), args.predict_step_run, args.option) \
        if args.predict_step_run is not None else []
    worst = dict(min_agreement=min(r["agreement"] for r in rows if r["agreement"] is not None),
                 min_test_diff=min(r["test_diff"] for r in rows if not np.isnan(r["test_diff"])))
    name = "network_accuracy" + ("_mirroring" if args.mirror else "") + \
        ("" if args.option == "auto" else f"_{args.option}")
    report(name, rows, title=f"trained demo models: {args.option} ({resolved}) against nnU-Net's float32 predictor",
           extra={"option": args.option, "resolved": resolved, "worst": worst, "predict_step": step})
    print("worst:", worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
