"""Where the steps' commands run.

`LocalLauncher` runs them here: the steps in order, each step's waves in order, a wave's slot jobs
(folds, prediction parts) side by side, one per slot: a GPU (`CUDA_VISIBLE_DEVICES` set to it)
or, with `--device cpu --parallel N`, one of N CPU slots. The first job that fails stops the
others and shows its log's last lines. Each job's output goes to its own log, through a filter
that keeps a progress bar's redraws out of the file (a few lines, not one per update); on a
terminal a status line shows what each running job last said. Every job's slot and times are
appended to WORK/logs/jobs.jsonl.

`SlurmLauncher` turns the steps into Slurm jobs, each running this pipeline on the local
launcher for its part (so every job decides from the outputs, as a local run does, and logs the
official command lines it runs): prepare+plan, the folds as one array (train+validate per task,
one GPU each), best, predict (one GPU), postprocess+export(+score), each `afterok` on the jobs
before it and `--kill-on-invalid-dep=yes`, so that a failed job's dependents are cancelled by
Slurm itself. What was submitted is recorded in WORK/slurm/jobs.json; a rerun submits only what
is neither done nor queued or running (and cancels and replaces a queued job whose dependencies
were replaced). `--wait` follows the jobs to their end.
"""
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_heart_ext.pipeline import report
from nnunet_heart_ext.pipeline.options import Options, PipelineError, command_line
from nnunet_heart_ext.pipeline.steps import Action, Context, Job, Step, Train, Validate, Wave

OFFICIAL_COMMANDS = ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_find_best_configuration",
                     "nnUNetv2_predict", "nnUNetv2_ensemble", "nnUNetv2_apply_postprocessing", "nnunet-heart")


