"""Crash run: the pipeline killed with SIGKILL at seeded random moments, rerun after each kill with
no manual step, every rerun checked to end in a valid predict.zip holding every test case.

    python -m benchmarks.crash_run [--kills 20] [--trainer-kills 20] [--seed 0] [--work DIR]

A tiny pipeline (the phantom of seed 1: 8 training and 2 test cases, shrunk so a window covers a case; a
trainer of 4 epochs x 2 iterations with a checkpoint every epoch; one fold, the first whose
validation cases hold every label; the CPU) is first run
once uninterrupted (its time T and each step's share are the baseline). Then:

- pipeline kills: a fresh work folder, the pipeline started, SIGKILL to the pipeline's own
  process (not its group: its jobs must end by themselves, through their guards) at a moment drawn
  uniformly from (0, T); then the processes of the killed run are counted until none is left
  (at most 30 s), and the same command is run again to its end.
- trainer kills: a work folder with prepare and plan done, the pipeline started, SIGKILL to
  `nnUNetv2_train` at a moment drawn uniformly within the baseline's training time; the pipeline
  reports the failed job and exits 1, and the same command is run again to its end.

Each rerun must exit 0 with a predict.zip whose members are exactly the test cases' submission
names, each a label map (0-3) on its test image's grid. Time lost per kill = time until the kill +
the rerun's time - T. Results: benchmarks/results/crash_run.json and .png, the table printed;
the summary is in benchmarks/RESULTS.md. This is a benchmark, not a test: it took 88 minutes
on the 2-core machine (14 moments drawn again).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.common import RESULTS_DIR, report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ensemble_pipeline.sh"
TRAINER = "CrashRunTrainer"
TRAINER_SOURCE = '''
from nnunet_heart_ext.trainers import HeartTrainer


class CrashRunTrainer(HeartTrainer):
    """4 epochs x 2 iterations, a checkpoint every epoch: many checkpoint writes to be killed in."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1
        self.test_time_mirroring = False
