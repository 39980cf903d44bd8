"""The pipeline's options: command line, HEART_* environment variables, demo defaults.

`parse(argv)` returns an `Options` with every default filled in and every value checked, or
raises PipelineError with a message that names the option. Nothing here touches the disk except
resolving paths. The options themselves (flags, --help, environment variables, defaults, what a
Slurm job is told) are the table in option_table.py; the parser and `command_line` are made from it.
"""
import argparse
import enum
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from nnunet_heart_ext.pipeline.errors import PipelineError  # noqa: F401  (re-exported: what options raise)
from nnunet_heart_ext.pipeline.demo import DEMO, DEMO_WORK_DEFAULT, demo_fold  # noqa: F401  (DEMO: re-exported)
from nnunet_heart_ext.pipeline.option_table import OPT, OPTIONS, SUBMISSION, USAGE, WORK_DEFAULT

STEPS = ("prepare", "plan", "train", "validate", "best", "predict", "postprocess", "export", "score", "report")
LAUNCHERS = ("local", "slurm")

# the pipeline's own folders and files in its work folder (WORK_DEFAULT, SUBMISSION: option_table.py)
LOGS, PREDICTIONS, PHANTOM, SLURM, REPORT = "logs", "predictions", "phantom", "slurm", "report"
TEST_DICE = "test_dice.json"


class Device(str, enum.Enum):
    """Where nnU-Net's commands run (their -device): parsed once from --device, asked everywhere
    else; `nnunet-heart predict-ensemble` accepts the same."""
    CUDA = "cuda"
    CPU = "cpu"

    @property
    def gpu(self) -> bool:
        return self is Device.CUDA

    @classmethod
    def parse(cls, value: str, what: str = "--device") -> "Device":
        try:
            return cls(value)
        except ValueError:
            raise PipelineError(f"{what} must be {' or '.join(d.value for d in cls)}, not '{value}'") from None

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass
class Options:
    """The user's settings, every value filled in and checked by `parse` (defaults: the option
    table, option_table.py; none is written here)."""
    src: Optional[Path] = None
    test_dir: Optional[Path] = None
    work: Optional[Path] = None
    raw: Optional[Path] = None
    preprocessed: Optional[Path] = None
    results: Optional[Path] = None
    out: Optional[Path] = None
    configs: List[str] = field(default_factory=list)
    folds: List[int] = field(default_factory=list)
    trainer: Optional[str] = None
    planner: Optional[str] = None
    plans: Optional[str] = None
    device: Optional[Device] = None
    gpus: Optional[List[str]] = None
    parallel: Optional[int] = None
    checkpoint: Optional[str] = None
    no_tta: bool = False
    only: List[str] = field(default_factory=list)
    force_from: Optional[str] = None  # the earliest step named by --force
    skip_disk_check: bool = False
    demo: bool = False
    seed: Optional[int] = None
    phantom: bool = False  # the demo writes its own phantom into src
    launcher: Optional[str] = None
    slurm_args: List[str] = field(default_factory=list)
    wait: bool = False
    slurm_job: Optional[str] = None  # set in a Slurm job's command line: the unit it runs (locks.py)
    dry_run: bool = False
    status: bool = False
    json: bool = False

    def __post_init__(self):
        if self.device is not None and not isinstance(self.device, Device):
            self.device = Device.parse(self.device)  # dataclasses.replace(o, device="cuda") stays typed

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
    for opt in OPTIONS:
        if opt.action == "append":
            p.add_argument(*opt.aliases, opt.flag, action=opt.action, default=[])
        else:
            p.add_argument(*opt.aliases, opt.flag, action=opt.action)
    return p


def _flag_or_env(a: argparse.Namespace, name: str) -> Optional[str]:
    """Option `name` as given: its flag, else its environment variable (neither: None)."""
    opt = OPT[name]
    return getattr(a, opt.dest) or _env(opt.env)


