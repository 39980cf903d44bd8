"""The CPU demo on several phantom seeds, each run alone, with and without what the extension
decides for the small classes.

    python -m benchmarks.demo_seeds [--seeds 20,21,22,24,25,26,27,28,29,30] [--work DIR] [--tag N] [--resume]

For each seed: `bash ensemble_pipeline.sh --demo --seed N` in a fresh work folder (its wall time;
its test Dice is the extension's: the decision offsets and gate chosen by the best step on the
fold's validation and applied by the predictor, then heart_postprocessing.pkl, keep-largest that
never removes the small classes). Then the same model's test predictions again with the decision
off (NNUNET_HEART_EXT_DECISION=0: nnU-Net's argmax), and the four combinations scored the same way:

    extension   offsets + heart_postprocessing.pkl   (the pipeline's own predict.zip)
    offsets     offsets + nnU-Net's postprocessing.pkl
    heart_pp    argmax  + heart_postprocessing.pkl
    nnunet      argmax  + nnU-Net's postprocessing.pkl       (plain nnU-Net)

(nnU-Net's measure: per class, the mean over the test cases of Dice; a case where the class is in
neither left out). The decision file's validation Dice with and without it are reported too.
Results: benchmarks/results/demo/run_<tag>_seed<N>.json and a table printed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.phantom import TEST_LABEL_DIR
from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.nnunet_outputs import read_inference_information
from nnunet_heart_ext.pipeline.options import parse

REPO = Path(__file__).resolve().parents[1]


def _dice(pred_dir: Path, truth: dict) -> dict:
    per_class = {c: [] for c in ds.CLASSES}
    for case, ref_file in truth.items():
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / ds.PREDICTION.name(case))))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
        for c in ds.CLASSES:
            a, b = pred == c, ref == c
            if a.sum() + b.sum():
                per_class[c].append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return {str(c): (float(np.mean(v)) if v else float("nan")) for c, v in per_class.items()}


def run_seed(seed: int, root: Path, env: dict, resume: bool = False) -> dict:
    work = root / f"seed{seed}"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    with open(root / f"seed{seed}.log", "w") as log:
        rc = subprocess.run(["bash", str(REPO / "ensemble_pipeline.sh"), "--demo", "--seed", str(seed), "--work",
                             str(work)], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - started
    if rc != 0:
        return dict(seed=seed, error=f"pipeline exit {rc}, see {root / f'seed{seed}.log'}")
    layout = Layout(parse(["--demo", "--seed", str(seed), "--work", str(work)]))
    info = read_inference_information(layout.inference_information)
    decision = json.loads(layout.decision_file(info).read_text())
    model = info.selected[0]
    model_dir = layout.model_dir(model["configuration"], model["trainer"], model["plans_identifier"])
    truth = ds.cases_in(layout.src / TEST_LABEL_DIR, ds.ORGANIZER_LABEL)
    with_env = dict(env, nnUNet_raw=str(layout.raw_root), nnUNet_preprocessed=str(layout.preprocessed_root),
                    nnUNet_results=str(layout.results_root))
    without_env = dict(with_env, NNUNET_HEART_EXT_DECISION="0")
    raw_pred = work / "argmax_predictions"
    folds = [str(f) for f in info.folds]
    subprocess.run(["nnUNetv2_predict", "-i", str(layout.raw.images_ts),
                    "-o", str(raw_pred), "-d", "100", "-tr", model["trainer"], "-p", model["plans_identifier"],
                    "-c", model["configuration"], "-f", *folds, "-device", "cpu", "--disable_tta", "-npp", "2",
                    "-nps", "2"], env=without_env, check=True, capture_output=True)
    nnunet_pkl = info.postprocessing_file
    heart_pkl = layout.heart_postprocessing_file(info)
    offsets_pred = layout.prediction_dir(model)

    def postprocessed(source: Path, pkl: Path, name: str) -> Path:
        out = work / name
        subprocess.run(["nnUNetv2_apply_postprocessing", "-i", str(source), "-o", str(out), "-pp_pkl_file", str(pkl),
                        "-np", "2", "-plans_json", str(model_dir / ds.MODEL_PLANS), "-dataset_json",
                        str(model_dir / ds.DATASET_JSON)], env=without_env, check=True, capture_output=True)
        return out

    test = dict(extension=_dice(layout.postprocessed, truth),
                offsets=_dice(postprocessed(offsets_pred, nnunet_pkl, "offsets_nnunet_pp"), truth),
                heart_pp=_dice(postprocessed(raw_pred, heart_pkl, "argmax_heart_pp"), truth),
                nnunet=_dice(postprocessed(raw_pred, nnunet_pkl, "argmax_nnunet_pp"), truth))
    return dict(seed=seed, fold=int(folds[0]), wall_s=round(wall, 1), resumed=resume, decision=decision["offsets"],
                gate_mm3=decision["gate_mm3"], gate_cap_mm3=decision.get("gate_cap_mm3"),
                validation=decision["validation_dice"],
                validation_mean=decision["mean_foreground_dice"], postprocessing=decision.get("postprocessing"),
                test=test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="20,21,22,24,25,26,27,28,29,30")
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_seeds"))
    parser.add_argument("--tag", default="N", help="run letter for the result files (default N)")
    parser.add_argument("--resume", action="store_true",
                        help="keep each seed's work folder: the pipeline reruns only what is not done (the same "
                             "trained models with a new decision rule, say); wall_s is then that rerun's time")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                             "TRITON_INTERPRET", "NNUNET_HEART_EXT_DECISION")}
    out_dir = REPO / "benchmarks" / "results" / "demo"
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row = run_seed(seed, args.work, env, args.resume)
        rows.append(row)
        (out_dir / f"run_{args.tag}_seed{seed}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)
    print("\nseed  wall  offsets, gate, keep-largest | test Dice (myo / valve / calcium): extension | offsets "
          "only | heart pp only | nnU-Net")
    for r in rows:
        if "error" in r:
            print(r["seed"], r["error"])
            continue
        cells = " | ".join(f"{t['1']:.3f} / {t['2']:.3f} / {t['3']:.3f}" for t in
                           (r["test"][k] for k in ("extension", "offsets", "heart_pp", "nnunet")))
        kept = (r["postprocessing"] or {}).get("keep_largest")
        print(f"{r['seed']:>4} {r['wall_s']:>6.0f}  {r['decision']} gate {r['gate_mm3']} kl {kept} | {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
