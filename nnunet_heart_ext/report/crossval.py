"""Cross-validation as nnU-Net left it: each fold's validation Dice (its `validation/summary.json`)
and its training curves (its `training_log_*.txt`), read into typed records.

The report layer does not import the pipeline: these readers read the same files as
`pipeline/nnunet_outputs.py` does, for what the report shows (per case, per class), and a file
that cannot be read raises DatasetError naming it.

Training curves come from nnUNetTrainer's own log lines (`2026-12-06 10:01:19.637052: train_loss
1.8178`, `val_loss`, `Pseudo dice [...]`, `Epoch N`). A fold continued from a checkpoint has one
log per start; they are read in the order they were started, and an epoch logged again by a
later start (the epochs after the checkpoint) takes the later values. Epochs per hour: from the
time between the starts of consecutive epochs within one log (so checkpointing and the
validation of each epoch count, the pauses between two starts do not).
"""
import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.io import DatasetError

EMA = 0.9  # nnU-Net's smoothing of the pseudo Dice (ema = 0.9 ema + 0.1 value), what it picks the best checkpoint by


def number(value) -> Optional[float]:
    """A metric as the report holds it: NaN (neither reference nor prediction holds the class) -> None
    (JSON's null, a dash on the page)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class CaseDice:
    """One validation case of one fold."""
    model: str                        # the results folder, TRAINER__PLANS__CONFIGURATION
    fold: int
    case: str
    dice: Tuple[Optional[float], ...]  # per foreground class, in label order (None: in neither)
    reference: str                    # the files nnU-Net compared
    prediction: str

    @property
    def mean(self) -> Optional[float]:
        return mean(self.dice)


@dataclass(frozen=True)
class Curve:
    """A fold's training, epoch by epoch."""
    epochs: Tuple[int, ...]
    train_loss: Tuple[Optional[float], ...]
    val_loss: Tuple[Optional[float], ...]
    pseudo_dice: Tuple[Optional[float], ...]  # mean over the classes of nnU-Net's pseudo Dice
    ema_pseudo_dice: Tuple[Optional[float], ...]
    epochs_per_hour: Optional[float]
    logs: Tuple[str, ...]


@dataclass(frozen=True)
class FoldResult:
    model: str
    fold: int
    summary: Optional[str]            # its summary.json (None: not validated)
    mean_dice: Tuple[Optional[float], ...]  # nnU-Net's mean per class
    cases: Tuple[CaseDice, ...]
    curve: Optional[Curve]

    def to_json(self) -> dict:
        return asdict(self)


def read_summary(path: Path, model: str, fold: int) -> Tuple[Tuple[Optional[float], ...], Tuple[CaseDice, ...]]:
    """(mean Dice per class, the cases) of one nnU-Net summary.json."""
    try:
        summary = json.loads(Path(path).read_text())
        means = tuple(number(summary["mean"].get(str(k), {}).get("Dice")) for k in ds.CLASSES)
        cases = []
        for entry in summary["metric_per_case"]:
            metrics = entry["metrics"]
            name = Path(entry["prediction_file"]).name
            case = ds.PREDICTION.case(name) or name
            cases.append(CaseDice(model, fold, case, tuple(number(metrics.get(str(k), {}).get("Dice"))
                                                           for k in ds.CLASSES),
                                  entry["reference_file"], entry["prediction_file"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError([f"{path}: not a summary.json as nnU-Net writes it ({type(e).__name__}: {e})"],
                           "cross-validation results") from None
    return means, tuple(cases)


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?): (.*?)\s*$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan", re.IGNORECASE)


def _numbers(text: str) -> List[float]:
    """The numbers of a logged value or list (`[np.float32(0.5), np.float32(0.0)]`, `[0.5, nan]`)."""
    return [float(x) for x in _NUMBER.findall(re.sub(r"np\.\w+\(", "(", text))]


def training_logs(fold_dir: Path) -> List[Path]:
    """The fold's training logs, in the order their runs started (their names' timestamps)."""
    found = []
    if Path(fold_dir).is_dir():
        for f in Path(fold_dir).iterdir():
            m = ds.TRAINING_LOG.match(f.name)
            if m:
                found.append((tuple(int(g) for g in m.groups()), f))
    return [f for _, f in sorted(found)]


def read_curve(logs: Sequence[Path]) -> Optional[Curve]:
    """A fold's training curve from its logs (None when they hold no epoch)."""
    values: Dict[int, Dict[str, float]] = {}
    durations: List[float] = []
    for log in logs:
        try:
            lines = Path(log).read_text(errors="replace").splitlines()
        except OSError as e:
            raise DatasetError([f"{log}: cannot read ({e.strerror})"], "training logs") from None
        epoch, started = None, None
        for line in lines:
            m = _LINE.match(line)
            if not m:
                continue
            when, message = m.groups()
            key, _, rest = message.partition(" ")
            if key == "Epoch" and rest.strip().isdigit():
                now = datetime.fromisoformat(when).timestamp()
                new = int(rest)
                if epoch is not None and new == epoch + 1 and started is not None:
                    durations.append(now - started)
                epoch, started = new, now
                values[epoch] = {}
            elif epoch is not None and key in ("train_loss", "val_loss"):
                numbers = _numbers(rest)
                if numbers:
                    values[epoch][key] = numbers[0]
            elif epoch is not None and message.startswith("Pseudo dice"):
                numbers = [x for x in _numbers(message[len("Pseudo dice"):]) if not math.isnan(x)]
                if numbers:
                    values[epoch]["pseudo_dice"] = sum(numbers) / len(numbers)
    if not values:
        return None
    epochs = sorted(values)
    dice = [values[e].get("pseudo_dice") for e in epochs]
    ema, smoothed = None, []
    for d in dice:
        if d is not None:
            ema = d if ema is None else EMA * ema + (1 - EMA) * d
        smoothed.append(None if ema is None else round(ema, 6))
    per_hour = round(3600.0 * len(durations) / sum(durations), 2) if durations and sum(durations) > 0 else None
    return Curve(tuple(epochs), tuple(values[e].get("train_loss") for e in epochs),
                 tuple(values[e].get("val_loss") for e in epochs), tuple(dice), tuple(smoothed), per_hour,
                 tuple(str(p) for p in logs))


def folds_of(model_dir: Path) -> List[int]:
    """The folds a model folder holds (its fold_F folders)."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(f for f in (ds.fold_of_folder(p.name) for p in Path(model_dir).iterdir() if p.is_dir())
                  if f is not None)


def read_fold(model_dir: Path, fold: int) -> FoldResult:
    """One fold of one model: its validation (if any) and its training curve (if logged)."""
    fold_dir = Path(model_dir) / ds.fold_folder(fold)
    summary = fold_dir / ds.VALIDATION_FOLDER / ds.VALIDATION_SUMMARY
    model = Path(model_dir).name
    if summary.is_file():
        means, cases = read_summary(summary, model, fold)
    else:
        means, cases = tuple(None for _ in ds.CLASSES), ()
    return FoldResult(model, fold, str(summary) if summary.is_file() else None, means, cases,
                      read_curve(training_logs(fold_dir)))


def worst_cases(folds: Sequence[FoldResult], per_fold: int) -> List[CaseDice]:
    """The `per_fold` validation cases of each fold with the lowest mean Dice over the classes,
    worst first overall."""
    out = []
    for f in folds:
        scored = [c for c in f.cases if c.mean is not None]
        out += sorted(scored, key=lambda c: (c.mean, c.case))[:per_fold]
    return sorted(out, key=lambda c: (c.mean, c.model, c.fold, c.case))
