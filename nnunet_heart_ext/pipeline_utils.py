"""Checks and reports for `ensemble_pipeline.sh`, one subcommand each.

The pipeline decides whether a step is finished from that step's outputs, never from a marker
file: `python -m nnunet_heart_ext.pipeline_utils <check> ...` exits 0 when the outputs are
complete and 1 (with a line saying what is missing on stderr) when they are not. Reports
(`summary`, `score`) print tables. Everything here reads files that nnU-Net's own commands
wrote; scoring uses nnU-Net's own `compute_metrics_on_folder_simple`.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile

NIFTI = ".nii.gz"
LABELS = {1: "myocardium", 2: "aortic_valve", 3: "calcification"}


class NotDone(Exception):
    """A step's outputs are missing or incomplete; the message says which."""


# ----------------------------------------------------------------------------- small helpers
def case_ids(folder: str, suffix: str = NIFTI) -> list:
    """Sorted case ids of the files in `folder` ending with `suffix` (suffix removed)."""
    if not os.path.isdir(folder):
        return []
    return sorted(f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix))


def image_case_ids(folder: str) -> list:
    """Case ids of nnU-Net images (`CASE_0000.nii.gz`, one channel)."""
    return case_ids(folder, "_0000" + NIFTI)


def _newest_mtime(paths) -> float:
    return max((os.path.getmtime(p) for p in paths), default=0.0)


