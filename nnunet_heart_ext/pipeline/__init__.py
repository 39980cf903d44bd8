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
                       inference.py: predict, postprocess, export, score, report)
    launcher.py        the Launcher interface, the dry run's listing
    launchers.py       the run's slots, picking a launcher
    local.py           LocalLauncher: here (GPU slots, CPU parallel)
    slurm_launcher.py  SlurmLauncher: the steps as Slurm jobs (arrays, afterok, cancel, follow)
    slurm.py           the Slurm client (sbatch, squeue, sacct, ...; WORK/slurm/jobs.json)
    processes.py       a job's process (under guard.py, which ends it with the pipeline) and its
                       log pump; stopping jobs with their process groups
    locks.py           one run per work folder, one job per step or fold
    errors.py          what stops a run, and its exit status
    terminal.py        notes, the status line, job logs
    report.py          --status, the Dice tables, the closing summary

`bash ensemble_pipeline.sh --help` lists the options.
"""
import signal
import sys
from typing import List, Optional

from nnunet_heart_ext.pipeline.errors import PipelineError, Stopped
from nnunet_heart_ext.pipeline.options import parse

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # one stop: a second Ctrl-C must not cut the stopping of the jobs short
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def handle_stop_signals():
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) stop the jobs and the run: each
    raises Stopped, the launcher's `finally` stops the running jobs, `main` exits 128 + signal.
    Returns the previous handlers."""
    return {s: signal.signal(s, _stop) for s in STOP_SIGNALS}


def main(argv: Optional[List[str]] = None) -> int:
    from nnunet_heart_ext.data.files import WriteError, is_write_failure, write_error
    from nnunet_heart_ext.pipeline import launchers, report
    from nnunet_heart_ext.pipeline.locks import Lock
    from nnunet_heart_ext.pipeline.steps import Context, make_steps
    from nnunet_heart_ext.pipeline.terminal import TERMINAL, note

    previous = None
    work_lock = None
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
        previous = handle_stop_signals()
        if options.slurm_job is None:  # a Slurm job locks its step or fold, not the work folder (locks.py)
            work_lock = Lock(ctx.layout.work_lock, f"the work folder {ctx.layout.work}").acquire(say=note)
        return launcher.run(steps)
    except PipelineError as e:
        TERMINAL.clear()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:
        if not is_write_failure(e):
            raise
        TERMINAL.clear()  # a full disk or a denied write: one line, not a traceback
        line = e.strerror if isinstance(e, WriteError) else write_error(e, e.filename or ".", "write").strerror
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    except Stopped as e:
        TERMINAL.clear()
        print(f"\n[pipeline] stopped by {e.name}; its jobs were stopped; rerun the same command to continue",
              file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if work_lock is not None:
            work_lock.release()
        if previous:
            for s, handler in previous.items():
                signal.signal(s, handler)
