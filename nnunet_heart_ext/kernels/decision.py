"""The decision that turns class probabilities into labels, with per-class offsets and a gate on
the smallest class, and the search that chooses them on cross-validation.

Maths. nnU-Net labels a voxel argmax_c p_c. With offsets b (b_background = 0) the label is

    argmax_c (log p_c + b_c)

(b_c = log w_c scales class c's probability by w_c: the AICUP teams' x1.15 is b = 0.14; b = 0 is
nnU-Net's decision). Since log p_c = z_c - logsumexp(z) for logits z, the offsets can be added to
the logits instead, exactly; and since order-1 resampling is a convex combination per voxel, adding
them before nnU-Net's export resampling gives the same labels as adding them after.

The gate (a has-calcium decision per case): a case keeps the gated class only when the voxels
labelled with it (after the offsets) add up to at least `gate_mm3`; otherwise none of its voxels
takes that class (its offset becomes -inf, so each such voxel takes the best of the others).

Search. For each validation case, the voxels whose label could differ between two settings of the
grid are few: a voxel's winner w at zero offsets loses to c only if log p_w - log p_c is smaller
than the grid's range of offsets. Those voxels (and every voxel the gated class wins, which the
gate may relabel) are kept with their log-probabilities; every other voxel's label is fixed and only
counted. Each setting (offsets from the grid, one gate threshold) is then scored on the kept voxels
plus the fixed counts, exactly as on the whole volumes, and ranked by nnU-Net's measure: the mean
over foreground classes of the mean over the validation cases of Dice (a case where a class is in
neither the reference nor the prediction has no Dice for it: NaN, left out), averaged over folds.
Overfitting guards: a coarse grid, a minimum gain over nnU-Net's decision (`min_gain`, else zero
offsets), ties broken towards the smallest offsets.

The gate's ties. Where the validation cannot tell two gates apart (no validation case's score
changes between them, the usual case: a fold holds a few calcified cases and rarely a
calcium-free case with one stray calcium voxel), the search takes the LARGEST gate up to the cap

    cap = gate_tie_fraction * (the smallest volume of the gated class in a validation case that holds it)

(half by default; 0 where no validation case holds it, and then ties go to no gate). A gate larger
than the cap is taken only where it scores strictly better. Reason: a stray prediction of the
small class in a case without it scores 0 for that case (the case's Dice turns from NaN to 0)
and halves a small test set's mean, while a gate below half of every calcification seen keeps any
calcified case whose prediction finds at least half of the smallest one. This applies with
whichever offsets are chosen, nnU-Net's zero offsets too (their gate must then not lose anything
on validation): a decision of zero offsets is then nnU-Net's argmax plus the gate.
"""
import itertools
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

NEG = -1e30  # an offset no probability overcomes (the gate's -inf, finite for float arithmetic)
TIE = 1e-12  # objectives closer than this are equal (the tie rules decide between them)


@dataclass(frozen=True)
class Decision:
    """Offsets per class (index = class, background 0 first) and the gate on class `gated`
    (None: no gate) at `gate_mm3` cubic millimetres."""
    offsets: Tuple[float, ...]
    gated: Optional[int] = None
    gate_mm3: float = 0.0

    @classmethod
    def nnunet(cls, n_classes: int) -> "Decision":
        """nnU-Net's own decision: argmax, no gate."""
        return cls(tuple(0.0 for _ in range(n_classes)))

    @property
    def is_nnunet(self) -> bool:
        return all(b == 0 for b in self.offsets) and (self.gated is None or self.gate_mm3 <= 0)


def labels(log_probabilities: np.ndarray, decision: Decision, voxel_mm3: float = 1.0) -> np.ndarray:
    """The labels of one case: log_probabilities (C, ...) (or logits) -> argmax with the
    decision's offsets and gate (uint8 for fewer than 256 classes)."""
    b = np.asarray(decision.offsets, dtype=log_probabilities.dtype).reshape((-1,) + (1,) * (log_probabilities.ndim - 1))
    out = np.argmax(log_probabilities + b, axis=0)
    if decision.gated is not None and decision.gate_mm3 > 0:
        if np.count_nonzero(out == decision.gated) * voxel_mm3 < decision.gate_mm3:
            b = b.copy()
            b[decision.gated] = NEG
            out = np.argmax(log_probabilities + b, axis=0)
    return out.astype(np.uint8 if log_probabilities.shape[0] < 256 else np.uint16)


