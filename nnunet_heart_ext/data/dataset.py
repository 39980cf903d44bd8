"""The dataset contract: every name and value that the project's modules agree on, stated once.

`phantom` writes, `prepare` reads, `export` writes and the pipeline checks the files named here;
none of them spells a case-name pattern, a folder name or a label value of its own.

Organizer (AICUP 2025; /work/shared/reference/aicup2025-heart.md):

    SRC/training_image1..3/patient0001.nii.gz     training images, spread over several folders
    SRC/training_label/patient0001_gt.nii.gz      their labels
    SRC/testing_image/patient0051.nii.gz          test images (ground truth `_gt` files may lie beside them)
    predict.zip: patient0051_predict.nii.gz ...   the submission, flat

Accepted as well (what contestants' copies of the data look like): any number of training image
folders named `training_image`, `training_images`, `training_imageN` or `training_imagesN`; labels
in `training_labels/`; the test images in `testing_images/`, `test_image/`, `test_images/` or
`imagesTs/` (or any folder named explicitly); test ground truth in `testing_label/` (what the
phantom writes), `testing_labels/`, `test_label/`, `test_labels/`, or beside the test images.

nnU-Net (raw dataset and the commands' outputs):

    $nnUNet_raw/Dataset100_Heart/imagesTr/patient0001_0000.nii.gz   labelsTr/patient0001.nii.gz
    $nnUNet_raw/Dataset100_Heart/imagesTs/patient0051_0000.nii.gz   dataset.json
    nnUNetv2_predict output: patient0051.nii.gz (+ patient0051.npz, .pkl with --save_probabilities)
    $nnUNet_results/Dataset100_Heart/TRAINER__PLANS__CONFIG/fold_F/{checkpoint_final.pth, validation/}

The organizer's case ids are kept through every step, so predictions map straight back.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# ----------------------------------------------------------------------------- dataset and labels
DATASET_ID = 100
DATASET_NAME = "Dataset100_Heart"
DESCRIPTION = "AICUP 2025 CT heart segmentation"
FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = {0: "CT"}
LABELS = {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}  # dataset.json's form
LABEL_VALUES = tuple(sorted(LABELS.values()))
CLASSES = {value: name for name, value in LABELS.items() if value != 0}  # foreground: value -> name

# ----------------------------------------------------------------------------- case ids
_CASE = r"(patient\d{4})"
CASE_EXAMPLE = "patientNNNN"


def case_id(number: int) -> str:
    """patient0001 for 1."""
    if not 0 <= number <= 9999:
        raise ValueError(f"case number {number} is outside 0-9999")
    return f"patient{number:04d}"


# ----------------------------------------------------------------------------- organizer folders
ORGANIZER_TRAIN_IMAGE_DIRS = ("training_image1", "training_image2", "training_image3")  # as published
TRAIN_IMAGE_DIR = re.compile(r"^training_images?\d*$")
TRAIN_LABEL_DIRS = ("training_label", "training_labels")
TEST_IMAGE_DIRS = ("testing_image", "testing_images", "test_image", "test_images", "imagesTs")
TEST_LABEL_DIRS = ("testing_label", "testing_labels", "test_label", "test_labels")

# ----------------------------------------------------------------------------- nnU-Net folders
NNUNET_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_-]+$")  # nnU-Net's DatasetNNN_Name
RAW_IMAGES_TR, RAW_LABELS_TR, RAW_IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
DATASET_JSON = "dataset.json"
SPLITS_JSON = "splits_final.json"
GT_SEGMENTATIONS = "gt_segmentations"
INFERENCE_INFORMATION = "inference_information.json"
DECISION = "heart_decision.json"  # the decision offsets and gate, beside nnU-Net's postprocessing.pkl
# the postprocessing of HeartTrainer models beside them: nnU-Net's format (plain nnU-Net reads it), keep-largest
# for the myocardium only (nnunet_heart_ext/nnunet/decision.py chooses it)
HEART_POSTPROCESSING = "heart_postprocessing.pkl"
NNUNET_POSTPROCESSING = "postprocessing.pkl"  # what nnUNetv2_find_best_configuration chose, in the same folder
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


_MODEL_SEP = "__"


def model_folder(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's results folder of one trained model."""
    return _MODEL_SEP.join((trainer, plans, configuration))


