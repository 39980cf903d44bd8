"""Small classes decided where cross-validation says (issue 33): per-class decision offsets and a
has-calcium gate, chosen like nnU-Net chooses its postprocessing, stored beside it, applied by the
predictor of HeartTrainer models.

Choosing (`choose`, `nnunet-heart decision`, and the pipeline's best step after
nnUNetv2_find_best_configuration): the validation probabilities of every fold (`fold_F/validation/
CASE.npz`, written with --npz; for several models, their mean, as their ensemble) against nnU-Net's
reference copies (`$nnUNet_preprocessed/DATASET/gt_segmentations`), searched over `GRID` by
nnunet_heart_ext.kernels.decision.search (its docstring states the rule: coarse grid, capped
offsets, a minimum gain over nnU-Net's decision, ties to the smallest offsets, then to the largest
gate up to half of the smallest calcification of the validation cases). The
result goes to `heart_decision.json` beside `postprocessing.pkl` (the folder
`crossval_results_folds_F..` nnU-Net's find_best_configuration writes for these folds), with the
validation Dice per fold with and without it.

Applying: the predictor of a HeartTrainer model (nnUNetv2_predict, predict-ensemble) looks for the
file of its folds (`load_for`) and says in its log which decision applies; the export
(prediction_export.py) adds the offsets to the logits (exact: see the kernel's docstring) and
applies the gate on the label map at the case's original resolution, as the search did. Models of
other trainers, and the validation itself, keep nnU-Net's argmax. A file with zero offsets and no
gate is nnU-Net's decision, exactly; deleting the file (or `NNUNET_HEART_EXT_DECISION=0`) turns it
off.

Postprocessing (chosen with the decision, in the same pass over the validation). nnU-Net's own
choice (postprocessing.pkl) may keep only the largest component of the whole foreground (labels
1+2+3 as one region), or of the valve or the calcification alone. That is right on the validation
cases and can still delete a test case's whole calcification, or part of its valve, where they are
not connected to the muscle (seen on a demo seed: calcium Dice 0.833 -> 0.000). For HeartTrainer
models the extension's rule is the top AICUP teams': keep-largest never removes the small classes;
only the myocardium's largest component is kept, and only where that raises the myocardium's mean
Dice over the folds' validation cases (nnU-Net's rule for a per-class step, on nnU-Net's labels,
with nnU-Net's keep-largest function and its tp/fp/fn counts). The choice is written as
heart_postprocessing.pkl, in nnU-Net's format (nnU-Net's function and keyword arguments: plain
nnU-Net reads and applies it), beside nnU-Net's postprocessing.pkl, which stays as nnU-Net wrote it;
the pipeline applies heart_postprocessing.pkl, and so can a user
(`nnUNetv2_apply_postprocessing -pp_pkl_file .../heart_postprocessing.pkl`).
"""
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data import decision_file
from nnunet_heart_ext.data.decision_file import Postprocessing, enabled
from nnunet_heart_ext.data.files import replace_atomically, sweep
from nnunet_heart_ext.kernels.decision import CaseCounts, Decision, Grid, reduce_case, search

DECISION_FILE = ds.DECISION
MYOCARDIUM = ds.LABELS["myocardium"]

