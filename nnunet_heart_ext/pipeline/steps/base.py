"""What a step is and what it gives to run: `Step` (its `check()`, its `waves()`, the steps whose
outputs it reads), `Job` (one official command with its log), `Action` (work done in the
pipeline's own process) and `Wave` (jobs that may run side by side, or one action)."""
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from nnunet_heart_ext.pipeline.checks import Check
from nnunet_heart_ext.pipeline.context import Context
from nnunet_heart_ext.pipeline.errors import NotReady  # noqa: F401  (re-exported: what waves() raise)


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

    # Exclusive sweeps: the step's locks keep every other writer out of the folders it writes
    # (fold folders), so even a leftover of a writer on another machine (a Slurm node) goes.
    sweep_exclusive = False

    def check(self) -> Check:
        raise NotImplementedError

    def locks(self) -> Dict[str, str]:
        """The locks it holds while it runs (locks.py; paths: Layout.step_lock), each with what it
        guards in words: its own by default."""
        return {self.name: f"the {self.name} step"}

    def writes(self) -> List[Path]:
        """The folders its commands write: checked for room to write and swept of killed writers'
        leftovers (data/files.py) before it runs."""
        return []

    def reads(self) -> List[Path]:
        """Other folders its commands list (nnU-Net's inputs): swept of leftovers too."""
        return []

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        """What to run. `forced`: redo even what is done. `assume` (a dry run): earlier steps are
        taken as done, so missing inputs raise no NotReady."""
        raise NotImplementedError

    def after(self) -> None:
        """Said after the step ran (e.g. what find_best_configuration chose)."""
