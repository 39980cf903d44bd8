"""ensemble_pipeline.sh end to end on a tiny phantom, on the CPU, through the entry point users run.

One work folder holds the main story (module fixture `runs`): a cluster-style run that prepares,
plans and trains fold 0 of two configurations alone; the full pipeline with folds 0-3, two
slots, killed while folds 1 and 2 train; the same command again (folds 1 and 2 continue, fold 3
waits for a free slot, prediction split in two parts); and once more (every step done). Later
tests copy from it: each organizer layout that `prepare` accepts, and an ensemble of two
configurations. The trainers are throwaway classes found through nnU-Net's official
`nnUNet_extTrainer` folder (tests/pipeline_helpers.py).
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

from pipeline_helpers import SCRIPT, cpu_args, tiny_phantom, user_env

TEST_CASES = ["patient0006", "patient0007"]  # 5 training cases (nnU-Net's 5-fold split needs 5), 2 test
TRAINER = "PipelineTestTrainer"
MODEL = f"{TRAINER}__HeartDemoPlans__3d_fullres"
FOLDS = "0,1,2,3"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    src = tiny_phantom(root)
    return {"root": root, "src": src, "env": user_env(root), "args": cpu_args(src, TRAINER)}


def _run(setup, *extra, timeout=900, check=True, args=None):
    p = subprocess.run((args or setup["args"]) + list(extra), env=setup["env"], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"pipeline failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def _fold_dir(work: Path, fold: int, model: str = MODEL) -> Path:
    return work / "nnUNet_results" / "Dataset100_Heart" / model / f"fold_{fold}"


def _digest(path: Path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _check_zip(zip_path: Path, test_images: Path) -> None:
    """Flat, one file per test case with the organizer's name, geometry of the test image, labels 0-3."""
    with zipfile.ZipFile(zip_path) as z:
        assert sorted(z.namelist()) == [f"{c}_predict.nii.gz" for c in TEST_CASES]
        out = zip_path.parent / (zip_path.stem + "_unzipped")
        shutil.rmtree(out, ignore_errors=True)
        z.extractall(out)
    for case in TEST_CASES:
        pred = sitk.ReadImage(str(out / f"{case}_predict.nii.gz"))
        image = sitk.ReadImage(str(test_images / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def _jobs(work: Path) -> list:
    return [json.loads(line) for line in (work / "logs" / "jobs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(setup):
    """One work folder, four runs (the whole test data story, shared by the tests below):
    A  `--only prepare,plan,train --folds 0 --configs 2d,3d_fullres`: a cluster-style job that
       finishes fold 0 of both configurations alone (2d is for the ensemble test);
    B  the full pipeline, folds 0-3, two at a time, killed (SIGKILL to its process group)
       once folds 1 and 2 both train their second epoch (fold 3 still waits for a slot);
    C  the same command again: folds 1 and 2 continue, fold 3 starts when a slot frees, the run completes;
    D  the same command once more: every step finds its outputs complete."""
    work = setup["root"] / "work"
    full = ["--work", str(work), "--folds", FOLDS, "--parallel", "2"]
    a = _run(setup, "--work", str(work), "--folds", "0", "--configs", "2d,3d_fullres", "--only", "prepare,plan,train",
             "--parallel", "2")
    fold0 = _digest(_fold_dir(work, 0) / "checkpoint_final.pth")

    logs = [work / "logs" / f"train_3d_fullres_fold{f}.log" for f in (1, 2)]
    b_out = setup["root"] / "run_b.out"
    with open(b_out, "w") as out:
        proc = subprocess.Popen(setup["args"] + full, env=setup["env"], start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            # "Epoch 1" is logged after epoch 0's checkpoint_latest.pth was written in full
            deadline = time.time() + 600
            while not all(log.is_file() and "Epoch 1" in log.read_text() for log in logs):
                assert proc.poll() is None, f"pipeline ended before folds 1 and 2 reached epoch 1:\n{b_out.read_text()}"
                assert time.time() < deadline, "timed out waiting for folds 1 and 2 to reach epoch 1"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = {f: sorted(p.name for p in _fold_dir(work, f).glob("checkpoint_*.pth")) for f in (1, 2)}
    jobs_b = len(_jobs(work)) if (work / "logs" / "jobs.jsonl").is_file() else 0
    c = _run(setup, *full)
    jobs_c = _jobs(work)[jobs_b:]
    after_c = {p: _digest(p) for p in [work / "predict.zip"] + [_fold_dir(work, f) / "checkpoint_final.pth"
                                                                 for f in range(4)]}
    started = time.time()
    d = _run(setup, *full)
    return {"work": work, "a": a.stdout, "b": b_out.read_text(), "c": c.stdout, "d": d.stdout, "fold0": fold0,
            "killed": killed, "after_c": after_c, "jobs_c": jobs_c,
            "d_seconds": time.time() - started, "full": full}


@pytest.mark.slow
def test_end_to_end_predict_zip(runs, setup):
    _check_zip(runs["work"] / "predict.zip", setup["src"] / "testing_image")
    assert f"submission: {runs['work'] / 'predict.zip'}" in runs["c"]


@pytest.mark.slow
def test_the_run_ends_with_the_report(runs):
    """The report step, after export: WORK/report/index.html and report.json of predict.zip (every
    test case), the four folds' validation Dice as their summary.json holds it, and each fold's
    training curve from nnU-Net's own logs (folds 1 and 2: two logs, killed and continued). The
    tests of the report itself are tests/test_report.py; --status naming it,
    test_done_checks_start_no_process."""
    work = runs["work"]
    assert "$ nnunet-heart report --pred " + str(work / "predict.zip") in runs["c"]
    assert f"report: {work / 'report' / 'index.html'}" in runs["c"]
    report = json.loads((work / "report" / "report.json").read_text())
    assert sorted(t["case"] for t in report["test"]) == TEST_CASES
    assert all(t["prediction"].startswith(f"{work / 'predict.zip'}:") for t in report["test"])
    assert report["training_distribution"]["cases"] == 5
    folds = {f["fold"]: f for f in report["cross_validation"]}
    assert sorted(folds) == [0, 1, 2, 3]
    for fold, f in folds.items():
        summary = json.loads((_fold_dir(work, fold) / "validation" / "summary.json").read_text())
        dice = summary["mean"]["1"]["Dice"]
        assert f["mean_dice"][0] == pytest.approx(dice) or (f["mean_dice"][0] is None and np.isnan(dice))
        assert f["curve"]["epochs"] == [0, 1, 2] and f["curve"]["epochs_per_hour"] > 0  # 3 epochs
        assert len(f["curve"]["logs"]) == (2 if fold in (1, 2) else 1)
    page = (work / "report" / "index.html").read_text()
    assert page.count('<tr class="case') == len(TEST_CASES)


@pytest.mark.slow
def test_only_runs_the_named_steps_and_folds(runs):
    a = runs["a"]
    assert "train_3d_fullres_fold0 started" in a and "train_2d_fold0 started" in a
    assert "fold1" not in a and "step best" not in a and "step validate" not in a


@pytest.mark.slow
def test_every_official_command_is_logged_before_it_runs(runs):
    lines = runs["c"].splitlines()
    started = [i for i, line in enumerate(lines) if " started" in line and "(log: " in line]
    assert len(started) >= 8  # folds 1-3, validation-free best, 2 prediction parts, postprocess, export
    for i in started:
        assert "  $ " in lines[i - 1], f"no command line logged before: {lines[i]}"
    for cmd in ("nnUNetv2_train 100 3d_fullres 3", "nnUNetv2_find_best_configuration 100", "nnUNetv2_predict -i",
                "nnUNetv2_apply_postprocessing -i", "nnunet-heart export --pred"):
        assert any(f"$ {cmd}" in line for line in lines), cmd


@pytest.mark.slow
def test_folds_and_prediction_parts_share_slots_without_overlap(runs):
    """The multi-GPU path with CPU slots: three folds on two slots, never two jobs on one slot at
    once, fold 3 started only when a slot was free, the prediction split into one part per slot."""
    jobs = [j for j in runs["jobs_c"] if j["slot"] is not None]
    by_slot = {}
    for j in jobs:
        by_slot.setdefault(j["slot"], []).append(j)
    assert set(by_slot) == {"cpu0", "cpu1"}
    for slot, js in by_slot.items():
        js.sort(key=lambda j: j["start"])
        for earlier, later in zip(js, js[1:]):
            assert earlier["end"] <= later["start"], f"{earlier['job']} and {later['job']} overlap on {slot}"
    names = {j["job"]: j for j in jobs}
    assert {"train_3d_fullres_fold1", "train_3d_fullres_fold2", "train_3d_fullres_fold3"} <= set(names)
    assert all(j["rc"] == 0 for j in jobs)
    first_end = min(names[f"train_3d_fullres_fold{f}"]["end"] for f in (1, 2))
    assert names["train_3d_fullres_fold3"]["start"] >= first_end
    parts = [names["predict_3d_fullres_part0"], names["predict_3d_fullres_part1"]]
    assert {p["slot"] for p in parts} == {"cpu0", "cpu1"} and "-num_parts 2" in parts[0]["command"]
    for fold in range(4):
        assert (_fold_dir(runs["work"], fold) / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_two_folds_train_in_parallel_with_a_log_each(runs):
    b, c = runs["b"], runs["c"]
    assert "train_3d_fullres_fold1 started on cpu0" in b and "train_3d_fullres_fold2 started on cpu1" in b
    assert "train_3d_fullres_fold0" not in b  # finished by run A
    for fold in (1, 2):
        log = (runs["work"] / "logs" / f"train_3d_fullres_fold{fold}.log").read_text()
        assert log.count(f"nnUNetv2_train 100 3d_fullres {fold} -tr {TRAINER}") == 2  # B, then C
        assert "Training done." in log
    for fold in range(4):
        fold_dir = _fold_dir(runs["work"], fold)
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
def test_rerun_finds_every_step_done_in_process(runs):
    for step in ("prepare", "plan", "train", "validate", "best", "predict", "postprocess", "export", "report"):
        assert f"{step}: already done" in runs["d"], step
    assert {p: _digest(p) for p in runs["after_c"]} == runs["after_c"]
    assert runs["d_seconds"] < 30  # no command, no extra Python start-up to ask what is done


@pytest.mark.slow
def test_done_checks_start_no_process(runs, setup, monkeypatch, capsys):
    """--status and a rerun with every step done, in this process, with process creation disabled:
    the "is it done" checks are plain file reads (torch.load of the checkpoints included: torch is
    imported first, since its import asks ldconfig for the CUDA libraries)."""
    import torch  # noqa: F401

    from nnunet_heart_ext.pipeline import main

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[:1]}")

    for name, value in setup["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    argv = setup["args"][2:] + runs["full"]
    assert main(argv + ["--status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == ["prepare", "plan", "train", "validate", "best", "predict", "postprocess",
                                         "export", "report"]
    assert all(r["done"] for r in rows), rows
    assert main(argv) == 0
    assert "export: already done" in capsys.readouterr().out


@pytest.mark.slow
def test_logs_stay_readable(runs):
    """Progress bars redraw on a terminal; in a log file they leave a line or two, not one per update."""
    logs = runs["work"] / "logs"
    for log in logs.glob("*.log"):
        assert "\r" not in log.read_text(), log
    plan = (logs / "plan.log").read_text()
    assert 1 <= plan.count("Preprocessing cases") <= 4, plan
    assert (logs / "prepare.log").read_text().count("prepare: checking") == 1


@pytest.mark.slow
def test_first_failing_fold_stops_the_run_and_shows_its_log(runs, setup):
    work = setup["root"] / "work_fail"
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(runs["work"] / folder, work / folder, symlinks=True)
    args = cpu_args(setup["src"], "PipelineFailingTrainer")
    p = _run(setup, "--work", str(work), "--folds", "0,1", "--parallel", "2", "--only", "train", check=False,
             timeout=300, args=args)
    assert p.returncode == 1
    assert "deliberate failure in fold 1" in p.stderr  # the log tail of the failed fold
    assert "train_3d_fullres_fold1 failed" in p.stderr and "train_3d_fullres_fold1.log" in p.stderr
    fold0 = _fold_dir(work, 0, "PipelineFailingTrainer__HeartDemoPlans__3d_fullres")
    assert not (fold0 / "checkpoint_final.pth").exists()  # the other fold was stopped, not finished
    ended = {j["job"]: j for j in _jobs(work)}
    assert ended["train_3d_fullres_fold0"]["rc"] != 0  # stopped by the pipeline


# ----------------------------------------------------------------------------- organizer layouts
def _move_all(src: Path, dst: Path):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        shutil.move(str(f), dst / f.name)
    src.rmdir()


def _layout_training_labels(src, root):
    (src / "training_label").rename(src / "training_labels")


def _layout_testing_images(src, root):
    (src / "testing_image").rename(src / "testing_images")


def _layout_gt_beside_test_images(src, root):
    _move_all(src / "testing_label", src / "testing_image")


def _layout_test_image(src, root):
    (src / "testing_image").rename(src / "test_image")


def _layout_test_images(src, root):
    (src / "testing_image").rename(src / "test_images")


def _layout_imagesTs(src, root):
    (src / "testing_image").rename(src / "imagesTs")


def _layout_test_dir_elsewhere(src, root):
    (src / "testing_image").rename(root / "my_test_images")
    return ["--test-dir", str(root / "my_test_images")]


def _layout_one_training_images_folder(src, root):
    for d in ("training_image1", "training_image2", "training_image3"):
        _move_all(src / d, src / "training_images")


LAYOUTS = [_layout_training_labels, _layout_testing_images, _layout_gt_beside_test_images, _layout_test_image,
           _layout_test_images, _layout_imagesTs, _layout_test_dir_elsewhere, _layout_one_training_images_folder]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__[len("_layout_"):])
def test_pipeline_gets_through_every_layout_prepare_accepts(layout, runs, setup, tmp_path):
    """Each organizer layout `nnunet-heart prepare` accepts gets through the pipeline. The trained
    models are the main story's (copied); prepare, the done checks and export run for each layout,
    and with the ground truth beside the test images (which prepare ignores) prediction and
    postprocessing run again too."""
    src = Path(shutil.copytree(setup["src"], tmp_path / "organizer"))
    extra = layout(src, tmp_path) or []
    work = tmp_path / "work"
    for folder in ("nnUNet_preprocessed", "nnUNet_results") + (("predictions",) if layout is not
                                                               _layout_gt_beside_test_images else ()):
        shutil.copytree(runs["work"] / folder, work / folder, symlinks=True)
    p = _run(setup, "--work", str(work), "--folds", FOLDS, *extra, args=cpu_args(src, TRAINER))
    assert "prepare finished" in p.stdout and "export finished" in p.stdout
    images_ts = work / "nnUNet_raw" / "Dataset100_Heart" / "imagesTs"
    assert sorted(f.name for f in images_ts.iterdir()) == [f"{c}_0000.nii.gz" for c in TEST_CASES]
    test_images = Path(extra[1]) if extra else \
        next(d for d in src.iterdir() if d.name.startswith(("test", "images")) and "label" not in d.name)
    _check_zip(work / "predict.zip", test_images)
    if layout is _layout_gt_beside_test_images:
        assert "predict_3d_fullres_part0 started" in p.stdout
    again = _run(setup, "--work", str(work), "--folds", FOLDS, *extra, args=cpu_args(src, TRAINER))
    assert "export: already done" in again.stdout and "prepare: already done" in again.stdout


# ----------------------------------------------------------------------------- ensemble
def _ensemble_wins(work: Path, models: list, fold: int):
    """Validation outputs where each model alone is wrong and their average is right: each model's
    probabilities put 0.45 on the true class and 0.55 on a wrong one (a different one per model),
    and one background voxel on calcification in both (so that no class is absent from both truth
    and prediction, which nnU-Net scores NaN). find_best_configuration then picks the ensemble."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rw = SimpleITKIO()
    gt_dir = work / "nnUNet_preprocessed" / "Dataset100_Heart" / "gt_segmentations"
    for shift, model in enumerate(models, start=1):
        validation = _fold_dir(work, fold, model) / "validation"
        for npz in validation.glob("*.npz"):
            case = npz.name[:-4]
            gt, props = rw.read_seg(str(gt_dir / f"{case}.nii.gz"))
            gt = gt[0].astype(np.int64)
            old = np.load(npz)["probabilities"]
            assert old.shape == (4, *gt.shape), (old.shape, gt.shape)
            probs = 0.45 * np.eye(4)[gt] + 0.55 * np.eye(4)[(gt + shift) % 4]
            spot = tuple(np.argwhere(gt == 0)[0])
            probs[spot] = [0.0, 0.0, 0.0, 1.0]
            probs = np.moveaxis(probs, -1, 0).astype(np.float32)
            np.savez_compressed(npz, probabilities=probs)
            rw.write_seg(probs.argmax(0).astype(np.uint8), str(validation / f"{case}.nii.gz"), props)


@pytest.mark.slow
def test_ensemble_of_two_configurations(runs, setup, tmp_path):
    """--configs 2d,3d_fullres: find_best_configuration picks the ensemble, nnunet-heart
    predict-ensemble averages both models' probabilities in memory (no .npz written), postprocessing
    and export follow; the ensemble equals nnUNetv2_predict --save_probabilities of each model +
    nnUNetv2_ensemble."""
    work = tmp_path / "work"
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(runs["work"] / folder, work / folder, symlinks=True)
    models = [f"{TRAINER}__HeartDemoPlans__2d", MODEL]
    for model in models:  # fold 0 of both, trained in run A
        shutil.copytree(runs["work"] / "nnUNet_results" / "Dataset100_Heart" / model / "fold_0",
                        work / "nnUNet_results" / "Dataset100_Heart" / model / "fold_0")
        for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy2(runs["work"] / "nnUNet_results" / "Dataset100_Heart" / model / f,
                         work / "nnUNet_results" / "Dataset100_Heart" / model / f)
    _ensemble_wins(work, models, 0)
    p = _run(setup, "--work", str(work), "--folds", "0", "--configs", "2d,3d_fullres", "--parallel", "2")
    out = p.stdout
    assert "chosen: 2d + 3d_fullres" in out
    assert "predict_ensemble_part0 started" in out and "$ nnunet-heart predict-ensemble -i" in out
    ensemble = work / "predictions" / "ensemble"
    assert sorted(f.name for f in ensemble.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in TEST_CASES]
    assert not list((work / "predictions").rglob("*.npz")), "no probability file round trip"
    # the official route gives the same label maps
    results = work / "nnUNet_results" / "Dataset100_Heart"
    env = dict(setup["env"], nnUNet_raw=str(work / "nnUNet_raw"),
               nnUNet_preprocessed=str(work / "nnUNet_preprocessed"), nnUNet_results=str(work / "nnUNet_results"))
    images = work / "nnUNet_raw" / "Dataset100_Heart" / "imagesTs"
    for model in models:
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(images), "-o", str(tmp_path / model),
                        "-m", str(results / model), "-f", "0", "-device", "cpu", "--save_probabilities", "-npp", "1",
                        "-nps", "1"], env=env, check=True, capture_output=True)
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_ensemble"), "-i", *(str(tmp_path / m) for m in models), "-o", str(tmp_path / "ens"),
                    "-np", "1"], env=env, check=True, capture_output=True)
    for case in TEST_CASES:
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ensemble / f"{case}.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ens" / f"{case}.nii.gz")))
        assert (ours == theirs).mean() >= 0.999, case
    info = json.loads((work / "nnUNet_results" / "Dataset100_Heart" / "inference_information.json").read_text())
    pp_pkl = info["best_model_or_ensemble"]["postprocessing_file"]
    # the ensemble's postprocessing chosen with its decision (keep-largest never removes the small
    # classes), beside nnU-Net's postprocessing.pkl, is the one applied
    heart_pkl = Path(pp_pkl).parent / "heart_postprocessing.pkl"
    assert "ensembles" in pp_pkl and heart_pkl.is_file() and f"-pp_pkl_file {heart_pkl}" in out
    assert f"-i {work / 'predictions' / 'ensemble'} -o {work / 'predictions' / 'postprocessed'}" in out
    _check_zip(work / "predict.zip", setup["src"] / "testing_image")


# ----------------------------------------------------------------------------- fast checks
def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA")}
    return dict(env, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def test_bad_arguments_fail_before_any_work(tmp_path):
    for extra, message in [(["--folds", "0,x"], "--folds: 'x' is not a fold number"),
                           (["--only", "bogus"], "--only: unknown step 'bogus'"),
                           (["--force", "bogus"], "--force: unknown step 'bogus'"),
                           (["--device", "tpu"], "--device must be cuda or cpu"),
                           (["--launcher", "pbs"], "--launcher must be local or slurm"),
                           (["--wait"], "--wait and --slurm-args go with --launcher slurm"),
                           (["--seed", "3"], "--seed is the demo phantom's seed"),
                           (["--bogus"], "unrecognized arguments: --bogus")]:
        p = subprocess.run(["bash", str(SCRIPT), "--src", str(tmp_path), "--work", str(tmp_path / "w")] + extra,
                           env=_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and message in p.stderr, (extra, p.stderr)
        assert not (tmp_path / "w").exists()
    p = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 0 and "--gpus LIST" in p.stdout and "--launcher slurm" in p.stdout


def test_asking_for_gpus_without_one_fails_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run(["bash", str(SCRIPT), "--src", str(tmp_path), "--work", str(tmp_path / "w")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no CUDA GPU visible" in p.stderr
    assert not (tmp_path / "w" / "nnUNet_raw").exists()  # nothing was prepared


def test_dry_run_and_status_print_the_commands_in_order_and_change_nothing(tmp_path):
    """On a fresh folder: --dry-run lists the official commands in the order they would run, --status
    says each step is to do and why, and neither writes anything (not even the work folder)."""
    work = tmp_path / "w"
    base = ["bash", str(SCRIPT), "--demo", "--seed", "3", "--work", str(work), "--folds", "0,1,2", "--parallel", "2"]
    p = subprocess.run(base + ["--dry-run"], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    commands = [line for line in p.stdout.splitlines() if not line.startswith("#")]
    expected = ["nnunet-heart phantom", "nnunet-heart prepare",
                "nnUNetv2_plan_and_preprocess -d 100 -pl HeartDemoPlanner",
                "nnUNetv2_train 100 3d_fullres 0", "nnUNetv2_train 100 3d_fullres 1", "nnUNetv2_train 100 3d_fullres 2",
                "nnUNetv2_find_best_configuration 100 -c 3d_fullres", "nnunet-heart decision", "nnUNetv2_predict",
                "nnUNetv2_predict",
                "nnUNetv2_apply_postprocessing", "nnunet-heart export", "nnunet-heart report"]
    assert len(commands) == len(expected) and all(c.startswith(e) for c, e in zip(commands, expected)), commands
    assert "--seed 3" in commands[0] and "-num_parts 2 -part_id 1" in commands[9]
    assert "-np 2 -npfp 2" in commands[2] and "-npp 2 -nps 2" in commands[8]  # the CPU defaults
    assert "(in this process) Dice per class" in p.stdout  # the demo's score, before the report
    assert "--test-summary" in commands[-1] and "-np 2" in commands[-1]
    s = subprocess.run(base + ["--status", "--json"], env=_env(), capture_output=True, text=True, timeout=120)
    rows = json.loads(s.stdout)
    assert [r["step"] for r in rows][-2:] == ["score", "report"] and not any(r["done"] for r in rows)
    assert "holds no phantom" in rows[0]["reason"]
    assert not work.exists()


def test_demo_seed_picks_the_phantom_and_its_own_work_folder(tmp_path):
    from nnunet_heart_ext.pipeline.options import parse

    o = parse(["--demo"], cwd=tmp_path)
    assert o.seed == 0 and o.work == tmp_path / "nnunet_demo" and o.src == tmp_path / "nnunet_demo" / "phantom"
    o = parse(["--demo", "--seed", "7"], cwd=tmp_path)
    assert o.seed == 7 and o.work == tmp_path / "nnunet_demo_seed7"
    from nnunet_heart_ext.pipeline.steps import Context, Prepare

    job = next(Prepare(Context(o, ["cpu0"])).waves(False, assume=True)).items[0]
    assert job.argv[:2] == ["nnunet-heart", "phantom"] and job.argv[-2:] == ["--seed", "7"]


@pytest.mark.parametrize("seed", range(12))
def test_demo_trains_a_fold_whose_validation_holds_every_label(tmp_path, seed):
    """nnUNetv2_find_best_configuration fails (IndexError) when a label is in none of the validation
    cases (its mean Dice is NaN): the demo's fold is chosen from nnU-Net's own split of the phantom's
    cases so that a calcified case is among them, whatever the seed; of those folds, the one that
    trains on the most calcified cases. The phantom's files are read for the labels actually drawn;
    the split is nnU-Net's generate_crossval_split as do_split calls it."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunet_heart_ext.data.phantom import make_phantom
    from nnunet_heart_ext.pipeline.options import DEMO, demo_fold, parse

    o = parse(["--demo", "--seed", str(seed)], cwd=tmp_path)
    assert o.folds == [demo_fold(seed)] and o.parallel == 1
    assert parse(["--demo", "--seed", str(seed), "--folds", "0,1"], cwd=tmp_path).folds == [0, 1]  # yours win
    out = make_phantom(tmp_path / "phantom", n_train=DEMO["n_train"], n_test=0, seed=seed)
    labels = {case: set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())
              for case, path in ((p.name[:11], p) for p in (out / "training_label").glob("*_gt.nii.gz"))}
    assert len(labels) == DEMO["n_train"]
    splits = generate_crossval_split(sorted(labels), seed=12345, n_splits=5)
    split = splits[o.folds[0]]
    assert set().union(*(labels[c] for c in split["val"])) == {0, 1, 2, 3}, (split, labels)

    def calcified_in_training(s):
        return sum(3 in labels[c] for c in s["train"])

    eligible = [s for s in splits if any(3 in labels[c] for c in s["val"])]
    assert calcified_in_training(split) == max(map(calcified_in_training, eligible)) >= 2, (split, labels)


def test_gpu_slots_one_job_per_gpu_at_a_time(tmp_path):
    """The GPU path of the local launcher: each job sees only its own GPU (CUDA_VISIBLE_DEVICES),
    never two jobs on one GPU at once, and more jobs than GPUs queue for a free one."""
    from nnunet_heart_ext.pipeline.local import LocalLauncher, resolve_slots
    from nnunet_heart_ext.pipeline.options import parse
    from nnunet_heart_ext.pipeline.steps import Context, Job, Wave

    o = parse(["--src", str(tmp_path), "--work", str(tmp_path / "w"), "--device", "cuda", "--gpus", "0,1"])
    ctx = Context(o, resolve_slots(o, strict=False))  # no GPU needed: the jobs only report what they see
    launcher = LocalLauncher(ctx)
    assert launcher.slots == ["0", "1"]
    logs = ctx.layout.logs
    logs.mkdir(parents=True)
    code = "import os, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(0.6)"
    jobs = [Job(f"job{i}", [sys.executable, "-c", code], logs / f"job{i}.log", slot=True) for i in range(5)]
    launcher.run_wave(Wave(jobs))
    records = [json.loads(line) for line in (logs / "jobs.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["rc"] == 0 for r in records)
    for r in records:
        assert f"gpu {r['slot']}" in (logs / f"{r['job']}.log").read_text()
    for slot in ("0", "1"):
        mine = sorted((r for r in records if r["slot"] == slot), key=lambda r: r["start"])
        assert mine and all(a["end"] <= b["start"] for a, b in zip(mine, mine[1:]))


def test_log_writer_keeps_one_line_per_progress_bar(tmp_path):
    from nnunet_heart_ext.pipeline.terminal import LogWriter

    w = LogWriter(tmp_path / "x.log", every=3600)
    w.feed(b"start\n")
    for i in range(100):
        w.feed(f"\rbar {i:3d}%".encode())
    w.feed(b"\rbar 100%\ndone\nhalf")
    w.close()
    assert (tmp_path / "x.log").read_text() == "start\nbar 100%\ndone\nhalf\n"
    w = LogWriter(tmp_path / "y.log", every=0)  # a long bar leaves a line now and then
    w.feed(b"\rbar 1")
    w.feed(b"\rbar 2")
    w.close()
    assert (tmp_path / "y.log").read_text().splitlines() == ["bar 1", "bar 2"]


STOP_SCRIPT = '''
import sys
from pathlib import Path
from nnunet_heart_ext.pipeline import handle_stop_signals
from nnunet_heart_ext.pipeline.errors import Stopped
from nnunet_heart_ext.pipeline.local import LocalLauncher, resolve_slots
from nnunet_heart_ext.pipeline.options import parse
from nnunet_heart_ext.pipeline.steps import Context, Job, Wave

work = Path(sys.argv[1])
o = parse(["--src", str(work), "--work", str(work), "--device", "cpu", "--parallel", "2"])
ctx = Context(o, resolve_slots(o))
ctx.layout.logs.mkdir(parents=True, exist_ok=True)
handle_stop_signals()
code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); " \\
       "print('up', flush=True); time.sleep(300)"
jobs = [Job(f"job{i}", [sys.executable, "-c", code], ctx.layout.logs / f"job{i}.log", slot=True) for i in range(3)]
try:
    LocalLauncher(ctx).run_wave(Wave(jobs))
except Stopped as e:
    print("stopped", e.name, flush=True)
    sys.exit(e.exit_code)
'''


def _alive(pids):
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_stopped_pipeline_leaves_no_job_process(tmp_path, sig):
    """The pipeline alone gets SIGTERM (`kill PID`), SIGINT (Ctrl-C), SIGHUP (its terminal closed) or
    SIGKILL: every job, and every process a job started, ends too (SIGKILL: through each job's guard,
    which Linux signals when the pipeline dies), the queued job never starts, and the first three
    exit 128 + the signal."""
    from nnunet_heart_ext.pipeline.processes import process_tree

    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "w")], stdout=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True)
    tree = []
    try:
        logs = [tmp_path / "w" / "logs" / f"job{i}.log" for i in range(2)]
        deadline = time.time() + 60
        while not all(log.is_file() and "\nup\n" in log.read_text() for log in logs):
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.1)
        time.sleep(0.3)  # the jobs' children have started
        tree = process_tree(p.pid)
        assert len(tree) == 7  # the pipeline; per job its guard, the job, the job's child
        p.send_signal(sig)
        rc = p.wait(timeout=30)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 128 + sig and f"stopped {signal.Signals(sig).name}" in p.stdout.read()
        deadline = time.time() + 15
        while _alive(tree[1:]) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(tree[1:])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in _alive(tree[1:]):
            os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "w" / "logs" / "job2.log").exists()
    if sig != signal.SIGKILL:
        records = [json.loads(line) for line in (tmp_path / "w" / "logs" / "jobs.jsonl").read_text().splitlines()]
        assert sorted(r["job"] for r in records) == ["job0", "job1"] and all(r["rc"] != 0 for r in records)


def test_status_line_redraws_only_on_a_terminal():
    import io

    from nnunet_heart_ext.pipeline.terminal import Terminal

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        t = Terminal(stream)
        t.status("train_3d_fullres_fold0 12s: Epoch 3")
        t.status("train_3d_fullres_fold0 13s: Epoch 4")
        t.note("train_3d_fullres_fold0 finished")
    assert plain.getvalue().count("\n") == 1 and "Epoch" not in plain.getvalue()
    assert tty.getvalue().count("\r\033[K") == 3 and tty.getvalue().endswith("finished\n")


def test_a_log_that_cannot_be_written_does_not_hang_the_job(tmp_path, monkeypatch):
    """A full disk: writing the log fails, but the job's output is still drained (a job blocked on a
    full pipe would hang forever) and the job ends as it would have."""
    from nnunet_heart_ext.pipeline import local, terminal
    from nnunet_heart_ext.pipeline.options import parse
    from nnunet_heart_ext.pipeline.steps import Context, Job, Wave

    def disk_full(self, line):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(terminal.LogWriter, "_write", disk_full)
    o = parse(["--src", str(tmp_path), "--work", str(tmp_path / "w"), "--device", "cpu"])
    ctx = Context(o, local.resolve_slots(o))
    ctx.layout.logs.mkdir(parents=True)
    code = "import sys; [sys.stdout.write('x' * 1000 + '\\n') for _ in range(2000)]"
    job = Job("chatty", [sys.executable, "-c", code], ctx.layout.logs / "chatty.log", slot=True)
    started = time.time()
    local.LocalLauncher(ctx).run_wave(Wave([job]))
    assert time.time() - started < 60
    (record,) = [json.loads(line) for line in (ctx.layout.logs / "jobs.jsonl").read_text().splitlines()]
    assert record["rc"] == 0


def test_demo_score_is_the_dice_per_class_of_the_submission(tmp_path):
    """The demo's `score` step (report.score): per class, the mean over the test cases of
    2|A∩B| / (|A| + |B|), a case where a class is in neither left out (nnU-Net's NaN), a class
    predicted where the reference has none counted as 0; computed here with numpy on random
    label maps written as the submission's files."""
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.pipeline.report import score

    rng = np.random.default_rng(12)
    refs, preds, truth = {}, {}, {}
    for i in range(4):
        case = ds.case_id(51 + i)
        ref = rng.integers(0, 3, (6, 20, 18)).astype(np.uint8)
        if i == 0:
            ref[1, 2:5, 3:6] = 3  # calcium in one case only
        pred = ref.copy()
        flip = rng.random(ref.shape) < 0.25
        pred[flip] = rng.integers(0, 4, int(flip.sum()))  # some calcium predicted where there is none
        if i == 3:
            pred[pred == 3] = 0  # a case with calcium in neither: no term
        refs[case], preds[case] = ref, pred
        for name, array in (("ref", ref), ("pred", pred)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 2.0))
            folder = tmp_path / name
            folder.mkdir(exist_ok=True)
            file = folder / (ds.SUBMISSION.name(case) if name == "pred" else ds.PREDICTION.name(case))
            sitk.WriteImage(image, str(file))
            if name == "ref":
                truth[case] = file
    with zipfile.ZipFile(tmp_path / "predict.zip", "w") as z:
        for f in sorted((tmp_path / "pred").iterdir()):
            z.write(f, f.name)
    result = score(tmp_path / "predict.zip", truth, tmp_path / "test_dice.json")
    assert json.loads((tmp_path / "test_dice.json").read_text()) == json.loads(json.dumps(result))
    for label in (1, 2, 3):
        dices = []
        for case in refs:
            a, b = refs[case] == label, preds[case] == label
            if a.sum() + b.sum():
                dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert result["mean"][str(label)]["Dice"] == pytest.approx(np.mean(dices), abs=1e-9)
    assert 0 < result["mean"]["3"]["Dice"] < 1
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("patient0051.nii.gz", b"")
    from nnunet_heart_ext.pipeline.options import PipelineError
    with pytest.raises(PipelineError, match="not a submission file name"):
        score(tmp_path / "bad.zip", truth, tmp_path / "bad.json")


def test_best_refuses_folds_whose_validation_lacks_a_label(tmp_path):
    """A label in no validation case of the folds (Dice NaN in every case) makes nnU-Net's
    find_best_configuration fail with a bare IndexError: the best step says which label and what to
    do instead, before running it; a label predicted where the reference has none (Dice 0) is fine."""
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.pipeline.options import PipelineError, parse
    from nnunet_heart_ext.pipeline.steps import Best, Context, labels_without_validation_dice

    o = parse(["--demo", "--folds", "0,1"], cwd=tmp_path)
    best = Best(Context(o, ["cpu0"]))
    nan = float("nan")

    def write(fold, per_case):
        summary = best.ctx.layout.fold_dir("3d_fullres", fold) / ds.VALIDATION_FOLDER / "summary.json"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"metric_per_case": [
            {"metrics": {str(k): {"Dice": d} for k, d in zip((1, 2, 3), dices)}} for dices in per_case]}))
        return summary

    a = write(0, [(0.9, 0.5, nan), (0.8, 0.4, nan)])
    b = write(1, [(0.9, 0.6, nan)])
    assert labels_without_validation_dice([a, b]) == ["3 (calcification)"]
    with pytest.raises(PipelineError, match=r"label 3 \(calcification\) is in no validation case of fold\(s\) 0,1"):
        next(best.waves(False))
    assert next(best.waves(False, assume=True)).items[0].argv[0] == "nnUNetv2_find_best_configuration"  # dry run
    write(1, [(0.9, 0.6, 0.0)])  # predicted calcium where there is none: Dice 0, a number
    assert labels_without_validation_dice([a, b]) == []
    assert next(best.waves(False)).items[0].argv[0] == "nnUNetv2_find_best_configuration"


