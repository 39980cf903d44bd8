"""Writing files so that a kill never leaves half a file where anyone looks, and removing what
killed writers left: the project's one atomic writer, used by `phantom`, `prepare`, `export`, the
pipeline, the prediction export, the .npz writer and HeartTrainer's checkpoints.

A file is written under a temporary name in the hidden folder `PARTIAL_DIR` inside its destination
folder (same file system), flushed to disk, then moved into place with `os.replace`. So a reader
never sees half a file, an interrupted run leaves no partial output under the final name, and a
killed writer's leftover lies where nnU-Net never looks: nnU-Net lists a folder's files by their
ending (`CASE_0000.nii.gz`), never the files of its subfolders. The temporary name keeps the final
name's ending (SimpleITK picks its writer by it) and says who wrote it (`HOST~PID~RANDOM~NAME`), so
`sweep` can tell a killed writer's leftover from a file being written right now. `sweep` also
removes the temporaries of earlier versions, which lay beside the outputs (`.tmp-<hex>-NAME`, which
nnU-Net did list). A write that fails for lack of room or permission raises `WriteError`: one line
naming the path, the operation and the free space.
"""
import errno
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional


# ----------------------------------------------------------------------------- atomic writes
PARTIAL_DIR = ".heart-partial"  # in an output folder: files being written, moved into place when complete
_HOST = socket.gethostname().replace("~", "-")
_SEP = "~"
# temporaries of earlier versions, beside the outputs: data/io's `.tmp-<12 hex>-NAME` (nnU-Net lists
# them), the .npz writer's `.NAME.<pid>.<8 hex>.tmp`, prepare's `.tmp-<8 chars>` folders
_LEGACY = re.compile(r"^\.tmp-[0-9a-f]{12}-.+$|^\..+\.\d+\.[0-9a-f]{8}\.tmp$|^\.tmp-[a-z0-9_]{8}$")
# a leftover of a writer on another machine is removed by a non-exclusive sweep after this long
FOREIGN_LEFTOVER_SECONDS = 24 * 3600
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})


class WriteError(OSError):
    """A write that failed for lack of room or permission; its message is one line naming the
    path, the operation and the free space on that file system."""


