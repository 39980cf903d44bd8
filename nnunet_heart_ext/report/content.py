"""What a report holds, as typed records: made by build.py, shown by page.py, kept in report.json
(pictures aside: they are in the page)."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from nnunet_heart_ext.data.decision_file import DecisionFile
from nnunet_heart_ext.report.crossval import CaseDice, FoldResult, number
from nnunet_heart_ext.report.flags import Flag, TrainingDistribution, rule_texts
from nnunet_heart_ext.report.measures import (CALCIUM_HU, CONNECTIVITY, MYOCARDIUM_DENSITY_G_PER_ML,
                                              CaseMeasures)
from nnunet_heart_ext.report.provenance import Provenance


@dataclass(frozen=True)
class Picture:
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class TrainingLabel:
    """A training label's measures, with what identifies the file they were made from (a rerun
    reuses them while the file is unchanged: each training label is read once)."""
    measures: CaseMeasures
    file: str
    size: int
    mtime_ns: int

    def to_json(self) -> dict:
        return dict(file=self.file, size=self.size, mtime_ns=self.mtime_ns, measures=self.measures.to_json())

    @classmethod
    def from_json(cls, d: dict) -> "TrainingLabel":
        return cls(CaseMeasures.from_json(d["measures"]), d["file"], int(d["size"]), int(d["mtime_ns"]))


@dataclass
class TestCase:
    measures: CaseMeasures
    flags: List[Flag]
    picture: Picture
    image: str
    prediction: str

    @property
    def case(self) -> str:
        return self.measures.case


@dataclass
class WorstCase:
    dice: CaseDice
    picture: Optional[Picture]
    note: str = ""   # why there is no picture


@dataclass
class TestScore:
    """A summary.json of the test predictions against a ground truth (the demo's test_dice.json)."""
    path: str
    mean_dice: Tuple[Optional[float], ...]
    cases: Tuple[CaseDice, ...]


@dataclass
class Report:
    provenance: Provenance
    distribution: TrainingDistribution
    training: List[TrainingLabel]
    tests: List[TestCase]
    folds: List[FoldResult] = field(default_factory=list)
    worst: List[WorstCase] = field(default_factory=list)
    test_score: Optional[TestScore] = None
    decision: Optional[DecisionFile] = None  # heart_decision.json: the offsets and gate, and what they bought
    decision_path: str = ""
    seconds: float = 0.0

    def sorted_tests(self) -> List[TestCase]:
        """Flagged cases first (most flags first), then by case id."""
        return sorted(self.tests, key=lambda t: (-len(t.flags), t.case))

    def to_json(self) -> dict:
        return dict(
            provenance=self.provenance.to_json(),
            constants=dict(calcium_hu=CALCIUM_HU, myocardium_density_g_per_ml=MYOCARDIUM_DENSITY_G_PER_ML,
                           connectivity=CONNECTIVITY),
            rules=[dict(rule=r, text=t) for r, t in rule_texts(self.distribution)],
            training_distribution=self.distribution.to_json(),
            training_labels=[t.to_json() for t in self.training],
            test=[dict(case=t.case, image=t.image, prediction=t.prediction, measures=t.measures.to_json(),
                       flags=[f.to_json() for f in t.flags]) for t in self.sorted_tests()],
            cross_validation=[f.to_json() for f in self.folds],
            worst_validation_cases=[dict(model=w.dice.model, fold=w.dice.fold, case=w.dice.case,
                                         dice=list(w.dice.dice), mean=w.dice.mean) for w in self.worst],
            test_score=None if self.test_score is None else dict(
                path=self.test_score.path, mean_dice=list(self.test_score.mean_dice),
                cases=[dict(case=c.case, dice=list(c.dice)) for c in self.test_score.cases]),
            decision=None if self.decision is None else dict(
                path=self.decision_path, chosen=self.decision.describe(),
                offsets=list(self.decision.decision.offsets), gated_label=self.decision.decision.gated,
                gate_mm3=self.decision.decision.gate_mm3,
                validation_dice={fold: {k: {c: number(d) for c, d in v.items()} for k, v in by.items()}
                                 for fold, by in self.decision.dice.items()},
                mean_foreground_dice=dict(nnunet=number(self.decision.dice_without),
                                          with_decision=number(self.decision.dice_with)),
                postprocessing=None if self.decision.postprocessing is None else dict(
                    keep_largest=list(self.decision.postprocessing.keep_largest),
                    myocardium_dice=dict(without=number(self.decision.postprocessing.dice_without),
                                         with_keep_largest=number(self.decision.postprocessing.dice_with)),
                    nnunet_chose=self.decision.postprocessing.nnunet_chose)),
            seconds=round(self.seconds, 2))
