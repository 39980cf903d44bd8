"""Reading the JSON files nnU-Net's commands write: the plans, splits_final.json, a validation's
summary.json (and the demo's test score, the same format) and inference_information.json; and the
split nnU-Net's trainer writes when splits_final.json is missing (`nnunet_split`).

One reader per file, each giving what the pipeline uses of it. A file that cannot be read (cut
short, not JSON) or lacks what nnU-Net puts in it raises a PipelineError that names the file, so
that --status and the steps say which file to look at instead of failing with a bare KeyError.
"""
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline.errors import PipelineError


def _read(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


@contextmanager
def _fields(path: Path, what: str):
    """Turns a missing or mistyped field met while reading `path` into a PipelineError naming it."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise PipelineError(f"{path} is not {what} as nnU-Net writes it ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- plans
class Plans:
    """nnU-Net's plans (PLANS.json in nnUNet_preprocessed, plans.json beside a model's folds)."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content = Path(path), content

    @property
    def configurations(self) -> List[str]:
        return list(self.content["configurations"])

    def data_identifier(self, config: str) -> str:
        """nnU-Net's data identifier of `config`, following `inherits_from` as PlansManager does."""
        with _fields(self.path, "a plans file"):
            configurations = self.content["configurations"]
            configuration = configurations[config]
            while "data_identifier" not in configuration and "inherits_from" in configuration:
                configuration = configurations[configuration["inherits_from"]]
            return configuration["data_identifier"]

    def __eq__(self, other) -> bool:
        return isinstance(other, Plans) and self.content == other.content


def read_plans(path: Path) -> Plans:
    content = _read(path, "the plans")
    with _fields(path, "a plans file"):
        if not isinstance(content["configurations"], dict):
            raise TypeError("'configurations' is not an object")
    return Plans(path, content)


# ----------------------------------------------------------------------------- splits_final.json
SPLIT_SEED, N_FOLDS = 12345, 5  # nnUNetTrainer.do_split's default split


def nnunet_split(cases: List[str]) -> List[dict]:
    """nnU-Net's default 5-fold split of these training cases, as nnUNetTrainer.do_split makes it when
    splits_final.json is missing (generate_crossval_split of the sorted ids, seed 12345)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(cases), seed=SPLIT_SEED, n_splits=N_FOLDS)


def read_splits(path: Path) -> List[Dict[str, List[str]]]:
    """Each fold's {"train": [...], "val": [...]} case ids."""
    splits = _read(path, "the split")
    with _fields(path, "a split (a list of folds, each with train and val cases)"):
        return [dict(train=list(s["train"]), val=list(s["val"])) for s in splits]


def validation_cases(path: Path, fold: int) -> List[str]:
    """The validation cases of `fold` (none for a fold the split does not have)."""
    splits = read_splits(path)
    return splits[fold]["val"] if fold < len(splits) else []


# ----------------------------------------------------------------------------- summary.json
def read_summary(path: Path) -> dict:
    """A summary.json of nnU-Net's compute_metrics_on_folder (a fold's validation, the demo's
    test score): metric_per_case, mean per label, foreground_mean."""
    summary = _read(path, "the metrics")
    with _fields(path, "a metrics summary"):
        if not isinstance(summary, dict):
            raise TypeError("not an object")
    return summary


def metric_per_case(path: Path) -> List[Dict[str, Dict[str, float]]]:
    """Per validation case: label -> metric -> value (Dice is NaN where neither the reference nor
    the prediction holds the label)."""
    summary = read_summary(path)
    with _fields(path, "a metrics summary"):
        return [dict(case["metrics"]) for case in summary["metric_per_case"]]


def dice_per_class(path: Path) -> Tuple[Dict[int, float], float]:
    """The mean Dice of each foreground class (NaN where the summary has none) and their mean."""
    summary = read_summary(path)
    with _fields(path, "a metrics summary"):
        return ({k: summary["mean"].get(str(k), {}).get("Dice", float("nan")) for k in ds.CLASSES},
                summary["foreground_mean"]["Dice"])


# ----------------------------------------------------------------------------- inference_information.json
@dataclass
class InferenceInformation:
    """What nnUNetv2_find_best_configuration compared and chose."""
    considered: List[str]              # the compared models' results folder names
    folds: List[int]
    selected: List[Dict[str, str]]     # the chosen model(s): trainer, plans_identifier, configuration
    postprocessing_file: Path          # the best's postprocessing.pkl
    some_plans_file: Path              # a plans.json of the best (its dataset.json lies beside it)
    all_results: Dict[str, object]     # each candidate's score


def _here(info_file: Path, recorded: str) -> Path:
    """A path nnU-Net recorded in inference_information.json (absolute, where the run was then),
    taken below this json's own dataset folder: a work folder copied or moved (another mount on a
    cluster node, a copy to try something) reads and writes its own files, never the original's."""
    recorded_path, dataset_dir = Path(recorded), Path(info_file).parent
    parts = recorded_path.parts
    if dataset_dir.name not in parts:
        return recorded_path
    below = parts[len(parts) - parts[::-1].index(dataset_dir.name):]
    return dataset_dir.joinpath(*below)


def read_inference_information(path: Path) -> InferenceInformation:
    info = _read(path, "the best configuration")
    with _fields(path, "inference information"):
        best = info["best_model_or_ensemble"]
        return InferenceInformation(
            considered=[ds.model_folder(m["trainer"], m["plans"], m["configuration"])
                        for m in info["considered_models"]],
            folds=[int(f) for f in info["folds"]],
            selected=[dict(trainer=m["trainer"], plans_identifier=m["plans_identifier"],
                           configuration=m["configuration"]) for m in best["selected_model_or_models"]],
            postprocessing_file=_here(path, best["postprocessing_file"]),
            some_plans_file=_here(path, best["some_plans_file"]),
            all_results=dict(info["all_results"]))


# ----------------------------------------------------------------------------- heart_decision.json
def read_decision(path: Path):
    """The decision (data/decision_file.DecisionFile) the best step chose, or a PipelineError naming the file."""
    from nnunet_heart_ext.data import decision_file

    try:
        return decision_file.read(path)
    except ValueError as e:
        raise PipelineError(str(e)) from None
