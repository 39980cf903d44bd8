"""The Slurm client: every sbatch, squeue, scontrol, sacct and scancel call of the pipeline, and
its record of what it submitted (WORK/slurm/jobs.json, the scripts in WORK/slurm/scripts/).

`Slurm.sbatch` submits a `Unit` (one job, or one job array with a task per command) with its
`afterok` dependencies and `--kill-on-invalid-dep=yes`, so that Slurm itself cancels the
dependents of a failed job; its log goes to WORK/logs/slurm/. Which units there are, what each
runs and waits for, is the launcher's (`slurm_launcher.py`).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.options import Options, PipelineError
from nnunet_heart_ext.pipeline.terminal import note


@dataclass
class Unit:
    """One submission: a job running `steps` (array: one task per configuration and fold)."""
    name: str
    steps: List[str]
    gpu: bool = False
    array: bool = False


FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED")


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

    def records(self) -> List[dict]:
        if not self.record_file.is_file():
            return []
        return json.loads(self.record_file.read_text())["submissions"]

    def save(self, records: List[dict]):
        from nnunet_heart_ext.data.io import write_text

        write_text(json.dumps({"submissions": records}, indent=1), self.record_file)

    def last(self, records: List[dict], key: str) -> Optional[dict]:
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
    def alive(job: str, live: Dict[str, Tuple[str, str]]) -> bool:
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

    def cancel(self, *jobs: str):
        _slurm("scancel", *jobs, check=False)

    def script(self, unit: Unit, commands: List[List[str]], stamp: str) -> Path:
        path = self.layout.slurm_scripts / f"{unit.name}-{stamp}.sh"
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

    def sbatch(self, unit: Unit, commands: List[List[str]], after: List[str], dry: bool) -> Tuple[str, List[str]]:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        logs = self.layout.slurm_logs
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
        script = self.script(unit, commands, stamp)
        argv.append(str(script))
        note(f"  $ {shlex.join(argv)}")
        job = _slurm(*argv).stdout.strip().split(";")[0]
        ids = [f"{job}_{i}" for i in range(len(commands))] if unit.array else [job]
        return job, ids

    def log_of(self, unit: str, job: str) -> Path:
        return self.layout.slurm_logs / f"{unit}-{job}.log"