# ----------------------------------------------------------------------------- faults (issue 31)
def _copy_work(runs, work: Path, folders=("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions")):
    for folder in folders:
        shutil.copytree(runs["work"] / folder, work / folder, symlinks=True)


@pytest.mark.slow
def test_a_decision_file_of_an_earlier_version_is_chosen_again(runs, setup, tmp_path):
    """A heart_decision.json written before the gate's tie rule (no gate_cap_mm3): the best step
    is not done, its decision runs again (nnU-Net's choice is kept), and predict follows it."""
    work = tmp_path / "work"
    _copy_work(runs, work)
    info = json.loads((work / "nnUNet_results" / "Dataset100_Heart" / "inference_information.json").read_text())
    pkl = Path(info["best_model_or_ensemble"]["postprocessing_file"])
    decision = work / pkl.relative_to(runs["work"]).parent / "heart_decision.json"
    content = json.loads(decision.read_text())
    del content["gate_cap_mm3"], content["format"]  # as the extension wrote it before either field
    decision.write_text(json.dumps(content))
    original = pkl.parent / "heart_decision.json"  # nnU-Net recorded the original run's absolute path
    assert original != decision and original.is_file()
    before = _digest(original)
    p = _run(setup, "--work", str(work), "--folds", FOLDS, "--only", "best,predict")
    assert "is of an earlier rule (format 2, chosen before the gate's ties go to the largest gate" in p.stdout
    assert "$ nnunet-heart decision" in p.stdout and "$ nnUNetv2_predict" in p.stdout
    assert "$ nnUNetv2_find_best_configuration" not in p.stdout
    assert json.loads(decision.read_text())["gate_cap_mm3"] >= 0
    assert _digest(original) == before  # the copy wrote its own file, not the original run's
    again = _run(setup, "--work", str(work), "--folds", FOLDS, "--only", "best,predict")
    assert "best: already done" in again.stdout and "predict: already done" in again.stdout


