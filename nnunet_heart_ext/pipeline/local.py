"""The local launcher: the steps' commands run here.

The steps in order, each step's waves in order, a wave's slot jobs (folds, prediction parts) side
by side, one per slot: a GPU (`CUDA_VISIBLE_DEVICES` set to it) or, with `--device cpu
--parallel N`, one of N CPU slots; jobs without a slot one after another. The first job that
fails stops the others and shows its log's last lines. Each job's output goes to its own log
(`terminal.LogWriter`); on a terminal a status line shows what each running job last said.
Every job's slot and times are appended to WORK/logs/jobs.jsonl (`processes.Running.finish`).

Before a step runs (and before it is checked, so that two runs never both find it "to do"), it
takes its locks (its own, or each fold's: locks.py; a Slurm job waits for a holder, a local run is
refused), the folders it writes are checked for room to write, and the leftovers of killed writers
are swept from the folders it writes and lists (data/files.py), each with a line in the log. A job
that fails with a full disk or a denied write is reported in one line with the free space.
"""
import os
import re
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_heart_ext.data.files import ensure_writable, free_bytes, sweep
from nnunet_heart_ext.pipeline import processes, report
from nnunet_heart_ext.pipeline.errors import PipelineError
from nnunet_heart_ext.pipeline.launcher import Launcher, print_commands
from nnunet_heart_ext.pipeline.locks import Lock, held
from nnunet_heart_ext.pipeline.options import Options
from nnunet_heart_ext.pipeline.processes import Running
from nnunet_heart_ext.pipeline.steps import Action, Context, Job, Step, Wave
from nnunet_heart_ext.pipeline.terminal import TERMINAL, log_tail, note

# what a job's log says when its disk is full or its folder not writable (Python's OSError,
# SimpleITK's NIfTI writer, torch.save's zip writer)
WRITE_FAILURE = re.compile(r"No space left on device|Errno 28|Disk quota exceeded|Read-only file system|"
                           r"Permission denied|NWAD: wrote only|unexpected pos \d+ vs \d+")

OFFICIAL_COMMANDS = ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_find_best_configuration",
                     "nnUNetv2_predict", "nnUNetv2_ensemble", "nnUNetv2_apply_postprocessing", "nnunet-heart")


def resolve_slots(o: Options, strict: bool = True) -> List[str]:
    """CPU slots cpu0..N-1, or GPU ids (from --gpus, else CUDA_VISIBLE_DEVICES, else every GPU
    torch sees). Not strict (dry run, status): no GPU check, one placeholder slot."""
    if not o.device.gpu:
        return [f"cpu{i}" for i in range(o.parallel)]
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable torch CUDA at all)
        n_gpu = 0
    if n_gpu == 0:
        if not strict:
            return o.gpus or ["0"]
        raise PipelineError("no CUDA GPU visible (torch.cuda.device_count() is 0); use --device cpu (slow) or --demo")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if o.gpus:
        if not visible:
            for g in o.gpus:
                if not g.isdigit() or int(g) >= n_gpu:
                    raise PipelineError(f"--gpus: GPU '{g}' does not exist (torch sees {n_gpu})")
        return list(o.gpus)
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(n_gpu)]


def check_commands() -> None:
    for cmd in OFFICIAL_COMMANDS:
        if shutil.which(cmd) is None:
            raise PipelineError(f"{cmd} not found on PATH: install nnU-Net v2 and this extension (pip install -e .) "
                                f"and activate that environment")


class LocalLauncher(Launcher):
    """Runs the steps here, on `resolve_slots`' slots (strict=False: a dry run, no GPU check)."""

    def __init__(self, ctx: Context):
        self.ctx, self.o = ctx, ctx.o
        self.slots = ctx.slots
        self._held: List[Lock] = []          # the locks of the running step (their descriptors go to its jobs)
        self._step: Optional[Step] = None    # the running step

    # ------------------------------------------------------------------ whole pipeline
    def run(self, steps: List[Step]) -> int:
        o = self.o
        check_commands()
        note(f"work: {o.work}   device: {o.device}   slots: {' '.join(self.slots)}   folds: "
             f"{','.join(map(str, o.folds))}   configs: {','.join(o.configs)}")
        note(f"trainer: {o.trainer}   planner: {o.planner} -> plans: {o.plans}")
        note(f"nnUNet_raw={o.raw} nnUNet_preprocessed={o.preprocessed} nnUNet_results={o.results}")
        ensure_writable(self.ctx.layout.logs)
        self.ctx.layout.logs.mkdir(parents=True, exist_ok=True)
        timings: Dict[str, Tuple[float, str]] = {}
        for step in steps:
            if not o.wanted(step.name):
                continue
            start = time.time()
            note(f"step {step.name}")
            with self.step_locks(step):
                self.tidy(step)
                state = self.run_step(step)
            timings[step.name] = (time.time() - start, state)
        print(report.summary(self.ctx, timings), flush=True)
        return 0

    def run_step(self, step: Step) -> str:
        """Check the step, run what is not done, check again; returns its state for the summary."""
        forced = self.o.forced(step.name)
        if not forced:
            c = step.check()
            if c.done:
                note(f"  {step.name}: already done ({c.reason})")
                return "already done"
            note(f"  {step.name}: to do: {c.reason}")
        self._step = step
        for wave in step.waves(forced):
            self.run_wave(wave)
        c = step.check()
        if not c.done:
            raise PipelineError(f"{step.name} ran, but its outputs are not complete: {c.reason}")
        step.after()
        return "done"

    def step_locks(self, step: Step) -> ExitStack:
        """The step's locks, taken in order (a Slurm job waits for each; a local run is refused)."""
        stack = ExitStack()
        self._held = []
        try:
            for name, what in sorted(step.locks().items()):
                lock = Lock(self.ctx.layout.step_lock(name), f"{what} of {self.ctx.layout.work}").acquire(
                    wait=self.o.slurm_job is not None, say=note)
                stack.callback(lock.release)
                self._held.append(lock)
        except BaseException:
            stack.close()
            raise
        return stack

    def tidy(self, step: Step) -> None:
        """Room to write in the step's output folders, and no leftover of a killed writer in the
        folders it writes or lists."""
        for folder in step.writes():
            ensure_writable(folder)
        for folder, exclusive in [(f, step.sweep_exclusive) for f in step.writes()] + [(f, False) for f in step.reads()]:
            removed = sweep(folder, exclusive=exclusive)
            if removed:
                names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
                note(f"  removed {len(removed)} leftover file(s) of killed writers in {folder}: {names}")

    def dry_run(self, steps: List[Step]) -> int:
        o = self.o
        print(f"# dry run: nothing is run or written. work: {o.work}; nnUNet_raw={o.raw} "
              f"nnUNet_preprocessed={o.preprocessed} nnUNet_results={o.results}")
        print(f"# these commands run with nnUNet_raw, nnUNet_preprocessed, nnUNet_results set as above"
              + ("; nnUNet_n_proc_DA and nnUNet_def_n_proc default to 1 and 2" if not o.device.gpu else ""))
        print_commands(steps, o, self.slots)
        return 0

    # ------------------------------------------------------------------ jobs
    def run_wave(self, wave: Wave):
        if wave.before:
            wave.before()
        for item in wave.items:
            if isinstance(item, Action):
                note(f"  {item.name}: {item.description}")
                item.run()
        jobs = [i for i in wave.items if isinstance(i, Job)]
        slot_jobs = [j for j in jobs if j.slot]
        plain = [j for j in jobs if not j.slot]
        if plain:
            self._schedule(plain, [None])
        if slot_jobs:
            self._schedule(slot_jobs, list(self.slots))

    def _start(self, job: Job, slot: Optional[str]) -> Running:
        env = self.ctx.env()
        if slot is not None and self.o.device.gpu:
            env["CUDA_VISIBLE_DEVICES"] = slot
        return processes.start(job, slot, env, fds=held(self._held))

    def _write_failure(self, log: Path) -> Optional[str]:
        """One line when a failed job's log says its disk is full or its folder is not writable."""
        tail = log_tail(log, 60)
        if not WRITE_FAILURE.search(tail):
            return None
        folders = (self._step.writes() if self._step is not None else []) or [self.ctx.layout.work]
        rooms = ", ".join(f"{(free_bytes(f) or 0) / 1024 ** 3:.2f} GiB free for {f}" for f in folders[:3])
        return f"its log says the disk is full or a folder is not writable ({rooms})"

    def _stop(self, running: Dict[str, Running]):
        processes.stop(running, self.ctx.layout.job_records)

    def _schedule(self, jobs: List[Job], slots: List[Optional[str]]):
        queue, free = list(jobs), list(slots)
        running: Dict[str, Running] = {}
        last_status = 0.0
        try:
            while queue or running:
                while queue and free:
                    job = queue.pop(0)
                    running[job.name] = self._start(job, free.pop(0))
                time.sleep(0.2)
                for name, r in list(running.items()):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    r.finish(self.ctx.layout.job_records, rc)
                    del running[name]
                    free.append(r.slot)
                    if rc != 0:
                        self._stop(running)
                        TERMINAL.clear()
                        print(f"---- last lines of {r.job.log} ----\n{log_tail(r.job.log)}", file=sys.stderr)
                        if r.writer.error is not None:
                            print(f"---- its output could not all be written to the log: {r.writer.error} "
                                  f"(disk full?)", file=sys.stderr)
                        why = self._write_failure(r.job.log)
                        raise PipelineError(f"{name} failed (exit {rc})" + (f": {why}" if why else "")
                                            + f"; full log: {r.job.log}; rerun to continue")
                    note(f"  {name} finished ({time.time() - r.start:.0f} s)")
                if TERMINAL.tty and time.time() - last_status >= 1 and running:
                    last_status = time.time()
                    TERMINAL.status("  " + " | ".join(
                        f"{name} {time.time() - r.start:.0f}s: {r.writer.last_line}" for name, r in running.items()))
        finally:
            if running:
                self._stop(running)