@dataclass
class CaseCounts:
    """One validation case reduced to what the search needs: the voxels whose label can change
    (their log-probabilities and reference labels) and the counts of every other voxel."""
    fold: int
    voxel_mm3: float
    log_p: np.ndarray          # (C, K): the K voxels whose label can change, float32
    ref: np.ndarray            # (K,): their reference labels
    fixed_pred: np.ndarray     # (C,): voxels outside them labelled c
    fixed_ref: np.ndarray      # (C,): voxels outside them with reference c
    fixed_tp: np.ndarray       # (C,): voxels outside them labelled c with reference c

    @cached_property
    def reference_counts(self) -> np.ndarray:
        """(C,): the case's reference voxels of each class (the same under every setting)."""
        n = self.fixed_ref.shape[0]
        return self.fixed_ref + np.bincount(self.ref, minlength=n)[:n]


def reduce_case(probabilities: np.ndarray, reference: np.ndarray, fold: int, voxel_mm3: float,
                offset_range: float, gated: Optional[int]) -> CaseCounts:
    """`probabilities` (C, ...) and `reference` (...) of one validation case -> CaseCounts for a grid
    whose offsets span `offset_range` (max offset - min offset over every class)."""
    n = probabilities.shape[0]
    p = probabilities.reshape(n, -1)
    ref = reference.reshape(-1)
    top2 = np.partition(p, n - 2, axis=0)[n - 2:]  # the two largest probabilities per voxel
    winner = np.argmax(p, axis=0)
    with np.errstate(divide="ignore"):
        gap = np.log(top2[1]) - np.log(top2[0])  # >= 0; inf where the runner-up is 0
    keep = gap <= offset_range + 1e-6
    if gated is not None:
        keep |= winner == gated
    fixed = ~keep
    fixed_pred = np.bincount(winner[fixed], minlength=n)[:n]
    fixed_ref = np.bincount(ref[fixed].astype(np.int64), minlength=n)[:n]
    fixed_tp = np.bincount(winner[fixed & (winner == ref)], minlength=n)[:n]
    with np.errstate(divide="ignore"):
        log_p = np.log(p[:, keep]).astype(np.float32)
    return CaseCounts(fold, voxel_mm3, np.maximum(log_p, np.float32(-1e4)), ref[keep].astype(np.int64),
                      fixed_pred, fixed_ref, fixed_tp)