def free_bytes(path: Path) -> Optional[int]:
    """Free space for an unprivileged user on the file system of `path` (or of its nearest
    existing parent); None if it cannot be told."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def write_error(error: OSError, path: Path, operation: str) -> WriteError:
    """The one-line WriteError for `error`, met while doing `operation` to `path`."""
    free = free_bytes(path)
    room = f"{free / 1024 ** 3:.2f} GiB free on its file system" if free is not None else "free space unknown"
    code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
    e = WriteError(error.errno, f"cannot {operation} {path}: {error.strerror or error} ({code}); {room}")
    e.filename = str(path)
    return e


def is_write_failure(error: BaseException) -> bool:
    """True for an OSError of lack of room or permission (a WriteError's cause)."""
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


def partial_path(final: Path) -> Path:
    """Where `final` is written before it is complete: in PARTIAL_DIR beside it, named with this
    host and process (so `sweep` knows whether its writer still runs) and ending like `final`.
    Not created here, so the file gets the usual permissions (mkstemp would make it private)."""
    final = Path(final)
    return final.parent / PARTIAL_DIR / _SEP.join((_HOST, str(os.getpid()), uuid.uuid4().hex[:8], final.name))


def _fsync(path: Path) -> None:
    """Flush a finished file (or a folder's entries) to disk, so a crash of the machine after the
    rename cannot leave a complete name on incomplete data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync of a folder; the rename is still atomic
    finally:
        os.close(fd)


def replace_atomically(write: Callable[[Path], object], final: Path, operation: str = "write") -> Path:
    """Call write(temporary path), flush it, move it to `final`; on any error remove the temporary
    (`final` keeps its previous content). Lack of room or permission raises WriteError (also when
    the writer reports it as something else: torch.save's RuntimeError on a full disk)."""
    final = Path(final)
    tmp = partial_path(final)
    try:
        for attempt in range(5):
            _make_folder(tmp.parent)
            try:
                write(tmp)
                break
            except BaseException as e:
                # a concurrent writer removed the (empty) partial folder between our mkdir and write
                # (and another may have made it again since)
                if attempt < 4 and (isinstance(e, FileNotFoundError) or not tmp.parent.is_dir()):
                    _remove(tmp)
                    continue
                raise
        if not tmp.exists() and not tmp.is_symlink():
            raise FileNotFoundError(errno.ENOENT, f"the writer of {final} wrote nothing", str(tmp))
        if not tmp.is_symlink():
            _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException as e:
        cause = _write_failure(e, tmp)  # before the temporary goes: it may be what filled the disk
        _remove(tmp)
        _remove_if_empty(tmp.parent)
        if cause is not None:
            raise write_error(cause, final, operation) from e
        raise
    _remove_if_empty(tmp.parent)  # other writers may be using it
    return final


def _make_folder(folder: Path) -> None:
    """mkdir -p, tolerating a concurrent writer that removes the folder while it is made (Path.mkdir
    with exist_ok raises FileExistsError when the folder vanishes between its two checks); the
    write that follows then fails and is retried."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass


FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full disk


def _write_failure(error: BaseException, tmp: Path) -> Optional[OSError]:
    """The lack of room or permission behind a failed write, if that is what it was."""
    if isinstance(error, WriteError) or not isinstance(error, Exception):
        return None
    if is_write_failure(error):
        return error
    free = free_bytes(tmp.parent)
    if free is not None and free < FULL_BELOW:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _writer_gone(name: str, mtime: float) -> bool:
    """Whether the writer of the partial file `name` is gone: a process of this host that no
    longer exists, or a writer on another host whose file has not changed for a day."""
    parts = name.split(_SEP, 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return True  # not one of ours as this version names them
    host, pid = parts[0], int(parts[1])
    if host != _HOST:
        return time.time() - mtime > FOREIGN_LEFTOVER_SECONDS
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def sweep(folder: Path, exclusive: bool = False) -> List[Path]:
    """Remove the leftovers of killed writers from `folder` (not its subfolders): the files in its
    PARTIAL_DIR whose writer is gone (all of them with `exclusive`, for a caller that knows nothing
    else writes into `folder` now, e.g. it holds the lock of this step or fold) and earlier
    versions' temporaries beside the outputs. Returns what was removed."""
    folder = Path(folder)
    removed: List[Path] = []
    partial = folder / PARTIAL_DIR
    try:
        entries = list(partial.iterdir())
    except OSError:
        entries = []
    for f in entries:
        try:
            mtime = f.lstat().st_mtime
        except OSError:
            continue
        if exclusive or _writer_gone(f.name, mtime):
            _remove(f)
            removed.append(f)
    if entries:
        _remove_if_empty(partial)
    try:
        legacy = [f for f in folder.iterdir() if _LEGACY.match(f.name)]
    except OSError:
        legacy = []
    for f in legacy:
        _remove(f)
        removed.append(f)
    return removed


def ensure_writable(folder: Path) -> None:
    """Check that files can be created in `folder` (as its writers will, in PARTIAL_DIR), or in
    its nearest existing parent when it does not exist yet (nothing is created for good);
    WriteError naming the folder if not."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return
    probe = partial_path(existing / "write-probe")
    created = not probe.parent.is_dir()
    try:
        probe.parent.mkdir(exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise write_error(e, folder, "create files in") from e
    finally:
        _remove(probe)
        if created:
            _remove_if_empty(probe.parent)


def write_text(text: str, path: Path) -> Path:
    return replace_atomically(lambda tmp: tmp.write_text(text), Path(path))


def append_line(line: str, path: Path) -> None:
    """Append one line to a record file (WORK/logs/jobs.jsonl) in a single write: a kill leaves
    whole lines (O_APPEND writes of one call do not interleave with other appenders)."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        if is_write_failure(e):
            raise write_error(e, path, "append to") from e
        raise


def copy_file(src: Path, dst: Path) -> Path:
    """Atomic copy keeping the modification time (so an unchanged source is recognised later)."""
    return replace_atomically(lambda tmp: shutil.copy2(src, tmp), Path(dst), "copy to")


def link_file(src: Path, dst: Path) -> Path:
    """Atomic symbolic link dst -> absolute src (replaces whatever dst was)."""
    dst = Path(dst)

    def write(tmp):
        os.symlink(Path(src).resolve(), tmp)

    return replace_atomically(write, dst, "link")


def up_to_date(src: Path, dst: Path, link: bool) -> bool:
    """True if dst already is what copy_file/link_file would make of src."""
    if link:
        return dst.is_symlink() and Path(os.readlink(dst)) == Path(src).resolve()
    if dst.is_symlink() or not dst.is_file():
        return False
    s, d = Path(src).stat(), dst.stat()
    return s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns
