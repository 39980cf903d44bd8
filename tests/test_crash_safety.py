"""What a kill, a second run, a cut-short file or a full disk leaves behind, made on purpose, and
what the extension does about it (issue 31). In-process and fast; the pipeline-level cases are in
test_pipeline.py (killed runs, leftovers, cut-short checkpoints) and test_slurm.py (a killed
submitter, a requeued job).

- Writes: a writer killed mid-write leaves nothing nnU-Net lists (nnU-Net's own listing functions
  are asked), and `sweep` removes what it left (and what earlier versions left beside the outputs).
- Locks: a second holder is refused with the holder's details; a killed holder's lock is taken
  over; one still held by the job processes of a killed run is waited for.
- "Done" means usable: cut-short checkpoints, JSON files and pickles are told from whole ones.
- HeartTrainer's checkpoints are written atomically: a failed save leaves the previous one whole.
- A full disk or a read-only folder: one WriteError line naming the path, the operation and the
  free space; the previous file intact. A real tiny file system is mounted where this machine
  allows it (root with CAP_SYS_ADMIN, as in CI), else the error is simulated.
"""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_heart_ext.data import files
from nnunet_heart_ext.data.files import PARTIAL_DIR, WriteError, ensure_writable, replace_atomically, sweep
from nnunet_heart_ext.data.io import write_image
from nnunet_heart_ext.pipeline.checks import checkpoint_problem, json_problem, pickle_problem
from nnunet_heart_ext.pipeline.errors import Busy
from nnunet_heart_ext.pipeline.locks import Holder, Lock


def _image(shape=(6, 8, 10)) -> sitk.Image:
    return sitk.GetImageFromArray(np.random.default_rng(0).random(shape).astype(np.float32))