def _case_dice(case: CaseCounts, b: np.ndarray, gated: Optional[int], gate_mm3: float) -> np.ndarray:
    """Dice of each class (NaN where the class is in neither) of one case under offsets b."""
    n = b.shape[0]
    lab = np.argmax(case.log_p + b[:, None], axis=0)
    if gated is not None and gate_mm3 > 0:
        count = case.fixed_pred[gated] + np.count_nonzero(lab == gated)
        if count * case.voxel_mm3 < gate_mm3:
            b = b.copy()
            b[gated] = NEG
            lab = np.argmax(case.log_p + b[:, None], axis=0)
    pred = case.fixed_pred + np.bincount(lab, minlength=n)[:n]
    refc = case.reference_counts
    tp = case.fixed_tp + np.bincount(lab[lab == case.ref], minlength=n)[:n]
    denominator = (pred + refc).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def score(cases: Sequence[CaseCounts], decision: Decision) -> Dict[int, np.ndarray]:
    """Per fold: the mean Dice of each foreground class over its cases (NaN where no case has it)."""
    b = np.asarray(decision.offsets, dtype=np.float32)
    per_fold: Dict[int, List[np.ndarray]] = {}
    for case in cases:
        per_fold.setdefault(case.fold, []).append(_case_dice(case, b, decision.gated, decision.gate_mm3)[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class in no case of a fold: NaN, as nnU-Net
        return {fold: np.nanmean(np.stack(d), axis=0) for fold, d in per_fold.items()}


def objective(per_fold: Dict[int, np.ndarray]) -> float:
    """nnU-Net's measure averaged over folds: the mean over foreground classes (NaN classes left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean([np.nanmean(d) for d in per_fold.values()]))


@dataclass
class Grid:
    """The settings tried: offsets per foreground class (class -> values, 0 included; a class not
    named keeps 0), the gate thresholds in mm3 for class `gated` (0: no gate)."""
    offsets: Dict[int, Tuple[float, ...]]
    gated: Optional[int] = None
    gates_mm3: Tuple[float, ...] = (0.0,)
    min_gain: float = 0.002
    gate_tie_fraction: float = 0.5  # ties go to the largest gate <= this x the smallest gated-class volume

    def gate_cap_mm3(self, cases: Sequence["CaseCounts"]) -> float:
        """The largest gate a tie may go to: gate_tie_fraction x the smallest volume (mm3) of the gated
        class among the validation cases whose reference holds it (0: no gate, or no such case)."""
        if self.gated is None:
            return 0.0
        volumes = [int(c.reference_counts[self.gated]) * c.voxel_mm3 for c in cases]
        present = [v for v in volumes if v > 0]
        return self.gate_tie_fraction * min(present) if present else 0.0

    def offset_range(self, n_classes: int) -> float:
        values = [v for c in range(1, n_classes) for v in self.offsets.get(c, (0.0,))] + [0.0]
        return max(values) - min(values)

    def settings(self, n_classes: int) -> Iterable[Decision]:
        axes = [self.offsets.get(c, (0.0,)) for c in range(1, n_classes)]
        for values in itertools.product(*axes):
            for gate in self.gates_mm3:
                yield Decision((0.0, *map(float, values)), self.gated if gate > 0 else None, float(gate))


@dataclass
class Choice:
    """What the search chose, and what it bought: per fold, the mean Dice of each foreground class
    with nnU-Net's decision and with the chosen one."""
    decision: Decision
    without: Dict[int, List[float]] = field(default_factory=dict)
    with_decision: Dict[int, List[float]] = field(default_factory=dict)
    objective_without: float = float("nan")
    objective_with: float = float("nan")
    settings_tried: int = 0
    gate_cap_mm3: float = 0.0  # the largest gate a tie could go to (Grid.gate_cap_mm3)


def _preference(setting: Decision, gate_cap_mm3: float) -> Tuple[float, int, float]:
    """How a setting ranks among settings of equal objective (smaller first): the smallest offsets,
    then the largest gate up to the cap, then gates above it from the smallest."""
    gate = setting.gate_mm3 if setting.gated is not None else 0.0
    return (sum(abs(b) for b in setting.offsets), *((0, -gate) if gate <= gate_cap_mm3 else (1, gate)))


def search(cases: Sequence[CaseCounts], grid: Grid, n_classes: int) -> Choice:
    """The setting of `grid` with the best objective over `cases`, ties by `_preference`. Offsets stay
    nnU-Net's (zero) unless the best beats nnU-Net's decision by at least grid.min_gain; then the gate
    is the preferred one among the zero-offset settings that lose nothing against nnU-Net's decision."""
    base = Decision.nnunet(n_classes)
    base_score = score(cases, base)
    base_objective = objective(base_score)
    cap = grid.gate_cap_mm3(cases)
    best, best_objective, tried = base, base_objective, 0
    zero_offsets = [(base, base_objective)]
    for setting in grid.settings(n_classes):
        tried += 1
        value = objective(score(cases, setting))
        if not any(setting.offsets):
            zero_offsets.append((setting, value))
        if value > best_objective + TIE or (abs(value - best_objective) <= TIE and
                                              _preference(setting, cap) < _preference(best, cap)):
            best, best_objective = setting, value
    if best_objective < base_objective + grid.min_gain:
        candidates = [s for s, value in zero_offsets if value >= base_objective - TIE]
        best = min(candidates, key=lambda s: _preference(s, cap))
    chosen = score(cases, best)
    return Choice(best, {f: [float(x) for x in v] for f, v in base_score.items()},
                  {f: [float(x) for x in v] for f, v in chosen.items()}, base_objective, objective(chosen), tried, cap)