VALVE, CALCIUM = ds.LABELS["aortic_valve"], ds.LABELS["calcification"]
# offsets of the small classes (log-probability units: 0.5 scales a probability by 1.65, 2.0 by 7.4;
# the cap is the grid's largest value), the gate's thresholds in mm3 (a calcification of the
# organizers' data is a few to a few hundred voxels of ~0.3 mm3)
GRID = Grid({VALVE: (0.0, 0.25, 0.5, 1.0, 1.5), CALCIUM: (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}, gated=CALCIUM,
            gates_mm3=(0.0, 1.0, 2.0, 5.0, 10.0, 20.0), min_gain=0.002)


def crossval_folder(model_folder: Path, folds: Sequence) -> Path:
    """Where nnUNetv2_find_best_configuration puts a model's postprocessing.pkl for these folds."""
    return Path(model_folder) / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"


# ----------------------------------------------------------------------------- the file
def load_for(model_folder: Path, folds: Sequence) -> Optional[Decision]:
    """The decision chosen for this model and these folds, if one was (and decisions are on)."""
    path = crossval_folder(model_folder, folds) / DECISION_FILE
    if not enabled() or not path.is_file():
        return None
    return decision_file.read(path).decision


# ----------------------------------------------------------------------------- choosing
def _validation_cases(model_folders: Sequence[Path], folds: Sequence) -> List[tuple]:
    """(fold, case, [npz of each model]) of every validation case of every fold."""
    out = []
    for fold in folds:
        folders = [Path(m) / ds.fold_folder(fold) / ds.VALIDATION_FOLDER for m in model_folders]
        cases = sorted(ds.cases_in(folders[0], ds.PROBABILITIES))
        if not cases:
            raise FileNotFoundError(f"{folders[0]}: no validation probabilities ({ds.PROBABILITIES.example}); "
                                    f"train or validate with --npz")
        for case in cases:
            files = [f / ds.PROBABILITIES.name(case) for f in folders]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{missing[0]}: missing (every model needs the fold's validation .npz)")
            out.append((fold, case, files))
    return out


def _reference(gt_folder: Path, case: str):
    """(labels, voxel volume in mm3) of a case's reference, read with nnU-Net's reader."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    seg, properties = SimpleITKIO().read_seg(str(gt_folder / ds.RAW_LABEL.name(case)))
    return seg[0], float(np.prod(properties["spacing"]))


@dataclass(frozen=True)
class KeepLargestCase:
    """One validation case's myocardium Dice (nnU-Net's labels) without and with keep-largest of
    the myocardium (NaN: the myocardium in neither the reference nor the prediction)."""
    fold: int
    case: str
    dice_without: float
    dice_with: float


@dataclass(frozen=True)
class ReducedValidation:
    """The folds' validation, reduced in one pass: for the decision's search, and for the
    postprocessing's choice."""
    cases: List[CaseCounts]
    keep_largest: List[KeepLargestCase]


def _dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    """nnU-Net's Dice of one label (its tp/fp/fn; NaN where the label is in neither)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == label, prediction == label)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan")


def keep_largest_case(fold: int, case: str, probabilities: np.ndarray, reference: np.ndarray) -> KeepLargestCase:
    """What keep-largest of the myocardium does to one case's nnU-Net labels (argmax), with nnU-Net's
    function (the extension's kernel under nnU-Net's name)."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    kept = remove_all_but_largest_component_from_segmentation(labels, MYOCARDIUM)
    return KeepLargestCase(int(fold), case, _dice(reference, labels, MYOCARDIUM), _dice(reference, kept, MYOCARDIUM))


def reduce_validation(model_folders: Sequence[Path], folds: Sequence, gt_folder: Path, grid: Grid) -> ReducedValidation:
    """Every validation case reduced for the search and the postprocessing (the models' mean probabilities)."""
    from tqdm import tqdm

    cases, keep_largest = [], []
    n_classes = len(ds.LABEL_VALUES)
    for fold, case, files in tqdm(_validation_cases(model_folders, folds), desc="decision: reading validation",
                                  unit="case", mininterval=5):
        probabilities = None
        for f in files:
            p = np.load(f)["probabilities"].astype(np.float32)
            probabilities = p if probabilities is None else probabilities + p
        probabilities /= len(files)
        reference, voxel_mm3 = _reference(gt_folder, case)
        if reference.shape != probabilities.shape[1:]:
            raise ValueError(f"{files[0]}: probabilities of shape {probabilities.shape[1:]} but the reference "
                             f"{gt_folder / ds.RAW_LABEL.name(case)} has {reference.shape}")
        keep_largest.append(keep_largest_case(fold, case, probabilities, reference))
        cases.append(reduce_case(probabilities, reference, int(fold), voxel_mm3, grid.offset_range(n_classes),
                                 grid.gated))
    return ReducedValidation(cases, keep_largest)


def choose_postprocessing(cases: Sequence[KeepLargestCase], nnunet_chose: str = "") -> Postprocessing:
    """Keep-largest of the myocardium where it raises the myocardium's mean Dice over the cases
    (NaN left out, as nnU-Net's summary does; strictly, as nnU-Net's rule), else no postprocessing."""
    without = [c.dice_without for c in cases if not np.isnan(c.dice_without)]
    with_ = [c.dice_with for c in cases if not np.isnan(c.dice_with)]
    mean_without = float(np.mean(without)) if without else float("nan")
    mean_with = float(np.mean(with_)) if with_ else float("nan")
    keep = bool(without and with_ and mean_with > mean_without)
    return Postprocessing((MYOCARDIUM,) if keep else (), mean_without, mean_with, nnunet_chose)


def nnunet_postprocessing_steps(pkl: Path) -> str:
    """nnU-Net's postprocessing.pkl in words ('' where there is none or it cannot be read)."""
    try:
        with open(pkl, "rb") as f:
            fns, kwargs = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError):
        return ""
    if not fns:
        return "nothing"
    return "; ".join(f"{getattr(fn, '__name__', fn)}({', '.join(f'{k}={_plain(v)!r}' for k, v in kw.items())})"
                     for fn, kw in zip(fns, kwargs))