def _nnunet_lists(folder: Path) -> list:
    """What nnU-Net takes for cases in an images folder (nnUNetv2_predict's and the planner's listing)."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    return sorted(Path(x[0]).name for x in create_lists_from_splitted_dataset_folder(str(folder), ".nii.gz"))


KILLED_WRITER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from nnunet_heart_ext.data.files import replace_atomically

    def write(tmp):
        tmp.write_bytes(b"\\x1f\\x8b" + b"x" * 1000)  # the start of a .nii.gz, never finished
        print("writing", flush=True)
        time.sleep(600)

    replace_atomically(write, Path(sys.argv[1]))
''')


# ----------------------------------------------------------------------------- writes and sweeps
def test_a_killed_writer_leaves_nothing_nnunet_lists_and_sweep_removes_it(tmp_path):
    images = tmp_path / "imagesTs"
    images.mkdir()
    write_image(_image(), images / "patient0001_0000.nii.gz")
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(images / "patient0002_0000.nii.gz")],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert _nnunet_lists(images) == ["patient0001_0000.nii.gz"]  # while it writes
    p.kill()
    p.wait()
    leftovers = list((images / PARTIAL_DIR).iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith("~patient0002_0000.nii.gz")
    assert _nnunet_lists(images) == ["patient0001_0000.nii.gz"]  # after the kill: nnU-Net sees one case
    # an earlier version's temporary lay beside the outputs, where nnU-Net takes it for a case
    legacy = images / ".tmp-0123456789ab-patient0003_0000.nii.gz"
    legacy.write_bytes(b"\x1f\x8b")
    assert ".tmp-0123456789ab-patient0003_0000.nii.gz" in _nnunet_lists(images)
    assert sorted(p.name for p in sweep(images)) == sorted([leftovers[0].name, legacy.name])
    assert sorted(p.name for p in images.iterdir()) == ["patient0001_0000.nii.gz"]  # the partial folder too


def test_sweep_keeps_what_a_running_writer_writes_unless_exclusive(tmp_path):
    folder = tmp_path / "fold_0"
    folder.mkdir()
    live = files.partial_path(folder / "checkpoint_latest.pth")  # this process: alive
    live.parent.mkdir()
    live.write_bytes(b"x")
    dead = live.parent / f"{files._HOST}~{2 ** 22 + 12345}~00000000~checkpoint_best.pth"  # no such pid
    dead.write_bytes(b"x")
    foreign = live.parent / "elsewhere~123~00000000~checkpoint_final.pth"  # another host's, recent
    foreign.write_bytes(b"x")
    assert sweep(folder) == [dead]
    assert live.exists() and foreign.exists()
    old = time.time() - files.FOREIGN_LEFTOVER_SECONDS - 60
    os.utime(foreign, (old, old))
    assert sweep(folder) == [foreign]
    assert sweep(folder, exclusive=True) == [live] and not (folder / PARTIAL_DIR).exists()


def test_replace_atomically_keeps_the_previous_file_on_failure(tmp_path):
    final = tmp_path / "out" / "summary.json"
    files.write_text('{"a": 1}', final)

    def fails(tmp):
        tmp.write_text('{"a": ')
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="killed halfway"):
        replace_atomically(fails, final)
    assert json.loads(final.read_text()) == {"a": 1}
    assert sorted(p.name for p in final.parent.iterdir()) == ["summary.json"]


def test_writers_sharing_a_folder_never_lose_a_file(tmp_path):
    """Export workers write into one folder at once; each removes the partial folder when it is
    empty: no write may fail because another removed it."""
    errors = []

    def writer(i):
        try:
            for k in range(40):
                files.write_text(str(k), tmp_path / f"case{i}_{k}.txt")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(list(tmp_path.glob("case*.txt"))) == 160
    assert not (tmp_path / PARTIAL_DIR).exists()


# ----------------------------------------------------------------------------- full disk, read-only
@contextmanager
def tiny_file_system(tmp_path: Path, size: str = "256k", read_only: bool = False):
    """A real tmpfs of `size` (read-only on request) where the machine lets root mount one, else
    None (the caller simulates the error)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if p.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path):
    """Fill the file system of `folder` to its last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)


def test_a_full_disk_gives_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """SimpleITK does not raise on a full disk (it prints an error and leaves a cut-short file): the
    check after it does, and the error is the one WriteError line."""
    from nnunet_heart_ext.data import io

    with tiny_file_system(tmp_path) as mount:
        simulated = mount is None
        if simulated:
            mount = tmp_path / "out"
            mount.mkdir()
        write_image(_image(), mount / "x.nii.gz")
        previous = (mount / "x.nii.gz").read_bytes()
        if simulated:  # what SimpleITK does on a full disk, and a disk with no room left
            monkeypatch.setattr(io.sitk, "WriteImage", lambda image, path, compress: Path(path).write_bytes(
                previous[:len(previous) // 3]))
            monkeypatch.setattr(files, "free_bytes", lambda path: 0)
        else:
            _fill(mount)
        with pytest.raises(WriteError) as e:
            write_image(_image((40, 64, 64)), mount / "x.nii.gz")
        message = e.value.strerror
        assert "\n" not in message and message.startswith(f"cannot write {mount / 'x.nii.gz'}: ")
        assert "No space left on device (ENOSPC)" in message and "GiB free on its file system" in message
        assert (mount / "x.nii.gz").read_bytes() == previous
        assert not (mount / PARTIAL_DIR).exists()


def test_a_read_only_folder_is_named_before_anything_runs(tmp_path, monkeypatch):
    with tiny_file_system(tmp_path, read_only=True) as mount:
        if mount is None:
            mount = tmp_path / "ro"
            mount.mkdir()
            real_mkdir = Path.mkdir

            def refuse(self, *a, **k):
                if str(self).startswith(str(mount)):
                    raise OSError(errno.EROFS, "Read-only file system", str(self))
                return real_mkdir(self, *a, **k)

            monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(WriteError) as e:
            ensure_writable(mount / "predictions" / "postprocessed")
        assert "Read-only file system" in e.value.strerror and "cannot create files in" in e.value.strerror
        assert str(mount / "predictions" / "postprocessed") in e.value.strerror
        assert not (mount / "predictions").exists()


def test_export_on_a_full_disk_exits_1_with_one_line_and_the_previous_zip(tmp_path):
    """`nnunet-heart export` to a full file system: exit 1, one line, the old predict.zip intact."""
    with tiny_file_system(tmp_path, size="96k") as mount:
        if mount is None:
            pytest.skip("needs a tmpfs mount (root with CAP_SYS_ADMIN); the error itself is covered above")
        images, pred = tmp_path / "imagesTs", tmp_path / "pred"
        images.mkdir()
        pred.mkdir()
        rng = np.random.default_rng(1)
        for i in range(3):
            ref = sitk.GetImageFromArray(rng.random((20, 40, 40)).astype(np.float32))
            sitk.WriteImage(ref, str(images / f"patient000{i}_0000.nii.gz"))
            label = sitk.GetImageFromArray(rng.integers(0, 4, (20, 40, 40)).astype(np.uint8))
            label.CopyInformation(ref)
            sitk.WriteImage(label, str(pred / f"patient000{i}.nii.gz"))
        (mount / "predict.zip").write_bytes(b"the previous submission")
        _fill(mount)
        p = subprocess.run([str(Path(sys.executable).parent / "nnunet-heart"), "export", "--pred", str(pred),
                            "--images", str(images), "--out", str(mount / "predict.zip")], capture_output=True,
                           text=True)
        assert p.returncode == 1
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("nnunet-heart export: error: cannot write") and str(mount / "predict.zip") in last
        assert "No space left on device" in last and "GiB free" in last and "Traceback" not in p.stderr
        assert (mount / "predict.zip").read_bytes() == b"the previous submission"


# ----------------------------------------------------------------------------- "done" means usable
def _checkpoint(path: Path):
    torch.save({"network_weights": {"w": torch.rand(128, 128)}, "current_epoch": 3, "logging": {}}, path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_cut_short_checkpoint_is_not_usable(tmp_path, keep):
    path = tmp_path / "checkpoint_final.pth"
    _checkpoint(path)
    assert checkpoint_problem(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    assert checkpoint_problem(path) is not None
    assert checkpoint_problem(tmp_path / "none.pth") == "missing"


def test_cut_short_json_and_pickles_are_not_usable(tmp_path):
    j, p = tmp_path / "summary.json", tmp_path / "postprocessing.pkl"
    j.write_text(json.dumps({"mean": {"1": {"Dice": 0.9}}}))
    p.write_bytes(pickle.dumps({"a": np.zeros(100)}))
    assert json_problem(j) is None and pickle_problem(p) is None
    j.write_text(j.read_text()[:-3])
    p.write_bytes(p.read_bytes()[:-10])
    assert "cut short" in json_problem(j) and "cut short" in pickle_problem(p)


# ----------------------------------------------------------------------------- HeartTrainer's checkpoints
def _trainer(folder: Path):
    """A HeartTrainer with just what nnU-Net's save_checkpoint reads (no dataset, no plans)."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from nnunet_heart_ext.trainers import HeartTrainer

    t = object.__new__(HeartTrainer)
    t.local_rank, t.disable_checkpointing, t.is_ddp = 0, False, False
    t.network = torch.nn.Linear(64, 64)
    t.optimizer = torch.optim.SGD(t.network.parameters(), lr=0.1)
    t.grad_scaler, t.logger, t._best_ema, t.current_epoch = None, MetaLogger(str(folder), False), None, 4
    t.my_init_kwargs, t.inference_allowed_mirroring_axes, t.output_folder = {}, (0, 1, 2), str(folder)
    return t


