"""What "done" means, in files: a step's `Check`, the typed `State` of one fold (its `Kind`, which
control flow branches on, and the reason said to the user), and the file checks the steps share:
a segmentation or probability file finished or cut short, a file older than its inputs (make's
rule: an output older than its input is stale).

Everything here only reads: nothing is deleted or written while checking.
"""
import enum
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from nnunet_heart_ext.data.io import nifti_incomplete


@dataclass
class Check:
    """A step's state: done, or not and why (when done, a short description)."""
    done: bool
    reason: str = ""


class Kind(enum.Enum):
    """Why a fold is (not) done."""
    DONE = "done"
    NOT_STARTED = "not started"          # no output at all yet
    RESUMABLE = "resumable"              # training stopped, a checkpoint to continue from
    OTHER_PLANS = "other plans"          # trained with plans other than the current ones
    NOT_TRAINED = "not trained"          # validation: the fold has no final checkpoint
    MISSING = "missing"                  # an output (or the input it is checked against) is missing
    STALE = "stale"                      # an output older than what it is made from
    INCOMPLETE = "incomplete"            # some cases not finished, or a file cut short


@dataclass(frozen=True)
class State:
    """One fold's state: its kind, and the reason in words."""
    kind: Kind
    reason: str

    @property
    def done(self) -> bool:
        return self.kind is Kind.DONE


# ----------------------------------------------------------------------------- file checks
def mtime(path: Path) -> float:
    return os.path.getmtime(path)


def newest(paths) -> float:
    """The newest modification time of those of `paths` that exist (0 if none does)."""
    return max((mtime(p) for p in paths if os.path.exists(p)), default=0.0)


def segmentation_problem(path: Path, newer_than: float = 0.0) -> Optional[str]:
    """Why `path` is not a finished segmentation (None if it is)."""
    if not path.is_file():
        return "missing"
    problem = nifti_incomplete(path)
    if problem:
        return problem
    if mtime(path) < newer_than:
        return "older than its input"
    return None


def npz_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return "missing"
    try:
        zipfile.ZipFile(path).close()  # reads the central directory at the file's end
    except (OSError, zipfile.BadZipFile):
        return "cut short"
    return None


def first_problem(problems: Dict[str, str], total: int, where: Path) -> str:
    """How many of `total` cases in `where` are not finished, with the first one's problem."""
    case, problem = next(iter(problems.items()))
    return f"{where}: {len(problems)} of {total} case(s) not finished ({case}: {problem})"
