"""A fault of the extension's own inference or export code never stops a prediction (issue 31).

The extension's inference (nnunet_heart_ext/nnunet/predictor.py) and export
(nnunet_heart_ext/nnunet/prediction_export.py) run paths that nnU-Net never runs: batched passes,
sums on the device, the export on the GPU, Numba kernels, the threaded `.npz` writer. An exception
raised inside them that says nothing about the input (a device or driver they were never run on,
say) makes that case fall back to nnU-Net's own code for the same step: nnU-Net's
`nnUNetPredictor` methods for the network passes, nnU-Net's
`export_prediction_from_logits` / `convert_predicted_logits_to_segmentation_with_correct_shape`
for the export. Each fallback prints one warning line naming the step and the error; the run
(`nnUNetv2_predict`, the validation, `nnunet-heart predict-ensemble`) ends with one line counting
the cases that fell back.

Not faults, raised as they are: FloatingPointError (NaN logits: the input image or the checkpoint),
out-of-memory (it has its own handling: smaller batches, sums on the host, the CPU export), and
errors raised inside `input_errors()` (e.g. a checkpoint that does not fit the network).

NNUNET_HEART_EXT_STRICT=1 makes every fault raise instead (the tests set it, tests/conftest.py, so
that no test hides a fault). `strict()` is the one place that reads it.
"""
import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Set, Tuple, TypeVar

import torch

STRICT_ENV = "NNUNET_HEART_EXT_STRICT"
_INPUT_ERROR = "_nnunet_heart_ext_input_error"

T = TypeVar("T")


def strict() -> bool:
    """Whether faults raise instead of falling back (NNUNET_HEART_EXT_STRICT set and not 0)."""
    return os.environ.get(STRICT_ENV, "0").strip() not in ("", "0")


def falls_back(error: BaseException) -> bool:
    """Whether `error`, raised by the extension's code, makes the case fall back to nnU-Net's: a
    fault of that code (not the input's, not out-of-memory) and strict mode off."""
    return (isinstance(error, Exception) and not strict()
            and not isinstance(error, (FloatingPointError, torch.cuda.OutOfMemoryError))
            and not getattr(error, _INPUT_ERROR, False))


@contextmanager
def input_errors():
    """Errors raised inside are the input's (nnU-Net's own code would raise them too): never a fault."""
    try:
        yield
    except Exception as error:
        try:
            setattr(error, _INPUT_ERROR, True)
        except AttributeError:  # an exception type without a __dict__: it stays a fault
            pass
        raise


def warn(case: Optional[str], what: str, instead: str, error: BaseException) -> None:
    """The warning line of one fallback."""
    where = f"{case}: " if case else ""
    print(f"nnunet_heart_ext: {where}{what} fell back to nnU-Net's own {instead}: {type(error).__name__}: {error}",
          file=sys.stderr, flush=True)


def attempt(fast: Callable[[], T], nnunet: Callable[[], T], *, case: Optional[str], what: str,
            instead: str) -> Tuple[T, bool]:
    """(fast(), False); on a fault, the warning and (nnunet(), True). nnunet() runs after the fast
    path's frames are gone, so that what they held (device memory) is free."""
    try:
        return fast(), False
    except Exception as error:
        if not falls_back(error):
            raise
        warn(case, what, instead, error)
    return nnunet(), True


class Tally:
    """The cases of one run and, per step ("inference", "export"), those that fell back."""

    def __init__(self):
        self.cases = 0
        self.case: Optional[str] = None
        self.fell_back: Dict[str, Set[object]] = {}

    def begin(self, case: Optional[str]) -> None:
        """The next case of the run (its name for the warnings, None where the driver has none)."""
        self.cases += 1
        self.case = case

    def record(self, step: str, case: object = None) -> None:
        """One fallback of `step` in `case` (default: the current case; without one, a case of its own)."""
        if case is None:
            case = self.case if self.case is not None else object()
        self.fell_back.setdefault(step, set()).add(case)

    def summary(self) -> Optional[str]:
        if not self.fell_back:
            return None
        parts = [f"{len(cases)} of {self.cases} case(s) fell back to nnU-Net's own {step}"
                 for step, cases in self.fell_back.items()]
        return f"nnunet_heart_ext: {'; '.join(parts)} (see the warnings above)"


_ACTIVE: List[Tally] = []


@contextmanager
def tally():
    """A run (a prediction, a validation, an ensemble): fallbacks recorded while it is active
    count in it; its summary line is printed at its end when any case fell back."""
    run = Tally()
    _ACTIVE.append(run)
    try:
        yield run
    finally:
        _ACTIVE.remove(run)
        line = run.summary()
        if line:
            print(line, file=sys.stderr, flush=True)


def record(step: str) -> None:
    """Count a fallback of `step` in the current case of the active run (if any)."""
    if _ACTIVE:
        _ACTIVE[-1].record(step)


def current_case() -> Optional[str]:
    return _ACTIVE[-1].case if _ACTIVE else None
