"""nnU-Net predictions -> the organizer's flat `predict.zip` (`nnunet-heart export`).

    PRED/patient0051.nii.gz   (nnUNetv2_predict output)  ->  predict.zip: patient0051_predict.nii.gz
    IMAGES/patient0051_0000.nii.gz (imagesTs) or IMAGES/patient0051.nii.gz (organizer's testing_image)

Before the zip is written every prediction is checked against its test image: readable, 3D, one
channel, same size, spacing, origin and direction, label values 0-3; every test image has exactly
one prediction and every prediction a test image. All problems are raised together in one
DatasetError naming the files, and no zip is written then. The zip is built under a temporary name
and moved into place, so `out_zip` is either the previous file or the complete new one. nnU-Net's
by-products in the prediction folder (*.json, *.npz, *.pkl) are ignored. File names are the dataset
contract's (`nnunet_heart_ext.data.dataset`).
"""
import zipfile
from pathlib import Path
from typing import Dict, List

import SimpleITK as sitk

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.files import replace_atomically, sweep
from nnunet_heart_ext.data.io import (DatasetError, geometry_mismatches, geometry_of, label_values_problem,
                                      read_geometry, read_image, volume_problem)


def _test_images(images_dir: Path, problems: List[str]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue
        case = ds.case_of_test_image(f.name)
        if case is None:
            why = "a second channel; the heart task has one (_0000)" if ds.is_second_channel(f.name) else \
                f"unrecognised name (expected {ds.RAW_IMAGE.example} or {ds.ORGANIZER_IMAGE.example})"
            problems.append(f"{f}: {why}")
            continue
        if case in found:
            problems.append(f"{f}: duplicate test image for {case} (also {found[case]})")
        else:
            found[case] = f
    return found


def _predictions(pred_dir: Path, problems: List[str]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for f in sorted(pred_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ds.FILE_ENDING):
            continue  # nnU-Net writes dataset.json, plans.json, *.npz, *.pkl beside the predictions
        case = ds.PREDICTION.case(f.name)
        if case is None:
            problems.append(f"{f}: unrecognised name (expected {ds.PREDICTION.example})")
        else:
            found[case] = f
    return found


def check_prediction(pred_path: Path, image_path: Path) -> List[str]:
    """Problems of one prediction against its test image, each naming the prediction file."""
    try:
        pred = read_image(pred_path)
    except ValueError as e:
        return [f"{pred_path}: {e}"]
    problem = volume_problem(geometry_of(pred))
    if problem:
        return [f"{pred_path}: {problem}"]
    try:
        image_geometry = read_geometry(image_path)
    except ValueError as e:
        return [f"{image_path}: {e}"]
    problems = [f"{pred_path}: {m} of its test image {image_path}"
                for m in geometry_mismatches(image_geometry, geometry_of(pred))]
    problem = label_values_problem(sitk.GetArrayViewFromImage(pred))
    if problem:
        problems.append(f"{pred_path}: {problem}")
    return problems


def export(pred_dir, images_dir, out_zip) -> Path:
    """Check every prediction in `pred_dir` against the test images in `images_dir` and write
    `out_zip` holding patientNNNN_predict.nii.gz for each; return its path. Raises DatasetError,
    having written nothing, if anything is missing, extra or invalid."""
    from tqdm import tqdm

    pred_dir = Path(pred_dir).expanduser().absolute()
    images_dir = Path(images_dir).expanduser().absolute()
    out_zip = Path(out_zip).expanduser().absolute()
    problems: List[str] = []
    for folder, what in ((pred_dir, "prediction"), (images_dir, "test image")):
        if not folder.is_dir():
            problems.append(f"{folder}: {what} folder does not exist")
    if problems:
        raise DatasetError(problems)
    images = _test_images(images_dir, problems)
    preds = _predictions(pred_dir, problems)
    if not images:
        problems.append(f"{images_dir}: no test images ({ds.RAW_IMAGE.example})")
    for case in sorted(images.keys() - preds.keys()):
        problems.append(f"{pred_dir / ds.PREDICTION.name(case)}: missing prediction for test image {images[case]}")
    for case in sorted(preds.keys() - images.keys()):
        problems.append(f"{preds[case]}: prediction for a case with no test image in {images_dir}")
    for case in tqdm(sorted(preds.keys() & images.keys()), desc="export: checking", unit="case"):
        problems += check_prediction(preds[case], images[case])
    if problems:
        raise DatasetError(problems)

    def write(tmp: Path):
        # .nii.gz is already compressed: store, don't deflate again
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for case in sorted(preds):
                zf.write(preds[case], arcname=ds.SUBMISSION.name(case))

    sweep(out_zip.parent)  # an earlier export's temporary, if it was killed
    replace_atomically(write, out_zip)
    print(f"export: {len(preds)} predictions -> {out_zip}")
    return out_zip
