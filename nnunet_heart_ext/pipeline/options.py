"""The pipeline's options: command line, HEART_* environment variables, demo defaults.

`parse(argv)` returns an `Options` with every default filled in and every value checked, or
raises PipelineError with a message that names the option. Nothing here touches the disk except
resolving paths.
"""
import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

STEPS = ("prepare", "plan", "train", "validate", "best", "predict", "postprocess", "export", "score")
LAUNCHERS = ("local", "slurm")

# the pipeline's own folders and files in its work folder
WORK_DEFAULT, DEMO_WORK_DEFAULT = "nnunet_data", "nnunet_demo"
LOGS, PREDICTIONS, PHANTOM, SLURM = "logs", "predictions", "phantom", "slurm"
SUBMISSION, TEST_DICE = "predict.zip", "test_dice.json"
DEMO = dict(n_train=24, n_test=4, folds="0", parallel=1, planner="HeartDemoPlanner", plans="HeartDemoPlans",
            trainer="HeartTrainer_demo")
SPLIT_SEED, N_FOLDS = 12345, 5  # nnUNetTrainer.do_split's default split


def nnunet_split(cases: List[str]) -> List[dict]:
    """nnU-Net's default 5-fold split of these training cases, as nnUNetTrainer.do_split makes it when
    splits_final.json is missing (generate_crossval_split of the sorted ids, seed 12345)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(cases), seed=SPLIT_SEED, n_splits=N_FOLDS)


def demo_fold(seed: int) -> int:
    """The fold the demo trains: of nnU-Net's default split of the phantom's training cases, the one
    that trains on the most calcified cases while its validation still holds one (ties: the lowest
    fold). nnUNetv2_find_best_configuration ranks models by the mean foreground Dice of the
    validation cases; a label absent from all of them makes that mean NaN and the command fails
    (IndexError). Calcium is what the fewest cases hold: the first fold with a calcified validation
    case trained on a single calcified case on some seeds, and its calcium did not generalise."""
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.data.phantom import calcified_training_cases

    calcified = set(calcified_training_cases(DEMO["n_train"], DEMO["n_test"], seed))
    cases = [ds.case_id(i) for i in range(1, DEMO["n_train"] + 1)]
    best, most = int(DEMO["folds"]), -1
    for fold, split in enumerate(nnunet_split(cases)):
        trained = len(calcified & {str(c) for c in split["train"]})
        if calcified & {str(c) for c in split["val"]} and trained > most:
            best, most = fold, trained
    return best

USAGE = """\
Usage: bash ensemble_pipeline.sh --src DIR [options]        (the same as: nnunet-heart pipeline ...)
       bash ensemble_pipeline.sh --demo [--seed N] [options]

AICUP 2025 heart CT organizer files -> submission-ready predict.zip, with nnU-Net's official
commands. Every step decides from its own outputs whether it is finished (resumable: rerun the
same command after a stop), and logs each command line before it runs. Steps:
  prepare      nnunet-heart prepare: organizer folders -> $nnUNet_raw/Dataset100_Heart (every case
               checked first; --demo writes the synthetic phantom before)
  plan         nnUNetv2_plan_and_preprocess -pl PLANNER -c CONFIGS --verify_dataset_integrity (after
               a disk-space estimate), then splits_final.json: nnU-Net's own seeded 5-fold split,
               the one nnUNetv2_train would write (yours is kept if it exists)
  train        nnUNetv2_train per configuration and fold, --npz; one fold per GPU in parallel;
               a fold with checkpoint_final.pth is finished, one with a checkpoint continues (--c)
  validate     nnUNetv2_train --val --npz, only for folds whose validation outputs are missing
  best         nnUNetv2_find_best_configuration over CONFIGS and FOLDS
  predict      nnUNetv2_predict with the chosen configuration and all FOLDS (parts split over
               the GPUs); when the best is an ensemble of configurations, nnunet-heart
               predict-ensemble averages their probabilities in memory (no .npz round trip)
  postprocess  nnUNetv2_apply_postprocessing with the chosen postprocessing.pkl
  export       nnunet-heart export -> predict.zip (flat, CASE_predict.nii.gz)
  score        (--demo only) Dice per class of predict.zip against the synthetic ground truth

