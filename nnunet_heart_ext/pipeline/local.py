"""The local launcher: the steps' commands run here.

The steps in order, each step's waves in order, a wave's slot jobs (folds, prediction parts) side
by side, one per slot: a GPU (`CUDA_VISIBLE_DEVICES` set to it) or, with `--device cpu
--parallel N`, one of N CPU slots; jobs without a slot one after another. The first job that
fails stops the others and shows its log's last lines. Each job's output goes to its own log
(`terminal.LogWriter`); on a terminal a status line shows what each running job last said.
Every job's slot and times are appended to WORK/logs/jobs.jsonl (`processes.Running.finish`).
"""
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

from nnunet_heart_ext.pipeline import processes, report
from nnunet_heart_ext.pipeline.launchers import Launcher, print_commands
from nnunet_heart_ext.pipeline.options import Options, PipelineError
from nnunet_heart_ext.pipeline.processes import Running
from nnunet_heart_ext.pipeline.steps import Action, Context, Job, Step, Wave
from nnunet_heart_ext.pipeline.terminal import TERMINAL, log_tail, note

OFFICIAL_COMMANDS = ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_find_best_configuration",
                     "nnUNetv2_predict", "nnUNetv2_ensemble", "nnUNetv2_apply_postprocessing", "nnunet-heart")


def resolve_slots(o: Options, strict: bool = True) -> List[str]:
    """CPU slots cpu0..N-1, or GPU ids (from --gpus, else CUDA_VISIBLE_DEVICES, else every GPU
    torch sees). Not strict (dry run, status): no GPU check, one placeholder slot."""
    if o.device == "cpu":
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

    # ------------------------------------------------------------------ whole pipeline
    def run(self, steps: List[Step]) -> int:
        o = self.o
        check_commands()
        note(f"work: {o.work}   device: {o.device}   slots: {' '.join(self.slots)}   folds: "
             f"{','.join(map(str, o.folds))}   configs: {','.join(o.configs)}")
        note(f"trainer: {o.trainer}   planner: {o.planner} -> plans: {o.plans}")
        note(f"nnUNet_raw={o.raw} nnUNet_preprocessed={o.preprocessed} nnUNet_results={o.results}")
        self.ctx.layout.logs.mkdir(parents=True, exist_ok=True)
        timings: Dict[str, Tuple[float, str]] = {}
        for step in steps:
            if not o.wanted(step.name):
                continue
            start = time.time()
            note(f"step {step.name}")
            forced = o.forced(step.name)
            if not forced:
                c = step.check()
                if c.done:
                    note(f"  {step.name}: already done ({c.reason})")
                    timings[step.name] = (time.time() - start, "already done")
                    continue
                note(f"  {step.name}: to do: {c.reason}")
            for wave in step.waves(forced):
                self.run_wave(wave)
            c = step.check()
            if not c.done:
                raise PipelineError(f"{step.name} ran, but its outputs are not complete: {c.reason}")
            step.after()
            timings[step.name] = (time.time() - start, "done")
        print(report.summary(self.ctx, timings), flush=True)
        return 0

    def dry_run(self, steps: List[Step]) -> int:
        o = self.o
        print(f"# dry run: nothing is run or written. work: {o.work}; nnUNet_raw={o.raw} "
              f"nnUNet_preprocessed={o.preprocessed} nnUNet_results={o.results}")
        print(f"# these commands run with nnUNet_raw, nnUNet_preprocessed, nnUNet_results set as above"
              + ("; nnUNet_n_proc_DA and nnUNet_def_n_proc default to 1 and 2" if o.device == "cpu" else ""))
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
        if slot is not None and self.o.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = slot
        return processes.start(job, slot, env)

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
                        raise PipelineError(f"{name} failed (exit {rc}); full log: {r.job.log}; rerun to continue")
                    note(f"  {name} finished ({time.time() - r.start:.0f} s)")
                if TERMINAL.tty and time.time() - last_status >= 1 and running:
                    last_status = time.time()
                    TERMINAL.status("  " + " | ".join(
                        f"{name} {time.time() - r.start:.0f}s: {r.writer.last_line}" for name, r in running.items()))
        finally:
            if running:
                self._stop(running)
