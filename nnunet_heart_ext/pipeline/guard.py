"""The guard each job's command runs under: the job's processes end when the pipeline ends, however
it ends.

    python -m nnunet_heart_ext.pipeline.guard PIPELINE_PID -- COMMAND [ARG ...]

The pipeline starts every job as this guard, in a process group of its own (`processes.start`);
the guard starts COMMAND in that group, and every process COMMAND starts (nnU-Net's data-loading
and export workers) inherits it. The guard

- asks Linux for a parent-death signal (`PR_SET_PDEATHSIG`, SIGTERM): when the pipeline dies, even
  by SIGKILL, the kernel tells the guard, which then stops the whole group;
- becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`): processes orphaned inside the job are
  reparented to it rather than to init, so they stay where it can see and end them;
- on SIGTERM, SIGINT or SIGHUP (from the pipeline stopping its jobs, or from the kernel as above)
  sends SIGTERM to the group, gives it `GRACE` seconds, then SIGKILL, and exits 128 + the signal;
- when COMMAND ends by itself, ends what it left behind in the group (a worker whose parent was
  killed by the out-of-memory killer) and exits with COMMAND's status (128 + N for signal N).

It holds the job's locks (their descriptors are passed to it) until all of that is over, so a rerun
never starts a fold while the previous run's trainer of it is still ending (locks.py). Off Linux
the two prctl calls are skipped and the rest still applies.
"""
import os
import signal
import subprocess
import sys
import time

GRACE = 10.0  # seconds between SIGTERM and SIGKILL
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def processes():
    """(pid, state, parent pid, process group) of every process (Linux: from /proc; none elsewhere)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            yield int(name), fields[0], int(fields[1]), int(fields[2])
        except (OSError, IndexError, ValueError):
            continue


def group_members(group: int = None) -> list:
    """The live processes of process group `group` (default: this one), this process aside."""
    me, group = os.getpid(), os.getpgrp() if group is None else group
    return [pid for pid, state, _, pgrp in processes() if pgrp == group and pid != me and state != "Z"]


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap() -> None:
    """Collect the exit status of every ended child (orphans reparented to this subreaper too)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_group(grace: float = GRACE) -> None:
    """SIGTERM to the group's other processes, SIGKILL to what is left after `grace` seconds."""
    _signal(group_members(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not group_members():
            return
        time.sleep(0.05)
    _signal(group_members(), signal.SIGKILL)
    for _ in range(100):
        _reap()
        if not group_members():
            return
        time.sleep(0.05)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run(parent: int, command: list) -> int:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # one stop; the group's SIGTERM reaches this process too
        raise _Stop(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    try:
        if os.getppid() != parent:  # the pipeline died before the death signal was asked for
            return 128 + signal.SIGTERM
        try:
            child = subprocess.Popen(command)
        except OSError as e:
            print(f"guard: cannot start {command[0]}: {e}", file=sys.stderr, flush=True)
            return 127
        rc = child.wait()
        leftovers = group_members()
        if leftovers:
            _signal(leftovers, signal.SIGKILL)
            time.sleep(0.1)
            _reap()
        return rc if rc >= 0 else 128 - rc
    except _Stop as e:
        end_group()  # also when the signal came while COMMAND was being started
        return 128 + e.signum


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m nnunet_heart_ext.pipeline.guard PIPELINE_PID -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    return run(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
