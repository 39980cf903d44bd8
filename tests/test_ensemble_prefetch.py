"""predict-ensemble preprocesses the next cases in spawned worker processes while one is predicted
(nnunet_heart_ext/nnunet/prefetch.py): the same label maps as preprocessing in the process
(np.array_equal), in the cases' order; a case that cannot be preprocessed (a worker that raises or
dies) ends the command at once with an error naming its files and exit status 1, the label maps
written before it kept and nothing partial; no worker process is left after success or error.
`--inference_batch N` reaches the HeartPredictor of each model.

The first tests drive Prefetch with a stand-in preprocessor (tests/prefetch_stubs.py, seconds);
the slow ones run the command on test_predict_command.py's small random-weight models."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prefetch_stubs
from nnunet_heart_ext.nnunet import prefetch
from test_predict_command import BIN, images, labels, model_folder, plans  # noqa: F401 (images: a fixture)


def _stat(pid: str) -> list:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children() -> list:
    """This process's child processes (zombies too), but multiprocessing's resource tracker (one
    per process that used its locks, which lives as long as this one, by design)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(_stat(d.name)[1]) == os.getpid() \
                    and b"resource_tracker" not in (d / "cmdline").read_bytes():
                found.append((int(d.name), (d / "cmdline").read_bytes()))
        except (OSError, IndexError):
            continue  # ended meanwhile
    return found


def session_processes(sid: int, wait_s: float = 10.0) -> list:
    """Processes left in session `sid` (a command started with start_new_session=True, already
    ended: its workers would keep its session), after waiting up to wait_s for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int(_stat(d.name)[3]) == sid:
                    left.append((int(d.name), (d / "cmdline").read_bytes()))
            except (OSError, IndexError):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stub_models(*extra: dict):
    """Two models (factors 1 and 10), each dict's keys added to its stand-in dataset.json."""
    return [prefetch.Model(f"model{i}", None, prefetch_stubs.Config(), {"factor": 10 ** i, **e})
            for i, e in enumerate(extra or ({}, {}))]


CASES = [[f"{n}_0000.nii.gz"] for n in range(5)]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_cases_come_in_order_once_per_model(workers, tmp_path):
    # earlier cases slower: later ones are ready first
    models = stub_models({"delay": 0.15, "log": str(tmp_path)}, {"delay": 0.15, "log": str(tmp_path)})
    with prefetch.Prefetch(models, CASES, workers=workers) as inputs:
        got = list(inputs)
    assert [files for files, _ in got] == CASES
    for n, (_, per_model) in enumerate(got):
        assert len(per_model) == 2
        for factor, (data, props) in zip((1, 10), per_model):
            assert props["case"] == n and np.array_equal(data, np.full((1, 2, 2, 2), n * factor, np.float32))
        pids = {props["pid"] for _, props in per_model}
        assert (pids == {os.getpid()}) == (workers == 0), "workers 0: here; otherwise in the workers"
    calls = sorted(p.name.rsplit("-", 2)[0] for p in tmp_path.iterdir())
    assert calls == sorted(f"{n}-{factor}" for n in range(5) for factor in (1, 10)), "once per case and model"
    assert not children()


def test_at_most_cases_ahead_are_submitted():
    """Memory stays bounded: the case handed out and CASES_AHEAD more, whatever the number of cases."""
    with prefetch.Prefetch(stub_models(), CASES, workers=2) as inputs:
        for n, _ in enumerate(inputs):
            assert children(), "the workers, seen by children()"
            assert len(inputs._pending) <= prefetch.CASES_AHEAD
            submitted = [files for files, _ in inputs._pending]
            assert submitted == CASES[n + 1:n + 1 + prefetch.CASES_AHEAD]
    assert not children()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_worker_that_raises_names_the_case(workers):
    models = stub_models({}, {"fail": "raise", "at": 2})
    seen = []
    with pytest.raises(prefetch.PreprocessingError) as e:
        with prefetch.Prefetch(models, CASES, workers=workers) as inputs:
            for files, _ in inputs:
                seen.append(files)
    assert seen == CASES[:2]
    assert "2_0000.nii.gz" in str(e.value) and "model1" in str(e.value) and "OSError: cannot read" in str(e.value)
    assert not children()