def test_heart_trainer_saves_checkpoints_atomically(tmp_path, monkeypatch):
    t = _trainer(tmp_path)
    final = tmp_path / "checkpoint_latest.pth"
    t.save_checkpoint(str(final))
    saved = torch.load(final, weights_only=False)
    assert saved["current_epoch"] == 5 and saved["trainer_name"] == "HeartTrainer"
    before = final.read_bytes()

    real_save = torch.save

    def killed_halfway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise KeyboardInterrupt  # stands in for a kill during the save

    monkeypatch.setattr(torch, "save", killed_halfway)
    t.current_epoch = 9
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(str(final))
    assert final.read_bytes() == before and checkpoint_problem(final) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]


def test_heart_trainer_checkpoint_on_a_full_disk(tmp_path):
    with tiny_file_system(tmp_path, size="128k") as mount:
        if mount is None:
            pytest.skip("needs a tmpfs mount (root with CAP_SYS_ADMIN); atomicity itself is covered above")
        t = _trainer(mount)
        t.network = torch.nn.Linear(16, 16)
        t.optimizer = torch.optim.SGD(t.network.parameters(), lr=0.1)
        final = mount / "checkpoint_latest.pth"
        t.save_checkpoint(str(final))
        before = final.read_bytes()
        t.network = torch.nn.Linear(256, 256)  # 256 KiB of weights: does not fit
        t.optimizer = torch.optim.SGD(t.network.parameters(), lr=0.1)
        with pytest.raises(WriteError, match="cannot save checkpoint .*checkpoint_latest.pth.*GiB free"):
            t.save_checkpoint(str(final))
        assert final.read_bytes() == before and not (mount / PARTIAL_DIR).exists()


