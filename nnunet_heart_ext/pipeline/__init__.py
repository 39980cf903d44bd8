"""`nnunet-heart pipeline` (what `ensemble_pipeline.sh` runs): organizer files -> predict.zip
with nnU-Net's official commands, resumable, here or on Slurm.

    options.py         the options (command line, HEART_* environment, --demo defaults)
    layout.py          every path the pipeline reads or writes (work folder, nnU-Net's folders)
    context.py         what the steps share: options, layout, slots, nnU-Net's environment
    nnunet_outputs.py  readers of nnU-Net's JSON files (plans, splits, summary, inference information)
    checks.py          what "done" means in files: Check, a fold's typed State, the file checks
    steps/             each step: its official commands, "done, or why not", the steps it needs
                       (base.py; data.py: prepare, plan; model.py: train, validate, best;
                       inference.py: predict, postprocess, export, score)
    launchers.py       local (GPU slots, CPU parallel) and Slurm (arrays, afterok, cancel, follow)
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

    try:
        options = parse(argv)
        if options is None:
            return 0  # --help
        if options.launcher == "slurm":
            slots = launchers.slurm_slots(options)
        elif options.status:
            slots = []  # --status runs nothing: no GPU is looked for
        else:  # a dry run checks no GPU
            slots = launchers.resolve_slots(options, strict=not options.dry_run)
        ctx = Context(options, slots)
        steps = make_steps(ctx)
        if options.status:
            jobs = None
            if options.launcher == "slurm":
                jobs = launchers.SlurmLauncher(ctx).live_jobs_by_step()
            report.status([s for s in steps if options.wanted(s.name)], options.json, jobs)
            return 0
        if options.launcher == "slurm":
            launcher = launchers.SlurmLauncher(ctx)
        else:
            launcher = launchers.LocalLauncher(ctx)
        if options.dry_run:
            return launcher.dry_run(steps)
        previous = signal.signal(signal.SIGTERM, _terminate)  # `kill PID`: stop the jobs too, like Ctrl-C
        try:
            return launcher.run(steps)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except PipelineError as e:
        launchers.TERMINAL.clear()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        launchers.TERMINAL.clear()
        print("\n[pipeline] interrupted; rerun the same command to continue", file=sys.stderr, flush=True)
        return 130
