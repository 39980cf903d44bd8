"""The `Launcher` interface both launchers implement, and the dry run's listing of official
commands that both print. Which launcher runs, and on which slots, is launchers.py's."""
import abc
from typing import List

from nnunet_heart_ext.pipeline.errors import PipelineError
from nnunet_heart_ext.pipeline.options import Options
from nnunet_heart_ext.pipeline.steps import Action, Job, Step


class Launcher(abc.ABC):
    """Runs the steps somewhere. Both return the pipeline's exit status (errors: PipelineError)."""

    @abc.abstractmethod
    def run(self, steps: List[Step]) -> int:
        """Run the wanted steps that are not done, in order, and print the closing summary."""

    @abc.abstractmethod
    def dry_run(self, steps: List[Step]) -> int:
        """Print what `run` would run from the current state; run and write nothing."""


def print_commands(steps: List[Step], o: Options, slots: List[str], indent: str = "") -> None:
    """The official commands of the wanted steps, in the order they would run from the current
    state (a done step is named, not run; once one step runs, later ones are checked again then)."""
    earlier_runs = False
    for step in steps:
        if not o.wanted(step.name):
            continue
        forced = o.forced(step.name)
        try:
            c = step.check() if not forced else None
        except PipelineError as e:
            c = None
            print(f"{indent}# {step.name}: {e}")
        if c is not None and c.done:
            print(f"{indent}# {step.name}: " + (f"done ({c.reason})" if not earlier_runs else
                                                "done now; checked again once the steps above ran"))
            continue
        print(f"{indent}# {step.name}: " + ("forced" if forced else c.reason if c else "to do"))
        earlier_runs = True
        for wave in step.waves(forced, assume=True):
            if wave.comment:
                print(indent + wave.comment)
            jobs = [i for i in wave.items if isinstance(i, Job)]
            if len(jobs) > 1 and jobs[0].slot:
                print(f"{indent}# side by side, one per slot ({' '.join(slots)}):")
            for item in wave.items:
                if isinstance(item, Action):
                    print(f"{indent}#   (in this process) {item.description}")
                else:
                    print(indent + item.command)
