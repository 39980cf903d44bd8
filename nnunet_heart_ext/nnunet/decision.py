"""Small classes decided where cross-validation says (issue 33): per-class decision offsets and a
has-calcium gate, chosen like nnU-Net chooses its postprocessing, stored beside it, applied by the
predictor of HeartTrainer models.

Choosing (`choose`, `nnunet-heart decision`, and the pipeline's best step after
nnUNetv2_find_best_configuration): the validation probabilities of every fold (`fold_F/validation/
CASE.npz`, written with --npz; for several models, their mean, as their ensemble) against nnU-Net's
reference copies (`$nnUNet_preprocessed/DATASET/gt_segmentations`), searched over `GRID` by
nnunet_heart_ext.kernels.decision.search (its docstring states the rule: coarse grid, capped
offsets, a minimum gain over nnU-Net's decision, ties to the smallest offsets and gate). The
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
"""
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data import decision_file
from nnunet_heart_ext.kernels.decision import CaseCounts, Decision, Grid, reduce_case, search

DECISION_FILE = ds.DECISION
OFF_ENV = "NNUNET_HEART_EXT_DECISION"  # 0: never apply a decision file

VALVE, CALCIUM = ds.LABELS["aortic_valve"], ds.LABELS["calcification"]
# offsets of the small classes (log-probability units: 0.5 scales a probability by 1.65, 2.0 by 7.4;
# the cap is the grid's largest value), the gate's thresholds in mm3 (a calcification of the
# organizers' data is a few to a few hundred voxels of ~0.3 mm3)
GRID = Grid({VALVE: (0.0, 0.25, 0.5, 1.0, 1.5), CALCIUM: (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}, gated=CALCIUM,
            gates_mm3=(0.0, 1.0, 2.0, 5.0, 10.0, 20.0), min_gain=0.002)


def crossval_folder(model_folder: Path, folds: Sequence) -> Path:
    """Where nnUNetv2_find_best_configuration puts a model's postprocessing.pkl for these folds."""
    return Path(model_folder) / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"


def enabled() -> bool:
    return os.environ.get(OFF_ENV, "1").strip() not in ("0",)


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


def reduce_validation(model_folders: Sequence[Path], folds: Sequence, gt_folder: Path, grid: Grid) -> List[CaseCounts]:
    """Every validation case reduced for the search (the models' mean probabilities)."""
    from tqdm import tqdm

    cases = []
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
        cases.append(reduce_case(probabilities, reference, int(fold), voxel_mm3, grid.offset_range(n_classes),
                                 grid.gated))
    return cases


def choose(model_folders: Sequence[Path], folds: Sequence, gt_folder: Path, out_folder: Optional[Path] = None,
           grid: Grid = GRID) -> Path:
    """Search the decision on the folds' validation and write heart_decision.json (default: beside
    the single model's postprocessing.pkl of these folds); returns its path."""
    model_folders = [Path(m) for m in model_folders]
    if out_folder is None:
        if len(model_folders) != 1:
            raise ValueError("several models (an ensemble): name the folder of its postprocessing.pkl with -o")
        out_folder = crossval_folder(model_folders[0], folds)
    cases = reduce_validation(model_folders, folds, Path(gt_folder), grid)
    choice = search(cases, grid, len(ds.LABEL_VALUES))
    path = decision_file.write(Path(out_folder) / DECISION_FILE, choice, model_folders, folds, grid)
    print(f"decision: {describe(choice.decision)}; mean foreground Dice on validation "
          f"{choice.objective_without:.4f} (nnU-Net's argmax) -> {choice.objective_with:.4f} ({path})", flush=True)
    return path


def describe(decision: Optional[Decision]) -> str:
    """The decision in words, for the logs."""
    return decision_file.DecisionFile(decision or Decision.nnunet(len(ds.LABEL_VALUES))).describe()
