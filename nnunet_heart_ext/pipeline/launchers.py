"""Where the steps' commands run: the `Launcher` interface, the one `--launcher` picks, and the
dry run's listing of official commands that both launchers print.

The two: `local.LocalLauncher` (here: GPU slots, CPU parallel) and
`slurm_launcher.SlurmLauncher` (Slurm jobs, with `slurm.py` the client that calls Slurm).
`slots(options)` is what the steps split their slot jobs over (prediction parts): GPUs or CPU
slots here, one per job on Slurm; the `Context` is built with them, before a launcher is made.
"""
import abc
from typing import Dict, List, Optional

from nnunet_heart_ext.pipeline.errors import PipelineError
from nnunet_heart_ext.pipeline.options import Options
from nnunet_heart_ext.pipeline.steps import Action, Context, Job, Step


class Launcher(abc.ABC):
    """Runs the steps somewhere. Both return the pipeline's exit status (errors: PipelineError)."""

    @abc.abstractmethod
    def run(self, steps: List[Step]) -> int:
        """Run the wanted steps that are not done, in order, and print the closing summary."""

    @abc.abstractmethod
    def dry_run(self, steps: List[Step]) -> int:
        """Print what `run` would run from the current state; run and write nothing."""


def slots(o: Options) -> List[str]:
    """The slots of this run: on Slurm one per job ("gpu", or cpu0..N-1 with --device cpu); here
    `local.resolve_slots` (GPUs checked, except in a dry run); none for --status (no GPU looked for)."""
    if o.launcher == "slurm":
        return ["gpu"] if o.device == "cuda" else [f"cpu{i}" for i in range(o.parallel)]
    if o.status:
        return []
    from nnunet_heart_ext.pipeline.local import resolve_slots

    return resolve_slots(o, strict=not o.dry_run)


def pick(ctx: Context) -> Launcher:
    """The launcher `--launcher` names."""
    if ctx.o.launcher == "slurm":
        from nnunet_heart_ext.pipeline.slurm_launcher import SlurmLauncher

        return SlurmLauncher(ctx)
    from nnunet_heart_ext.pipeline.local import LocalLauncher

    return LocalLauncher(ctx)


def queued_jobs_by_step(ctx: Context) -> Optional[Dict[str, List[str]]]:
    """For --status: each step's queued or running Slurm jobs; None on the local launcher."""
    if ctx.o.launcher != "slurm":
        return None
    from nnunet_heart_ext.pipeline.slurm_launcher import SlurmLauncher

    return SlurmLauncher(ctx).live_jobs_by_step()


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