# ----------------------------------------------------------------------------- locks
def test_a_second_holder_is_refused_with_the_holders_details(tmp_path):
    path = tmp_path / "locks" / "pipeline.lock"
    first = Lock(path, "the work folder W").acquire(say=lambda m: None)
    try:
        holder = Lock(path, "x").holder()
        assert holder == Holder(os.getpid(), holder.host, holder.started, holder.command)
        with pytest.raises(Busy) as e:
            Lock(path, "the work folder W").acquire(say=lambda m: None)
        message = str(e.value)
        assert message.startswith("the work folder W is held by another run (pid %d on %s, started " %
                                   (os.getpid(), holder.host)) and str(path) in message
        assert e.value.exit_code == 75
    finally:
        first.release()
    Lock(path, "the work folder W").acquire(say=lambda m: None).release()  # free again


HOLD_AND_DIE = textwrap.dedent('''
    import os, subprocess, sys
    from nnunet_heart_ext.pipeline.locks import Lock
    lock = Lock(sys.argv[1], "the fold").acquire(say=print)
    if sys.argv[2] == "child":  # a job process keeps the lock after this holder dies (as a guard does)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(float(%r))" % sys.argv[3]],
                         pass_fds=(lock.fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("held", flush=True)
    os._exit(0)  # killed: no release
''')


def test_a_killed_holders_lock_is_taken_over_with_a_line(tmp_path):
    path = tmp_path / "fold.lock"
    p = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(path), "alone", "0"], capture_output=True, text=True)
    assert "held" in p.stdout
    said = []
    lock = Lock(path, "the fold").acquire(say=said.append)
    try:
        assert lock.taken_over is not None and lock.taken_over.gone()
        assert said == [f"the fold: its holder ({lock.taken_over.describe()}) is gone; lock taken over"]
    finally:
        lock.release()
    said.clear()
    Lock(path, "the fold").acquire(say=said.append).release()
    assert said == []  # released properly: nothing to take over


def test_a_lock_held_by_a_killed_runs_job_processes_is_waited_for(tmp_path):
    path = tmp_path / "fold.lock"
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(path), "child", "3"], capture_output=True, text=True)
    assert "held" in p.stdout
    said = []
    lock = Lock(path, "the fold").acquire(say=said.append, wait_for_dead=60)
    try:
        assert time.monotonic() - started >= 3  # it waited for the job process to end
        assert "still held by the job processes of a stopped run" in said[0] and "taken over" in said[1]
    finally:
        lock.release()


def test_a_slurm_job_waits_for_the_holder_of_its_fold(tmp_path):
    path = tmp_path / "fold.lock"
    holder = Lock(path, "the fold").acquire(say=lambda m: None)
    threading.Timer(1.0, holder.release).start()
    said = []
    started = time.monotonic()
    Lock(path, "3d_fullres fold 0 of W").acquire(wait=True, say=said.append).release()
    assert time.monotonic() - started >= 0.9
    assert said[0].startswith(f"3d_fullres fold 0 of W is held by pid {os.getpid()}") and "waiting" in said[0]
