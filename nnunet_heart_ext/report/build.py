"""`nnunet-heart report`: find the files, measure and draw every case on the usable cores, write
`OUT/index.html` and `OUT/report.json` (atomically, data/files.py).

Each test image and its prediction are read once (`data.io.read_voxels_once`: SimpleITK reads the
header, ISA-L inflates the voxels at twice zlib's speed), in a worker process
that measures the case and draws its pictures from those arrays and returns only the numbers and a
small PNG. Training labels are read once too: their measures are kept in report.json with each
file's size and modification time, and a later report reuses them while the file is unchanged.
The worst validation cases' reference, prediction and CT are read for their pictures only.

Bad input stops the report before anything is written, with one line per problem naming its file
(DatasetError, exit 1 from the command line): a test image without a prediction or the reverse, a
file that is not a readable whole NIfTI image, a prediction on another grid than its image, label
values other than 0-3, an unreadable summary.json.
"""
import json
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data import decision_file
from nnunet_heart_ext.data.files import sweep, write_text
from nnunet_heart_ext.data.io import (DatasetError, Geometry, geometry_mismatches, label_values_problem,
                                      read_voxels_once, volume_problem)
from nnunet_heart_ext.kernels.cores import usable_cores
from nnunet_heart_ext.report import crossval, page, pictures
from nnunet_heart_ext.report.content import Picture, Report, TestCase, TestScore, TrainingLabel, WorstCase
from nnunet_heart_ext.report.flags import TrainingDistribution, flags_of
from nnunet_heart_ext.report.measures import LabelMap, measure
from nnunet_heart_ext.report.provenance import provenance


@dataclass
class Inputs:
    """What `nnunet-heart report` is given."""
    predictions: Path                 # a folder of predictions (CASE.nii.gz or CASE_predict.nii.gz), or predict.zip
    images: Path                      # the test images (imagesTs, or the organizer's testing_image)
    out: Path                         # the report's folder
    train_labels: Optional[Path] = None   # labelsTr or the organizer's training_label: the flags' distribution
    train_images: Sequence[Path] = ()     # imagesTr or training_image1..3: the worst validation cases' CT
    models: Sequence[Path] = ()           # trained model folders (TRAINER__PLANS__CONFIGURATION)
    folds: Optional[Sequence[int]] = None  # None: every fold_F of each model
    postprocessing: Optional[Path] = None
    test_summary: Optional[Path] = None   # a summary.json of the test set against a ground truth (the demo's)
    decision: Optional[Path] = None       # heart_decision.json (nnunet-heart decision): offsets, gate, what they bought
    worst: int = 3                        # worst validation cases shown per fold
    processes: Optional[int] = None       # None: every usable core
    argv: Optional[Sequence[str]] = None  # the command line, for the page


# ----------------------------------------------------------------------------- finding the files
def _listing(folder: Path, problems: List[str], what: str) -> List[Path]:
    if not Path(folder).is_dir():
        problems.append(f"{folder}: {what} folder does not exist")
        return []
    return [f for f in sorted(Path(folder).iterdir()) if not f.name.startswith(".") and f.name.endswith(ds.FILE_ENDING)]


def _add(found: Dict[str, Path], case: str, f: Path, problems: List[str]) -> None:
    if case in found:
        problems.append(f"{f}: duplicate case id {case} (also {found[case]})")
    else:
        found[case] = f


def test_images(folder: Path, problems: List[str]) -> Dict[str, Path]:
    """Case -> test image (CASE_0000.nii.gz or CASE.nii.gz); ground-truth `_gt` files beside them ignored."""
    found: Dict[str, Path] = {}
    for f in _listing(folder, problems, "test image"):
        case = ds.case_of_test_image(f.name)
        if case is not None:
            _add(found, case, f, problems)
        elif ds.ORGANIZER_LABEL.case(f.name) is None:
            problems.append(f"{f}: unrecognised name (expected {ds.RAW_IMAGE.example} or {ds.ORGANIZER_IMAGE.example})")
    if not found and Path(folder).is_dir():
        problems.append(f"{folder}: no test images ({ds.RAW_IMAGE.example})")
    return found


