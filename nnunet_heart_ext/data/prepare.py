"""Organizer layout -> nnU-Net raw dataset (`nnunet-heart prepare`).

    SRC/training_image1..3/patient0001.nii.gz      ->  RAW/Dataset100_Heart/imagesTr/patient0001_0000.nii.gz
    SRC/training_label/patient0001_gt.nii.gz       ->  RAW/Dataset100_Heart/labelsTr/patient0001.nii.gz
    SRC/testing_image/patient0051.nii.gz           ->  RAW/Dataset100_Heart/imagesTs/patient0051_0000.nii.gz
                                                       RAW/Dataset100_Heart/dataset.json

The names and folders it accepts are the dataset contract's (`nnunet_heart_ext.data.dataset`). The
organizer's case ids are kept, so predictions map straight back (see `export`). The test folder
is found beside the training folders (testing_image, testing_images, test_image, test_images or
imagesTs) or given with `test_dir`; its `patientNNNN.nii.gz` are the test images (ground-truth
`_gt` files there are ignored).

Every case is checked before anything is written, at least as strictly as nnU-Net's own
`--verify_dataset_integrity`: readable NIfTI (not cut short), 3D, one channel; no NaN or infinite
voxel in any image or label (test images included); image and label with the same size, spacing
(nnU-Net's tolerance), origin and direction; label values 0-3 only; no case id twice; no label
without an image or image without a label; no file name it does not recognise. All problems are
raised together in one DatasetError, each naming its file. The originals are only read: files are
copied (or symbolically linked with `link=True`), and a rerun copies only what changed (size or
modification time) and removes the files it wrote for cases no longer in the source. A dataset
folder that prepare did not make (no `.nnunet-heart-prepare.json` in it) is never written into.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import SimpleITK as sitk

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.files import copy_file, link_file, sweep, up_to_date, write_text
from nnunet_heart_ext.data.io import (DatasetError, geometry_mismatches, geometry_of, label_values_problem,
                                      read_image, stored_nonfinite_problem, volume_problem)

DATASET_NAME = ds.NNUNET_DATASET_NAME
MARKER = ".nnunet-heart-prepare.json"  # in the dataset folder: the files prepare wrote there


def _raw_root(raw_root, problems: List[str]) -> Optional[Path]:
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            problems.append("$nnUNet_raw: not set; set it or pass --raw")
            return None
    return Path(raw_root).expanduser().absolute()


def _plan_files(files: ds.OrganizerFiles, out: Path) -> Dict[Path, Path]:
    """Destination in the raw dataset -> organizer file, for every file prepare copies."""
    raw = ds.RawDataset(out)
    plan = {}
    for c in files.training_cases:
        plan[raw.image(c)] = files.images[c]
        plan[raw.label(c)] = files.labels[c]
    for c in files.test_cases:
        plan[raw.test_image(c)] = files.tests[c]
    return plan


def pending(src, raw_root=None, dataset_name: str = ds.DATASET_NAME, test_dir=None) -> Optional[str]:
    """Why `prepare(src, raw_root, ...)` would still change something, or None when the dataset
    folder already holds exactly what it would write (copies up to date by size and modification
    time, no file of a dropped case, dataset.json in place). Reads file names and metadata only."""
    problems: List[str] = []
    root = _raw_root(raw_root, problems)
    if root is None:
        return problems[0]
    files = ds.find_organizer_files(src, test_dir)
    if files.problems:
        return f"the organizer folder has problems ({files.problems[0]}{', ...' if len(files.problems) > 1 else ''})"
    out = root / dataset_name
    if not (out / MARKER).is_file():
        return f"{out} was not written by prepare yet"
    plan = _plan_files(files, out)
    try:
        written = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{out / MARKER} is unreadable ({type(e).__name__})"
    ours = {str(dst.relative_to(out)) for dst in plan}
    if written != ours:
        return f"{out} holds other cases than {files.src} ({len(written ^ ours)} file(s) differ)"
    stale = [dst for dst, source in plan.items() if not up_to_date(source, dst, dst.is_symlink())]
    if stale:
        return f"{len(stale)} file(s) in {out} differ from their originals (e.g. {stale[0].name})"
    dataset_json = out / ds.DATASET_JSON
    try:
        counted = json.loads(dataset_json.read_text()).get("numTraining")
    except (OSError, ValueError, AttributeError):
        counted = None
    if counted != len(files.training_cases):
        return f"{dataset_json} is missing, unreadable or counts other cases"
    return None


def prepare(src, raw_root=None, dataset_name: str = ds.DATASET_NAME, test_dir=None, link: bool = False) -> Path:
    """Convert the organizer's folder `src` into `raw_root/dataset_name` (default root: $nnUNet_raw)
    and return the dataset folder. Raises DatasetError, having written nothing, if the input is invalid."""
    from tqdm import tqdm

    src = Path(src).expanduser().absolute()
    problems: List[str] = []
    root = _raw_root(raw_root, problems)
    if not DATASET_NAME.match(dataset_name):
        problems.append(f"{dataset_name}: not an nnU-Net dataset name (DatasetNNN_Name)")
    if not src.is_dir():
        raise DatasetError(problems + [f"{src}: source folder does not exist"])
    out = root / dataset_name if root else None
    files = ds.find_organizer_files(src, test_dir)
    problems += files.problems
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
    cases, tests = files.training_cases, files.test_cases
    print(f"prepare: {len(cases)} training cases in {len(files.train_image_dirs)} folders, {len(tests)} test images"
          + (f" in {files.test_dir}" if files.test_dir else " (no test folder found)"))
    checks = [(files.images[c], files.labels[c]) for c in cases] + [(files.tests[c], None) for c in tests]
    for image_path, label_path in tqdm(checks, desc="prepare: checking", unit="case", mininterval=5):
        problems += check_case(image_path, label_path)
    if problems:
        raise DatasetError(problems)

    plan = _plan_files(files, out)
    for folder in (out, *(out / sub for sub in (ds.RAW_IMAGES_TR, ds.RAW_LABELS_TR, ds.RAW_IMAGES_TS))):
        folder.mkdir(parents=True, exist_ok=True)
        removed = sweep(folder)  # a killed earlier run's temporaries, which nnU-Net would take for cases
        if removed:
            print(f"prepare: removed {len(removed)} leftover file(s) of killed writers in {folder}")
    # the marker lists what prepare wrote, so a rerun removes only its own files of dropped cases;
    # it names the new files before they are written, so an interrupted run can be rerun
    try:
        earlier = set(json.loads((out / MARKER).read_text())["files"]) if (out / MARKER).is_file() else set()
    except (OSError, ValueError, KeyError, TypeError):
        earlier = set()  # unreadable: the files of dropped cases are left, every case is checked again
    ours = {str(dst.relative_to(out)) for dst in plan}
    write_text(json.dumps({"source": str(src), "files": sorted(earlier | ours)}, indent=1), out / MARKER)
    removed = 0
    for name in sorted(earlier - ours):  # cases dropped from the source since the last run
        if (out / name).is_symlink() or (out / name).is_file():
            (out / name).unlink()
            removed += 1
    written = 0
    for dst, source in tqdm(plan.items(), desc="prepare: " + ("linking" if link else "copying"), unit="file",
                            mininterval=5):
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
        problem = volume_problem(geometry_of(image)) or stored_nonfinite_problem(image_path, image)
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
    if image is not None and volume_problem(geometry_of(image)) is None:
        for mismatch in geometry_mismatches(geometry_of(image), geometry_of(label)):
            problems.append(f"{label_path}: {mismatch} of its image {image_path.name}")
    problem = stored_nonfinite_problem(label_path, label) or label_values_problem(sitk.GetArrayViewFromImage(label))
    if problem:
        problems.append(f"{label_path}: {problem}")
    return problems


def _write_dataset_json(out: Path, dataset_name: str, num_training: int) -> bool:
    """nnU-Net's own generate_dataset_json, made in a temporary folder and written into place
    atomically; left alone if the content would not change (True if written)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    content = ds.dataset_json_content(num_training)
    with tempfile.TemporaryDirectory(prefix="nnunet-heart-prepare-") as tmp:
        generate_dataset_json(tmp, content["channel_names"], content["labels"], content["num_training_cases"],
                              content["file_ending"], dataset_name=dataset_name,
                              description=f"{ds.DESCRIPTION} (organizer layout converted by `nnunet-heart prepare`)",
                              overwrite_image_reader_writer="SimpleITKIO", converted_by="nnunet-heart prepare",
                              license="see the AICUP 2025 competition terms")
        text = (Path(tmp) / ds.DATASET_JSON).read_text()
    final = out / ds.DATASET_JSON
    try:
        if final.is_file() and json.loads(final.read_text()) == json.loads(text):
            return False
    except ValueError:
        pass  # cut short or not JSON: rewritten
    write_text(text, final)
    return True