Options (environment variable in brackets; flags win):
  --src DIR          organizer folder: training_image1..3/, training_label/, testing_image/ [HEART_SRC]
                     (every layout `nnunet-heart prepare` accepts: training_labels/, testing_images/,
                     test_image(s)/, imagesTs/, ground-truth _gt files beside the test images)
  --test-dir DIR     test images, if not in a test folder inside SRC [HEART_TEST_DIR]
  --work DIR         working folder (default: ./nnunet_data; ./nnunet_demo with --demo, or
                     ./nnunet_demo_seedN for another seed) [HEART_WORK]
                     nnUNet_raw, nnUNet_preprocessed, nnUNet_results are respected when set
                     (not with --demo); otherwise WORK/nnUNet_raw, ... are used
  --raw DIR, --preprocessed DIR, --results DIR   override the three nnU-Net folders
  --out FILE         the submission zip (default: WORK/predict.zip) [HEART_OUT]
  --configs LIST     comma-separated configurations (default: 3d_fullres) [HEART_CONFIGS]
  --folds LIST       comma-separated folds (default: 0,1,2,3,4) [HEART_FOLDS]
  --trainer NAME     (default: HeartTrainer) [HEART_TRAINER]
  --planner NAME     (default: HeartPlanner) [HEART_PLANNER]
  --plans NAME       plans identifier the planner writes (default: HeartPlans) [HEART_PLANS]
  --device cuda|cpu  (default: cuda; cpu with --demo) [HEART_DEVICE]
  --gpus LIST        GPU ids, one fold per GPU at a time (default: every visible GPU) [HEART_GPUS]
  --parallel N       with --device cpu: folds trained at once (default: 1; nnUNetv2_train on the CPU
                     already uses every core) [HEART_PARALLEL]
  --checkpoint NAME  checkpoint used for prediction (default: checkpoint_final.pth) [HEART_CHECKPOINT]
  --no-tta           predict without mirroring (8x fewer network passes; on with --demo) [HEART_NO_TTA=1]
  --only STEP[,..]   run just these steps (e.g. --only train --folds 3)
  --force STEP       redo STEP and every step after it (repeatable; --only limits it to STEP)
  --skip-disk-check  do not stop when the disk estimate says preprocessing will not fit
  --demo             synthetic phantom (24 train, 4 test), CPU, HeartDemoPlanner/HeartDemoPlans,
                     HeartTrainer_demo on one fold with both cores (of the folds whose validation
                     holds a calcified case, which nnUNetv2_find_best_configuration needs, the one
                     training on the most calcified cases),
                     --no-tta, then Dice per class on the test cases
  --seed N           with --demo: the phantom's seed (default 0) [HEART_SEED]

Where it runs:
  --launcher local   (default) here: folds one per GPU in parallel, or --parallel N on the CPU
  --launcher slurm   each step as Slurm jobs: prepare+plan, then the folds as one sbatch --array
                     (one GPU each; a task trains and validates one fold), then best, predict
                     (one GPU) and postprocess+export(+score), each afterok on the jobs before;
                     a failed job's dependents are cancelled. Job logs: WORK/logs/slurm/.
                     Rerunning submits only what is neither done nor already queued or running.
                     [HEART_LAUNCHER]
  --slurm-args "..." extra sbatch arguments for every job, e.g.
                     --slurm-args "--partition=gpu --account=lab42 --time=24:00:00" [HEART_SLURM_ARGS]
  --wait             with slurm: follow the jobs to the end, report each one's end, and fail with
                     the failed job's log tail (without it: submit, say how to follow, return)

Without running anything:
  --dry-run          print the official commands in the order they would run
  --status [--json]  each step: done or not, and why
  -h, --help         this text