@pytest.mark.parametrize("pause", [0.0, 3.0])
def test_a_worker_that_dies_ends_the_run_without_a_hang(pause):
    """The worker dies while its case is awaited, or (pause: the network is slow) before the next
    case is submitted (the pool refuses it)."""
    models = stub_models({}, {"fail": "die", "at": 1})
    start = time.monotonic()
    with pytest.raises(prefetch.PreprocessingError, match="ended abruptly.*1_0000.nii.gz"):
        with prefetch.Prefetch(models, CASES, workers=2) as inputs:
            for _ in inputs:
                time.sleep(pause)
    assert time.monotonic() - start < 120
    assert not children()


def test_an_error_of_the_caller_ends_the_workers():
    """The network fails on the first case while the next ones are being preprocessed: closing
    terminates their workers."""
    with pytest.raises(KeyError):
        with prefetch.Prefetch(stub_models({"delay": 1.0}, {"delay": 1.0}), CASES, workers=2) as inputs:
            for _ in inputs:
                raise KeyError("the network")
    assert not children()


def test_negative_workers_are_refused(capsys):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        prefetch.Prefetch(stub_models(), CASES, workers=-1)
    from nnunet_heart_ext import cli  # the command says so before loading any model

    for option, value in (("-npp", "-1"), ("--inference_batch", "0")):
        with pytest.raises(SystemExit) as e:
            cli.main(["predict-ensemble", "-i", "x", "-o", "y", "-m", str(Path(__file__).parent), option, value])
        assert e.value.code == 1 and f"{option} {value} must be" in capsys.readouterr().err


# ---------------------------------------------------------------- the command