def _value(a: argparse.Namespace, name: str, demo: bool) -> Optional[str]:
    """Option `name`: its flag, else its environment variable, else its default (with --demo: the demo's)."""
    opt = OPT[name]
    return getattr(a, opt.dest) or _env(opt.env, opt.default_for(demo))


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
    seed = a.seed if a.seed is not None else _env(OPT["seed"].env, OPT["seed"].default)
    if not re.fullmatch(r"\d+", str(seed)):
        raise PipelineError(f"--seed: '{seed}' is not a non-negative whole number")
    o.seed = int(seed)
    if a.seed is not None and not o.demo:
        raise PipelineError("--seed is the demo phantom's seed: use it with --demo")

    o.src = path(_flag_or_env(a, "src"))
    o.test_dir = path(_flag_or_env(a, "test_dir"))
    work = _flag_or_env(a, "work")
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
        o.raw = path(_flag_or_env(a, "raw")) or o.work / "nnUNet_raw"
        o.preprocessed = path(_flag_or_env(a, "preprocessed")) or o.work / "nnUNet_preprocessed"
        o.results = path(_flag_or_env(a, "results")) or o.work / "nnUNet_results"
    o.out = path(_flag_or_env(a, "out")) or o.work / SUBMISSION

    o.configs = _csv(_value(a, "configs", o.demo))
    if not o.configs:
        raise PipelineError("--configs: no configuration given")
    folds = _flag_or_env(a, "folds")
    if folds is None:  # the demo's fold is worked out only when nobody chose folds (each Slurm job is told them)
        folds = (str(demo_fold(o.seed)) if o.phantom else DEMO["folds"]) if o.demo else OPT["folds"].default
    folds = _csv(folds)
    for f in folds:
        if not re.fullmatch(r"\d+", f):
            raise PipelineError(f"--folds: '{f}' is not a fold number")
    if not folds:
        raise PipelineError("--folds: no fold given")
    o.folds = [int(f) for f in folds]
    o.trainer = _value(a, "trainer", o.demo)
    o.planner = _value(a, "planner", o.demo)
    o.plans = _value(a, "plans", o.demo)
    o.device = Device.parse(_value(a, "device", o.demo))
    gpus = _flag_or_env(a, "gpus")
    o.gpus = _csv(gpus) if gpus else None
    parallel = _value(a, "parallel", o.demo)
    if not re.fullmatch(r"[1-9]\d*", str(parallel)):
        raise PipelineError(f"--parallel: '{parallel}' is not a positive number")
    o.parallel = int(parallel)
    o.checkpoint = _value(a, "checkpoint", o.demo)
    o.no_tta = a.no_tta or o.demo or _env(OPT["no_tta"].env, "0") == "1"

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

    o.launcher = _value(a, "launcher", o.demo)
    if o.launcher not in LAUNCHERS:
        raise PipelineError(f"--launcher must be {' or '.join(LAUNCHERS)}, not '{o.launcher}'")
    slurm_args = a.slurm_args if a.slurm_args is not None else _env(OPT["slurm_args"].env, OPT["slurm_args"].default)
    try:
        o.slurm_args = shlex.split(slurm_args)
    except ValueError as e:
        raise PipelineError(f"--slurm-args: {e}") from None
    o.wait, o.dry_run, o.status, o.json = a.wait, a.dry_run, a.status, a.json
    o.slurm_job = a.slurm_job
    if o.json and not o.status:
        raise PipelineError("--json goes with --status")
    if o.dry_run and o.status:
        raise PipelineError("--dry-run and --status: choose one")
    if (a.wait or a.slurm_args is not None) and o.launcher != "slurm":
        raise PipelineError("--wait and --slurm-args go with --launcher slurm")
    return o


def command_line(o: Options, only: List[str], configs: Optional[List[str]] = None,
                 folds: Optional[List[int]] = None, job: Optional[str] = None) -> List[str]:
    """The `nnunet-heart pipeline` arguments that run `only` of this pipeline on the local launcher
    (what each Slurm job runs, `job` naming its unit): every path absolute and every default
    spelled out, so that the job does not depend on the submitting shell's folder or environment.
    Made from `OPTIONS`: each option passed on, with its value in `o` or the one given here."""
    forced = [s for s in only if o.forced(s)]
    given = dict(launcher="local", only=list(only), configs=configs or o.configs, folds=folds or o.folds,
                 force_from=forced[0] if forced else None, slurm_job=job)
    args: List[str] = []
    for opt in OPTIONS:
        if not opt.passed_on:
            continue
        if opt.name in given:
            value = given[opt.name]
        else:
            value = opt.passed_on(o) if callable(opt.passed_on) else getattr(o, opt.name)
        args += opt.argv(value)
    return [sys.executable, "-m", "nnunet_heart_ext.cli", "pipeline"] + args
