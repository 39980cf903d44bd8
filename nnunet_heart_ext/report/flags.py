"""What is unusual about a test case, judged against the training labels' own distribution.

The rules are stated here once (`RULES`, with their constants); `rule_texts` gives them in words,
with the numbers of this training set, for the page. A case's flags (`flags_of`) name the rule
and say what was found, so the page sorts the cases by them and shows why.

    absent      a class the prediction lacks although at least half the training labels hold it
    volume      a class's volume outside the range (min-max) of the training labels that hold it
    myocardium  more than one myocardium component (a second blob: in the air at the border, say)
    calcium     a calcification component farther from the aortic valve than any of the training
                labels' calcifications is from theirs, plus a margin
"""
from dataclasses import asdict, dataclass
from statistics import median
from typing import List, Optional, Sequence, Tuple

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.report.measures import CALCIUM, CONNECTIVITY, MYOCARDIUM, CaseMeasures

ABSENT_SHARE = 0.5            # `absent`: flagged when at least this share of the training labels hold the class
VALVE_REACH_MARGIN_MM = 5.0   # `calcium`: added to the farthest training calcification's distance to its valve
VALVE_REACH_DEFAULT_MM = 10.0  # `calcium`: the reach when no training label holds calcification and its valve

RULES = ("absent", "volume", "myocardium", "calcium")


@dataclass(frozen=True)
class ClassRange:
    """One class over the training labels."""
    label: int
    cases_with: int              # training labels that hold it
    min_ml: Optional[float]      # over those labels (None: none holds it)
    median_ml: Optional[float]
    max_ml: Optional[float]
    max_components: int


@dataclass(frozen=True)
class TrainingDistribution:
    """The training labels' own distribution, what test cases are compared with."""
    cases: int
    classes: Tuple[ClassRange, ...]
    calcium_valve_max_mm: Optional[float]  # the farthest calcification component from its valve (None: none)

    @classmethod
    def of(cls, measures: Sequence[CaseMeasures]) -> "TrainingDistribution":
        ranges = []
        for label in ds.CLASSES:
            volumes = [m.of(label).volume_ml for m in measures if m.of(label).present]
            ranges.append(ClassRange(label, len(volumes), min(volumes, default=None),
                                     median(volumes) if volumes else None, max(volumes, default=None),
                                     max((m.of(label).components for m in measures), default=0)))
        distances = [d for m in measures for d in m.calcium_valve_mm]
        return cls(len(measures), tuple(ranges), max(distances, default=None))

    def of_class(self, label: int) -> ClassRange:
        return next(c for c in self.classes if c.label == label)

    @property
    def valve_reach_mm(self) -> float:
        """How far from the valve a calcification may lie before it is flagged."""
        if self.calcium_valve_max_mm is None:
            return VALVE_REACH_DEFAULT_MM
        return round(self.calcium_valve_max_mm + VALVE_REACH_MARGIN_MM, 3)

    def expects(self, label: int) -> bool:
        """Whether a prediction lacking the class is flagged (`absent`)."""
        return self.cases > 0 and self.of_class(label).cases_with >= ABSENT_SHARE * self.cases

    def to_json(self) -> dict:
        return dict(asdict(self), valve_reach_mm=self.valve_reach_mm)

    @classmethod
    def from_json(cls, d: dict) -> "TrainingDistribution":
        return cls(d["cases"], tuple(ClassRange(**c) for c in d["classes"]), d["calcium_valve_max_mm"])


@dataclass(frozen=True)
class Flag:
    rule: str    # one of RULES
    label: int   # the class it is about
    text: str    # what was found, in words

    def to_json(self) -> dict:
        return asdict(self)


def _name(label: int) -> str:
    return ds.CLASSES[label].replace("_", " ")


def volume_text(label: int, ml: float) -> str:
    """A class's volume as the page states it: calcification in mm3 (tens of mm3), the others in ml."""
    return f"{ml * 1000:.1f} mm3" if label == CALCIUM else f"{ml:.3f} ml"


def _range(r: "ClassRange") -> str:
    if r.label == CALCIUM:
        return f"{r.min_ml * 1000:.1f}-{r.max_ml * 1000:.1f} mm3"
    return f"{r.min_ml:.3f}-{r.max_ml:.3f} ml"


def rule_texts(d: TrainingDistribution) -> List[Tuple[str, str]]:
    """(rule, what it flags), with this training set's numbers: shown on the page."""
    n = d.cases
    expected = [_name(c.label) for c in d.classes if d.expects(c.label)]
    ranges = "; ".join(f"{_name(c.label)} {_range(c)} ({c.cases_with} of {n})"
                       for c in d.classes if c.cases_with)
    reach = (f"the farthest of the training labels' is {d.calcium_valve_max_mm:.1f} mm from its valve, "
             f"+ {VALVE_REACH_MARGIN_MM:g} mm" if d.calcium_valve_max_mm is not None else
             f"no training label holds calcification beside a valve: {VALVE_REACH_DEFAULT_MM:g} mm")
    return [
        ("absent", f"a class the prediction lacks although at least {ABSENT_SHARE:.0%} of the {n} training labels "
                   f"hold it ({', '.join(expected) or 'none'})" if n else
                   "a class the prediction lacks (not judged: no training labels)"),
        ("volume", f"a class's volume outside the range of the training labels that hold it ({ranges or 'none'})"
                   if n else "a volume outside the training range (not judged: no training labels)"),
        ("myocardium", f"more than one myocardium component ({CONNECTIVITY}-connected voxels)"),
        ("calcium", f"a calcification component whose nearest voxel is more than {d.valve_reach_mm:g} mm from the "
                    f"aortic valve ({reach})"),
    ]


def flags_of(m: CaseMeasures, d: TrainingDistribution) -> List[Flag]:
    """The flags of one test case."""
    out: List[Flag] = []
    for c in m.classes:
        r = d.of_class(c.label)
        if not c.present:
            if d.expects(c.label):
                out.append(Flag("absent", c.label, f"{_name(c.label)} absent (in {r.cases_with} of {d.cases} "
                                                   f"training labels)"))
        elif r.cases_with and not r.min_ml <= c.volume_ml <= r.max_ml:
            side = "below" if c.volume_ml < r.min_ml else "above"
            out.append(Flag("volume", c.label, f"{_name(c.label)} {volume_text(c.label, c.volume_ml)}, {side} the "
                                               f"training range {_range(r)}"))
    myocardium = m.of(MYOCARDIUM)
    if myocardium.components > 1:
        out.append(Flag("myocardium", MYOCARDIUM, f"{myocardium.components} myocardium components"))
    far = [x for x in m.calcium_valve_mm if x > d.valve_reach_mm]
    if far:
        out.append(Flag("calcium", CALCIUM,
                        f"{len(far)} calcification component(s) more than {d.valve_reach_mm:g} mm from the aortic "
                        f"valve (the farthest {far[0]:.1f} mm)"))
    return out
