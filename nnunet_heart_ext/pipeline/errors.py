"""What can stop a pipeline run, and the exit status each gives (`main` turns them into one line
on stderr and that status).

    PipelineError  a problem the user can fix (bad option, missing or broken file): exit 1
    NotReady       a step cannot run yet, an earlier step's outputs are missing: exit 1
    Busy           another run holds the lock of this work folder, step or fold: exit 75
                   (EX_TEMPFAIL: try again later)
    Stopped        SIGTERM, SIGINT or SIGHUP: the jobs are stopped, exit 128 + the signal
"""
import signal

EXIT_ERROR = 1
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL


class PipelineError(Exception):
    """A problem the user can fix; printed as `error: ...`, exit status 1."""
    exit_code = EXIT_ERROR


class NotReady(PipelineError):
    """A step cannot run yet: an earlier step's outputs are missing."""


class Busy(PipelineError):
    """Another run holds a lock this run needs (the message names the holder)."""
    exit_code = EXIT_BUSY


class Stopped(BaseException):
    """The pipeline got SIGTERM, SIGINT or SIGHUP (BaseException, like KeyboardInterrupt, so that
    no `except Exception` swallows it on its way up)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