# ----------------------------------------------------------------------------- terminal
class Terminal:
    """Notes for the user; on a terminal also one status line, redrawn in place."""

    def __init__(self, stream=None):
        self._stream = stream
        self.shown = False

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up each time: tests (and callers) may replace sys.stdout

    @property
    def tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False

    def note(self, message: str):
        self.clear()
        self.stream.write(f"[pipeline {time.strftime('%H:%M:%S')}] {message}\n")
        self.stream.flush()

    def status(self, line: str):
        if not self.tty:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\033[K" + line[:width])
        self.stream.flush()
        self.shown = True


def note(message: str):
    TERMINAL.note(message)


TERMINAL = Terminal()


class LogWriter:
    """A job's output into its log file, line by line. A line redrawn with carriage returns (a
    progress bar) is written once when it ends, and at most every `every` seconds while it lasts."""

    def __init__(self, path: Path, every: float = 60.0):
        self.file = open(path, "ab")
        self.pending = b""
        self.last_line = ""
        self.every = every
        self.last_partial = time.monotonic()
        self.error: Optional[Exception] = None  # why the log could not be written, if it could not

    @staticmethod
    def _visible(line: bytes) -> bytes:
        parts = [p for p in line.split(b"\r") if p.strip()]
        return parts[-1] if parts else b""

    def feed(self, data: bytes):
        if self.file.closed:  # a worker process outlived its job and still writes: nothing to keep
            return
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._write(self._visible(line))
        if b"\r" in self.pending:
            visible = self._visible(self.pending)
            self.last_line = visible.decode(errors="replace").strip() or self.last_line
            if time.monotonic() - self.last_partial >= self.every and visible:
                self._write(visible)
                self.pending = b""
                self.last_partial = time.monotonic()

    def _write(self, line: bytes):
        self.file.write(line + b"\n")
        self.file.flush()
        if line.strip():
            self.last_line = line.decode(errors="replace").strip()

    def close(self):
        if self.file.closed:
            return
        try:
            if self.pending and self.error is None:
                self._write(self._visible(self.pending))
            self.pending = b""
        except OSError as e:
            self.error = e
        finally:
            try:
                self.file.close()
            except OSError as e:
                self.error = self.error or e


def _pump(stream, writer: LogWriter):
    """Drain the job's output into its log. The pipe is drained to the end even when the log can no
    longer be written (a full disk): a job blocked on a full pipe would hang instead of failing."""
    failed = False
    while True:
        data = os.read(stream.fileno(), 65536)
        if not data:
            break
        if failed:
            continue
        try:
            writer.feed(data)
        except (OSError, ValueError) as e:
            failed = True
            writer.error = e


def log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------- process trees
def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants (nnU-Net's data-loading and export workers)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _signal_all(pids: List[int], sig: int):
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------- dry run
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


# ----------------------------------------------------------------------------- local launcher
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


@dataclass
class _Running:
    job: Job
    slot: Optional[str]
    proc: subprocess.Popen
    writer: LogWriter
    thread: threading.Thread
    start: float

    def finish(self, records: Path, rc: int):
        self.thread.join(timeout=30)
        self.writer.close()
        record = dict(job=self.job.name, slot=self.slot, start=self.start, end=time.time(), rc=rc, pid=self.proc.pid,
                      command=self.job.command)
        with open(records, "a") as f:
            f.write(json.dumps(record) + "\n")


class LocalLauncher:
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

    def _start(self, job: Job, slot: Optional[str]) -> _Running:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        where = slot or "this machine"
        with open(job.log, "a") as f:
            f.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} on {where}: {job.command}\n")
        env = self.ctx.env()
        if slot is not None and self.o.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = slot
        if job.note:
            note(f"  {job.name}: {job.note}")
        note(f"  $ {job.command}")
        proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        writer = LogWriter(job.log)
        thread = threading.Thread(target=_pump, args=(proc.stdout, writer), daemon=True)
        thread.start()
        note(f"  {job.name} started" + (f" on {slot}" if slot else "") + f" (log: {job.log})")
        return _Running(job, slot, proc, writer, thread, time.time())

    def _stop(self, running: Dict[str, _Running]):
        trees = {name: process_tree(r.proc.pid) for name, r in running.items()}
        for pids in trees.values():
            _signal_all(pids, signal.SIGTERM)
        deadline = time.time() + 10
        for name, r in running.items():
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_all([p for p in trees[name] if os.path.exists(f"/proc/{p}")], signal.SIGKILL)
            r.proc.wait()
            r.finish(self.ctx.layout.job_records, r.proc.returncode)
        running.clear()

    def _schedule(self, jobs: List[Job], slots: List[Optional[str]]):
        queue, free = list(jobs), list(slots)
        running: Dict[str, _Running] = {}
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


# ----------------------------------------------------------------------------- Slurm launcher
@dataclass
class Unit:
    name: str
    steps: List[str]
    gpu: bool = False
    array: bool = False


UNITS = [Unit("prep", ["prepare", "plan"]), Unit("train", ["train", "validate"], gpu=True, array=True),
         Unit("best", ["best"]), Unit("predict", ["predict"], gpu=True),
         Unit("finish", ["postprocess", "export", "score"])]
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED")


def _slurm(*argv, check=True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise PipelineError(f"{argv[0]} not found on PATH: --launcher slurm runs on a Slurm login node")
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise PipelineError(f"{shlex.join(argv)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def slurm_slots(o: Options) -> List[str]:
    """Each Slurm job runs on one GPU (or, with --device cpu, as the local launcher's CPU slots)."""
    return ["gpu"] if o.device == "cuda" else [f"cpu{i}" for i in range(o.parallel)]


class SlurmLauncher:
    def __init__(self, ctx: Context):
        self.ctx, self.o = ctx, ctx.o
        self.record_file = ctx.layout.slurm_records
        self.poll = float(os.environ.get("HEART_SLURM_POLL", "15"))

    # ------------------------------------------------------------------ record of submissions
    def records(self) -> List[dict]:
        if not self.record_file.is_file():
            return []
        return json.loads(self.record_file.read_text())["submissions"]

    def _save(self, records: List[dict]):
        from nnunet_heart_ext.data.io import write_text

        write_text(json.dumps({"submissions": records}, indent=1), self.record_file)

    def _last(self, records: List[dict], key: str) -> Optional[dict]:
        found = [r for r in records if r["key"] == key]
        return found[-1] if found else None

    def live(self) -> Dict[str, Tuple[str, str]]:
        """Job id -> (state, reason) of this user's queued and running jobs (array tasks one by one)."""
        out = {}
        for line in _slurm("squeue", "--me", "-h", "-r", "-o", "%i|%T|%r").stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                out[parts[0]] = (parts[1], parts[2])
        return out

    @staticmethod
    def _alive(job: str, live: Dict[str, Tuple[str, str]]) -> bool:
        state = live.get(job)
        return state is not None and "DependencyNeverSatisfied" not in state[1]

    def ended(self, job: str) -> Tuple[str, str, str]:
        """(state, exit code, reason) of a job that left the queue: scontrol while the controller
        remembers it, else sacct where accounting exists, else UNKNOWN."""
        p = _slurm("scontrol", "-o", "show", "job", job, check=False)
        if p.returncode == 0 and "JobState=" in p.stdout:
            fields = dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
            return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?"), fields.get("Reason", "")
        if shutil.which("sacct"):
            p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State,ExitCode"], capture_output=True,
                               text=True)
            if p.returncode == 0 and p.stdout.strip():
                state, exit_code = (p.stdout.strip().splitlines()[0].split("|") + ["?"])[:2]
                return state.split()[0], exit_code, ""
        return "UNKNOWN", "?", ""

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

    def task_done(self, config: str, fold: int, steps=("train", "validate")) -> bool:
        """One fold of the array: its steps (those of the train unit that --only keeps) are done."""
        if any(self.o.forced(s) for s in steps):
            return False
        if "train" in steps and not Train(self.ctx).fold_state(config, fold).done:
            return False
        return "validate" not in steps or Validate(self.ctx).fold_check(config, fold).done

    # ------------------------------------------------------------------ submission
    def _script(self, unit: Unit, commands: List[List[str]], stamp: str) -> Path:
        path = self.ctx.layout.slurm_scripts / f"{unit.name}-{stamp}.sh"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["#!/usr/bin/env bash", f"# nnunet-heart pipeline, Slurm job '{unit.name}': {', '.join(unit.steps)}",
                 "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
                 f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]
        if unit.array:
            lines.append('case "$SLURM_ARRAY_TASK_ID" in')
            for i, argv in enumerate(commands):
                lines.append(f"  {i}) exec {shlex.join(argv)} ;;")
            lines += ['  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;', "esac"]
        else:
            lines.append(f"exec {shlex.join(commands[0])}")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        return path

    def _sbatch(self, unit: Unit, commands: List[List[str]], after: List[str], dry: bool) -> Tuple[str, List[str]]:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        logs = self.ctx.layout.slurm_logs
        argv = ["sbatch", "--parsable", f"--job-name=heart-{unit.name}",
                f"--output={logs / (unit.name + ('-%A_%a.log' if unit.array else '-%j.log'))}"]
        if unit.array:
            argv.append(f"--array=0-{len(commands) - 1}")
        if unit.gpu and self.o.device == "cuda":
            argv.append("--gres=gpu:1")
        if after:
            argv += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        argv += self.o.slurm_args
        if dry:
            print(shlex.join(argv + [f"<{unit.name} script>"]))
            for i, c in enumerate(commands):
                print(f"#   job{' task ' + str(i) if unit.array else ''}: {shlex.join(c)}")
            return f"<{unit.name}>", [f"<{unit.name}>" + (f"_{i}" if unit.array else "") for i in range(len(commands))]
        logs.mkdir(parents=True, exist_ok=True)
        script = self._script(unit, commands, stamp)
        argv.append(str(script))
        note(f"  $ {shlex.join(argv)}")
        job = _slurm(*argv).stdout.strip().split(";")[0]
        ids = [f"{job}_{i}" for i in range(len(commands))] if unit.array else [job]
        return job, ids

    def _log_of(self, unit: str, job: str) -> Path:
        return self.ctx.layout.slurm_logs / f"{unit}-{job}.log"

    def submit(self, steps: Dict[str, Step], dry: bool = False) -> List[dict]:
        """Submit what is neither done nor queued/running; return the records of every job to follow."""
        records = self.records()
        live = {} if dry else self.live()
        follow: List[dict] = []
        upstream: List[str] = []   # job ids the next unit waits for
        cascade = False            # an earlier unit runs: later ones cannot be judged done yet
        renewed = False            # an earlier unit got a new job: queued later jobs wait on replaced ones
        for unit in self.units():
            if unit.array:
                keys = [(f"train:{c}:{f}", c, f) for c in self.o.configs for f in self.o.folds]
                todo = [(k, c, f) for k, c, f in keys if cascade or not self.task_done(c, f, unit.steps)]
            else:
                keys = [(unit.name, None, None)]
                todo = keys if cascade or not self.unit_done(unit, steps) else []
            if not todo:
                if not dry:
                    note(f"  {unit.name} ({', '.join(unit.steps)}): already done")
                continue
            kept, new = [], []
            for key, c, f in todo:
                last = self._last(records, key)
                if last and self._alive(last["job"], live):
                    if renewed:  # it waits on jobs that were replaced: replace it too
                        _slurm("scancel", last["job"], check=False)
                        note(f"  {key}: cancelled queued job {last['job']} (it waited on replaced jobs)")
                        new.append((key, c, f))
                    else:
                        kept.append(last)
                else:
                    if last and last["job"] in live:  # pending forever: its dependency failed
                        _slurm("scancel", last["job"], check=False)
                    new.append((key, c, f))
            for r in kept:
                if not dry:
                    note(f"  {r['key']}: job {r['job']} is {live[r['job']][0].lower()}; not submitted again")
            ids = [r["job"] for r in kept]
            follow += kept
            if new:
                if unit.array:
                    commands = [command_line(self.o, unit.steps, [c], [f]) for _, c, f in new]
                else:
                    commands = [command_line(self.o, unit.steps)]
                job, new_ids = self._sbatch(unit, commands, upstream, dry)
                for (key, c, f), job_id in zip(new, new_ids):
                    rec = dict(key=key, unit=unit.name, job=job_id, submitted=time.time(),
                               log=str(self._log_of(unit.name, job_id)), after=list(upstream))
                    records.append(rec)
                    follow.append(rec)
                if not dry:
                    note(f"  {unit.name} ({', '.join(unit.steps)}): submitted job {job}"
                         + (f" ({len(new)} task(s): " + ", ".join(f"{c} fold {f}" for _, c, f in new) + ")"
                            if unit.array else "") + (f", after {','.join(upstream)}" if upstream else ""))
                    self._save(records)
                ids += [job] if unit.array else new_ids
                renewed = True
            upstream = ids
            cascade = True
        return follow

    # ------------------------------------------------------------------ following
    def follow(self, jobs: List[dict], steps: Dict[str, Step]) -> int:
        order = [u.name for u in UNITS]
        pending = {r["job"]: r for r in jobs}
        note(f"following {len(pending)} job(s): {', '.join(pending)} (every {self.poll:g} s)")
        started: Dict[str, float] = {}
        while pending:
            live = self.live()
            for job, r in list(pending.items()):
                if job in live and "DependencyNeverSatisfied" not in live[job][1]:
                    if live[job][0] == "RUNNING" and job not in started:
                        started[job] = time.time()
                        note(f"  job {job} ({r['key']}) running (log: {r['log']})")
                    continue
                if job in live:  # its dependency failed: Slurm will cancel it (--kill-on-invalid-dep)
                    _slurm("scancel", job, check=False)
                    state, exit_code, reason = "CANCELLED", "0:0", "DependencyNeverSatisfied"
                else:
                    state, exit_code, reason = self.ended(job)
                del pending[job]
                if state == "UNKNOWN":  # forgotten by the controller: judge by the outputs
                    unit = self.units_by_name()[r["unit"]]
                    if unit.array:
                        _, config, fold = r["key"].split(":")
                        done = self.task_done(config, int(fold), unit.steps)
                    else:
                        done = self.unit_done(unit, steps)
                    state = "COMPLETED" if done else "FAILED"
                note(f"  job {job} ({r['key']}) ended: {state} (exit {exit_code})")
                if state.split()[0] not in FAILED_STATES:
                    continue
                # a failure: cancel what depends on it, show its log
                later = [j for j, o in pending.items() if order.index(o["unit"]) > order.index(r["unit"])]
                if later:
                    _slurm("scancel", *later, check=False)
                    note(f"  cancelled the jobs that depend on it: {', '.join(later)}")
                others = [j for j in pending if j not in later]
                TERMINAL.clear()
                shown = [r]
                if reason == "DependencyNeverSatisfied":  # the failure was upstream: show those jobs' logs
                    after = set(r.get("after", []))
                    upstream = [x for x in self.records() if x["job"] in after or x["job"].split("_")[0] in after]
                    failed = [x for x in upstream if self.ended(x["job"])[0].split()[0] in FAILED_STATES]
                    shown = failed or upstream or [r]
                for x in shown:
                    print(f"---- last lines of {x['log']} ----\n{log_tail(Path(x['log']))}", file=sys.stderr)
                why = f" ({reason})" if reason and reason != "None" else ""
                raise PipelineError(f"Slurm job {job} ({r['key']}) {state}{why}; full log: {r['log']}"
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
            ids = ",".join(r["job"] for r in jobs)
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
        records, live = self.records(), self.live()
        out: Dict[str, List[str]] = {}
        for u in UNITS:
            for r in records:
                if r["unit"] == u.name and r["job"] in live:
                    for s in u.steps:
                        out.setdefault(s, []).append(f"{r['job']} {live[r['job']][0].lower()}")
        return out
