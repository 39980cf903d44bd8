"""Organizer layout -> nnU-Net raw dataset (`nnunet-heart prepare`).

    SRC/training_image1..3/patient0001.nii.gz      ->  RAW/Dataset100_Heart/imagesTr/patient0001_0000.nii.gz
    SRC/training_label/patient0001_gt.nii.gz       ->  RAW/Dataset100_Heart/labelsTr/patient0001.nii.gz
    SRC/testing_image/patient0051.nii.gz           ->  RAW/Dataset100_Heart/imagesTs/patient0051_0000.nii.gz
                                                       RAW/Dataset100_Heart/dataset.json

The organizer's case ids are kept, so predictions map straight back (see `export`). The test folder
is found beside the training folders (testing_image, testing_images, test_image, test_images or
imagesTs) or given with `test_dir`; its `patientNNNN.nii.gz` are the test images (ground-truth
`_gt` files there are ignored).

Every case is checked before anything is written: readable NIfTI, 3D, one channel; image and label
with the same size, spacing, origin and direction; label values 0-3; no case id twice; no label
without an image or image without a label; no file name it does not recognise. All problems are
raised together in one DatasetError, each naming its file. The originals are only read: files are
copied (or symbolically linked with `link=True`), and a rerun copies only what changed (size or
modification time) and removes the files it wrote for cases no longer in the source. A dataset
folder that prepare did not make (no `.nnunet-heart-prepare.json` in it) is never written into.
"""
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import SimpleITK as sitk

from nnunet_heart_ext.io import (IMAGE_NAME, LABEL_NAME, LABELS, DatasetError, copy_file, geometry_mismatches,
                                 geometry_of, label_values_problem, link_file, read_image, up_to_date,
                                 volume_problem, write_text)

TRAIN_IMAGE_DIR = re.compile(r"^training_images?\d*$")
TRAIN_LABEL_DIRS = ("training_label", "training_labels")
TEST_IMAGE_DIRS = ("testing_image", "testing_images", "test_image", "test_images", "imagesTs")
DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_-]+$")
MARKER = ".nnunet-heart-prepare.json"  # in the dataset folder: the files prepare wrote there


def _scan(folder: Path, pattern: re.Pattern, expected: str, found: Dict[str, Path], problems: List[str],
          also_ok: Optional[re.Pattern] = None) -> None:
    """Add `patientNNNN` -> file for the names in `folder` that match; report the others."""
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue  # hidden files (.DS_Store, editors' swap files)
        m = pattern.match(f.name)
        if m is None:
            if not (also_ok and also_ok.match(f.name)):
                problems.append(f"{f}: unrecognised name (expected {expected})")
            continue
        case = f"patient{m.group(1)}"
        if case in found:
            problems.append(f"{f}: duplicate case id {case} (also {found[case]})")
        else:
            found[case] = f


def _find_test_dir(src: Path, test_dir, problems: List[str]) -> Optional[Path]:
    if test_dir is not None:
        test_dir = Path(test_dir).expanduser().absolute()
        if not test_dir.is_dir():
            problems.append(f"{test_dir}: test folder does not exist")
            return None
        return test_dir
    candidates = [src / name for name in TEST_IMAGE_DIRS if (src / name).is_dir()]
    if len(candidates) > 1:
        problems.append(f"{src}: several test folders ({', '.join(c.name for c in candidates)}); "
                        f"name one with --test-dir")
        return None
    return candidates[0] if candidates else None


