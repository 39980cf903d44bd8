"""The Slurm client: every sbatch, squeue, scontrol, sacct and scancel call of the pipeline, and
its record of what it submitted (WORK/slurm/jobs.json, the scripts in WORK/slurm/scripts/).

`Slurm.sbatch` submits a `Unit` (one job, or one job array with a task per command) with its
`afterok` dependencies and `--kill-on-invalid-dep=yes`, so that Slurm itself cancels the
dependents of a failed job; its log goes to WORK/logs/slurm/ (appended to, so a requeued job's
runs follow one another). Which units there are, what each runs and waits for, is the launcher's
(`slurm_launcher.py`).

A submission is recorded before it can be lost: each gets a job name of its own
(`heart-UNIT-TOKEN`), written into jobs.json (as a `Submission` without a job id) before sbatch
runs. A submitter killed between sbatch and recording the id leaves that record; the next run finds
the job by its name in the queue (`recover`) instead of submitting it again.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from nnunet_heart_ext.data.files import write_text
from nnunet_heart_ext.pipeline.errors import PipelineError
from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.options import Options
from nnunet_heart_ext.pipeline.terminal import note


@dataclass
class Unit:
    """One submission: a job running `steps` (array: one task per configuration and fold)."""
    name: str
    steps: List[str]
    gpu: bool = False
    array: bool = False


@dataclass
class Submission:
    """One submitted job, or one task of a submitted array, as WORK/slurm/jobs.json keeps it."""
    key: str                     # what it runs: the unit's name, or train:CONFIG:FOLD for a fold (`fold_key`)
    unit: str
    name: str                    # the Slurm job name, unique to this submission
    submitted: float
    after: List[str] = field(default_factory=list)  # the job ids it waits for (afterok)
    job: Optional[str] = None    # Slurm's id (an array task's: ARRAYID_TASK); None until sbatch answered
    task: Optional[int] = None   # its index in the array
    log: str = ""                # its Slurm log (known once the id is)
    config: Optional[str] = None  # the fold it trains (array tasks)
    fold: Optional[int] = None

    @classmethod
    def from_json(cls, record: dict) -> "Submission":
        known = {f.name for f in fields(cls)}
        record = dict(record)
        record.setdefault("name", "")  # records of earlier versions named no job
        return cls(**{k: v for k, v in record.items() if k in known})


def fold_key(config: str, fold: int) -> str:
    return f"train:{config}:{fold}"


class LiveJob(NamedTuple):
    """A queued or running job (array tasks one by one), as squeue shows it."""
    state: str
    reason: str
    name: str


FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED")
NEVER = "DependencyNeverSatisfied"


def _slurm(*argv, check=True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise PipelineError(f"{argv[0]} not found on PATH: --launcher slurm runs on a Slurm login node")
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise PipelineError(f"{shlex.join(argv)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


class Slurm:
    """This user's Slurm queue, and the record of this work folder's submissions."""

    def __init__(self, o: Options, layout: Layout):
        self.o, self.layout = o, layout
        self.record_file = layout.slurm_records

    # ------------------------------------------------------------------ the record
    def records(self) -> List[Submission]:
        if not self.record_file.is_file():
            return []
        try:
            return [Submission.from_json(r) for r in json.loads(self.record_file.read_text())["submissions"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{self.record_file}: cannot read the Slurm submissions ({type(e).__name__}: {e}); "
                                f"move it away to start the record afresh (queued jobs are then not recognised)")

    def save(self, records: List[Submission]):
        write_text(json.dumps({"submissions": [asdict(r) for r in records]}, indent=1), self.record_file)

    @staticmethod
    def last(records: List[Submission], key: str) -> Optional[Submission]:
        found = [r for r in records if r.key == key]
        return found[-1] if found else None

    def recover(self, records: List[Submission], live: Dict[str, LiveJob], say=note) -> bool:
        """Give each record without a job id (its submitter was killed before it recorded the
        answer of sbatch) the id of the queued or running job of its name; True if any was found."""
        found = False
        for r in records:
            if r.job is not None or not r.name:
                continue
            ids = [j for j, x in live.items() if x.name == r.name
                   and (r.task is None or j.rsplit("_", 1)[-1] == str(r.task))]
            if len(ids) == 1:
                r.job, r.log = ids[0], str(self.log_of(r.unit, ids[0]))
                say(f"  {r.key}: found job {r.job} ({r.name}) in the queue; a killed run submitted it without "
                    f"recording it")
                found = True
        return found

    # ------------------------------------------------------------------ the queue
    def live(self) -> Dict[str, LiveJob]:
        """Job id -> LiveJob of this user's queued and running jobs (array tasks one by one)."""
        out = {}
        for line in _slurm("squeue", "--me", "-h", "-r", "-o", "%i|%T|%r|%j").stdout.splitlines():
            parts = line.strip().split("|", 3)
            if len(parts) == 4:
                out[parts[0]] = LiveJob(*parts[1:])
        return out

    @staticmethod
    def alive(job: Optional[str], live: Dict[str, LiveJob]) -> bool:
        state = live.get(job) if job else None
        return state is not None and NEVER not in state.reason

    def ended(self, job: str) -> Tuple[str, str, str]:
        """(state, exit code, reason) of a job that left the queue: scontrol while the controller
        remembers it, else sacct where accounting exists, else UNKNOWN."""
        p = _slurm("scontrol", "-o", "show", "job", job, check=False)
        if p.returncode == 0 and "JobState=" in p.stdout:
            fields_ = dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
            return fields_.get("JobState", "UNKNOWN"), fields_.get("ExitCode", "?"), fields_.get("Reason", "")
        if shutil.which("sacct"):
            p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State,ExitCode"], capture_output=True,
                               text=True)
            if p.returncode == 0 and p.stdout.strip():
                state, exit_code = (p.stdout.strip().splitlines()[0].split("|") + ["?"])[:2]
                return state.split()[0], exit_code, ""
        return "UNKNOWN", "?", ""

    def cancel(self, *jobs: str):
        _slurm("scancel", *jobs, check=False)

    # ------------------------------------------------------------------ submitting
    @staticmethod
    def job_name(unit: Unit) -> str:
        """A name no other submission has: how a rerun recognises the job in the queue."""
        return f"heart-{unit.name}-{uuid.uuid4().hex[:8]}"

    def script(self, unit: Unit, commands: List[List[str]], stamp: str) -> Path:
        path = self.layout.slurm_scripts / f"{unit.name}-{stamp}.sh"
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
        write_text("\n".join(lines) + "\n", path)
        path.chmod(0o755)
        return path

    def sbatch(self, unit: Unit, commands: List[List[str]], after: List[str], name: str,
               dry: bool) -> Tuple[str, List[str]]:
        """Submit `unit` as job `name`; (job id, the id of each command's job or task)."""
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        logs = self.layout.slurm_logs
        argv = ["sbatch", "--parsable", "--open-mode=append",
                f"--output={logs / (unit.name + ('-%A_%a.log' if unit.array else '-%j.log'))}"]
        if unit.array:
            argv.append(f"--array=0-{len(commands) - 1}")
        if unit.gpu:
            argv.append("--requeue")  # preempted or requeued: it runs again and continues from its checkpoint
            if self.o.device.gpu:
                argv.append("--gres=gpu:1")
        if after:
            argv += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        argv += self.o.slurm_args
        argv.append(f"--job-name={name}")  # after --slurm-args: a rerun finds the job by this name
        if dry:
            print(shlex.join(argv + [f"<{unit.name} script>"]))
            for i, c in enumerate(commands):
                print(f"#   job{' task ' + str(i) if unit.array else ''}: {shlex.join(c)}")
            return f"<{unit.name}>", [f"<{unit.name}>" + (f"_{i}" if unit.array else "") for i in range(len(commands))]
        logs.mkdir(parents=True, exist_ok=True)
        script = self.script(unit, commands, stamp)
        argv.append(str(script))
        note(f"  $ {shlex.join(argv)}")
        job = _slurm(*argv).stdout.strip().split(";")[0]
        ids = [f"{job}_{i}" for i in range(len(commands))] if unit.array else [job]
        return job, ids

    def log_of(self, unit: str, job: str) -> Path:
        return self.layout.slurm_logs / f"{unit}-{job}.log"
