"""The jobs' processes: starting one with its output pumped into its log, and stopping a job
together with every process it started.

`start` runs a job's command with its output (stdout and stderr) read by a thread into the job's
`LogWriter`; `Running.finish` appends the job's slot, times and exit status to WORK/logs/jobs.jsonl.
`stop` ends running jobs and their descendants (nnU-Net's data-loading and export workers):
SIGTERM to every process of each tree, SIGKILL to what is left after 10 seconds.
"""
import datetime
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_heart_ext.pipeline.steps import Job
from nnunet_heart_ext.pipeline.terminal import LogWriter, note


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
        with open(records, "a") as f:
            f.write(json.dumps(record) + "\n")


def start(job: Job, slot: Optional[str], env: Dict[str, str]) -> Running:
    """Start `job` on `slot` (None: no slot) with environment `env`; its log gets a header line,
    then the job's output."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    where = slot or "this machine"
    with open(job.log, "a") as f:
        f.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} on {where}: {job.command}\n")
    if job.note:
        note(f"  {job.name}: {job.note}")
    note(f"  $ {job.command}")
    proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)
    writer = LogWriter(job.log)
    thread = threading.Thread(target=_pump, args=(proc.stdout, writer), daemon=True)
    thread.start()
    note(f"  {job.name} started" + (f" on {slot}" if slot else "") + f" (log: {job.log})")
    return Running(job, slot, proc, writer, thread, time.time())


def stop(running: Dict[str, Running], records: Path):
    """Stop the running jobs and their process trees; each job's record is appended to `records`."""
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
        r.finish(records, r.proc.returncode)
    running.clear()
