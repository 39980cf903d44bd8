"""The Slurm launcher: the steps as Slurm jobs, which ones, in what order, and following them.

Each job runs this pipeline on the local launcher for its part (so every job decides from the
outputs, as a local run does, and logs the official command lines it runs): prepare+plan, the
folds as one array (train+validate per task, one GPU each), best, predict (one GPU),
postprocess+export(+score)+report, each `afterok` on the jobs before it, so that a failed job's
dependents are cancelled by Slurm itself. A rerun submits only what is neither done nor queued or
running (and cancels and replaces a queued job whose dependencies were replaced). `--wait`
follows the jobs to their end. The calls to Slurm and the record of submissions (recorded before
sbatch runs, so a killed submitter never makes a job run twice) are `slurm.py`'s.

Each job runs the pipeline with `--slurm-job UNIT`: it takes its step's or fold's lock, waiting for
a holder, so two jobs never train one fold (locks.py). Training jobs are submitted `--requeue`: a
preempted or requeued one runs again and continues from its checkpoint.
"""
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_heart_ext.pipeline import report
from nnunet_heart_ext.pipeline.errors import PipelineError
from nnunet_heart_ext.pipeline.launcher import Launcher, print_commands
from nnunet_heart_ext.pipeline.options import command_line
from nnunet_heart_ext.pipeline.slurm import FAILED_STATES, NEVER, Slurm, Submission, Unit, fold_key
from nnunet_heart_ext.pipeline.steps import Context, Step
from nnunet_heart_ext.pipeline.terminal import TERMINAL, log_tail, note

UNITS = [Unit("prep", ["prepare", "plan"]), Unit("train", ["train", "validate"], gpu=True, array=True),
         Unit("best", ["best"]), Unit("predict", ["predict"], gpu=True),
         Unit("finish", ["postprocess", "export", "score", "report"])]


class SlurmLauncher(Launcher):
    """Submits the steps as the `UNITS`' jobs (what is neither done nor queued), follows them with --wait."""

    def __init__(self, ctx: Context):
        self.ctx, self.o = ctx, ctx.o
        self.slurm = Slurm(self.o, ctx.layout)
        self.poll = float(os.environ.get("HEART_SLURM_POLL", "15"))

    # ------------------------------------------------------------------ what is done
    def units(self) -> List[Unit]:
        out = []
        for u in UNITS:
            steps = [s for s in u.steps if s in self.o.steps() and self.o.wanted(s)]
            if steps:
                out.append(Unit(u.name, steps, u.gpu, u.array))
        return out

    def units_by_name(self) -> Dict[str, Unit]:
        return {u.name: u for u in self.units()}

    def unit_done(self, unit: Unit, steps: Dict[str, Step]) -> bool:
        if any(self.o.forced(s) for s in unit.steps):
            return False
        try:
            return all(steps[s].check().done for s in unit.steps)
        except PipelineError:
            return False

    def task_done(self, steps: Dict[str, Step], config: str, fold: int, unit: Unit) -> bool:
        """One fold of the array: its steps (those of the train unit that --only keeps) are done."""
        if any(self.o.forced(s) for s in unit.steps):
            return False
        if "train" in unit.steps and not steps["train"].fold_state(config, fold).done:
            return False
        return "validate" not in unit.steps or steps["validate"].fold_check(config, fold).done

    # ------------------------------------------------------------------ submission
    def submit(self, steps: Dict[str, Step], dry: bool = False) -> List[Submission]:
        """Submit what is neither done nor queued/running; return the records of every job to follow."""
        records = self.slurm.records()
        live = {} if dry else self.slurm.live()
        if not dry and self.slurm.recover(records, live):
            self.slurm.save(records)
        follow: List[Submission] = []
        upstream: List[str] = []   # job ids the next unit waits for
        cascade = False            # an earlier unit runs: later ones cannot be judged done yet
        renewed = False            # an earlier unit got a new job: queued later jobs wait on replaced ones
        for unit in self.units():
            # (key, configuration, fold) of each job of the unit
            if unit.array:
                keys = [(fold_key(c, f), c, f) for c in self.o.configs for f in self.o.folds]
                todo = [(k, c, f) for k, c, f in keys if cascade or not self.task_done(steps, c, f, unit)]
            else:
                keys: List[Tuple[str, Optional[str], Optional[int]]] = [(unit.name, None, None)]
                todo = keys if cascade or not self.unit_done(unit, steps) else []
            if not todo:
                if not dry:
                    note(f"  {unit.name} ({', '.join(unit.steps)}): already done")
                continue
            kept, new = [], []
            for key, c, f in todo:
                last = self.slurm.last(records, key)
                if last and self.slurm.alive(last.job, live):
                    if renewed:  # it waits on jobs that were replaced: replace it too
                        self.slurm.cancel(last.job)
                        note(f"  {key}: cancelled queued job {last.job} (it waited on replaced jobs)")
                        new.append((key, c, f))
                    else:
                        kept.append(last)
                else:
                    if last and last.job in live:  # pending forever: its dependency failed
                        self.slurm.cancel(last.job)
                    new.append((key, c, f))
            for r in kept:
                if not dry:
                    note(f"  {r.key}: job {r.job} is {live[r.job].state.lower()}; not submitted again")
            ids = [r.job for r in kept]
            follow += kept
            if new:
                job, submitted = self._submit(unit, new, upstream, records, dry)
                follow += submitted
                if not dry:
                    note(f"  {unit.name} ({', '.join(unit.steps)}): submitted job {job}"
                         + (f" ({len(new)} task(s): " + ", ".join(f"{c} fold {f}" for _, c, f in new) + ")"
                            if unit.array else "") + (f", after {','.join(upstream)}" if upstream else ""))
                ids += [job] if unit.array else [r.job for r in submitted]
                renewed = True
            upstream = ids
            cascade = True
        return follow

    def _submit(self, unit: Unit, new: list, upstream: List[str], records: List[Submission],
                dry: bool) -> Tuple[str, List[Submission]]:
        """sbatch one unit's new jobs, recorded first under their job name (so that a submitter
        killed before it records the job id leaves a record the next run finds the job by)."""
        name = self.slurm.job_name(unit)
        submitted = [Submission(key=key, unit=unit.name, name=name, submitted=time.time(), after=list(upstream),
                                task=i if unit.array else None, config=c, fold=f)
                     for i, (key, c, f) in enumerate(new)]
        if unit.array:
            commands = [command_line(self.o, unit.steps, [c], [f], job=unit.name) for _, c, f in new]
        else:
            commands = [command_line(self.o, unit.steps, job=unit.name)]
        if not dry:
            self.slurm.save(records + submitted)
        try:
            job, ids = self.slurm.sbatch(unit, commands, upstream, name, dry)
        except BaseException:
            if not dry:
                self.slurm.save(records)  # nothing was submitted: no record of it
            raise
        for r, job_id in zip(submitted, ids):
            r.job, r.log = job_id, str(self.slurm.log_of(unit.name, job_id))
        records += submitted
        if not dry:
            self.slurm.save(records)
        return job, submitted

    # ------------------------------------------------------------------ following
    def follow(self, jobs: List[Submission], steps: Dict[str, Step]) -> int:
        order = [u.name for u in UNITS]
        pending = {r.job: r for r in jobs if r.job}
        note(f"following {len(pending)} job(s): {', '.join(pending)} (every {self.poll:g} s)")
        started: Dict[str, float] = {}
        while pending:
            live = self.slurm.live()
            for job, r in list(pending.items()):
                if job in live and NEVER not in live[job].reason:
                    if live[job].state == "RUNNING" and job not in started:
                        started[job] = time.time()
                        note(f"  job {job} ({r.key}) running (log: {r.log})")
                    elif live[job].state != "RUNNING" and job in started:  # requeued or preempted
                        del started[job]
                        note(f"  job {job} ({r.key}) {live[job].state.lower()} again ({live[job].reason}); it "
                             f"continues from its outputs when it runs")
                    continue
                if job in live:  # its dependency failed: Slurm will cancel it (--kill-on-invalid-dep)
                    self.slurm.cancel(job)
                    state, exit_code, reason = "CANCELLED", "0:0", NEVER
                else:
                    state, exit_code, reason = self.slurm.ended(job)
                del pending[job]
                if state == "UNKNOWN":  # forgotten by the controller: judge by the outputs
                    unit = self.units_by_name()[r.unit]
                    done = self.task_done(steps, r.config, r.fold, unit) if unit.array else self.unit_done(unit, steps)
                    state = "COMPLETED" if done else "FAILED"
                note(f"  job {job} ({r.key}) ended: {state} (exit {exit_code})")
                if state.split()[0] not in FAILED_STATES:
                    continue
                # a failure: cancel what depends on it, show its log
                later = [j for j, o in pending.items() if order.index(o.unit) > order.index(r.unit)]
                if later:
                    self.slurm.cancel(*later)
                    note(f"  cancelled the jobs that depend on it: {', '.join(later)}")
                others = [j for j in pending if j not in later]
                TERMINAL.clear()
                shown = [r]
                if reason == NEVER:  # the failure was upstream: show those jobs' logs
                    after = set(r.after)
                    upstream = [x for x in self.slurm.records() if x.job and (x.job in after
                                                                               or x.job.split("_")[0] in after)]
                    failed = [x for x in upstream if self.slurm.ended(x.job)[0].split()[0] in FAILED_STATES]
                    shown = failed or upstream or [r]
                for x in shown:
                    print(f"---- last lines of {x.log} ----\n{log_tail(Path(x.log))}", file=sys.stderr)
                why = f" ({reason})" if reason and reason != "None" else ""
                raise PipelineError(f"Slurm job {job} ({r.key}) {state}{why}; full log: {r.log}"
                                    + (f"; still running: {', '.join(others)} (their results are kept)" if others
                                       else "") + "; rerun to submit what is left")
            if pending:
                time.sleep(self.poll)
        return 0

    # ------------------------------------------------------------------ entry
    def run(self, steps: List[Step]) -> int:
        o = self.o
        by_name = {s.name: s for s in steps}
        note(f"work: {o.work}   launcher: slurm   device: {o.device}   folds: {','.join(map(str, o.folds))}   "
             f"configs: {','.join(o.configs)}")
        note(f"trainer: {o.trainer}   planner: {o.planner} -> plans: {o.plans}   sbatch extra: "
             f"{shlex.join(o.slurm_args) or '(none)'}")
        self.ctx.layout.logs.mkdir(parents=True, exist_ok=True)
        jobs = self.submit(by_name)
        if not jobs:
            note("nothing to submit: every step is done")
            print(report.summary(self.ctx, {}), flush=True)
            return 0
        if not o.wait:
            ids = ",".join(r.job for r in jobs if r.job)
            print(f"\nsubmitted or queued: {ids}\nfollow them with:\n  squeue --me -j {ids}\n"
                  f"  tail -f {self.ctx.layout.slurm_logs}/*.log\n"
                  f"  the same command with --status (each step, done or not) or --wait (follow to the end; "
                  f"submits nothing twice)", flush=True)
            return 0
        self.follow(jobs, by_name)
        print(report.summary(self.ctx, {}), flush=True)
        return 0

    def dry_run(self, steps: List[Step]) -> int:
        print(f"# dry run (slurm): the sbatch commands in order, each with the pipeline command its job runs; "
              f"nothing is submitted. work: {self.o.work}")
        self.submit({s.name: s for s in steps}, dry=True)
        print("# the official commands those jobs run, in order (each job on one GPU, or one CPU slot):")
        print_commands(steps, self.o, self.ctx.slots, indent="#   ")
        return 0

    def live_jobs_by_step(self) -> Dict[str, List[str]]:
        records, live = self.slurm.records(), self.slurm.live()
        self.slurm.recover(records, live, say=lambda message: None)  # shown, not saved: --status writes nothing
        out: Dict[str, List[str]] = {}
        for u in UNITS:
            for r in records:
                if r.unit == u.name and r.job in live:
                    for s in u.steps:
                        out.setdefault(s, []).append(f"{r.job} {live[r.job].state.lower()}")
        return out