def model_of_folder(name: str) -> Optional[Dict[str, str]]:
    """trainer, plans and configuration of a results folder named by `model_folder` (None if not)."""
    parts = name.split(_MODEL_SEP)
    if len(parts) != 3 or not all(parts):
        return None
    return dict(trainer=parts[0], plans=parts[1], configuration=parts[2])


_FOLD = re.compile(r"^fold_(\d+)$")


def fold_folder(fold: int) -> str:
    return f"fold_{fold}"


def fold_of_folder(name: str) -> Optional[int]:
    """The fold of a folder named by `fold_folder` (None if not)."""
    m = _FOLD.match(name)
    return int(m.group(1)) if m else None


VALIDATION_FOLDER = "validation"
VALIDATION_SUMMARY = "summary.json"  # nnU-Net's metrics of a fold's validation (also compute_metrics' output)
MODEL_PLANS = "plans.json"  # the plans nnUNetv2_train copies into a model's results folder
POSTPROCESSING_JSON = "postprocessing.json"  # written by nnU-Net beside postprocessing.pkl: what it chose, readable
# nnUNetTrainer's log of one training run, training_log_YYYY_M_D_HH_MM_SS.txt (one per start, resumed runs too)
TRAINING_LOG = re.compile(r"^training_log_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)\.txt$")

# ----------------------------------------------------------------------------- the report (`nnunet-heart report`)
# written by the report layer, checked by the pipeline's report step
REPORT_HTML = "index.html"
REPORT_JSON = "report.json"


# ----------------------------------------------------------------------------- file names
class _Pattern:
    """One file-name rule: makes the name of a case and recognises it."""

    def __init__(self, template: str, example: str):
        self.template = template  # with {case}
        self.example = example
        self.regex = re.compile("^" + re.escape(template).replace(re.escape("{case}"), _CASE) + "$")

    def name(self, case: str) -> str:
        return self.template.format(case=case)

    def case(self, name: str) -> Optional[str]:
        """The case id if `name` follows the rule, else None."""
        m = self.regex.match(name)
        return m.group(1) if m else None


ORGANIZER_IMAGE = _Pattern("{case}" + FILE_ENDING, f"{CASE_EXAMPLE}{FILE_ENDING}")
ORGANIZER_LABEL = _Pattern("{case}_gt" + FILE_ENDING, f"{CASE_EXAMPLE}_gt{FILE_ENDING}")
SUBMISSION = _Pattern("{case}_predict" + FILE_ENDING, f"{CASE_EXAMPLE}_predict{FILE_ENDING}")
RAW_IMAGE = _Pattern("{case}_0000" + FILE_ENDING, f"{CASE_EXAMPLE}_0000{FILE_ENDING}")  # the one channel
RAW_LABEL = _Pattern("{case}" + FILE_ENDING, f"{CASE_EXAMPLE}{FILE_ENDING}")
PREDICTION = _Pattern("{case}" + FILE_ENDING, f"{CASE_EXAMPLE}{FILE_ENDING}")  # nnUNetv2_predict's output
PROBABILITIES = _Pattern("{case}.npz", f"{CASE_EXAMPLE}.npz")  # --save_probabilities
PROBABILITIES_PROPERTIES = _Pattern("{case}.pkl", f"{CASE_EXAMPLE}.pkl")  # written beside the .npz
RAW_OTHER_CHANNEL = re.compile("^" + _CASE + r"_(\d{4})" + re.escape(FILE_ENDING) + "$")