def _env() -> dict:
    env = dict(os.environ, nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def ensemble(models, images_dir: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    """nnunet-heart predict-ensemble in a session of its own (see session_processes)."""
    with subprocess.Popen([str(BIN / "nnunet-heart"), "predict-ensemble", "-i", str(images_dir), "-o", str(out),
                           "-m", *map(str, models), "-f", "0", "-device", "cpu", *extra], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        stdout, stderr = p.communicate(timeout=600)
    proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    proc.left = session_processes(p.pid)
    return proc


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two models of different preprocessing (spacing), as in test_predict_command's ensemble test."""
    root = tmp_path_factory.mktemp("models")
    other = plans("OtherPlans")
    other["configurations"]["3d_fullres"]["spacing"] = [1.2, 1.1, 1.1]
    return [model_folder(root / "a", "HeartTrainer", plans(), folds=(0,)),
            model_folder(root / "b", "HeartTrainer", other, folds=(0,))]


def written_order(stdout: str) -> list:
    return [line.split(":")[0] for line in stdout.splitlines() if line.endswith("model(s) written")]


@pytest.mark.slow
def test_workers_write_what_the_process_writes(tmp_path, images, two_models, monkeypatch):
    here = ensemble(two_models, images, tmp_path / "here", "-npp", "0")
    ahead = ensemble(two_models, images, tmp_path / "ahead", "-npp", "2")
    for proc in (here, ahead):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert written_order(proc.stdout) == ["aniso", "iso"]
        assert not proc.left, proc.left
    for case in ("aniso", "iso"):
        assert np.array_equal(labels(tmp_path / "here", case), labels(tmp_path / "ahead", case)), case
    assert len(np.unique(labels(tmp_path / "here", "iso"))) >= 3

    # In this process: --continue_prediction queues only the missing case; --inference_batch 3 is
    # every HeartPredictor's, and its forward passes take up to 3 inputs (8 mirrorings a window).
    from nnunet_heart_ext import cli
    from nnunet_heart_ext.nnunet import ensemble_predict
    from nnunet_heart_ext.nnunet.predictor import HeartPredictor

    predictors, batches, queued = [], [], []
    make_predictor, make_prefetch = ensemble_predict._predictor, prefetch.Prefetch

    def recording_predictor(*args, **kwargs):
        p = make_predictor(*args, **kwargs)
        p.network.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0]))
        predictors.append(p)
        return p

    def recording_prefetch(models, cases, **kwargs):
        queued.extend(cases)
        return make_prefetch(models, cases, **kwargs)

    monkeypatch.setattr(ensemble_predict, "_predictor", recording_predictor)
    monkeypatch.setattr(prefetch, "Prefetch", recording_prefetch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # the PyTorch module runs the passes (the hook above sees them; OpenVINO's would not)
    monkeypatch.setenv("NNUNET_HEART_EXT_CPU_NETWORK", "float32")
    out = tmp_path / "batch3"
    out.mkdir()
    shutil.copy(tmp_path / "here" / "aniso.nii.gz", out / "aniso.nii.gz")
    before = (out / "aniso.nii.gz").stat().st_mtime_ns
    assert cli.main(["predict-ensemble", "-i", str(images), "-o", str(out), "-m", *map(str, two_models), "-f", "0",
                     "-device", "cpu", "-npp", "1", "--inference_batch", "3", "--continue_prediction"]) == 0
    assert [Path(files[0]).name for files in queued] == ["iso_0000.nii.gz"]
    assert (out / "aniso.nii.gz").stat().st_mtime_ns == before
    assert len(predictors) == 2 and all(isinstance(p, HeartPredictor) and p.inference_batch == 3 for p in predictors)
    assert max(batches) == 3
    # a batch of 3 sums the same windows in the same order: the labels agree up to float rounding
    assert (labels(out, "iso") == labels(tmp_path / "here", "iso")).mean() >= 0.999
    assert not children()


@pytest.mark.slow
@pytest.mark.parametrize("npp", ["2", "0"])
def test_a_broken_image_names_it_and_keeps_the_other_outputs(tmp_path, images, two_models, npp):
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    broken = folder / "b_broken_0000.nii.gz"
    broken.write_bytes(b"not an image, " * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "iso.nii.gz").write_bytes(b"an earlier prediction")  # after the broken case: left as it is
    proc = ensemble(two_models, folder, out, "-npp", npp)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert str(broken) in proc.stderr and "nnunet-heart predict-ensemble: error: preprocessing" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert written_order(proc.stdout) == ["aniso"]
    assert labels(out, "aniso").ndim == 3  # whole: it reads
    assert (out / "iso.nii.gz").read_bytes() == b"an earlier prediction"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["aniso.nii.gz", "iso.nii.gz", "predict_ensemble_args.json"]
    assert not [p for p in out.rglob("*") if p.is_file() and p.parent != out], "no partial file"
    assert not proc.left, proc.left
    json.loads((out / "predict_ensemble_args.json").read_text())


KILLED = """
import os, signal, sys
sys.path[:0] = {path!r}
import prefetch_stubs
from nnunet_heart_ext.nnunet import prefetch
models = [prefetch.Model("m", None, prefetch_stubs.Config(), {{"factor": 1, "delay": 30.0}})]
pool = prefetch.Prefetch(models, [[f"{{n}}_0000.nii.gz"] for n in (4, 0, 1)], workers=2)
next(iter(pool))  # case 4 (no delay); cases 0 and 1 are being preprocessed, 30 s each
print(*pool._pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_end_with_a_killed_command(tmp_path):
    log = tmp_path / "stdout"
    with log.open("w") as stdout:  # a file, not a pipe: a worker left would hold a pipe open
        proc = subprocess.run([sys.executable, "-c", KILLED.format(path=sys.path)], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    workers = [int(pid) for pid in log.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 20
    try:
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    finally:  # this test's workers, should they be left
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