'''
TEST_CASES = ["patient0009", "patient0010"]


def add_arguments(parser) -> None:
    parser.add_argument("--kills", type=int, default=20, help="pipeline kills (default 20)")
    parser.add_argument("--trainer-kills", type=int, default=20, help="trainer kills (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")


# ----------------------------------------------------------------------------- setup
def _shrink(folder: Path, factor: float = 3.0) -> None:
    for path in folder.glob("*/*.nii.gz"):
        img = sitk.ReadImage(str(path))
        size = [max(8, int(round(s / factor))) for s in img.GetSize()]
        spacing = [sp * s / n for sp, s, n in zip(img.GetSpacing(), img.GetSize(), size)]
        interp = sitk.sitkNearestNeighbor if path.name.endswith("_gt.nii.gz") else sitk.sitkLinear
        sitk.WriteImage(sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), spacing,
                                      img.GetDirection(), 0, img.GetPixelID()), str(path))


def _fold_holding_every_label(src: Path) -> int:
    """The first of nnU-Net's five folds whose validation cases hold every label (so that
    nnUNetv2_find_best_configuration has a Dice for each, whatever the barely trained network
    predicts), read from the shrunk phantom's label files."""
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.pipeline.nnunet_outputs import nnunet_split

    labels = {case: set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())
              for case, path in ds.cases_in(src / ds.TRAIN_LABEL_DIRS[0], ds.ORGANIZER_LABEL).items()}
    for fold, split in enumerate(nnunet_split(sorted(labels))):
        if set().union(*(labels[c] for c in split["val"])) >= set(ds.LABEL_VALUES):
            return fold
    raise SystemExit(f"no fold of {src} has every label in its validation cases")


def _setup(root: Path):
    from nnunet_heart_ext.data.phantom import make_phantom

    # seed 1: after shrinking, two training cases keep a calcification (seed 0 keeps none), so a
    # fold's validation can hold every label
    src = make_phantom(root / "phantom", n_train=8, n_test=2, seed=1)
    _shrink(src)
    trainers = root / "trainers"
    trainers.mkdir(exist_ok=True)
    (trainers / "crash_run_trainers.py").write_text(TRAINER_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                             "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")}
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
               nnUNet_extTrainer=str(trainers), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
    return src, env


FOLD = [0]  # set by main: a fold whose validation holds every label


def _command(src: Path, work: Path) -> list:
    return ["bash", str(SCRIPT), "--src", str(src), "--work", str(work), "--device", "cpu", "--planner",
            "HeartDemoPlanner", "--plans", "HeartDemoPlans", "--trainer", TRAINER, "--folds", str(FOLD[0])]


# ----------------------------------------------------------------------------- what a kill leaves
def _processes_of(work: Path) -> list:
    """Processes of the run in `work`, zombies aside: those whose command line names the work folder
    (the pipeline, its guards) or whose environment does (nnU-Net's commands name no folder: they
    find it through nnUNet_raw/_preprocessed/_results, which the pipeline points into `work`)."""
    out = []
    needle = str(work).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = Path(f"/proc/{name}/environ").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        mine = needle in cmdline or any(v.startswith(b"nnUNet_") and needle in v for v in environ.split(b"\0"))
        if mine and state != "Z":
            out.append(int(name))
    return out


def _wait_gone(work: Path, limit: float = 30.0) -> tuple:
    """(seconds until no process of the killed run was left, processes left after `limit`)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if not _processes_of(work):
            return time.monotonic() - start, 0
        time.sleep(0.1)
    left = _processes_of(work)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return limit, len(left)


def _check_zip(work: Path, src: Path) -> str:
    """'' if WORK/predict.zip holds exactly the test cases, each a label map on its image's grid."""
    out = work / "predict.zip"
    try:
        with zipfile.ZipFile(out) as z:
            names = sorted(z.namelist())
            if names != [f"{c}_predict.nii.gz" for c in TEST_CASES]:
                return f"members {names}"
            with tempfile.TemporaryDirectory() as tmp:
                z.extractall(tmp)
                for case in TEST_CASES:
                    pred = sitk.ReadImage(str(Path(tmp) / f"{case}_predict.nii.gz"))
                    image = sitk.ReadImage(str(src / "testing_image" / f"{case}.nii.gz"))
                    if pred.GetSize() != image.GetSize() or not np.allclose(pred.GetSpacing(), image.GetSpacing()):
                        return f"{case}: grid differs from its image"
                    if not set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3}:
                        return f"{case}: label values outside 0-3"
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _step_at(output: str) -> str:
    steps = [line.split("] step ", 1)[1].strip() for line in output.splitlines() if "] step " in line]
    return steps[-1] if steps else "(start-up)"


def _run(argv, env, log: Path) -> tuple:
    started = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.monotonic() - started


# ----------------------------------------------------------------------------- the two kinds of kill
def _pipeline_kill(i: int, at: float, src: Path, env: dict, root: Path, baseline: float) -> dict:
    work = root / f"pipeline_kill_{i:02d}"
    shutil.rmtree(work, ignore_errors=True)
    log = root / f"pipeline_kill_{i:02d}.log"
    with open(log, "w") as f:
        started = time.monotonic()
        p = subprocess.Popen(_command(src, work), env=env, stdout=f, stderr=subprocess.STDOUT)
        while p.poll() is None and time.monotonic() - started < at:
            time.sleep(0.02)
        killed_at = time.monotonic() - started
        finished_first = p.poll() is not None
        if not finished_first:
            # the pipeline is `bash ensemble_pipeline.sh` exec'ing nnunet-heart: the same process
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    step = _step_at(log.read_text()) if not finished_first else "(finished before the kill)"
    gone_after, left = _wait_gone(work)
    rc, rerun = _run(_command(src, work), env, root / f"pipeline_kill_{i:02d}_rerun.log")
    problem = _check_zip(work, src) if rc == 0 else f"rerun exit {rc}"
    return dict(kind="pipeline", kill=i, at_s=round(killed_at, 1), step=step, gone_after_s=round(gone_after, 2),
                left_running=left, rerun_s=round(rerun, 1), lost_s=round(killed_at + rerun - baseline, 1),
                recovered=problem == "", problem=problem)


def _trainer_pids(work: Path) -> list:
    out = []
    for pid in _processes_of(work):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"nnUNetv2_train") for part in cmd[:2]):
            out.append(pid)
    return out


def _trainer_kill(i: int, at: float, src: Path, env: dict, root: Path, planned: Path, baseline: float,
                  before_train: float) -> dict:
    work = root / f"trainer_kill_{i:02d}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(planned, work, symlinks=True)
    log = root / f"trainer_kill_{i:02d}.log"
    with open(log, "w") as f:
        started = time.monotonic()
        p = subprocess.Popen(_command(src, work), env=env, stdout=f, stderr=subprocess.STDOUT)
        trained_from = None
        killed = None
        while p.poll() is None:
            pids = _trainer_pids(work)
            if pids and trained_from is None:
                trained_from = time.monotonic()
            if trained_from is not None and time.monotonic() - trained_from >= at and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = time.monotonic() - started
                break
            time.sleep(0.02)
        first_rc = p.wait()
    if killed is None:
        killed = time.monotonic() - started
    rc, rerun = _run(_command(src, work), env, root / f"trainer_kill_{i:02d}_rerun.log")
    problem = _check_zip(work, src) if rc == 0 else f"rerun exit {rc}"
    # the kill interrupted a run that had prepare and plan done: compare with the baseline without them
    return dict(kind="trainer", kill=i, at_s=round((trained_from or started) - started + at, 1),
                step="train", first_exit=first_rc, gone_after_s=None, left_running=len(_trainer_pids(work)),
                rerun_s=round(rerun, 1), lost_s=round(killed + rerun - (baseline - before_train), 1),
                recovered=problem == "", problem=problem)


# ----------------------------------------------------------------------------- main
def _plot(rows, ax):
    for kind, marker in (("pipeline", "o"), ("trainer", "s")):
        mine = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["at_s"] for r in mine], [r["lost_s"] for r in mine], marker=marker,
                   label=f"{kind} killed ({sum(r['recovered'] for r in mine)}/{len(mine)} recovered)")
    ax.set_xlabel("moment of the SIGKILL (s after the start)")
    ax.set_ylabel("time lost (s)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()


def _step_times(log: str) -> dict:
    """Seconds each step took in a run's closing summary."""
    out, inside = {}, False
    for line in log.splitlines():
        if line.startswith("step ") and "seconds" in line:
            inside = True
            continue
        if inside:
            parts = line.split()
            if len(parts) >= 3 and parts[1].replace(".", "").isdigit():
                out[parts[0]] = float(parts[1])
            elif not line.strip():
                break
    return out


def main(args) -> None:
    root = Path(args.work or tempfile.mkdtemp(prefix="crash-run-")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    src, env = _setup(root)
    FOLD[0] = _fold_holding_every_label(src)
    print(f"fold {FOLD[0]} (its validation cases hold every label)", flush=True)
    rng = random.Random(args.seed)
    work = root / "baseline"
    shutil.rmtree(work, ignore_errors=True)
    rc, baseline = _run(_command(src, work), env, root / "baseline.log")
    if rc != 0 or _check_zip(work, src):
        raise SystemExit(f"the uninterrupted run failed (exit {rc}): see {root / 'baseline.log'}")
    steps = _step_times((root / "baseline.log").read_text())
    before_train = steps.get("prepare", 0) + steps.get("plan", 0)
    print(f"baseline: {baseline:.1f} s ({steps})", flush=True)
    planned = root / "planned"
    shutil.rmtree(planned, ignore_errors=True)
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(work / folder, planned / folder, symlinks=True)
    rows, missed = [], 0
    # a moment drawn after the run's end (the machine was faster than in the baseline) kills nothing:
    # it is drawn again, so that every row is a kill
    while sum(r["kind"] == "pipeline" for r in rows) < args.kills and missed < 3 * args.kills:
        row = _pipeline_kill(len(rows), rng.uniform(0.5, 0.95 * baseline), src, env, root, baseline)
        print(json.dumps(row), flush=True)
        if row["step"] == "(finished before the kill)":
            missed += 1
            continue
        rows.append(row)
    while sum(r["kind"] == "trainer" for r in rows) < args.trainer_kills and missed < 3 * (args.kills + args.trainer_kills):
        i = sum(r["kind"] == "trainer" for r in rows)
        row = _trainer_kill(i, rng.uniform(0.0, max(0.5, 0.9 * steps.get("train", 10.0) - 4.0)), src, env, root,
                            planned, baseline, before_train)
        print(json.dumps(row), flush=True)
        if row["first_exit"] == 0:  # training ended before the moment came
            missed += 1
            continue
        rows.append(row)
    summary = {kind: dict(kills=len(mine), recovered=sum(r["recovered"] for r in mine),
                          left_running=sum(r["left_running"] for r in mine),
                          median_lost_s=float(np.median([r["lost_s"] for r in mine])) if mine else None,
                          max_lost_s=max((r["lost_s"] for r in mine), default=None))
               for kind in ("pipeline", "trainer") for mine in [[r for r in rows if r["kind"] == kind]]}
    report("crash_run", rows, "SIGKILL at random moments, then the same command again", plot=_plot,
           extra=dict(baseline_s=round(baseline, 1), baseline_steps_s=steps, seed=args.seed, fold=FOLD[0],
                      summary=summary,
                      moments_drawn_again=missed),
           results_dir=args.out)
    print(json.dumps(summary, indent=1))
    if any(not r["recovered"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crash_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    main(parser.parse_args())
