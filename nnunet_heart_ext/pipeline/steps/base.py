"""What a step is and what it gives to run: `Step` (its `check()`, its `waves()`, the steps whose
outputs it reads), `Job` (one official command with its log), `Action` (work done in the
pipeline's own process) and `Wave` (jobs that may run side by side, or one action)."""
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from nnunet_heart_ext.pipeline.checks import Check
from nnunet_heart_ext.pipeline.context import Context
from nnunet_heart_ext.pipeline.options import PipelineError


class NotReady(PipelineError):
    """A step cannot run yet: an earlier step's outputs are missing."""


@dataclass
class Job:
    """One official command, with its log."""
    name: str
    argv: List[str]
    log: Path
    slot: bool = False  # needs a GPU (or CPU slot): may run beside other slot jobs
    note: str = ""      # said when it starts (e.g. "continuing from checkpoint_latest.pth")

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass
class Action:
    """Work done in this process (disk estimate, writing the split, scoring)."""
    name: str
    description: str
    run: Callable[[], None]


@dataclass
class Wave:
    items: list                           # Jobs (run side by side) or a single Action
    before: Optional[Callable[[], None]] = None
    comment: str = ""                     # for the dry run


class Step:
    """One step of the pipeline. `needs`: the steps whose outputs it reads (each earlier in the
    order); their paths come from the context's layout, never from constructing those steps."""
    name = ""
    needs: Tuple[str, ...] = ()

    def __init__(self, ctx: Context):
        self.ctx, self.o, self.layout = ctx, ctx.o, ctx.layout

    def check(self) -> Check:
        raise NotImplementedError

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        """What to run. `forced`: redo even what is done. `assume` (a dry run): earlier steps are
        taken as done, so missing inputs raise no NotReady."""
        raise NotImplementedError

    def after(self) -> None:
        """Said after the step ran (e.g. what find_best_configuration chose)."""
