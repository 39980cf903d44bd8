"""Where the steps' commands run: the launcher `--launcher` picks, and the slots of the run.

The two launchers implement `launcher.Launcher`: `local.LocalLauncher` (here: GPU slots, CPU
parallel) and `slurm_launcher.SlurmLauncher` (Slurm jobs, with `slurm.py` the client that calls
Slurm). `slots(options)` is what the steps split their slot jobs over (prediction parts): GPUs or
CPU slots here, one per job on Slurm; the `Context` is built with them, before a launcher is made.
"""
from typing import Dict, List, Optional

from nnunet_heart_ext.pipeline import local
from nnunet_heart_ext.pipeline.launcher import Launcher
from nnunet_heart_ext.pipeline.options import Options
from nnunet_heart_ext.pipeline.slurm_launcher import SlurmLauncher
from nnunet_heart_ext.pipeline.steps import Context


def slots(o: Options) -> List[str]:
    """The slots of this run: on Slurm one per job ("gpu", or cpu0..N-1 with --device cpu); here
    `local.resolve_slots` (GPUs checked, except in a dry run); none for --status (no GPU looked for)."""
    if o.launcher == "slurm":
        return ["gpu"] if o.device.gpu else [f"cpu{i}" for i in range(o.parallel)]
    if o.status:
        return []
    return local.resolve_slots(o, strict=not o.dry_run)


def pick(ctx: Context) -> Launcher:
    """The launcher `--launcher` names."""
    if ctx.o.launcher == "slurm":
        return SlurmLauncher(ctx)
    return local.LocalLauncher(ctx)


def queued_jobs_by_step(ctx: Context) -> Optional[Dict[str, List[str]]]:
    """For --status: each step's queued or running Slurm jobs; None on the local launcher."""
    if ctx.o.launcher != "slurm":
        return None
    return SlurmLauncher(ctx).live_jobs_by_step()