def _plain(value):
    """numpy's integers (nnU-Net's label lists hold them) as Python's, for the description."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def write_postprocessing(path: Path, chosen: Postprocessing) -> Path:
    """heart_postprocessing.pkl in nnU-Net's format (what determine_postprocessing pickles: its
    functions and their keyword arguments), atomically."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    fns = [remove_all_but_largest_component_from_segmentation for _ in chosen.keep_largest]
    kwargs = [{"labels_or_regions": int(label)} for label in chosen.keep_largest]

    def dump(tmp: Path):
        with open(tmp, "wb") as f:
            pickle.dump((fns, kwargs), f)

    return replace_atomically(dump, Path(path))


def choose(model_folders: Sequence[Path], folds: Sequence, gt_folder: Path, out_folder: Optional[Path] = None,
           grid: Grid = GRID) -> Path:
    """Search the decision on the folds' validation, choose the postprocessing with it, and write
    heart_postprocessing.pkl, then heart_decision.json (default: beside the single model's
    postprocessing.pkl of these folds); returns the json's path."""
    model_folders = [Path(m) for m in model_folders]
    if out_folder is None:
        if len(model_folders) != 1:
            raise ValueError("several models (an ensemble): name the folder of its postprocessing.pkl with -o")
        out_folder = crossval_folder(model_folders[0], folds)
    out_folder = Path(out_folder)
    sweep(out_folder)  # what a killed run of this command left half-written (its writer gone)
    reduced = reduce_validation(model_folders, folds, Path(gt_folder), grid)
    choice = search(reduced.cases, grid, len(ds.LABEL_VALUES))
    postprocessing = choose_postprocessing(reduced.keep_largest,
                                           nnunet_postprocessing_steps(out_folder / ds.NNUNET_POSTPROCESSING))
    pkl = write_postprocessing(out_folder / ds.HEART_POSTPROCESSING, postprocessing)
    # the json last: a complete heart_decision.json means its postprocessing file is complete too
    path = decision_file.write(out_folder / DECISION_FILE, choice, model_folders, folds, grid, postprocessing)
    print(f"decision: {describe(choice.decision)} (a gate's ties went to at most {choice.gate_cap_mm3:g} mm3, "
          f"{grid.gate_tie_fraction:g} x the smallest calcification of the validation cases); mean foreground "
          f"Dice on validation {choice.objective_without:.4f} (nnU-Net's argmax) -> {choice.objective_with:.4f} ({path})", flush=True)
    print(f"postprocessing: {postprocessing.summary()}; apply with nnUNetv2_apply_postprocessing -pp_pkl_file {pkl}",
          flush=True)
    return path


def describe(decision: Optional[Decision]) -> str:
    """The decision in words, for the logs."""
    return decision_file.DecisionFile(decision or Decision.nnunet(len(ds.LABEL_VALUES))).describe()