def _readable_nifti(path: str) -> bool:
    import SimpleITK as sitk

    try:
        sitk.ReadImage(path)  # a file cut short by a kill fails here, not at header level
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- step checks
def prepared(raw_dataset: str, src: str, test_dir: str) -> None:
    """`prepare` is done when dataset.json, imagesTr, labelsTr and imagesTs hold the source's cases."""
    dataset_json = os.path.join(raw_dataset, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise NotDone(f"{dataset_json} is missing")
    n_train = json.load(open(dataset_json))["numTraining"]
    labels = case_ids(os.path.join(raw_dataset, "labelsTr"))
    images = image_case_ids(os.path.join(raw_dataset, "imagesTr"))
    if len(labels) != n_train or labels != images:
        raise NotDone(f"{raw_dataset}: imagesTr/labelsTr do not hold the {n_train} cases of dataset.json")
    src_labels = case_ids(os.path.join(src, "training_label"), "_gt" + NIFTI) if src else labels
    if len(src_labels) != n_train:
        raise NotDone(f"{raw_dataset} holds {n_train} training cases, {src} has {len(src_labels)}")
    n_test_src = len(case_ids(test_dir)) if test_dir else None
    n_test = len(image_case_ids(os.path.join(raw_dataset, "imagesTs")))
    if n_test == 0 or (n_test_src is not None and n_test != n_test_src):
        raise NotDone(f"{raw_dataset}/imagesTs holds {n_test} images, {test_dir} has {n_test_src}")


def preprocessed(preprocessed_dataset: str, plans: str, configs: list, raw_dataset: str) -> None:
    """Plans exist and every configuration's folder holds every training case (.pkl is written
    last per case, and nnU-Net empties the folder when preprocessing starts)."""
    plans_file = os.path.join(preprocessed_dataset, plans + ".json")
    if not os.path.isfile(plans_file):
        raise NotDone(f"{plans_file} is missing")
    plan = json.load(open(plans_file))
    cases = case_ids(os.path.join(raw_dataset, "labelsTr"))
    for config in configs:
        if config not in plan["configurations"]:
            raise SystemExit(f"error: configuration {config} is not in {plans_file} "
                             f"(it has {', '.join(plan['configurations'])})")
        folder = os.path.join(preprocessed_dataset, data_identifier(plan, config))
        done = set(case_ids(folder, ".pkl"))
        missing = [c for c in cases if c not in done]
        if missing:
            raise NotDone(f"{folder}: {len(missing)} of {len(cases)} cases not preprocessed")
    gt = case_ids(os.path.join(preprocessed_dataset, "gt_segmentations"))
    if gt != cases:
        raise NotDone(f"{preprocessed_dataset}/gt_segmentations is incomplete")


def data_identifier(plan: dict, config: str) -> str:
    """nnU-Net's data identifier of `config`, following `inherits_from` as PlansManager does."""
    configuration = plan["configurations"][config]
    while "data_identifier" not in configuration and "inherits_from" in configuration:
        configuration = plan["configurations"][configuration["inherits_from"]]
    return configuration["data_identifier"]


def validated(fold_dir: str, preprocessed_dataset: str, fold: int) -> None:
    """Validation of a fold is done when summary.json and a segmentation and .npz for each
    validation case of splits_final.json exist (what find_best_configuration needs)."""
    validation = os.path.join(fold_dir, "validation")
    summary = os.path.join(validation, "summary.json")
    if not os.path.isfile(summary):
        raise NotDone(f"{summary} is missing")
    splits = json.load(open(os.path.join(preprocessed_dataset, "splits_final.json")))
    val_cases = splits[fold]["val"]
    missing = [c for c in val_cases
               if not (os.path.isfile(os.path.join(validation, c + NIFTI))
                       and os.path.isfile(os.path.join(validation, c + ".npz")))]
    if missing:
        raise NotDone(f"{validation}: no segmentation/.npz for {', '.join(missing)}")
    if os.path.getmtime(summary) < os.path.getmtime(os.path.join(fold_dir, "checkpoint_final.pth")):
        raise NotDone(f"{summary} is older than the fold's checkpoint_final.pth")


def best_found(results_dataset: str, model_dirs: list, folds: list) -> None:
    """find_best_configuration is done when inference_information.json considered exactly these
    models and folds and is newer than every fold's validation."""
    info_file = os.path.join(results_dataset, "inference_information.json")
    if not os.path.isfile(info_file):
        raise NotDone(f"{info_file} is missing")
    info = json.load(open(info_file))
    considered = sorted(f"{m['trainer']}__{m['plans']}__{m['configuration']}" for m in info["considered_models"])
    if considered != sorted(os.path.basename(d) for d in model_dirs):
        raise NotDone(f"{info_file} compared other models: {considered}")
    if [int(f) for f in info["folds"]] != [int(f) for f in folds]:
        raise NotDone(f"{info_file} used folds {info['folds']}")
    if not os.path.isfile(info["best_model_or_ensemble"]["postprocessing_file"]):
        raise NotDone(f"{info['best_model_or_ensemble']['postprocessing_file']} is missing")
    summaries = [os.path.join(d, f"fold_{f}", "validation", "summary.json") for d in model_dirs for f in folds]
    if os.path.getmtime(info_file) < _newest_mtime(s for s in summaries if os.path.isfile(s)):
        raise NotDone(f"{info_file} is older than a fold's validation")


def best_models(results_dataset: str) -> None:
    """Print what find_best_configuration chose: one `trainer plans configuration` line per
    model, then `postprocessing <pkl>` and `plans <plans.json>`."""
    info = json.load(open(os.path.join(results_dataset, "inference_information.json")))
    best = info["best_model_or_ensemble"]
    for m in best["selected_model_or_models"]:
        print("model", m["trainer"], m["plans_identifier"], m["configuration"])
    print("postprocessing", best["postprocessing_file"])
    print("plans", best["some_plans_file"])


def predicted(pred_dir: str, images_dir: str, need_npz: bool, newer_than: str = None) -> None:
    """Every test image has a readable segmentation (and .npz when an ensemble needs it).
    Unreadable files (cut short by a kill) are deleted so that nnU-Net's
    --continue_prediction redoes them instead of skipping them."""
    cases = image_case_ids(images_dir)
    if not cases:
        raise SystemExit(f"error: no test images (*_0000{NIFTI}) in {images_dir}")
    missing = []
    for case in cases:
        seg = os.path.join(pred_dir, case + NIFTI)
        npz = os.path.join(pred_dir, case + ".npz")
        ok = os.path.isfile(seg) and _readable_nifti(seg)
        if ok and need_npz:
            try:
                zipfile.ZipFile(npz).close()  # reads the central directory at the file's end
            except (OSError, zipfile.BadZipFile):
                ok = False
        if ok and newer_than and os.path.getmtime(seg) < os.path.getmtime(newer_than):
            ok = False
        if not ok:
            missing.append(case)
            for f in (seg, npz):
                if os.path.isfile(f):
                    os.remove(f)
    if missing:
        raise NotDone(f"{pred_dir}: {len(missing)} of {len(cases)} test cases not predicted")


def zipped(zip_path: str, pred_dir: str) -> None:
    """predict.zip is done when it holds `CASE_predict.nii.gz` for every prediction, flat, and
    is newer than all of them."""
    if not os.path.isfile(zip_path):
        raise NotDone(f"{zip_path} is missing")
    expected = sorted(c + "_predict" + NIFTI for c in case_ids(pred_dir))
    try:
        names = sorted(zipfile.ZipFile(zip_path).namelist())
    except zipfile.BadZipFile:
        raise NotDone(f"{zip_path} is not a readable zip")
    if names != expected:
        raise NotDone(f"{zip_path} does not hold exactly the {len(expected)} predictions of {pred_dir}")
    if os.path.getmtime(zip_path) < _newest_mtime(os.path.join(pred_dir, c + NIFTI) for c in case_ids(pred_dir)):
        raise NotDone(f"{zip_path} is older than the predictions")


# ----------------------------------------------------------------------------- other checks
def estimate_preprocessed_bytes(raw_dataset: str, n_configs: int) -> int:
    """Disk that preprocessing will need, from image headers: per configuration, every training
    image as float32 plus its segmentation as int8 (nnU-Net's blosc2 files compress CT poorly,
    so this is an upper-end guess at the original spacing), plus the copied label files."""
    import SimpleITK as sitk

    voxels = 0
    images_dir = os.path.join(raw_dataset, "imagesTr")
    for name in sorted(os.listdir(images_dir)):
        if name.endswith(NIFTI):
            reader = sitk.ImageFileReader()
            reader.SetFileName(os.path.join(images_dir, name))
            reader.ReadImageInformation()
            n = 1
            for s in reader.GetSize():
                n *= s
            voxels += n
    labels_dir = os.path.join(raw_dataset, "labelsTr")
    label_bytes = sum(os.path.getsize(os.path.join(labels_dir, f)) for f in os.listdir(labels_dir))
    return int(voxels * (4 + 1) * n_configs * 1.2) + label_bytes


def disk_check(raw_dataset: str, target: str, n_configs: int) -> None:
    """Exit with an error when `target`'s file system lacks the space preprocessing needs."""
    need = estimate_preprocessed_bytes(raw_dataset, n_configs)
    os.makedirs(target, exist_ok=True)
    free = shutil.disk_usage(target).free
    gb = 1024 ** 3
    if free < need:
        raise SystemExit(f"error: preprocessing {raw_dataset} needs about {need / gb:.1f} GiB in {target}, "
                         f"only {free / gb:.1f} GiB are free (free space, or set nnUNet_preprocessed "
                         f"elsewhere; --skip-disk-check to try anyway)")
    print(f"disk: preprocessing needs about {need / gb:.2f} GiB, {free / gb:.1f} GiB free in {target}")


def usable_checkpoint(path: str) -> None:
    """A checkpoint torch can load (one cut short while being saved cannot be continued from)."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to load means: not usable)
        raise NotDone(f"{path} cannot be loaded ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------- reports
def _dice_row(summary_file: str) -> list:
    summary = json.load(open(summary_file))
    return [summary["mean"].get(str(k), {}).get("Dice", float("nan")) for k in LABELS] + \
        [summary["foreground_mean"]["Dice"]]


def _table(rows: list) -> str:
    head = ["", *LABELS.values(), "mean"]
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for name, values in rows:
        lines.append("  ".join([f"{name:>14}"] + [f"{v:>14.4f}" for v in values]))
    return "\n".join(lines)


def validation_summary(model_dirs: list, folds: list) -> None:
    """Validation Dice per class and fold (from each fold's validation/summary.json)."""
    for model_dir in model_dirs:
        rows = []
        for f in folds:
            s = os.path.join(model_dir, f"fold_{f}", "validation", "summary.json")
            if os.path.isfile(s):
                rows.append((f"fold {f}", _dice_row(s)))
        print(f"validation Dice, {os.path.basename(model_dir)}:")
        print(_table(rows) if rows else "  (no validation results)")


def score(zip_path: str, gt_dir: str, out_json: str, num_processes: int = 1) -> dict:
    """Dice per class of the predictions in `zip_path` (`CASE_predict.nii.gz`) against the
    ground truth in `gt_dir` (`CASE_gt.nii.gz`), by nnU-Net's compute_metrics_on_folder_simple."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    with tempfile.TemporaryDirectory() as tmp:
        pred, ref = os.path.join(tmp, "pred"), os.path.join(tmp, "ref")
        os.makedirs(ref)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(pred)
        for name in os.listdir(pred):
            os.rename(os.path.join(pred, name), os.path.join(pred, name.replace("_predict" + NIFTI, NIFTI)))
            gt = os.path.join(gt_dir, name.replace("_predict" + NIFTI, "_gt" + NIFTI))
            if not os.path.isfile(gt):
                raise SystemExit(f"error: no ground truth {gt} for {name} in {zip_path}")
            os.symlink(os.path.abspath(gt), os.path.join(ref, name.replace("_predict" + NIFTI, NIFTI)))
        tmp_json = os.path.join(tmp, "summary.json")
        compute_metrics_on_folder_simple(ref, pred, list(LABELS), tmp_json, num_processes=num_processes)
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        shutil.copyfile(tmp_json, out_json + ".tmp")
        os.replace(out_json + ".tmp", out_json)
    dice_table(out_json)
    return json.load(open(out_json))


def dice_table(summary_json: str) -> None:
    """Print the Dice per class of one nnU-Net summary.json (the demo's test score)."""
    print(f"test Dice against the ground truth ({summary_json}):")
    print(_table([("test", _dice_row(summary_json))]))


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunet_heart_ext.pipeline_utils", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepared"); a.add_argument("raw_dataset"); a.add_argument("src"); a.add_argument("test_dir")
    a = sub.add_parser("preprocessed"); a.add_argument("preprocessed_dataset"); a.add_argument("plans")
    a.add_argument("configs"); a.add_argument("raw_dataset")
    a = sub.add_parser("validated"); a.add_argument("fold_dir"); a.add_argument("preprocessed_dataset")
    a.add_argument("fold", type=int)
    a = sub.add_parser("best-found"); a.add_argument("results_dataset"); a.add_argument("model_dirs")
    a.add_argument("folds")
    a = sub.add_parser("best-models"); a.add_argument("results_dataset")
    a = sub.add_parser("predicted"); a.add_argument("pred_dir"); a.add_argument("images_dir")
    a.add_argument("--npz", action="store_true"); a.add_argument("--newer-than")
    a = sub.add_parser("zipped"); a.add_argument("zip"); a.add_argument("pred_dir")
    a = sub.add_parser("disk-check"); a.add_argument("raw_dataset"); a.add_argument("target")
    a.add_argument("n_configs", type=int)
    a = sub.add_parser("usable-checkpoint"); a.add_argument("path")
    a = sub.add_parser("summary"); a.add_argument("model_dirs"); a.add_argument("folds")
    a = sub.add_parser("score"); a.add_argument("zip"); a.add_argument("gt_dir"); a.add_argument("out_json")
    a.add_argument("-np", type=int, default=1)
    a = sub.add_parser("dice-table"); a.add_argument("summary_json")
    args = p.parse_args(argv)

    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    try:
        if args.cmd == "prepared":
            prepared(args.raw_dataset, args.src, args.test_dir)
        elif args.cmd == "preprocessed":
            preprocessed(args.preprocessed_dataset, args.plans, csv(args.configs), args.raw_dataset)
        elif args.cmd == "validated":
            validated(args.fold_dir, args.preprocessed_dataset, args.fold)
        elif args.cmd == "best-found":
            best_found(args.results_dataset, csv(args.model_dirs), [int(f) for f in csv(args.folds)])
        elif args.cmd == "best-models":
            best_models(args.results_dataset)
        elif args.cmd == "predicted":
            predicted(args.pred_dir, args.images_dir, args.npz, args.newer_than)
        elif args.cmd == "zipped":
            zipped(args.zip, args.pred_dir)
        elif args.cmd == "disk-check":
            disk_check(args.raw_dataset, args.target, args.n_configs)
        elif args.cmd == "usable-checkpoint":
            usable_checkpoint(args.path)
        elif args.cmd == "summary":
            validation_summary(csv(args.model_dirs), [int(f) for f in csv(args.folds)])
        elif args.cmd == "score":
            score(args.zip, args.gt_dir, args.out_json, args.np)
        elif args.cmd == "dice-table":
            dice_table(args.summary_json)
    except NotDone as e:
        print(f"not done: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
