"""What the user sees of the running jobs, and what their logs keep.

`Terminal` (one per process: `TERMINAL`, and `note()` for short) prints the pipeline's notes and,
on a terminal, one status line redrawn in place with what each running job last said.
`LogWriter` writes a job's output into its log through a filter that keeps a progress bar's
redraws out of the file (a few lines, not one per update); `log_tail` is what a failure shows.
"""
import shutil
import sys
import time
from pathlib import Path
from typing import Optional


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


def log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])
