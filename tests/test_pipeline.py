"""ensemble_pipeline.sh end to end on a tiny phantom, on the CPU.

One pipeline run (two folds in parallel) is shared by most assertions; the kill test copies its
prepared and preprocessed data and its finished fold 0, then kills a run while fold 1 trains.
The trainer is a throwaway class found through nnU-Net's official `nnUNet_extTrainer` folder
(3 epochs x 2 iterations, a checkpoint every epoch), which also checks that
nnUNet_extTrainer keeps working next to the extension's import hook.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_heart_ext import pipeline_utils

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ensemble_pipeline.sh"
TEST_CASES = ["patient0006", "patient0007"]  # 5 training cases (nnU-Net's 5-fold split needs 5), 2 test
MODEL = "PipelineTestTrainer__HeartDemoPlans__3d_fullres"

TRAINER_SOURCE = '''
from nnunet_heart_ext.trainers import HeartTrainer


class PipelineTestTrainer(HeartTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1
        self.test_time_mirroring = False


class PipelineFailingTrainer(PipelineTestTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        if fold == 1:
            raise RuntimeError("deliberate failure in fold 1")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1000  # fold 0 must still be running when fold 1 fails
'''


def _shrink(folder: Path, factor: float = 3.0) -> None:
    """Resample every case to 1/factor of its size (same physical extent): patches then cover
    whole images, so validation and prediction take one window per case."""
    for path in folder.glob("*/*.nii.gz"):
        img = sitk.ReadImage(str(path))
        size = [max(8, int(round(s / factor))) for s in img.GetSize()]
        spacing = [sp * s / n for sp, s, n in zip(img.GetSpacing(), img.GetSize(), size)]
        interp = sitk.sitkNearestNeighbor if path.name.endswith("_gt.nii.gz") else sitk.sitkLinear
        out = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), spacing,
                            img.GetDirection(), 0, img.GetPixelID())
        sitk.WriteImage(out, str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from nnunet_heart_ext.phantom import make_phantom

    root = tmp_path_factory.mktemp("pipeline")
    src = make_phantom(root / "phantom", n_train=5, n_test=2, seed=0)
    _shrink(src)
    trainers = root / "ext_trainers"
    trainers.mkdir()
    (trainers / "pipeline_test_trainers.py").write_text(TRAINER_SOURCE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA",
                        "nnUNet_def_n_proc", "CUDA_VISIBLE_DEVICES",
                        # set by conftest for the kernel tests; would run the loss in Triton's interpreter
                        "TRITON_INTERPRET")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["nnUNet_extTrainer"] = str(trainers)
    args = ["bash", str(SCRIPT), "--src", str(src), "--device", "cpu",
            "--planner", "HeartDemoPlanner", "--plans", "HeartDemoPlans", "--trainer", "PipelineTestTrainer"]
    return {"root": root, "src": src, "env": env, "args": args}


def _run(setup, *extra, timeout=600, check=True):
    p = subprocess.run(setup["args"] + list(extra), env=setup["env"], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"pipeline failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def _fold_dir(work: Path, fold: int) -> Path:
    return work / "nnUNet_results" / "Dataset100_Heart" / MODEL / f"fold_{fold}"


def _digest(path: Path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _check_zip(zip_path: Path, src: Path) -> None:
    """Flat, one file per test case with the organizer's name, geometry of the test image, labels 0-3."""
    with zipfile.ZipFile(zip_path) as z:
        assert sorted(z.namelist()) == [f"{c}_predict.nii.gz" for c in TEST_CASES]
        out = zip_path.parent / (zip_path.stem + "_unzipped")
        shutil.rmtree(out, ignore_errors=True)
        z.extractall(out)
    for case in TEST_CASES:
        pred = sitk.ReadImage(str(out / f"{case}_predict.nii.gz"))
        image = sitk.ReadImage(str(src / "testing_image" / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def _wait_for(condition, proc, what: str, seconds: float = 480) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"pipeline ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(setup):
    """One work folder, four runs (the whole test data story, shared by the tests below):
    A  `--only prepare,plan,train --folds 0`: a cluster-style job that finishes fold 0 alone;
    B  the full pipeline, folds 0,1,2, two at a time, killed (SIGKILL to its process group)
       once folds 1 and 2 both train their second epoch;
    C  the same command again: folds 1 and 2 continue, the run completes;
    D  the same command once more: every step finds its outputs complete."""
    work = setup["root"] / "work"
    full = ["--work", str(work), "--folds", "0,1,2", "--parallel", "2"]
    a = _run(setup, "--work", str(work), "--folds", "0", "--only", "prepare,plan,train")
    fold0 = _digest(_fold_dir(work, 0) / "checkpoint_final.pth")

    logs = [work / "logs" / f"train_3d_fullres_fold{f}.log" for f in (1, 2)]
    b_out = setup["root"] / "run_b.out"
    with open(b_out, "w") as out:
        proc = subprocess.Popen(setup["args"] + full, env=setup["env"], start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            # "Epoch 1" is logged after epoch 0's checkpoint_latest.pth was written in full
            _wait_for(lambda: all(log.is_file() and "Epoch 1" in log.read_text() for log in logs),
                      proc, "folds 1 and 2 both reached epoch 1")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = {f: sorted(p.name for p in _fold_dir(work, f).glob("checkpoint_*.pth")) for f in (1, 2)}
    c = _run(setup, *full)
    after_c = {p: _digest(p) for p in [work / "predict.zip"] + [_fold_dir(work, f) / "checkpoint_final.pth"
                                                                 for f in (0, 1, 2)]}
    d = _run(setup, *full)
    return {"work": work, "a": a.stdout, "b": b_out.read_text(), "c": c.stdout, "d": d.stdout,
            "fold0": fold0, "killed": killed, "after_c": after_c}


@pytest.mark.slow
def test_end_to_end_predict_zip(runs, setup):
    _check_zip(runs["work"] / "predict.zip", setup["src"])
    assert f"submission: {runs['work'] / 'predict.zip'}" in runs["c"]


@pytest.mark.slow
def test_only_runs_the_named_steps_and_folds(runs):
    assert "train_3d_fullres_fold0 started" in runs["a"]
    assert "fold1" not in runs["a"] and "step best" not in runs["a"]


@pytest.mark.slow
def test_two_folds_train_in_parallel_with_a_log_each(runs):
    b, c = runs["b"], runs["c"]
    assert "train_3d_fullres_fold1 started on cpu0" in b and "train_3d_fullres_fold2 started on cpu1" in b
    assert "train_3d_fullres_fold0" not in b  # finished by run A
    for fold in (1, 2):
        log = (runs["work"] / "logs" / f"train_3d_fullres_fold{fold}.log").read_text()
        assert log.count(f"nnUNetv2_train 100 3d_fullres {fold} -tr PipelineTestTrainer") == 2  # B, then C
        assert "Training done." in log
    for fold in (0, 1, 2):
        fold_dir = _fold_dir(runs["work"], fold)
        assert (fold_dir / "checkpoint_final.pth").is_file()
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        # the closing summary reports this fold's validation Dice per class
        row = next(line for line in c.splitlines() if line.strip().startswith(f"fold {fold}"))
        assert f"{summary['mean']['1']['Dice']:.4f}" in row and f"{summary['mean']['2']['Dice']:.4f}" in row


@pytest.mark.slow
def test_killed_run_resumes_without_retraining_finished_folds(runs):
    c = runs["c"]
    for fold in (1, 2):
        assert "checkpoint_latest.pth" in runs["killed"][fold]  # killed mid-training
        assert "checkpoint_final.pth" not in runs["killed"][fold]
        assert f"train_3d_fullres_fold{fold}: continuing from checkpoint_latest.pth" in c
        resumed = (runs["work"] / "logs" / f"train_3d_fullres_fold{fold}.log").read_text().split("=== ")[-1]
        assert "Epoch 0\n" not in resumed and "Epoch 2" in resumed
    assert "train_3d_fullres_fold0" not in c  # the finished fold was not started again
    assert _digest(_fold_dir(runs["work"], 0) / "checkpoint_final.pth") == runs["fold0"]


@pytest.mark.slow
def test_rerun_finds_every_step_done(runs):
    for step in ("prepare", "plan", "train", "validate", "best", "predict", "postprocess", "export"):
        assert f"{step}: already done" in runs["d"], step
    assert {p: _digest(p) for p in runs["after_c"]} == runs["after_c"]


@pytest.mark.slow
def test_first_failing_fold_stops_the_run_and_shows_its_log(runs, setup):
    work = setup["root"] / "work_fail"
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(runs["work"] / folder, work / folder, symlinks=True)
    args = [a if a != "PipelineTestTrainer" else "PipelineFailingTrainer" for a in setup["args"]]
    p = subprocess.run(args + ["--work", str(work), "--folds", "0,1", "--parallel", "2", "--only", "train"], env=setup["env"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "deliberate failure in fold 1" in p.stderr  # the log tail of the failed fold
    assert "train_3d_fullres_fold1 failed" in p.stderr and "train_3d_fullres_fold1.log" in p.stderr
    fold0 = work / "nnUNet_results" / "Dataset100_Heart" / "PipelineFailingTrainer__HeartDemoPlans__3d_fullres" / "fold_0"
    assert not (fold0 / "checkpoint_final.pth").exists()  # the other fold was stopped, not finished


@pytest.mark.slow
def test_disk_estimate_covers_what_preprocessing_wrote(runs):
    work = runs["work"]
    raw = work / "nnUNet_raw" / "Dataset100_Heart"
    pre = work / "nnUNet_preprocessed" / "Dataset100_Heart"
    written = sum(p.stat().st_size for d in ("HeartDemoPlans_3d_fullres", "gt_segmentations")
                  for p in (pre / d).iterdir())
    assert pipeline_utils.estimate_preprocessed_bytes(str(raw), 1) >= written


def test_score_uses_nnunet_dice(tmp_path):
    """Perfect predictions score 1 where a class exists; a wiped class scores 0."""
    rng = np.random.default_rng(0)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    zip_path = tmp_path / "predict.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for i, case in enumerate(TEST_CASES):
            lab = rng.integers(0, 3, size=(6, 7, 8)).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(gt_dir / f"{case}_gt.nii.gz"))
            pred = lab.copy()
            pred[pred == 2] = 0
            sitk.WriteImage(sitk.GetImageFromArray(pred), str(tmp_path / "p.nii.gz"))
            z.write(tmp_path / "p.nii.gz", f"{case}_predict.nii.gz")
    summary = pipeline_utils.score(str(zip_path), str(gt_dir), str(tmp_path / "dice.json"))
    assert summary["mean"]["1"]["Dice"] == pytest.approx(1.0)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.0)
    assert np.isnan(summary["mean"]["3"]["Dice"])  # absent in both: nnU-Net scores it NaN


def test_bad_arguments_fail_before_any_work(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    for extra, message in [(["--folds", "0,x"], "--folds: 'x' is not a fold number"),
                           (["--only", "bogus"], "--only: unknown step 'bogus'"),
                           (["--force", "bogus"], "--force: unknown step 'bogus'"),
                           (["--device", "tpu"], "--device must be cuda or cpu")]:
        p = subprocess.run(["bash", str(SCRIPT), "--src", str(tmp_path), "--work", str(tmp_path / "w")] + extra,
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and message in p.stderr, (extra, p.stderr)
    p = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--gpus LIST" in p.stdout


def test_asking_for_gpus_without_one_fails_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    p = subprocess.run(["bash", str(SCRIPT), "--src", str(tmp_path), "--work", str(tmp_path / "w")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no CUDA GPU visible" in p.stderr
    assert not (tmp_path / "w" / "nnUNet_raw").exists()  # nothing was prepared
