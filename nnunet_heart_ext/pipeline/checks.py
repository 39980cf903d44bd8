"""What "done" means, in files: a step's `Check`, the typed `State` of one fold (its `Kind`, which
control flow branches on, and the reason said to the user), and the file checks the steps share.

"Done" means usable: an output counts only when it can be read as what it claims to be, since a
killed writer (or a full disk) can leave a complete name on incomplete data, and nnU-Net writes its
checkpoints, JSON files and pickles in place. Each check is cheap and reads as little as it can:
  segmentation   the .nii.gz's gzip trailer against the length its NIfTI header implies
  .npz, zip      the archive's central directory (at the file's end)
  checkpoint     the archive's directory, then torch.load(mmap=True): the pickle is read, the
                 tensors only mapped (a cut-short file has no directory; one whose tensors were
                 not all written fails to map)
  JSON           parsed whole (small files)
  pickle         its opcodes walked to the final STOP (nothing unpickled, nothing imported)
and a file older than its inputs is stale (make's rule).

Everything here only reads: nothing is deleted or written while checking.
"""
import enum
import json
import os
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

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


def json_problem(path: Path) -> Optional[str]:
    """Why `path` is not a readable JSON file (None if it is)."""
    if not Path(path).is_file():
        return "missing"
    try:
        json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"cut short or not JSON ({type(e).__name__}: {e})"
    return None


def pickle_problem(path: Path) -> Optional[str]:
    """Why `path` is not a whole pickle (None if it is): its opcodes are walked to the STOP that
    ends a pickle, without unpickling (no import of what it names, no code run)."""
    if not Path(path).is_file():
        return "missing"
    last = None
    try:
        with open(path, "rb") as f:
            for opcode, _, _ in pickletools.genops(f):
                last = opcode.name
    except (OSError, ValueError, EOFError) as e:
        return f"cut short or not a pickle ({type(e).__name__}: {e})"
    if last != "STOP":
        return "cut short or not a pickle (no STOP)"
    return None


_checkpoints: Dict[Tuple[str, int, int], Optional[str]] = {}


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` is not a usable torch checkpoint (None if it is): missing, cut short, or not
    loadable. Remembered per (path, size, modification time), so a run checks each file once."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return "missing"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _checkpoints:
        _checkpoints[key] = _checkpoint_problem(path)
    return _checkpoints[key]


def _checkpoint_problem(path: Path) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "not a torch checkpoint (no data.pkl in it)"
    except (OSError, zipfile.BadZipFile) as e:
        return f"cut short ({type(e).__name__}: {e})"
    import torch

    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to load means: not usable)
        return f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
    return None


def first_problem(problems: Dict[str, str], total: int, where: Path) -> str:
    """How many of `total` cases in `where` are not finished, with the first one's problem."""
    case, problem = next(iter(problems.items()))
    return f"{where}: {len(problems)} of {total} case(s) not finished ({case}: {problem})"