def prepare(src, raw_root=None, dataset_name: str = "Dataset100_Heart", test_dir=None, link: bool = False) -> Path:
    """Convert the organizer's folder `src` into `raw_root/dataset_name` (default root: $nnUNet_raw)
    and return the dataset folder. Raises DatasetError, having written nothing, if the input is invalid."""
    from tqdm import tqdm

    src = Path(src).expanduser().absolute()
    problems: List[str] = []
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            problems.append("$nnUNet_raw: not set; set it or pass --raw")
    if not DATASET_NAME.match(dataset_name):
        problems.append(f"{dataset_name}: not an nnU-Net dataset name (DatasetNNN_Name)")
    if not src.is_dir():
        raise DatasetError(problems + [f"{src}: source folder does not exist"])
    out = Path(raw_root).expanduser().absolute() / dataset_name if raw_root else None

    image_dirs = sorted(d for d in src.iterdir() if d.is_dir() and TRAIN_IMAGE_DIR.match(d.name))
    label_dirs = [src / n for n in TRAIN_LABEL_DIRS if (src / n).is_dir()]
    if not image_dirs:
        problems.append(f"{src}: no training image folder (training_image1, training_image2, ...)")
    if len(label_dirs) != 1:
        problems.append(f"{src}: expected one training label folder (training_label), found {len(label_dirs)}")
    test_folder = _find_test_dir(src, test_dir, problems)

    images: Dict[str, Path] = {}
    labels: Dict[str, Path] = {}
    tests: Dict[str, Path] = {}
    for d in image_dirs:
        _scan(d, IMAGE_NAME, "patientNNNN.nii.gz", images, problems)
    for d in label_dirs:
        _scan(d, LABEL_NAME, "patientNNNN_gt.nii.gz", labels, problems)
    if test_folder is not None:
        _scan(test_folder, IMAGE_NAME, "patientNNNN.nii.gz", tests, problems, also_ok=LABEL_NAME)
    for case in sorted(labels.keys() - images.keys()):
        problems.append(f"{labels[case]}: label without an image (no {case}.nii.gz in "
                        f"{', '.join(d.name for d in image_dirs) or 'training_image*'})")
    for case in sorted(images.keys() - labels.keys()):
        problems.append(f"{images[case]}: training image without a label (no {case}_gt.nii.gz in training_label)")
    for case in sorted(tests.keys() & images.keys()):
        problems.append(f"{tests[case]}: duplicate case id {case} (also {images[case]})")
    if image_dirs and not images and not problems:
        problems.append(f"{src}: no training cases found")
    if out is not None:
        if out.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(out.resolve()):
            problems.append(f"{out}: output and source folder {src} overlap; choose another --raw")
        elif out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
            problems.append(f"{out}: exists and was not made by `nnunet-heart prepare`; it is left alone: "
                            f"move it away or choose another --raw or --dataset")
        dataset_id = DATASET_NAME.match(dataset_name)
        if dataset_id and out.parent.is_dir():
            for other in out.parent.glob(f"Dataset{dataset_id.group(1)}_*"):
                if other.name != dataset_name:
                    problems.append(f"{other}: another dataset with id {dataset_id.group(1)}; nnU-Net could not "
                                    f"tell them apart")

    # read every case that the layout allows, so that one run lists all problems
    cases = sorted(images.keys() & labels.keys())
    print(f"prepare: {len(cases)} training cases in {len(image_dirs)} folders, {len(tests)} test images"
          + (f" in {test_folder}" if test_folder else " (no test folder found)"))
    checks = [(images[c], labels[c]) for c in cases] + [(tests[c], None) for c in sorted(tests.keys() - images.keys())]
    for image_path, label_path in tqdm(checks, desc="prepare: checking", unit="case"):
        problems += check_case(image_path, label_path)
    if problems:
        raise DatasetError(problems)

    plan = {}
    for c in cases:
        plan[out / "imagesTr" / f"{c}_0000.nii.gz"] = images[c]
        plan[out / "labelsTr" / f"{c}.nii.gz"] = labels[c]
    for c in sorted(tests):
        plan[out / "imagesTs" / f"{c}_0000.nii.gz"] = tests[c]
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # the marker lists what prepare wrote, so a rerun removes only its own files of dropped cases;
    # it names the new files before they are written, so an interrupted run can be rerun
    earlier = set(json.loads((out / MARKER).read_text())["files"]) if (out / MARKER).is_file() else set()
    ours = {str(dst.relative_to(out)) for dst in plan}
    write_text(json.dumps({"source": str(src), "files": sorted(earlier | ours)}, indent=1), out / MARKER)
    removed = 0
    for name in sorted(earlier - ours):  # cases dropped from the source since the last run
        if (out / name).is_symlink() or (out / name).is_file():
            (out / name).unlink()
            removed += 1
    written = 0
    for dst, source in tqdm(plan.items(), desc="prepare: " + ("linking" if link else "copying"), unit="file"):
        if not up_to_date(source, dst, link):
            (link_file if link else copy_file)(source, dst)
            written += 1
    json_changed = _write_dataset_json(out, dataset_name, len(cases))
    write_text(json.dumps({"source": str(src), "files": sorted(ours)}, indent=1), out / MARKER)
    print(f"prepare: {out}: {written} file(s) {'linked' if link else 'copied'}, {len(plan) - written} unchanged, "
          f"{removed} stale removed, dataset.json {'written' if json_changed else 'unchanged'}")
    return out


def check_case(image_path: Path, label_path: Optional[Path]) -> List[str]:
    """Problems of one case (label_path None for a test image), each naming its file."""
    try:
        image = read_image(image_path)
    except ValueError as e:
        image, problems = None, [f"{image_path}: {e}"]
    else:
        problem = volume_problem(geometry_of(image))
        problems = [f"{image_path}: {problem}"] if problem else []
    if label_path is None:
        return problems
    try:
        label = read_image(label_path)
    except ValueError as e:
        return problems + [f"{label_path}: {e}"]
    problem = volume_problem(geometry_of(label))
    if problem:
        return problems + [f"{label_path}: {problem}"]
    if image is not None and not problems:
        for mismatch in geometry_mismatches(geometry_of(image), geometry_of(label)):
            problems.append(f"{label_path}: {mismatch} of its image {image_path.name}")
    problem = label_values_problem(sitk.GetArrayViewFromImage(label))
    if problem:
        problems.append(f"{label_path}: {problem}")
    return problems


def _write_dataset_json(out: Path, dataset_name: str, num_training: int) -> bool:
    """nnU-Net's own generate_dataset_json, written to a temporary folder and moved into place;
    left alone if the content would not change (True if written)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        generate_dataset_json(tmp, {0: "CT"}, dict(LABELS), num_training, ".nii.gz", dataset_name=dataset_name,
                              description="AICUP 2025 CT heart segmentation (organizer layout converted by "
                                          "`nnunet-heart prepare`)",
                              overwrite_image_reader_writer="SimpleITKIO", converted_by="nnunet-heart prepare",
                              license="see the AICUP 2025 competition terms")
        new = Path(tmp) / "dataset.json"
        final = out / "dataset.json"
        if final.is_file() and json.loads(final.read_text()) == json.loads(new.read_text()):
            return False
        os.replace(new, final)
        return True
