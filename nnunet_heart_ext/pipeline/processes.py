"""The jobs' processes: starting one with its output pumped into its log, and stopping a job
together with every process it started.

`start` runs a job's command under its guard (guard.py) in a process group of its own, with its
output (stdout and stderr) read by a thread into the job's `LogWriter`, and hands the guard the
descriptors of the locks its step holds; `Running.finish` appends the job's slot, times and exit
status to WORK/logs/jobs.jsonl (one whole line per write). `stop` ends running jobs with every
process they started (nnU-Net's data-loading and export workers, all in the job's group): SIGTERM
to each group, SIGKILL to what is left after 10 seconds. If the pipeline itself is killed, the
guards end their groups (parent-death signal).
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_heart_ext.data.files import append_line
from nnunet_heart_ext.pipeline import guard
from nnunet_heart_ext.pipeline.steps import Job
from nnunet_heart_ext.pipeline.terminal import LogWriter, note

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the pipeline stops its jobs


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


def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for pid, _, ppid, _ in guard.processes():
        tree.setdefault(ppid, []).append(pid)
    return tree


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants (nnU-Net's data-loading and export workers)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the job's group still exists (zombies aside)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return bool(guard.group_members(pgid)) if os.path.isdir("/proc") else True


@dataclass
class Running:
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
        append_line(json.dumps(record), records)


def guarded(argv: List[str]) -> List[str]:
    """`argv` run under the guard (guard.py), which ends it with this process."""
    return [sys.executable, "-m", "nnunet_heart_ext.pipeline.guard", str(os.getpid()), "--", *argv]


def start(job: Job, slot: Optional[str], env: Dict[str, str], fds: Sequence[int] = ()) -> Running:
    """Start `job` on `slot` (None: no slot) with environment `env`, its guard holding the lock
    descriptors `fds`; its log gets a header line, then the job's output."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    where = slot or "this machine"
    with open(job.log, "a") as f:
        f.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} on {where}: {job.command}\n")
    if job.note:
        note(f"  {job.name}: {job.note}")
    note(f"  $ {job.command}")
    proc = subprocess.Popen(guarded(job.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True, pass_fds=tuple(fds))
    writer = LogWriter(job.log)
    thread = threading.Thread(target=_pump, args=(proc.stdout, writer), daemon=True)
    thread.start()
    note(f"  {job.name} started" + (f" on {slot}" if slot else "") + f" (log: {job.log})")
    return Running(job, slot, proc, writer, thread, time.time())


def stop(running: Dict[str, Running], records: Path):
    """Stop the running jobs with every process of their groups; each job's record is appended to
    `records`."""
    for r in running.values():
        _signal_group(r.proc.pid, signal.SIGTERM)  # the guard leads its job's group: its pid is the group's id
    deadline = time.time() + STOP_GRACE
    for name, r in running.items():
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        while group_alive(r.proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        _signal_group(r.proc.pid, signal.SIGKILL)
        r.proc.wait()
        r.finish(records, r.proc.returncode)
    running.clear()