def _named(folder: Path, problems: List[str], what: str, names) -> Dict[str, Path]:
    """Case -> file of `folder` named by the first of `names` (dataset contract names) that fits."""
    found: Dict[str, Path] = {}
    for f in _listing(folder, problems, what):
        case = next((c for c in (n.case(f.name) for n in names) if c is not None), None)
        if case is None:
            problems.append(f"{f}: unrecognised name (expected {' or '.join(n.example for n in names)})")
        else:
            _add(found, case, f, problems)
    return found


def prediction_files(folder: Path, problems: List[str]) -> Dict[str, Path]:
    """Case -> prediction (nnUNetv2_predict's CASE.nii.gz or the submission's CASE_predict.nii.gz)."""
    return _named(folder, problems, "prediction", (ds.PREDICTION, ds.SUBMISSION))


def label_files(folder: Path, problems: List[str]) -> Dict[str, Path]:
    """Case -> training label (labelsTr's CASE.nii.gz or the organizer's CASE_gt.nii.gz)."""
    return _named(folder, problems, "training label", (ds.RAW_LABEL, ds.ORGANIZER_LABEL))


def image_files(folders: Sequence[Path]) -> Dict[str, Path]:
    """Case -> training image, in any of `folders` (imagesTr's CASE_0000.nii.gz, the organizer's CASE.nii.gz)."""
    found: Dict[str, Path] = {}
    for folder in folders:
        for pattern in (ds.RAW_IMAGE, ds.ORGANIZER_IMAGE):
            for case, f in ds.cases_in(folder, pattern).items():
                found.setdefault(case, f)
    return found


@contextmanager
def predictions_folder(path: Path) -> Iterator[Path]:
    """The predictions as a folder: `path` itself, or predict.zip's files extracted to a temporary
    folder (stored, not deflated: a copy)."""
    path = Path(path)
    if not path.is_file():
        yield path  # a folder (or nothing: the listing says so)
        return
    if not zipfile.is_zipfile(path):
        raise DatasetError([f"{path}: neither a prediction folder nor a zip"], "predictions")
    with tempfile.TemporaryDirectory(prefix="nnunet-heart-report-") as tmp:
        try:
            with zipfile.ZipFile(path) as z:
                for member in z.infolist():
                    if ds.SUBMISSION.case(Path(member.filename).name) is None or member.is_dir() or \
                            "/" in member.filename:
                        raise DatasetError([f"{path}: {member.filename} is not a submission file name "
                                            f"({ds.SUBMISSION.example}, at the zip's top level)"], "predictions")
                z.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetError([f"{path}: cannot read the zip ({e})"], "predictions") from None
        yield Path(tmp)


# ----------------------------------------------------------------------------- work done in the pool
def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one process per core already (distance maps)


class Volume(NamedTuple):
    """A whole file, read once."""
    geometry: Geometry
    array: np.ndarray                     # (z, y, x)
    spacing: Tuple[float, float, float]   # (z, y, x) mm
    head_up: bool                         # whether the z axis points to the head (shown up)


