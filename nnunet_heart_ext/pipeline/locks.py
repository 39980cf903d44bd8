"""One run per work folder, one job per step or fold: advisory locks on files in WORK/locks/.

    pipeline.lock      held by a run (and by the Slurm submitter) for its whole life; a second
                       run on the same work folder is refused at once (`Busy`, exit 75) with the
                       holder's pid, host, start time and command line. --status and --dry-run
                       take no lock.
    fold-CONFIG-F.lock held while a fold trains or validates (by a local run and by a Slurm
    STEP.lock          training job alike), and by the job processes of that step or fold, so
                       that two jobs never train one fold: a Slurm job waits for the holder, a
                       local run is refused.

The lock is `fcntl.flock` on the file, held while the holding process, or a job process it handed
the lock to, keeps it open: the kernel drops it when the last of them ends, however they end
(SIGKILL included), so a killed holder leaves no lock behind and a rerun needs no manual step. The
job processes get the lock's descriptor (`fds`, passed to each job's guard, processes.py): after a
SIGKILL of the pipeline its jobs' processes take a few seconds to end, and until they have, their
step or fold stays locked. A rerun that finds a lock held by a dead pipeline on this host waits for
those processes instead of refusing.

Who holds a lock is written into its file (`Holder`, JSON) once it is taken, and cleared when it is
released; a holder that is still written there when the lock is taken was killed, and the log says
whose lock was taken over. (filelock, the usual library, is not used: it neither hands its
descriptor to child processes nor keeps the holder's details in the file.)
"""
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from nnunet_heart_ext.data.files import is_write_failure, write_error
from nnunet_heart_ext.pipeline.errors import Busy

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking (the pipeline runs on Linux and macOS)
    fcntl = None

# how long a rerun waits for the job processes of a killed pipeline (their guard gives them 10 s
# after SIGTERM, then SIGKILL) before it refuses to run
DEAD_HOLDER_WAIT = 120.0
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock."""
    pid: int
    host: str
    started: float
    command: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), time.time(), shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]))

    def describe(self) -> str:
        when = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {self.pid} on {self.host}, started {when}: {self.command}"

    def gone(self) -> bool:
        """True if the holder is a process of this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Lock:
    """An advisory lock on `path` (created with its folder). `what` names it in messages."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: Optional[int] = None
        self.taken_over: Optional[Holder] = None  # a killed holder whose lock this one took

    # ------------------------------------------------------------------ the holder, in the file
    def holder(self) -> Optional[Holder]:
        """The holder written in the file (None: none, or not readable yet)."""
        try:
            text = self.path.read_text()
            return Holder(**json.loads(text)) if text.strip() else None
        except (OSError, ValueError, TypeError):
            return None

    def _write_holder(self, holder: Holder) -> None:
        data = json.dumps(asdict(holder)).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    # ------------------------------------------------------------------ taking and releasing
    def _try(self) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in _UNSUPPORTED:
                print(f"[pipeline] warning: {self.path}: this file system does not support locks ({e.strerror}); "
                      f"a second run on the same folder is not detected", file=sys.stderr, flush=True)
                return True
            raise
        return True

    def acquire(self, wait: bool = False, say: Callable[[str], None] = print,
                wait_for_dead: float = DEAD_HOLDER_WAIT) -> "Lock":
        """Take the lock. Held by another process: with `wait`, wait for it (saying so); else
        raise Busy naming the holder, unless the holder is a dead process of this host whose job
        processes still end (then wait up to `wait_for_dead` seconds for them)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if is_write_failure(e):
                raise write_error(e, self.path, "create the lock") from e
            raise
        try:
            if not self._try():
                holder = self.holder()
                who = holder.describe() if holder else "holder unknown"
                if wait:
                    say(f"{self.what} is held by {who}; waiting for it")
                    deadline = None
                elif holder is not None and holder.gone():
                    say(f"{self.what} is still held by the job processes of a stopped run ({who}); waiting up to "
                        f"{wait_for_dead:.0f} s for them to end")
                    deadline = time.monotonic() + wait_for_dead
                else:
                    raise Busy(f"{self.what} is held by another run ({who}). Wait for it to finish or stop it "
                               f"(kill {holder.pid if holder else 'PID'}); --status and --dry-run work meanwhile "
                               f"(lock: {self.path})")
                while not self._try():
                    if deadline is not None and time.monotonic() > deadline:
                        raise Busy(f"{self.what} is still held by processes of a stopped run ({who}) after "
                                   f"{wait_for_dead:.0f} s; end them (see `ps`) and rerun (lock: {self.path})")
                    time.sleep(0.2)
            previous = self.holder()
            if previous is not None and (previous.pid, previous.host) != (os.getpid(), socket.gethostname()):
                self.taken_over = previous
                say(f"{self.what}: its holder ({previous.describe()}) is gone; lock taken over")
            self._write_holder(Holder.me())
        except BaseException:
            self._close()
            raise
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder: a later run takes it over without a word
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)  # the kernel drops the lock once no job process holds it either
            finally:
                self.fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held(locks) -> Tuple[int, ...]:
    """The descriptors of these held locks, for the job processes started while they are held."""
    return tuple(lock.fd for lock in locks if lock.fd is not None)
