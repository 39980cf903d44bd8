"""`ensemble_pipeline.sh --launcher slurm` on a real single-node Slurm (tests/slurm_cluster.py),
through the same entry point users run, on a tiny phantom on the CPU:

- the CPU demo's steps as Slurm jobs with --wait, to a valid predict.zip and its test score;
- the follower killed and a fold's job cancelled mid-training, then reruns: finished folds are
  not retrained, the cut fold continues from its checkpoint, and nothing queued or running is
  submitted a second time;
- one fold fails: the failure is reported with its job's log, and the jobs after it are cancelled.

The daemons run from a temporary folder and are stopped by their own process ids at the end.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from pipeline_helpers import SCRIPT, cpu_args, tiny_phantom, user_env
from slurm_cluster import INSTALL, SlurmCluster, missing_binaries

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:  # a failure, not a skip: these tests are part of the suite (.ci/run installs Slurm)
        pytest.fail(f"Slurm tests need {', '.join(missing)}: {INSTALL} (after apt-get update)")
    c = SlurmCluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cluster):
    root = tmp_path_factory.mktemp("slurm_pipeline")
    src = tiny_phantom(root)
    env = user_env(root)
    env.update(cluster.env, HEART_SLURM_POLL="1")
    return dict(root=root, src=src, env=env)


def _run(setup, args, timeout=900, check=True):
    p = subprocess.run(args, env=setup["env"], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"pipeline failed ({p.returncode}):\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}")
    return p


def _records(work: Path) -> list:
    return json.loads((work / "slurm" / "jobs.json").read_text())["submissions"]


def _fold_dir(work: Path, trainer: str, fold: int) -> Path:
    return work / "nnUNet_results" / "Dataset100_Heart" / f"{trainer}__HeartDemoPlans__3d_fullres" / f"fold_{fold}"


def _digest(path: Path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _prepared_copy(demo_work: Path, work: Path) -> None:
    """The demo run's raw and preprocessed data (mtimes kept, so prepare and plan are done)."""
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(demo_work / folder, work / folder, symlinks=True)


@pytest.fixture(scope="module")
def demo(setup):
    work = setup["root"] / "demo"
    args = ["bash", str(SCRIPT), "--demo", "--src", str(setup["src"]), "--trainer", "PipelineTestTrainer",
            "--work", str(work), "--folds", "0,1", "--parallel", "1", "--launcher", "slurm",
            "--slurm-args", "--time=90 --comment=heart-ci"]
    started = time.time()
    p = _run(setup, args + ["--wait"])
    return dict(work=work, out=p.stdout, err=p.stderr, seconds=time.time() - started, args=args)


def test_demo_steps_as_slurm_jobs_reach_a_valid_predict_zip(demo, cluster, setup):
    work, out = demo["work"], demo["out"]
    with zipfile.ZipFile(work / "predict.zip") as z:
        assert sorted(z.namelist()) == ["patient0006_predict.nii.gz", "patient0007_predict.nii.gz"]
    scored = json.loads((work / "test_dice.json").read_text())
    assert set(scored["mean"]) >= {"1", "2"}

    records = _records(work)
    assert [r["key"] for r in records] == ["prep", "train:3d_fullres:0", "train:3d_fullres:1", "best", "predict",
                                           "finish"]
    by_key = {r["key"]: r for r in records}
    array = by_key["train:3d_fullres:0"]["job"].split("_")[0]
    assert by_key["train:3d_fullres:1"]["job"] == f"{array}_1"  # the folds are one array
    assert by_key["train:3d_fullres:0"]["after"] == [by_key["prep"]["job"]]
    assert by_key["best"]["after"] == [array] and by_key["predict"]["after"] == [by_key["best"]["job"]]
    assert by_key["finish"]["after"] == [by_key["predict"]["job"]]
    for r in records:  # each job ended well, said so, and left its log under the work folder
        assert f"job {r['job']} ({r['key']}) ended: COMPLETED" in out
        assert Path(r["log"]).is_file() and Path(r["log"]).is_relative_to(work / "logs" / "slurm")
    # every job ran the official commands and logged them first
    fold1_log = Path(by_key["train:3d_fullres:1"]["log"]).read_text()
    assert "$ nnUNetv2_train 100 3d_fullres 1 -tr PipelineTestTrainer" in fold1_log
    assert "$ nnUNetv2_find_best_configuration 100" in Path(by_key["best"]["log"]).read_text()
    # --slurm-args reached sbatch: the time limit Slurm recorded for every job
    finished = {j["JobId"]: j for j in cluster.finished()}
    ours = [j for j in finished.values() if j.get("Name", "").startswith("heart-")]
    assert len(ours) == 6 and all(j["TimeLimit"] == "90" for j in ours), ours

    # a rerun finds everything done and submits nothing
    again = _run(setup, demo["args"] + ["--wait"])
    assert "nothing to submit: every step is done" in again.stdout
    assert len(_records(work)) == 6