def _read(path: Path) -> Volume:
    """A whole 3D file (SimpleITK's header, ISA-L's inflate: data.io.read_voxels_once); ValueError
    naming it."""
    try:
        geometry, array = read_voxels_once(path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    problem = volume_problem(geometry)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return Volume(geometry, array, tuple(reversed(geometry.spacing)), geometry.direction[8] > 0)


def _picture(picture) -> Picture:
    return Picture(pictures.png(picture), picture.width, picture.height)


def test_task(case: str, image_path: Path, prediction_path: Path, shown_as: str):
    """One test case: ('test', case, measures, picture, problems). `shown_as`: the prediction's
    name in messages (`predict.zip:CASE_predict.nii.gz` for a file extracted from the zip)."""
    try:
        image = _read(image_path)
        prediction = _read(prediction_path)
    except ValueError as e:
        return "test", case, None, None, [str(e).replace(str(prediction_path), shown_as)]
    problems = [f"{shown_as}: {m} of its test image {image_path}"
                for m in geometry_mismatches(image.geometry, prediction.geometry)]
    problem = label_values_problem(prediction.array)
    if problem:
        problems.append(f"{shown_as}: {problem}")
    if problems:
        return "test", case, None, None, problems
    labels = LabelMap(prediction.array, prediction.spacing)
    measures = measure(case, labels, image.array)
    return "test", case, measures, _picture(pictures.strip(labels, image.array, measures.centre, image.head_up)), []


def training_task(case: str, path: Path):
    """One training label: ('training', case, TrainingLabel, None, problems)."""
    try:
        stat = Path(path).stat()
        label = _read(path)
    except (ValueError, OSError) as e:
        return "training", case, None, None, [str(e)]
    problem = label_values_problem(label.array)
    if problem:
        return "training", case, None, None, [f"{path}: {problem}"]
    measures = measure(case, LabelMap(label.array, label.spacing))
    return "training", case, TrainingLabel(measures, str(path), stat.st_size, stat.st_mtime_ns), None, []


def worst_task(key: int, reference: Optional[Path], prediction: Path, image: Optional[Path]):
    """One worst validation case: ('worst', key, note, picture, []). A file that cannot be read gives
    a note on the page, not an error: the validation was nnU-Net's, the report only shows it."""
    if reference is None:
        return "worst", key, "no picture: its reference file is missing", None, []
    try:
        ref, pred = _read(reference), _read(prediction)
        ct = _read(image) if image is not None else None
    except ValueError as e:
        return "worst", key, f"no picture: {e}", None, []
    if ref.array.shape != pred.array.shape or (ct is not None and ct.array.shape != ref.array.shape):
        return "worst", key, f"no picture: {prediction}, {reference} and the CT differ in size", None, []
    reference_map = LabelMap(ref.array, ref.spacing)
    centre = measure("", reference_map).centre
    picture = pictures.pair(reference_map, LabelMap(pred.array, ref.spacing), None if ct is None else ct.array,
                            centre, ref.head_up)
    return "worst", key, "", _picture(picture), []


def run_tasks(tasks: List[tuple], processes: int) -> List[tuple]:
    """Each (function, *arguments) on `processes` worker processes (here when 1), with a progress bar."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(tasks), desc="report", unit="file") as bar:
        if processes <= 1 or len(tasks) <= 1:  # here (SimpleITK's threads left as the caller set them)
            for function, *arguments in tasks:
                results.append(function(*arguments))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = [pool.submit(function, *arguments) for function, *arguments in tasks]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
    return results


# ----------------------------------------------------------------------------- the report
def cached_training(out: Path) -> Dict[str, TrainingLabel]:
    """The training labels' measures of an earlier report in `out` (none if it cannot be read)."""
    try:
        earlier = json.loads((Path(out) / ds.REPORT_JSON).read_text())
        return {t.measures.case: t for t in (TrainingLabel.from_json(d) for d in earlier["training_labels"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _unchanged(cached: Optional[TrainingLabel], path: Path) -> bool:
    if cached is None:
        return False
    stat = path.stat()
    return cached.file == str(path) and cached.size == stat.st_size and cached.mtime_ns == stat.st_mtime_ns


def _test_score(path: Path) -> TestScore:
    means, cases = crossval.read_summary(path, "test", -1)
    return TestScore(str(path), means, cases)


def make_report(inputs: Inputs) -> Path:
    """Write the report of `inputs` into `inputs.out`; return the page's path. DatasetError, with
    nothing written, on bad input."""
    started = time.perf_counter()
    out = Path(inputs.out).expanduser().absolute()
    problems: List[str] = []
    images = test_images(Path(inputs.images), problems)
    source = Path(inputs.predictions).expanduser().absolute()
    with predictions_folder(source) as pred_dir:
        predictions = prediction_files(pred_dir, problems)
        shown = {case: f"{source}:{f.name}" if pred_dir != source else str(f) for case, f in predictions.items()}
        for case in sorted(images.keys() - predictions.keys()):
            problems.append(f"{source}: no prediction for test image {images[case]} "
                            f"({ds.PREDICTION.name(case)} or {ds.SUBMISSION.name(case)})")
        for case in sorted(predictions.keys() - images.keys()):
            problems.append(f"{shown[case]}: prediction of {case}, which has no test image in {inputs.images}")
        labels = label_files(Path(inputs.train_labels), problems) if inputs.train_labels else {}
        model_folds = []
        for model in inputs.models:
            if not Path(model).is_dir():
                problems.append(f"{model}: model folder does not exist")
                continue
            model_folds.append((Path(model), list(inputs.folds) if inputs.folds is not None else
                                crossval.folds_of(Path(model))))
        if problems:
            raise DatasetError(problems)
        folds = [crossval.read_fold(model, f) for model, fs in model_folds for f in fs]
        test_score = _test_score(Path(inputs.test_summary)) if inputs.test_summary else None
        decision = None
        if inputs.decision:
            try:
                decision = decision_file.read(Path(inputs.decision))
            except ValueError as e:
                raise DatasetError([str(e)]) from None
        worst = crossval.worst_cases(folds, inputs.worst)
        train_images = image_files([Path(p) for p in inputs.train_images])

        cache = cached_training(out)
        training = {case: cache[case] for case, path in labels.items() if _unchanged(cache.get(case), path)}
        tasks = [(training_task, case, path) for case, path in sorted(labels.items()) if case not in training]
        tasks += [(test_task, case, images[case], predictions[case], shown[case]) for case in sorted(images)]
        for key, w in enumerate(worst):
            reference = Path(w.reference) if Path(w.reference).is_file() else labels.get(w.case)
            tasks.append((worst_task, key, reference, Path(w.prediction), train_images.get(w.case)))
        processes = max(1, min(inputs.processes or usable_cores(), len(tasks)))
        tests: Dict[str, tuple] = {}
        worst_pictures: Dict[int, tuple] = {}
        for kind, key, value, picture, found in run_tasks(tasks, processes):
            problems += found
            if found:
                continue
            if kind == "training":
                training[key] = value
            elif kind == "test":
                tests[key] = (value, picture)
            else:
                worst_pictures[key] = (value, picture)
    if problems:
        raise DatasetError(sorted(problems))

    distribution = TrainingDistribution.of([training[c].measures for c in sorted(training)])
    report = Report(
        provenance=provenance(source, Path(inputs.images).absolute(),
                              inputs.train_labels and Path(inputs.train_labels).absolute(),
                              ", ".join(str(Path(p).absolute()) for p in inputs.train_images) or None,
                              [(m.absolute(), fs) for m, fs in model_folds],
                              inputs.postprocessing and Path(inputs.postprocessing).absolute(),
                              inputs.test_summary and Path(inputs.test_summary).absolute(), inputs.argv),
        distribution=distribution, training=[training[c] for c in sorted(training)],
        tests=[TestCase(m, flags_of(m, distribution), picture, str(images[case]), shown[case])
               for case, (m, picture) in sorted(tests.items())],
        folds=folds, worst=[WorstCase(w, worst_pictures[i][1], worst_pictures[i][0]) for i, w in enumerate(worst)],
        test_score=test_score, decision=decision, decision_path=str(inputs.decision or ""))
    report.seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    sweep(out)  # an earlier report's temporaries, if it was killed
    page_path = write_text(page.render(report), out / ds.REPORT_HTML)
    write_text(json.dumps(report.to_json(), indent=1) + "\n", out / ds.REPORT_JSON)  # last: the step's "done"
    flagged = sum(1 for t in report.tests if t.flags)
    print(f"report: {len(report.tests)} test case(s), {flagged} flagged; {len(folds)} cross-validation fold(s) "
          f"-> {page_path} [{time.perf_counter() - started:.1f} s on {processes} process(es)]", flush=True)
    return page_path
