"""`heart_decision.json`: the decision offsets and has-calcium gate chosen on cross-validation
(nnunet_heart_ext/nnunet/decision.py chooses them; the predictor and the pipeline read them), with
what they bought on each fold's validation. One record, `DecisionFile`, read and written here.

    {"format": 3, "offsets": {"2": 0.5, "3": 1.0}, "gated_label": 3, "gate_mm3": 2.0, "gate_cap_mm3": 20.5,
     "models": [...], "folds": [0, 1, 2, 3, 4],
     "validation_dice": {"0": {"nnunet": {"1": .., "2": .., "3": ..}, "with_decision": {...}}, ...},
     "mean_foreground_dice": {"nnunet": .., "with_decision": ..}, "grid": {...}, "rule": "...",
     "postprocessing": {"file": "heart_postprocessing.pkl", "keep_largest": [1],
                        "dice": {"without": .., "with": ..}, "nnunet_chose": "...", "rule": "..."}}

Beside it, `heart_postprocessing.pkl` (nnU-Net's format, read by nnUNetv2_apply_postprocessing): the
postprocessing of HeartTrainer models, keep-largest for the myocardium only. Which postprocessing
file applies, and whether the decision does, is stated here (`postprocessing_to_apply`, `enabled`).

`format` is the version of the rule that chose the file (`FORMAT`, what changed at each in `CHANGES`):
the pipeline's best step chooses again where a file is older than the rule it would apply. Files
written before the field are read by what they hold: gate_cap_mm3 from format 3 on, postprocessing
from format 2 on.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.files import write_text
from nnunet_heart_ext.kernels.decision import Choice, Decision, Grid

RULE = ("argmax_c(log p_c + offset_c); a case keeps the gated label only if its voxels add up to gate_mm3; "
        "chosen on the folds' validation: the best mean over folds of nnU-Net's mean foreground Dice, zero offsets "
        "unless beaten by min_gain, ties to the smallest offsets, then to the largest gate up to gate_cap_mm3 "
        "(gate_tie_fraction x the smallest volume of the gated label in a validation case that holds it)")
POSTPROCESSING_RULE = ("keep-largest never removes the small classes (aortic valve, calcification): only the "
                       "myocardium's largest component is kept, and only where that raises its mean Dice over the "
                       "folds' validation cases (nnU-Net's labels; nnU-Net's rule for a per-class step)")
FORMAT = 3  # raise it, saying what changed in CHANGES, where a rule change should make the pipeline choose again
CHANGES = {1: "offsets and a has-calcium gate",
           2: "heart_postprocessing.pkl chosen with the decision",
           3: "the gate's ties go to the largest gate up to gate_cap_mm3"}
OFF_ENV = "NNUNET_HEART_EXT_DECISION"  # 0: neither the decision nor heart_postprocessing.pkl applies


def enabled() -> bool:
    """Whether decision files (and the postprocessing chosen with them) apply."""
    return os.environ.get(OFF_ENV, "1").strip() not in ("0",)


def postprocessing_to_apply(nnunet_pkl: Path) -> Path:
    """The postprocessing applied to a model's (or ensemble's) predictions: heart_postprocessing.pkl
    where the decision step wrote one beside nnU-Net's postprocessing.pkl (and decisions are on),
    else nnU-Net's."""
    heart = Path(nnunet_pkl).parent / ds.HEART_POSTPROCESSING
    return heart if enabled() and heart.is_file() else Path(nnunet_pkl)


@dataclass(frozen=True)
class Postprocessing:
    """The postprocessing chosen with the decision: keep-largest of these labels (empty: none),
    the myocardium's mean validation Dice without and with it, and what nnU-Net's own
    postprocessing.pkl did, in words."""
    keep_largest: Tuple[int, ...] = ()
    dice_without: float = math.nan
    dice_with: float = math.nan
    nnunet_chose: str = ""

    def describe(self) -> str:
        if not self.keep_largest:
            return "no keep-largest"
        return "keep-largest of " + ", ".join(ds.CLASSES.get(c, str(c)) for c in self.keep_largest)

    def summary(self) -> str:
        """What was chosen, what it bought on validation, and what nnU-Net had chosen, in one line."""
        return (f"{self.describe()}, the small classes never removed (the myocardium's mean validation Dice "
                f"{self.dice_without:.4f} without, {self.dice_with:.4f} with; nnU-Net's postprocessing.pkl: "
                f"{self.nnunet_chose or 'not found'})")