@pytest.mark.slow
def test_leftovers_of_killed_writers_are_swept_where_nnunet_lists(runs, setup, tmp_path):
    """Temporaries of killed writers in every folder nnU-Net lists: an earlier version's (beside the
    outputs, where nnU-Net takes them for cases and plan/postprocess fail) and this version's (in
    the hidden partial folder). The run removes them, saying so, and plan and postprocess (forced)
    run nnU-Net's commands on those folders without a manual step."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_heart_ext.data.files import PARTIAL_DIR, _HOST

    work = tmp_path / "work"
    _copy_work(runs, work)
    raw = work / "nnUNet_raw" / "Dataset100_Heart"
    model_predictions = work / "predictions" / f"{TRAINER}_HeartDemoPlans_3d_fullres"
    planted = {raw / "imagesTr": ".tmp-0123456789ab-patient0001_0000.nii.gz",
               raw / "labelsTr": ".tmp-0123456789ab-patient0001.nii.gz",
               raw / "imagesTs": ".tmp-0123456789ab-patient0006_0000.nii.gz",
               model_predictions: ".tmp-0123456789ab-patient0006.nii.gz",
               work / "predictions" / "postprocessed": ".tmp-0123456789ab-patient0007.nii.gz"}
    for folder, name in planted.items():
        (folder / name).write_bytes(b"\x1f\x8b\x08")  # a gzip stream cut short
    (raw / "imagesTr" / PARTIAL_DIR).mkdir()  # this version's, of a writer that is gone
    (raw / "imagesTr" / PARTIAL_DIR / f"{_HOST}~{2 ** 22 + 4321}~0badc0de~patient0002_0000.nii.gz").write_bytes(b"x")
    listed = [Path(x[0]).name for x in create_lists_from_splitted_dataset_folder(str(raw / "imagesTs"), ".nii.gz")]
    assert planted[raw / "imagesTs"] in listed  # what made every rerun fail before
    p = _run(setup, "--work", str(work), "--folds", FOLDS, "--only", "prepare,plan,postprocess,export",
             "--force", "plan")
    for folder, name in planted.items():
        assert not (folder / name).exists(), folder
        assert f"leftover file(s) of killed writers in {folder}" in p.stdout, folder
    assert not (raw / "imagesTr" / PARTIAL_DIR).exists()
    assert "$ nnUNetv2_plan_and_preprocess" in p.stdout and "$ nnUNetv2_apply_postprocessing" in p.stdout
    _check_zip(work / "predict.zip", setup["src"] / "testing_image")


@pytest.mark.slow
def test_cut_short_checkpoints_continue_from_a_usable_one_or_retrain(runs, setup, tmp_path):
    """Fold 0's checkpoint_final.pth cut short (a kill while nnU-Net wrote it in place): not
    trained, it continues from its usable checkpoint_best.pth; fold 1 with every checkpoint cut
    short trains from the start. Each broken file is set aside with a line naming it."""
    from nnunet_heart_ext.data.files import PARTIAL_DIR

    work = tmp_path / "work"
    _copy_work(runs, work, ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    leftover = _fold_dir(work, 0) / PARTIAL_DIR / "othernode~77~0badc0de~checkpoint_latest.pth"
    leftover.parent.mkdir()
    leftover.write_bytes(b"PK")  # a save cut short on another machine: the fold's lock says it is ours to remove
    for fold in (0, 1):
        for c in _fold_dir(work, fold).glob("checkpoint_*.pth"):
            if fold == 1 or c.name == "checkpoint_final.pth":
                c.write_bytes(c.read_bytes()[:c.stat().st_size // 2])
    args = ("--work", str(work), "--folds", "0,1", "--parallel", "2", "--only", "train,validate")
    status = _run(setup, *args, "--status").stdout
    assert "train        to do  3d_fullres fold 0: checkpoint_best.pth (will continue); checkpoint_final.pth cut " \
           "short" in status
    assert "fold 1: no usable checkpoint" in status and "will train from the start" in status
    p = _run(setup, *args)
    fold0, fold1 = _fold_dir(work, 0), _fold_dir(work, 1)
    assert not leftover.parent.exists() and f"leftover file(s) of killed writers in {fold0}" in p.stdout
    assert f"{fold0 / 'checkpoint_final.pth'} cut short" in p.stdout
    assert "set aside as checkpoint_final.pth.broken; continuing from checkpoint_best.pth" in p.stdout
    assert "set aside as checkpoint_best.pth.broken; training from the start" in p.stdout
    assert "train_3d_fullres_fold0: continuing from checkpoint_best.pth" in p.stdout
    log0 = (work / "logs" / "train_3d_fullres_fold0.log").read_text().split("=== ")[-1]
    log1 = (work / "logs" / "train_3d_fullres_fold1.log").read_text().split("=== ")[-1]
    assert "--c" in log0.splitlines()[0] and "Epoch 0\n" not in log0
    assert "--c" not in log1.splitlines()[0] and "Epoch 0\n" in log1
    from nnunet_heart_ext.pipeline.checks import checkpoint_problem

    for fold in (fold0, fold1):
        assert checkpoint_problem(fold / "checkpoint_final.pth") is None
        assert (fold / "validation" / "summary.json").is_file()


@pytest.mark.slow
def test_a_second_run_on_the_same_work_folder_is_refused(runs, setup, tmp_path):
    """While a run holds the work folder (here: this test, as the first run would), a second run
    stops at once with exit 75 naming the holder, and touches nothing; --status and --dry-run still
    work. Once the holder is killed, the next run takes the lock over with a line."""
    from nnunet_heart_ext.pipeline.locks import Lock

    work = tmp_path / "work"
    _copy_work(runs, work)
    lock_file = work / "locks" / "pipeline.lock"
    holder = Lock(lock_file, "the work folder").acquire(say=lambda m: None)
    try:
        before = sorted(str(p) for p in work.rglob("*"))
        p = _run(setup, "--work", str(work), "--folds", FOLDS, check=False)
        assert p.returncode == 75, p.stderr
        assert f"error: the work folder {work} is held by another run (pid {os.getpid()} on " in p.stderr
        assert "wait for it to finish or stop it" in p.stderr.lower() and "--status and --dry-run work" in p.stderr
        assert sorted(str(q) for q in work.rglob("*")) == before
        assert _run(setup, "--work", str(work), "--folds", FOLDS, "--status").returncode == 0
        assert _run(setup, "--work", str(work), "--folds", FOLDS, "--dry-run").returncode == 0
    finally:
        holder.release()
    holder_info = json.dumps(dict(pid=2 ** 22 + 999, host=os.uname().nodename, started=time.time() - 60,
                                  command="nnunet-heart pipeline (killed)"))
    lock_file.write_text(holder_info)  # a holder killed while it held the lock
    p = _run(setup, "--work", str(work), "--folds", FOLDS)
    assert f"the work folder {work}: its holder (pid {2 ** 22 + 999}" in p.stdout and "lock taken over" in p.stdout
    assert "predict: already done" in p.stdout and (work / "predict.zip").is_file()


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_or_read_only_output_stops_with_one_line_and_keeps_the_previous_zip(runs, setup, tmp_path):
    """--out on a read-only file system: the export step stops before running anything, one line
    naming the folder; on a full file system: the export job fails, the pipeline says the disk is
    full with the free space, and the previous predict.zip is left as it was. (Real tmpfs mounts;
    tests/test_crash_safety.py simulates the errors where mounting is not allowed.)"""
    work, ro, full = tmp_path / "work", tmp_path / "ro", tmp_path / "full"
    if not (_mount_tmpfs(ro, "size=64k,ro") and _mount_tmpfs(full, "size=64k")):
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        pytest.skip("needs tmpfs mounts (root with CAP_SYS_ADMIN); the errors are simulated in test_crash_safety.py")
    try:
        _copy_work(runs, work)
        p = _run(setup, "--work", str(work), "--folds", FOLDS, "--out", str(ro / "predict.zip"), check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: cannot create files in {ro}: Read-only file "
                                                            f"system (EROFS); ")
        (full / "predict.zip").write_bytes(b"the previous submission")
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 1024):
                pass
        except OSError:  # full
            pass
        finally:
            os.close(fd)
        p = _run(setup, "--work", str(work), "--folds", FOLDS, "--out", str(full / "predict.zip"), check=False)
        assert p.returncode == 1 and "nnunet-heart export: error: cannot write" in p.stderr
        assert f"error: export failed (exit 1): its log says the disk is full or a folder is not writable " \
               f"(0.00 GiB free for {full})" in p.stderr
        assert (full / "predict.zip").read_bytes() == b"the previous submission"
        assert not list(full.glob(".*")) and sorted(q.name for q in full.iterdir()) == ["filler", "predict.zip"]
    finally:
        for m in (ro, full):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