def test_killed_follower_and_cut_fold_resume_without_double_submission(demo, cluster, setup):
    trainer = "PipelineSlowFold1Trainer"
    work = setup["root"] / "kill"
    _prepared_copy(demo["work"], work)
    args = cpu_args(setup["src"], trainer) + ["--work", str(work), "--folds", "0,1", "--launcher", "slurm",
                                              "--only", "prepare,plan,train,validate,best"]
    fold0, fold1 = _fold_dir(work, trainer, 0), _fold_dir(work, trainer, 1)
    fold1_log = work / "logs" / "train_3d_fullres_fold1.log"
    with open(setup["root"] / "kill_run1.out", "w") as out:
        follower = subprocess.Popen(args + ["--wait"], env=setup["env"], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 600
            while not ((fold0 / "checkpoint_final.pth").is_file() and fold1_log.is_file()
                       and "Epoch 2" in fold1_log.read_text()):
                assert follower.poll() is None, (setup["root"] / "kill_run1.out").read_text()
                assert time.time() < deadline, "fold 0 did not finish or fold 1 did not reach epoch 2"
                time.sleep(0.5)
        finally:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
    fold0_final = _digest(fold0 / "checkpoint_final.pth")
    first = {r["key"]: r["job"] for r in _records(work)}
    assert "prep" not in first  # prepare and plan were done already: not submitted
    cluster._run("scancel", first["train:3d_fullres:1"])  # the fold's job dies mid-training
    deadline = time.time() + 60
    while first["train:3d_fullres:1"] in cluster.jobs():
        assert time.time() < deadline
        time.sleep(0.5)
    assert (fold1 / "checkpoint_latest.pth").is_file() and not (fold1 / "checkpoint_final.pth").is_file()

    second = _run(setup, args)  # submits what is neither done nor queued: fold 1 and what follows it
    assert "train:3d_fullres:0" not in [r["key"] for r in _records(work)[len(first):]]
    third = _run(setup, args)  # everything left is queued or running now: nothing is submitted again
    assert len(_records(work)) == len(first) + 2, second.stdout
    assert "submitted job" not in third.stdout and "not submitted again" in third.stdout
    status = _run(setup, args + ["--status"]).stdout  # the queued and running jobs, beside each step
    fold1_job = _records(work)[-2]["job"]
    # the train line names the resubmitted fold's job among the live ones (fold 0's first task may still be
    # validating, and is listed too)
    train_jobs = [line.split("[slurm: ", 1)[1] for line in status.splitlines()
                  if line.startswith("train ") and "[slurm: " in line]
    assert train_jobs and re.search(rf"(^|, ){re.escape(fold1_job)} ", train_jobs[0]), status
    _run(setup, args + ["--wait"])  # follows the queued jobs to their end

    records = _records(work)
    keys = [r["key"] for r in records]
    assert keys.count("train:3d_fullres:0") == 1 and keys.count("train:3d_fullres:1") == 2
    assert keys.count("best") == 2 and "prep" not in keys
    # never two jobs of one key at the same time: each replacement was submitted after the old one ended
    finished = {j["JobId"]: j for j in cluster.finished()}
    by_id = {f"{j['ArrayJobId']}_{j['ArrayTaskId']}" if j.get("ArrayTaskId") else j["JobId"]: j
             for j in finished.values()}
    for key in ("train:3d_fullres:1", "best"):
        old, new = [by_id[r["job"]] for r in records if r["key"] == key]
        assert old["JobState"] == "CANCELLED" and new["JobState"] == "COMPLETED"
        assert old["EndTime"] <= new["SubmitTime"], (old, new)
    # the finished fold was neither retrained nor touched; the cut one continued from its checkpoint
    assert _digest(fold0 / "checkpoint_final.pth") == fold0_final
    assert (work / "logs" / "train_3d_fullres_fold0.log").read_text().count("=== ") == 1
    runs = fold1_log.read_text().split("=== ")[1:]
    assert len(runs) == 2 and "--c" in runs[1].splitlines()[0]
    assert "Epoch 0\n" not in runs[1] and "Epoch 11" in runs[1]
    assert (fold1 / "checkpoint_final.pth").is_file()
    assert (work / "nnUNet_results" / "Dataset100_Heart" / "inference_information.json").is_file()


def test_failed_fold_is_reported_with_its_log_and_dependents_are_cancelled(demo, cluster, setup):
    trainer = "PipelineFailingTrainer"
    work = setup["root"] / "fail"
    _prepared_copy(demo["work"], work)
    args = cpu_args(setup["src"], trainer) + ["--work", str(work), "--folds", "0,1", "--launcher", "slurm", "--wait"]
    try:
        p = _run(setup, args, check=False, timeout=600)
        assert p.returncode == 1
        records = {r["key"]: r for r in _records(work)}
        failed = records["train:3d_fullres:1"]
        assert f"Slurm job {failed['job']} (train:3d_fullres:1) FAILED" in p.stderr
        assert "deliberate failure in fold 1" in p.stderr  # the failed job's log tail
        assert failed["log"] in p.stderr
        dependents = [records[k]["job"] for k in ("best", "predict", "finish")]
        assert f"cancelled the jobs that depend on it: {', '.join(dependents)}" in p.stdout
        for job in dependents:
            assert cluster.job(job).get("JobState") == "CANCELLED", cluster.job(job)
        assert records["train:3d_fullres:0"]["job"] in p.stderr  # still running: said, and left alone
        assert not (work / "nnUNet_results" / "Dataset100_Heart" / "inference_information.json").exists()
    finally:
        cluster.cancel_all()


FAKE_SBATCH = """#!/usr/bin/env bash
# the real sbatch, then the submitter is killed before it can record the job's id
out=$({real} "$@") || exit $?
echo "$out"
kill -9 $PPID
"""


def _train_args(setup, work, trainer="PipelineSlowFold1Trainer"):
    return cpu_args(setup["src"], trainer) + ["--work", str(work), "--folds", "1", "--launcher", "slurm",
                                              "--only", "prepare,plan,train"]


def test_a_submitter_killed_after_sbatch_never_makes_a_fold_train_twice(demo, cluster, setup, tmp_path):
    """The submitter is killed right after sbatch answered, before it recorded the job's id. Its
    record (written before sbatch, under the job's unique name) lets the rerun find the job in the
    queue: it is not submitted again, the rerun follows it to its end, and the fold trains once."""
    work = setup["root"] / "killed_submitter"
    _prepared_copy(demo["work"], work)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH.format(real=shutil.which("sbatch", path=setup["env"]["PATH"])))
    (fake / "sbatch").chmod(0o755)
    # the fold trains for ~20 s: still queued or running when the rerun looks, a few seconds later
    args = _train_args(setup, work, trainer="PipelineTestTrainer")
    killed = subprocess.run(args, env=dict(setup["env"], PATH=f"{fake}:{setup['env']['PATH']}"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0  # killed (bash reports 137)
    (record,) = _records(work)
    assert record["key"] == "train:3d_fullres:1" and record["job"] is None and record["name"].startswith("heart-train-")
    live = {j: s for j, s in cluster.jobs().items()}
    assert len(live) == 1, live  # the job sbatch submitted runs (or waits to)
    (job,) = live
    try:
        again = _run(setup, args + ["--wait"])
        assert f"train:3d_fullres:1: found job {job} ({record['name']}) in the queue" in again.stdout
        assert "not submitted again" in again.stdout and "submitted job" not in again.stdout
        assert f"job {job} (train:3d_fullres:1) ended: COMPLETED" in again.stdout
        (record,) = _records(work)
        assert record["job"] == job
        assert [j.get("Name") for j in cluster.finished()].count(record["name"]) == 1
        log = (work / "logs" / "train_3d_fullres_fold1.log").read_text()
        assert log.count("=== ") == 1 and "Training done." in log
    finally:
        cluster.cancel_all()


def test_a_requeued_training_job_continues_from_its_checkpoint(demo, cluster, setup):
    """`scontrol requeue` (what preemption with requeue does) of a fold's job mid-training: Slurm
    stops it (SIGTERM: the pipeline in the job stops its trainer) and runs it again; the fold
    continues from its checkpoint, and the submission is the same one (never submitted twice)."""
    work = setup["root"] / "requeue"
    _prepared_copy(demo["work"], work)
    args = _train_args(setup, work)
    try:
        _run(setup, args)
        (record,) = _records(work)
        log = work / "logs" / "train_3d_fullres_fold1.log"
        deadline = time.time() + 600
        while not (log.is_file() and "Epoch 2" in log.read_text()):
            assert time.time() < deadline, "the fold did not reach epoch 2"
            time.sleep(0.5)
        cluster._run("scontrol", "requeue", record["job"])
        deadline = time.time() + 60
        while cluster.jobs().get(record["job"]) != "PENDING":
            assert time.time() < deadline, cluster.jobs()
            time.sleep(0.3)
        cluster._run("scontrol", "update", f"JobId={record['job']}", "StartTime=now")  # Slurm delays a requeue 2 min
        done = _run(setup, args + ["--wait"])
        assert "not submitted again" in done.stdout and f"job {record['job']} (train:3d_fullres:1) ended: COMPLETED" \
            in done.stdout
        assert len(_records(work)) == 1
        runs = log.read_text().split("=== ")[1:]
        assert len(runs) == 2 and "--c" in runs[1].splitlines()[0]
        assert "Epoch 0\n" not in runs[1] and "Epoch 11" in runs[1] and "Training done." in runs[1]
        slurm_log = Path(record["log"]).read_text()  # appended to: both runs of the job
        assert slurm_log.count("step train") == 2 and "stopped by SIGTERM" in slurm_log
        assert cluster.job(record["job"]).get("Restarts") == "1"
    finally:
        cluster.cancel_all()