def case_of_test_image(name: str) -> Optional[str]:
    """Case id of a test image named either way: organizer (`patient0051.nii.gz`) or nnU-Net
    raw (`patient0051_0000.nii.gz`)."""
    return ORGANIZER_IMAGE.case(name) or RAW_IMAGE.case(name)


def is_second_channel(name: str) -> bool:
    """`patient0051_0001.nii.gz`: a channel other than _0000 (the heart task has one)."""
    m = RAW_OTHER_CHANNEL.match(name)
    return bool(m) and m.group(2) != "0000"


def cases_in(folder: Path, pattern: _Pattern) -> Dict[str, Path]:
    """Case id -> file for the files in `folder` that follow `pattern` (none if no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for f in sorted(folder.iterdir()):
        case = pattern.case(f.name)
        if case is not None:
            found[case] = f
    return found


# ----------------------------------------------------------------------------- raw dataset
def below(base: str, *parts: str, doc: str = "") -> property:
    """A read-only property of a paths object: `parts` below its attribute `base` (a Path)."""
    def get(self) -> Path:
        return getattr(self, base).joinpath(*parts)

    return property(get, doc=doc or f"{base}/{'/'.join(parts)}")


@dataclass(frozen=True)
class RawDataset:
    """Paths of the nnU-Net raw dataset under one nnUNet_raw folder."""
    root: Path

    @classmethod
    def under(cls, raw_root) -> "RawDataset":
        return cls(Path(raw_root) / DATASET_NAME)

    images_tr = below("root", RAW_IMAGES_TR)
    labels_tr = below("root", RAW_LABELS_TR)
    images_ts = below("root", RAW_IMAGES_TS)
    dataset_json = below("root", DATASET_JSON)

    def image(self, case: str) -> Path:
        return self.images_tr / RAW_IMAGE.name(case)

    def label(self, case: str) -> Path:
        return self.labels_tr / RAW_LABEL.name(case)

    def test_image(self, case: str) -> Path:
        return self.images_ts / RAW_IMAGE.name(case)

    def training_cases(self) -> List[str]:
        return sorted(cases_in(self.labels_tr, RAW_LABEL))

    def test_cases(self) -> Dict[str, Path]:
        return cases_in(self.images_ts, RAW_IMAGE)


def dataset_json_content(num_training: int) -> dict:
    """The arguments of nnU-Net's generate_dataset_json for this dataset (prepare writes it)."""
    return dict(channel_names=dict(CHANNEL_NAMES), labels=dict(LABELS), num_training_cases=num_training,
                file_ending=FILE_ENDING)


# ----------------------------------------------------------------------------- organizer folder
@dataclass
class OrganizerFiles:
    """What an organizer folder holds, by the rules above. `problems` lists, one line per problem
    and each naming its file, whatever does not fit them (nothing is read beyond names)."""
    src: Path
    train_image_dirs: List[Path] = field(default_factory=list)
    train_label_dir: Optional[Path] = None
    test_dir: Optional[Path] = None
    images: Dict[str, Path] = field(default_factory=dict)
    labels: Dict[str, Path] = field(default_factory=dict)
    tests: Dict[str, Path] = field(default_factory=dict)
    test_labels: Dict[str, Path] = field(default_factory=dict)  # ground truth of test cases, if given
    problems: List[str] = field(default_factory=list)

    @property
    def training_cases(self) -> List[str]:
        return sorted(self.images.keys() & self.labels.keys())

    @property
    def test_cases(self) -> List[str]:
        return sorted(self.tests.keys() - self.images.keys())