@dataclass(frozen=True)
class DecisionFile:
    """What a heart_decision.json holds."""
    decision: Decision
    folds: List = field(default_factory=list)
    models: List[str] = field(default_factory=list)
    dice: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)  # fold -> nnunet|with_decision -> label -> Dice
    dice_without: float = math.nan  # the mean over folds of nnU-Net's mean foreground Dice, argmax
    dice_with: float = math.nan     # the same with the decision
    postprocessing: Optional[Postprocessing] = None  # written with heart_postprocessing.pkl (files before it: None)
    gate_cap_mm3: Optional[float] = None  # the largest gate a tie could go to (files before that rule: None)
    format: int = FORMAT  # the rule that chose it (CHANGES)

    def outdated(self) -> Optional[str]:
        """Why the rule of this version would choose differently (None when the file is of this
        version or newer): what changed since the file's rule."""
        if self.format >= FORMAT:
            return None
        return (f"format {self.format}, chosen before " +
                "; ".join(CHANGES[v] for v in range(self.format + 1, FORMAT + 1)))

    def fold_rows(self) -> List[Tuple[str, str, Tuple[float, ...]]]:
        """(fold, "nnunet" | "with_decision", Dice per class of ds.CLASSES) for each fold in its
        number's order, argmax first; a class without a Dice (in neither reference nor
        prediction, or not in the file) is NaN."""
        rows = []
        for fold in sorted(self.dice, key=lambda f: (not str(f).isdigit(), int(f) if str(f).isdigit() else 0, str(f))):
            for key in ("nnunet", "with_decision"):
                per_label = self.dice[fold].get(key, {})
                rows.append((str(fold), key, tuple(float(per_label.get(str(c), math.nan)) for c in ds.CLASSES)))
        return rows

    def describe(self) -> str:
        d = self.decision
        if d.is_nnunet:
            return "nnU-Net's argmax (no offsets, no gate)"
        offsets = ", ".join(f"{ds.CLASSES.get(c, c)} {b:+g}" for c, b in enumerate(d.offsets) if c and b)
        gate = f"; {ds.CLASSES.get(d.gated, d.gated)} kept from {d.gate_mm3:g} mm3" \
            if d.gated is not None and d.gate_mm3 > 0 else ""
        return f"offsets {offsets or 'none'}{gate}"


def read(path: Path) -> DecisionFile:
    """The record of a heart_decision.json (ValueError naming the file if it is not one)."""
    try:
        content = json.loads(Path(path).read_text())
        given = {int(c): float(b) for c, b in content["offsets"].items()}
        offsets = tuple(given.get(c, 0.0) for c in range(max(given, default=0) + 1))
        gated = content.get("gated_label")
        decision = Decision(offsets if len(offsets) > 1 else (0.0,), None if gated is None else int(gated),
                            float(content.get("gate_mm3", 0.0)))
        means = content.get("mean_foreground_dice", {})
        pp = content.get("postprocessing")
        postprocessing = None if pp is None else Postprocessing(
            tuple(int(c) for c in pp["keep_largest"]), float(pp["dice"]["without"]), float(pp["dice"]["with"]),
            str(pp.get("nnunet_chose", "")))
        return DecisionFile(decision, list(content.get("folds", [])), list(content.get("models", [])),
                            dict(content.get("validation_dice", {})), float(means.get("nnunet", math.nan)),
                            float(means.get("with_decision", math.nan)), postprocessing,
                            None if content.get("gate_cap_mm3") is None else float(content["gate_cap_mm3"]),
                            int(content.get("format", _format_by_content(content))))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a decision file ({type(e).__name__}: {e})") from None


def _format_by_content(content: dict) -> int:
    """The format of a file written before `format` was: the newest whose field it holds."""
    return 3 if content.get("gate_cap_mm3") is not None else 2 if content.get("postprocessing") is not None else 1


def write(path: Path, choice: Choice, models: Sequence, folds: Sequence, grid: Grid,
          postprocessing: Optional[Postprocessing] = None) -> Path:
    """Write the search's choice (and what it bought) atomically; `postprocessing`: the one chosen
    with it, written before this file as heart_postprocessing.pkl beside it."""
    d = choice.decision
    labels = [str(c) for c in ds.CLASSES]
    content = {
        "format": FORMAT,
        "offsets": {str(c): b for c, b in enumerate(d.offsets) if c > 0},
        "gated_label": d.gated, "gate_mm3": d.gate_mm3, "gate_cap_mm3": choice.gate_cap_mm3,
        "models": [str(m) for m in models], "folds": list(folds),
        "validation_dice": {str(f): {"nnunet": dict(zip(labels, choice.without[f])),
                                     "with_decision": dict(zip(labels, choice.with_decision[f]))}
                            for f in sorted(choice.without)},
        "mean_foreground_dice": {"nnunet": choice.objective_without, "with_decision": choice.objective_with},
        "grid": {"offsets": {str(c): list(v) for c, v in grid.offsets.items()}, "gated_label": grid.gated,
                 "gates_mm3": list(grid.gates_mm3), "min_gain": grid.min_gain,
                 "gate_tie_fraction": grid.gate_tie_fraction, "settings_tried": choice.settings_tried},
        "rule": RULE,
    }
    if postprocessing is not None:
        content["postprocessing"] = {
            "file": ds.HEART_POSTPROCESSING, "keep_largest": list(postprocessing.keep_largest),
            "dice": {"label": ds.LABELS["myocardium"], "without": postprocessing.dice_without,
                     "with": postprocessing.dice_with},
            "nnunet_chose": postprocessing.nnunet_chose, "rule": POSTPROCESSING_RULE}
    return write_text(json.dumps(content, indent=1), Path(path))
