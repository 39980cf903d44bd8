"""The table of `nnunet-heart pipeline`'s options (`OPTIONS`), and --help (`USAGE`) made from it.

Each option is stated once, as an `Opt`: its flag, its --help rows, its environment variable,
its default and the demo's, and whether a Slurm job is told it; options.py makes the parser,
`parse`'s defaults and `command_line` from the same records. The defaults shown and used
(`WORK_DEFAULT`, `SUBMISSION`) live here with them; the demo's, in demo.py.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from nnunet_heart_ext.pipeline.demo import DEMO, DEMO_WORK_DEFAULT

WORK_DEFAULT = "nnunet_data"
SUBMISSION = "predict.zip"

_USAGE_HEAD = """\
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
  best         nnUNetv2_find_best_configuration over CONFIGS and FOLDS, then nnunet-heart decision:
               the small classes' decision offsets and has-calcium gate, on the same validation,
               and heart_postprocessing.pkl: keep-largest for the myocardium only, never the
               small classes (nnU-Net's postprocessing.pkl stays as nnU-Net wrote it)
  predict      nnUNetv2_predict with the chosen configuration and all FOLDS (parts split over
               the GPUs); when the best is an ensemble of configurations, nnunet-heart
               predict-ensemble averages their probabilities in memory (no .npz round trip)
  postprocess  nnUNetv2_apply_postprocessing with heart_postprocessing.pkl (nnU-Net's
               postprocessing.pkl where NNUNET_HEART_EXT_DECISION=0 or none was written)
  export       nnunet-heart export -> predict.zip (flat, CASE_predict.nii.gz)
  score        (--demo only) Dice per class of predict.zip against the synthetic ground truth
  report       nnunet-heart report -> WORK/report/index.html: one static page (open it in any
               browser) of the test predictions (volumes, myocardium mass, calcium, components,
               pictures; cases flagged against the training labels) and of the cross-validation
               (Dice per fold and case, worst cases, training curves), and report.json

"""

_USAGE_TAIL = """\
Environment: nnUNet_n_proc_DA and nnUNet_def_n_proc default to 1 and 2 on CPU (unset on GPU);
your values are kept. Logs: WORK/logs/ (one per step or job). Commands come from PATH
(nnUNetv2_*, nnunet-heart).
"""


@dataclass(frozen=True)
class Opt:
    """One option of `nnunet-heart pipeline`, stated once: the parser, --help and `command_line`
    (what a Slurm job is told) are made from the table `OPTIONS`.

    `rows` are its --help lines: (left column, text); the text's "{env}" becomes the variable in
    brackets, "{default}" and "{demo}" the defaults; no rows: it is shown in another option's row.
    `passed_on`: whether `command_line` passes the option to each job, as its `Options` value
    (`field`), or a function of the Options giving the value (None: not passed); True and False
    pass a flag or not, a list goes comma-separated."""
    flag: str
    section: str                       # the --help heading it is listed under
    rows: Tuple[Tuple[str, str], ...] = ()
    env: Optional[str] = None          # the HEART_* (or nnU-Net) variable that sets it
    default: Optional[str] = None      # as it would be typed
    demo: Optional[str] = None         # with --demo, if other
    action: str = "store"              # argparse's: store, store_true, append
    field: Optional[str] = None        # the Options field, if not the flag's name
    passed_on: Union[bool, Callable[[object], object]] = False  # of the Options
    aliases: Tuple[str, ...] = ()      # other spellings, before `flag` (-h)

    @property
    def dest(self) -> str:
        """argparse's name of the value."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def name(self) -> str:
        """Its Options field."""
        return self.field or self.dest

    def default_for(self, demo: bool) -> Optional[str]:
        return self.demo if demo and self.demo is not None else self.default

    def help_text(self) -> str:
        env = f"[{self.env}=1]" if self.action == "store_true" and self.env else f"[{self.env}]"
        out = []
        for left, text in self.rows:
            text = text.replace("{env}", env).replace("{default}", str(self.default)).replace("{demo}", str(self.demo))
            first, *more = text.split("\n")
            out.append(f"  {left:<18} {first}" if len(left) <= 18 else f"  {left}   {first}")
            out += [" " * 21 + line for line in more]
        return "\n".join(out)

    def argv(self, value) -> List[str]:
        """The arguments that give it `value` (none for None, False, an empty list)."""
        if value is None or value is False or value == []:
            return []
        if value is True:
            return [self.flag]
        if isinstance(value, list):
            return [self.flag, ",".join(str(v) for v in value)]
        return [self.flag, str(value)]


OPTIONS_SECTION = "Options (environment variable in brackets; flags win):"
WHERE_SECTION = "Where it runs:"
NOTHING_SECTION = "Without running anything:"
_O, _W, _N = OPTIONS_SECTION, WHERE_SECTION, NOTHING_SECTION
OPTIONS: Tuple[Opt, ...] = (
    Opt("--src", _O, (("--src DIR", "organizer folder: training_image1..3/, training_label/, testing_image/ {env}\n"
                                    "(every layout `nnunet-heart prepare` accepts: training_labels/, testing_images/,\n"
                                    "test_image(s)/, imagesTs/, ground-truth _gt files beside the test images)"),),
        env="HEART_SRC", passed_on=lambda o: None if o.phantom else o.src),
    Opt("--test-dir", _O, (("--test-dir DIR", "test images, if not in a test folder inside SRC {env}"),),
        env="HEART_TEST_DIR", passed_on=True),
    Opt("--work", _O, (("--work DIR", "working folder (default: ./{default}; ./{demo} with --demo, or\n"
                                      "./{demo}_seedN for another seed) {env}\n"
                                      "nnUNet_raw, nnUNet_preprocessed, nnUNet_results are respected when set\n"
                                      "(not with --demo); otherwise WORK/nnUNet_raw, ... are used"),),
        env="HEART_WORK", default=WORK_DEFAULT, demo=DEMO_WORK_DEFAULT, passed_on=True),
    Opt("--raw", _O, (("--raw DIR, --preprocessed DIR, --results DIR", "override the three nnU-Net folders"),),
        env="nnUNet_raw", passed_on=True),
    Opt("--preprocessed", _O, env="nnUNet_preprocessed", passed_on=True),
    Opt("--results", _O, env="nnUNet_results", passed_on=True),
    Opt("--out", _O, (("--out FILE", "the submission zip (default: WORK/{default}) {env}"),),
        env="HEART_OUT", default=SUBMISSION, passed_on=True),
    Opt("--configs", _O, (("--configs LIST", "comma-separated configurations (default: {default}) {env}"),),
        env="HEART_CONFIGS", default="3d_fullres", passed_on=True),
    Opt("--folds", _O, (("--folds LIST", "comma-separated folds (default: {default}) {env}"),),
        env="HEART_FOLDS", default="0,1,2,3,4", passed_on=True),
    Opt("--trainer", _O, (("--trainer NAME", "(default: {default}) {env}"),),
        env="HEART_TRAINER", default="HeartTrainer", demo=DEMO["trainer"], passed_on=True),
    Opt("--planner", _O, (("--planner NAME", "(default: {default}) {env}"),),
        env="HEART_PLANNER", default="HeartPlanner", demo=DEMO["planner"], passed_on=True),
    Opt("--plans", _O, (("--plans NAME", "plans identifier the planner writes (default: {default}) {env}"),),
        env="HEART_PLANS", default="HeartPlans", demo=DEMO["plans"], passed_on=True),
    Opt("--device", _O, (("--device cuda|cpu", "(default: {default}; {demo} with --demo) {env}"),),
        env="HEART_DEVICE", default="cuda", demo="cpu", passed_on=True),
    Opt("--gpus", _O, (("--gpus LIST", "GPU ids, one fold per GPU at a time (default: every visible GPU) {env}"),),
        env="HEART_GPUS"),  # a Slurm job uses the GPU Slurm gives it
    Opt("--parallel", _O, (("--parallel N", "with --device cpu: folds trained at once (default: {default}; "
                                            "nnUNetv2_train on the CPU\nalready uses every core) {env}"),),
        env="HEART_PARALLEL", default="1", demo=str(DEMO["parallel"]), passed_on=True),
    Opt("--checkpoint", _O, (("--checkpoint NAME", "checkpoint used for prediction (default: {default}) {env}"),),
        env="HEART_CHECKPOINT", default="checkpoint_final.pth", passed_on=True),
    Opt("--no-tta", _O, (("--no-tta", "predict without mirroring (8x fewer network passes; on with --demo) {env}"),),
        env="HEART_NO_TTA", action="store_true", passed_on=True),
    Opt("--only", _O, (("--only STEP[,..]", "run just these steps (e.g. --only train --folds 3)"),), passed_on=True),
    Opt("--force", _O, (("--force STEP", "redo STEP and every step after it (repeatable; --only limits it to STEP)"),),
        action="append", field="force_from", passed_on=True),
    Opt("--skip-disk-check", _O, (("--skip-disk-check", "do not stop when the disk estimate says preprocessing will "
                                                        "not fit"),),
        action="store_true", passed_on=True),
    Opt("--demo", _O, (("--demo", "synthetic phantom (24 train, 4 test), CPU, HeartDemoPlanner/HeartDemoPlans,\n"
                                  "HeartTrainer_demo on one fold with both cores (of the folds whose validation\n"
                                  "holds a calcified case, which nnUNetv2_find_best_configuration needs, the one\n"
                                  "training on the most calcified cases),\n"
                                  "--no-tta, then Dice per class on the test cases and the report"),),
        action="store_true", passed_on=True),
    Opt("--seed", _O, (("--seed N", "with --demo: the phantom's seed (default {default}) {env}"),),
        env="HEART_SEED", default="0", passed_on=lambda o: o.seed if o.demo else None),
    Opt("--launcher", _W, (("--launcher local", "(default) here: folds one per GPU in parallel, or --parallel N on "
                                                "the CPU"),
                           ("--launcher slurm", "each step as Slurm jobs: prepare+plan, then the folds as one sbatch "
                                                "--array\n"
                                                "(one GPU each; a task trains and validates one fold), then best, "
                                                "predict\n"
                                                "(one GPU) and postprocess+export(+score)+report, each afterok on the "
                                                "jobs before;\n"
                                                "a failed job's dependents are cancelled. Job logs: WORK/logs/slurm/.\n"
                                                "Rerunning submits only what is neither done nor already queued or "
                                                "running.\n"
                                                "{env}")),
        env="HEART_LAUNCHER", default="local", passed_on=True),
    Opt("--slurm-args", _W, (("--slurm-args \"...\"", "extra sbatch arguments for every job, e.g.\n"
                                                      "--slurm-args \"--partition=gpu --account=lab42 "
                                                      "--time=24:00:00\" {env}"),),
        env="HEART_SLURM_ARGS", default=""),
    Opt("--slurm-job", _W, (("--slurm-job UNIT", "set by --launcher slurm in each job's command line: the job locks its "
                                                 "step or\nfold (waiting for another job that holds it) instead of "
                                                 "the work folder"),),
        passed_on=True),
    Opt("--wait", _W, (("--wait", "with slurm: follow the jobs to the end, report each one's end, and fail with\n"
                                  "the failed job's log tail (without it: submit, say how to follow, return)"),),
        action="store_true"),
    Opt("--dry-run", _N, (("--dry-run", "print the official commands in the order they would run"),),
        action="store_true"),
    Opt("--status", _N, (("--status [--json]", "each step: done or not, and why"),), action="store_true"),
    Opt("--json", _N, action="store_true"),
    Opt("--help", _N, (("-h, --help", "this text"),), action="store_true", aliases=("-h",)),
)
OPT = {o.name: o for o in OPTIONS}


def _usage() -> str:
    sections = []
    for section in (OPTIONS_SECTION, WHERE_SECTION, NOTHING_SECTION):
        rows = [o.help_text() for o in OPTIONS if o.section == section and o.rows]
        sections.append("\n".join([section] + rows) + "\n")
    return _USAGE_HEAD + "\n".join(sections) + "\n" + _USAGE_TAIL


USAGE = _usage()