def _scan(folder: Path, pattern: _Pattern, found: Dict[str, Path], problems: List[str],
          also: Optional[_Pattern] = None, also_found: Optional[Dict[str, Path]] = None) -> None:
    """Add case -> file for the names in `folder` that follow `pattern` (or `also`, into
    `also_found`); report the other names and duplicate case ids."""
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue  # hidden files (.DS_Store, editors' swap files)
        case, into = pattern.case(f.name), found
        if case is None and also is not None:
            case, into = also.case(f.name), also_found
        if case is None:
            expected = pattern.example + (f" or {also.example}" if also else "")
            problems.append(f"{f}: unrecognised name (expected {expected})")
        elif case in into:
            problems.append(f"{f}: duplicate case id {case} (also {into[case]})")
        else:
            into[case] = f


def find_test_dir(src: Path) -> List[Path]:
    """The test folders beside the training folders, by the names above."""
    return [src / name for name in TEST_IMAGE_DIRS if (src / name).is_dir()]


def find_organizer_files(src, test_dir=None) -> OrganizerFiles:
    """Scan the organizer folder `src` (and `test_dir`, by default found in `src`)."""
    src = Path(src).expanduser().absolute()
    out = OrganizerFiles(src=src)
    problems = out.problems
    if not src.is_dir():
        problems.append(f"{src}: source folder does not exist")
        return out
    out.train_image_dirs = sorted(d for d in src.iterdir() if d.is_dir() and TRAIN_IMAGE_DIR.match(d.name))
    label_dirs = [src / n for n in TRAIN_LABEL_DIRS if (src / n).is_dir()]
    if not out.train_image_dirs:
        problems.append(f"{src}: no training image folder ({', '.join(ORGANIZER_TRAIN_IMAGE_DIRS)}, ...)")
    if len(label_dirs) == 1:
        out.train_label_dir = label_dirs[0]
    else:
        problems.append(f"{src}: expected one training label folder ({' or '.join(TRAIN_LABEL_DIRS)}), "
                        f"found {len(label_dirs)}")
    if test_dir is not None:
        test_dir = Path(test_dir).expanduser().absolute()
        if test_dir.is_dir():
            out.test_dir = test_dir
        else:
            problems.append(f"{test_dir}: test folder does not exist")
    else:
        candidates = find_test_dir(src)
        if len(candidates) > 1:
            problems.append(f"{src}: several test folders ({', '.join(c.name for c in candidates)}); "
                            f"name one with --test-dir")
        elif candidates:
            out.test_dir = candidates[0]

    for d in out.train_image_dirs:
        _scan(d, ORGANIZER_IMAGE, out.images, problems)
    if out.train_label_dir is not None:
        _scan(out.train_label_dir, ORGANIZER_LABEL, out.labels, problems)
    if out.test_dir is not None:
        _scan(out.test_dir, ORGANIZER_IMAGE, out.tests, problems, also=ORGANIZER_LABEL, also_found=out.test_labels)
    for name in TEST_LABEL_DIRS:  # test ground truth in a folder of its own (the phantom's testing_label)
        if (src / name).is_dir() and (src / name) != out.test_dir:
            for case, f in cases_in(src / name, ORGANIZER_LABEL).items():
                out.test_labels.setdefault(case, f)

    image_dirs = ", ".join(d.name for d in out.train_image_dirs) or "training_image*"
    label_dir = out.train_label_dir.name if out.train_label_dir else TRAIN_LABEL_DIRS[0]
    for case in sorted(out.labels.keys() - out.images.keys()):
        problems.append(f"{out.labels[case]}: label without an image (no {ORGANIZER_IMAGE.name(case)} in "
                        f"{image_dirs})")
    for case in sorted(out.images.keys() - out.labels.keys()):
        problems.append(f"{out.images[case]}: training image without a label (no {ORGANIZER_LABEL.name(case)} "
                        f"in {label_dir})")
    for case in sorted(out.tests.keys() & out.images.keys()):
        problems.append(f"{out.tests[case]}: duplicate case id {case} (also {out.images[case]})")
    if out.train_image_dirs and not out.images and not problems:
        problems.append(f"{src}: no training cases found")
    return out
