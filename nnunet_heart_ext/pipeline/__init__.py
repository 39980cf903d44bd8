"""`nnunet-heart pipeline` (what `ensemble_pipeline.sh` runs): organizer files -> predict.zip
with nnU-Net's official commands, resumable, here or on Slurm.

    option_table.py    each option stated once: flag, --help rows, HEART_* variable, defaults
    options.py         parsing them into Options (checks, --demo defaults), a Slurm job's command line
    layout.py          every path the pipeline reads or writes (work folder, nnU-Net's folders)
    context.py         what the steps share: options, layout, slots, nnU-Net's environment
    nnunet_outputs.py  readers of nnU-Net's JSON files (plans, splits, summary, inference information)
    checks.py          what "done" means in files: Check, a fold's typed State, the file checks
    steps/             each step: its official commands, "done, or why not", the steps it needs
                       (base.py; data.py: prepare, plan; model.py: train, validate, best;
                       inference.py: predict, postprocess, export, score)
    launchers.py       the Launcher interface, the run's slots, picking one, the dry run's listing
    local.py           LocalLauncher: here (GPU slots, CPU parallel)
    slurm_launcher.py  SlurmLauncher: the steps as Slurm jobs (arrays, afterok, cancel, follow)
    slurm.py           the Slurm client (sbatch, squeue, sacct, ...; WORK/slurm/jobs.json)
    processes.py       a job's process and its log pump; stopping process trees
    terminal.py        notes, the status line, job logs
    report.py          --status, the Dice tables, the closing summary

`bash ensemble_pipeline.sh --help` lists the options.
"""
import signal
import sys
from typing import List, Optional

from nnunet_heart_ext.pipeline.options import PipelineError, parse


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    from nnunet_heart_ext.pipeline import launchers, report
    from nnunet_heart_ext.pipeline.steps import Context, make_steps
    from nnunet_heart_ext.pipeline.terminal import TERMINAL

    try:
        options = parse(argv)
        if options is None:
            return 0  # --help
        ctx = Context(options, launchers.slots(options))
        steps = make_steps(ctx)
        if options.status:
            jobs = launchers.queued_jobs_by_step(ctx)
            report.status([s for s in steps if options.wanted(s.name)], options.json, jobs)
            return 0
        launcher = launchers.pick(ctx)
        if options.dry_run:
            return launcher.dry_run(steps)
        previous = signal.signal(signal.SIGTERM, _terminate)  # `kill PID`: stop the jobs too, like Ctrl-C
        try:
            return launcher.run(steps)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except PipelineError as e:
        TERMINAL.clear()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        TERMINAL.clear()
        print("\n[pipeline] interrupted; rerun the same command to continue", file=sys.stderr, flush=True)
        return 130