Environment: nnUNet_n_proc_DA and nnUNet_def_n_proc default to 1 and 2 on CPU (unset on GPU);
your values are kept. Logs: WORK/logs/ (one per step or job). Commands come from PATH
(nnUNetv2_*, nnunet-heart).
"""


class PipelineError(Exception):
    """A problem the user can fix; printed as `error: ...`, exit status 1."""


@dataclass
class Options:
    src: Optional[Path] = None
    test_dir: Optional[Path] = None
    work: Path = None
    raw: Path = None
    preprocessed: Path = None
    results: Path = None
    out: Path = None
    configs: List[str] = field(default_factory=list)
    folds: List[int] = field(default_factory=list)
    trainer: str = "HeartTrainer"
    planner: str = "HeartPlanner"
    plans: str = "HeartPlans"
    device: str = "cuda"
    gpus: Optional[List[str]] = None
    parallel: int = 1
    checkpoint: str = "checkpoint_final.pth"
    no_tta: bool = False
    only: List[str] = field(default_factory=list)
    force_from: Optional[str] = None  # the earliest step named by --force
    skip_disk_check: bool = False
    demo: bool = False
    seed: int = 0
    phantom: bool = False  # the demo writes its own phantom into src
    launcher: str = "local"
    slurm_args: List[str] = field(default_factory=list)
    wait: bool = False
    dry_run: bool = False
    status: bool = False
    json: bool = False

    # ------------------------------------------------------------------ derived (paths: layout.py)
    def steps(self) -> List[str]:
        """The steps of this pipeline, in order (score only in the demo)."""
        return [s for s in STEPS if s != "score" or self.demo]

    def wanted(self, step: str) -> bool:
        return not self.only or step in self.only

    def forced(self, step: str) -> bool:
        return self.force_from is not None and STEPS.index(step) >= STEPS.index(self.force_from)


def _csv(value: str) -> List[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _env(name: str, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet-heart pipeline", add_help=False, usage=USAGE.splitlines()[0][7:])
    add = p.add_argument
    add("-h", "--help", action="store_true")
    for flag in ("--src", "--test-dir", "--work", "--raw", "--preprocessed", "--results", "--out", "--configs",
                 "--folds", "--trainer", "--planner", "--plans", "--device", "--gpus", "--parallel", "--checkpoint",
                 "--only", "--seed", "--launcher", "--slurm-args"):
        add(flag)
    add("--force", action="append", default=[])
    for flag in ("--no-tta", "--skip-disk-check", "--demo", "--wait", "--dry-run", "--status", "--json"):
        add(flag, action="store_true")
    return p


def _fail_on_argparse_error(parser: argparse.ArgumentParser):
    def error(message):
        raise PipelineError(f"{message} (see --help)")
    parser.error = error


def parse(argv: Optional[List[str]] = None, cwd: Optional[Path] = None) -> Optional[Options]:
    """Options from `argv` and the environment; None after printing --help."""
    parser = _build_parser()
    _fail_on_argparse_error(parser)
    a = parser.parse_args(argv)
    if a.help:
        print(USAGE, end="")
        return None
    cwd = Path(cwd or os.getcwd())
    o = Options()
    path = lambda v: (cwd / Path(v).expanduser()).absolute() if v else None  # noqa: E731

    o.demo = a.demo
    seed = a.seed if a.seed is not None else _env("HEART_SEED", "0")
    if not re.fullmatch(r"\d+", str(seed)):
        raise PipelineError(f"--seed: '{seed}' is not a non-negative whole number")
    o.seed = int(seed)
    if a.seed is not None and not o.demo:
        raise PipelineError("--seed is the demo phantom's seed: use it with --demo")

    o.src = path(a.src or _env("HEART_SRC"))
    o.test_dir = path(a.test_dir or _env("HEART_TEST_DIR"))
    work = a.work or _env("HEART_WORK")
    if o.demo:
        demo_work = DEMO_WORK_DEFAULT if o.seed == 0 else f"{DEMO_WORK_DEFAULT}_seed{o.seed}"
        o.work = path(work or demo_work)
        if o.src is None:
            o.src, o.phantom = o.work / PHANTOM, True
        # The demo's synthetic Dataset100_Heart must never land in a real nnUNet_raw.
        o.raw = path(a.raw) or o.work / "nnUNet_raw"
        o.preprocessed = path(a.preprocessed) or o.work / "nnUNet_preprocessed"
        o.results = path(a.results) or o.work / "nnUNet_results"
    else:
        o.work = path(work or WORK_DEFAULT)
        o.raw = path(a.raw or _env("nnUNet_raw")) or o.work / "nnUNet_raw"
        o.preprocessed = path(a.preprocessed or _env("nnUNet_preprocessed")) or o.work / "nnUNet_preprocessed"
        o.results = path(a.results or _env("nnUNet_results")) or o.work / "nnUNet_results"
    o.out = path(a.out or _env("HEART_OUT")) or o.work / SUBMISSION

    o.configs = _csv(a.configs or _env("HEART_CONFIGS", "3d_fullres"))
    if not o.configs:
        raise PipelineError("--configs: no configuration given")
    folds = a.folds or _env("HEART_FOLDS")
    if folds is None:  # the demo's fold is worked out only when nobody chose folds (each Slurm job is told them)
        folds = (str(demo_fold(o.seed)) if o.phantom else DEMO["folds"]) if o.demo else "0,1,2,3,4"
    folds = _csv(folds)
    for f in folds:
        if not re.fullmatch(r"\d+", f):
            raise PipelineError(f"--folds: '{f}' is not a fold number")
    if not folds:
        raise PipelineError("--folds: no fold given")
    o.folds = [int(f) for f in folds]
    o.trainer = a.trainer or _env("HEART_TRAINER", DEMO["trainer"] if o.demo else "HeartTrainer")
    o.planner = a.planner or _env("HEART_PLANNER", DEMO["planner"] if o.demo else "HeartPlanner")
    o.plans = a.plans or _env("HEART_PLANS", DEMO["plans"] if o.demo else "HeartPlans")
    o.device = a.device or _env("HEART_DEVICE", "cpu" if o.demo else "cuda")
    if o.device not in ("cuda", "cpu"):
        raise PipelineError(f"--device must be cuda or cpu, not '{o.device}'")
    gpus = a.gpus or _env("HEART_GPUS")
    o.gpus = _csv(gpus) if gpus else None
    parallel = a.parallel or _env("HEART_PARALLEL", str(DEMO["parallel"]) if o.demo else "1")
    if not re.fullmatch(r"[1-9]\d*", str(parallel)):
        raise PipelineError(f"--parallel: '{parallel}' is not a positive number")
    o.parallel = int(parallel)
    o.checkpoint = a.checkpoint or _env("HEART_CHECKPOINT", "checkpoint_final.pth")
    o.no_tta = a.no_tta or o.demo or _env("HEART_NO_TTA", "0") == "1"

    o.only = _csv(a.only) if a.only else []
    for s in o.only:
        if s not in STEPS:
            raise PipelineError(f"--only: unknown step '{s}' (steps: {' '.join(STEPS)})")
    for s in a.force:
        if s not in STEPS:
            raise PipelineError(f"--force: unknown step '{s}' (steps: {' '.join(STEPS)})")
    if a.force:
        o.force_from = min(a.force, key=STEPS.index)
    o.skip_disk_check = a.skip_disk_check

    o.launcher = a.launcher or _env("HEART_LAUNCHER", "local")
    if o.launcher not in LAUNCHERS:
        raise PipelineError(f"--launcher must be {' or '.join(LAUNCHERS)}, not '{o.launcher}'")
    slurm_args = a.slurm_args if a.slurm_args is not None else _env("HEART_SLURM_ARGS", "")
    try:
        o.slurm_args = shlex.split(slurm_args)
    except ValueError as e:
        raise PipelineError(f"--slurm-args: {e}") from None
    o.wait, o.dry_run, o.status, o.json = a.wait, a.dry_run, a.status, a.json
    if o.json and not o.status:
        raise PipelineError("--json goes with --status")
    if o.dry_run and o.status:
        raise PipelineError("--dry-run and --status: choose one")
    if (a.wait or a.slurm_args is not None) and o.launcher != "slurm":
        raise PipelineError("--wait and --slurm-args go with --launcher slurm")
    return o


def command_line(o: Options, only: List[str], configs: Optional[List[str]] = None,
                 folds: Optional[List[int]] = None) -> List[str]:
    """The `nnunet-heart pipeline` arguments that run `only` of this pipeline on the local launcher
    (what each Slurm job runs): every path absolute and every default spelled out, so that the job
    does not depend on the submitting shell's folder or environment."""
    args = ["--launcher", "local", "--only", ",".join(only), "--work", str(o.work), "--raw", str(o.raw),
            "--preprocessed", str(o.preprocessed), "--results", str(o.results), "--out", str(o.out),
            "--configs", ",".join(configs or o.configs), "--folds", ",".join(str(f) for f in (folds or o.folds)),
            "--trainer", o.trainer, "--planner", o.planner, "--plans", o.plans, "--device", o.device,
            "--parallel", str(o.parallel), "--checkpoint", o.checkpoint]
    if o.demo:
        args += ["--demo", "--seed", str(o.seed)]
    if o.src is not None and not o.phantom:
        args += ["--src", str(o.src)]
    if o.test_dir is not None:
        args += ["--test-dir", str(o.test_dir)]
    if o.no_tta:
        args.append("--no-tta")
    if o.skip_disk_check:
        args.append("--skip-disk-check")
    forced = [s for s in only if o.forced(s)]
    if forced:
        args += ["--force", forced[0]]
    return [sys.executable, "-m", "nnunet_heart_ext.cli", "pipeline"] + args
