"""The pipeline's steps: for each, the official commands it runs and what "done" means.

A step's `check()` decides from the step's outputs alone, in this process and without running
anything, whether the step is finished, and says why not: outputs missing, incomplete (a file
cut short by a kill), or older than what they are made from (make's rule: an output older than
its input is stale). `waves()` yields what to run, in order: each wave a list of jobs that may
run side by side (folds, prediction parts) or one in-process action. Nothing is deleted or
written while checking; the few preparations a rerun needs (dropping a cut-short prediction so
that `--continue_prediction` redoes it, setting a broken checkpoint aside) are a wave's `before`,
which a dry run skips.

What each step's outputs are:
  prepare      $nnUNet_raw/Dataset100_Heart as `nnunet-heart prepare` would write it now
  plan         PLANS.json, every case preprocessed (newer than its raw files) for every
               configuration, gt_segmentations, splits_final.json
  train        fold_F/checkpoint_final.pth of a model whose plans.json is the current plans
  validate     fold_F/validation: summary.json newer than the checkpoint, a segmentation and .npz
               for each validation case of splits_final.json
  best         inference_information.json for these models and folds, newer than every validation
  predict      one complete segmentation per test image, newer than the model choice and than the
               image (in predictions/ensemble when the best is an ensemble: `nnunet-heart
               predict-ensemble` averages the models' probabilities in memory, no .npz)
  postprocess  one complete segmentation per test image, newer than the prediction it came from
  export       the zip holding exactly CASE_predict.nii.gz of every postprocessed case, newer than them
  score        test_dice.json newer than the zip
"""
import json
import os
import shlex
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.io import nifti_incomplete
from nnunet_heart_ext.pipeline.options import Options, PipelineError


class NotReady(PipelineError):
    """A step cannot run yet: an earlier step's outputs are missing."""


@dataclass
class Check:
    done: bool
    reason: str = ""  # why not done (or, when done, a short description)


@dataclass
class Job:
    """One official command, with its log."""
    name: str
    argv: List[str]
    log: Path
    slot: bool = False  # needs a GPU (or CPU slot): may run beside other slot jobs
    note: str = ""      # said when it starts (e.g. "continuing from checkpoint_latest.pth")

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass
class Action:
    """Work done in this process (disk estimate, writing the split, scoring)."""
    name: str
    description: str
    run: Callable[[], None]


@dataclass
class Wave:
    items: list                           # Jobs (run side by side) or a single Action
    before: Optional[Callable[[], None]] = None
    comment: str = ""                     # for the dry run


# ----------------------------------------------------------------------------- file checks
def _mtime(path: Path) -> float:
    return os.path.getmtime(path)


def _newest(paths) -> float:
    return max((_mtime(p) for p in paths if os.path.exists(p)), default=0.0)


def segmentation_problem(path: Path, newer_than: float = 0.0) -> Optional[str]:
    """Why `path` is not a finished segmentation (None if it is)."""
    if not path.is_file():
        return "missing"
    problem = nifti_incomplete(path)
    if problem:
        return problem
    if _mtime(path) < newer_than:
        return "older than its input"
    return None


def npz_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return "missing"
    try:
        zipfile.ZipFile(path).close()  # reads the central directory at the file's end
    except (OSError, zipfile.BadZipFile):
        return "cut short"
    return None


def labels_without_validation_dice(summaries: List[Path]) -> List[str]:
    """Foreground labels that have no Dice in any case of these validation summaries (nnU-Net's
    summary.json: a case where neither the reference nor the prediction holds the label gives NaN).
    nnUNetv2_find_best_configuration ranks by the mean over the labels of their mean over the cases;
    such a label makes it NaN, and the command then fails with IndexError."""
    scored: Dict[str, bool] = {}
    for summary in summaries:
        for case in json.loads(summary.read_text())["metric_per_case"]:
            for label, metrics in case["metrics"].items():
                dice = metrics.get("Dice")
                scored[label] = scored.get(label, False) or (dice is not None and dice == dice)
    names = []
    for label, ok in scored.items():
        if not ok:
            names.append(f"{label} ({ds.CLASSES[int(label)]})" if label.isdigit() and int(label) in ds.CLASSES
                         else label)
    return names


def _first(problems: Dict[str, str], total: int, where: Path) -> str:
    case, problem = next(iter(problems.items()))
    return f"{where}: {len(problems)} of {total} case(s) not finished ({case}: {problem})"


# ----------------------------------------------------------------------------- context
class Context:
    """Paths and settings shared by the steps."""

    def __init__(self, options: Options):
        self.o = options
        self.raw = ds.RawDataset.under(options.raw)
        self.pre = options.preprocessed / ds.DATASET_NAME
        self.res = options.results / ds.DATASET_NAME
        self.slots: List[str] = []  # set by the launcher

    # nnU-Net's results layout
    def model_dir(self, config: str, trainer: str = None, plans: str = None) -> Path:
        return self.res / ds.model_folder(trainer or self.o.trainer, plans or self.o.plans, config)

    def fold_dir(self, config: str, fold: int) -> Path:
        return self.model_dir(config) / ds.fold_folder(fold)

    @property
    def plans_file(self) -> Path:
        return self.pre / f"{self.o.plans}.json"

    @property
    def inference_information(self) -> Path:
        return self.res / ds.INFERENCE_INFORMATION

    def log(self, name: str) -> Path:
        return self.o.logs / f"{name}.log"

    # process counts: passed only where the user (or the CPU default) set them; otherwise nnU-Net
    # keeps its own per-command defaults (e.g. 4 for 3d_fullres preprocessing: RAM)
    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.o.raw), nnUNet_preprocessed=str(self.o.preprocessed),
                   nnUNet_results=str(self.o.results), PYTHONUNBUFFERED="1")
        if self.o.device == "cpu":
            env.setdefault("nnUNet_n_proc_DA", "1")
            env.setdefault("nnUNet_def_n_proc", "2")
        return env

    @property
    def n_proc(self) -> Optional[str]:
        return self.env().get("nnUNet_def_n_proc")

    @property
    def n_proc_or_default(self) -> str:
        return self.n_proc or "8"


# ----------------------------------------------------------------------------- steps
class Step:
    name = ""

    def __init__(self, ctx: Context):
        self.ctx, self.o = ctx, ctx.o

    def check(self) -> Check:
        raise NotImplementedError

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        """What to run. `forced`: redo even what is done. `assume` (a dry run): earlier steps are
        taken as done, so missing inputs raise no NotReady."""
        raise NotImplementedError

    def after(self) -> None:
        """Said after the step ran (e.g. what find_best_configuration chose)."""


class Prepare(Step):
    name = "prepare"

    def _phantom_check(self) -> Optional[str]:
        if not self.o.phantom:
            return None
        from nnunet_heart_ext.data.phantom import phantom_differs

        from nnunet_heart_ext.pipeline.options import DEMO
        return phantom_differs(self.o.src, DEMO["n_train"], DEMO["n_test"], self.o.seed)

    def check(self) -> Check:
        from nnunet_heart_ext.data.prepare import pending

        if self.o.src is None:
            if self.ctx.raw.dataset_json.is_file():
                return Check(True, f"{self.ctx.raw.root} (no --src given: taken as it is)")
            return Check(False, "no --src given and no prepared dataset")
        reason = self._phantom_check()
        if reason:
            return Check(False, reason)
        reason = pending(self.o.src, self.o.raw, test_dir=self.o.test_dir)
        return Check(reason is None, reason or f"{self.ctx.raw.root} matches {self.o.src}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        from nnunet_heart_ext.pipeline.options import DEMO

        if self.o.src is None:
            raise PipelineError("--src DIR is required (the organizer folder with training_image1..3/ and "
                                "training_label/), or --demo")
        if self.o.phantom and (forced or self._phantom_check()):
            yield Wave([Job("phantom", ["nnunet-heart", "phantom", "--out", str(self.o.src), "--train",
                                        str(DEMO["n_train"]), "--test", str(DEMO["n_test"]), "--seed",
                                        str(self.o.seed)], self.ctx.log("prepare"))])
        elif not self.o.src.is_dir() and not assume:
            raise PipelineError(f"--src {self.o.src} is not a folder")
        argv = ["nnunet-heart", "prepare", "--src", str(self.o.src), "--raw", str(self.o.raw)]
        if self.o.test_dir is not None:  # otherwise prepare finds the test folder itself
            argv += ["--test-dir", str(self.o.test_dir)]
        yield Wave([Job("prepare", argv, self.ctx.log("prepare"))])


def data_identifier(plans: dict, config: str) -> str:
    """nnU-Net's data identifier of `config`, following `inherits_from` as PlansManager does."""
    configuration = plans["configurations"][config]
    while "data_identifier" not in configuration and "inherits_from" in configuration:
        configuration = plans["configurations"][configuration["inherits_from"]]
    return configuration["data_identifier"]


def estimate_preprocessed_bytes(raw: ds.RawDataset, n_configs: int) -> int:
    """Disk that preprocessing will need, from image headers: per configuration, every training
    image as float32 plus its segmentation as int8 (nnU-Net's blosc2 files compress CT poorly,
    so this is an upper-end guess at the original spacing), plus the copied label files."""
    from nnunet_heart_ext.data.io import read_geometry

    voxels = 0
    for case in raw.training_cases():
        n = 1
        for s in read_geometry(raw.image(case)).size:
            n *= s
        voxels += n
    label_bytes = sum(raw.label(c).stat().st_size for c in raw.training_cases())
    return int(voxels * (4 + 1) * n_configs * 1.2) + label_bytes


class Plan(Step):
    name = "plan"

    def _plans(self) -> dict:
        plans = json.loads(self.ctx.plans_file.read_text())
        missing = [c for c in self.o.configs if c not in plans["configurations"]]
        if missing:
            raise PipelineError(f"configuration {', '.join(missing)} is not in {self.ctx.plans_file} "
                                f"(it has {', '.join(plans['configurations'])})")
        return plans

    def _preprocessing_check(self) -> Check:
        raw, pre = self.ctx.raw, self.ctx.pre
        if not self.ctx.plans_file.is_file():
            return Check(False, f"{self.ctx.plans_file} is missing")
        plans = self._plans()
        cases = raw.training_cases()
        for config in self.o.configs:
            folder = pre / data_identifier(plans, config)
            problems = {}
            for case in cases:
                pkl = folder / f"{case}.pkl"  # written last of a case's files
                if not pkl.is_file():
                    problems[case] = "not preprocessed"
                elif _mtime(pkl) < _newest([raw.image(case), raw.label(case)]):
                    problems[case] = "preprocessed before its raw files changed"
            if problems:
                return Check(False, _first(problems, len(cases), folder))
        gt = ds.cases_in(pre / ds.GT_SEGMENTATIONS, ds.RAW_LABEL)
        if sorted(gt) != cases:
            return Check(False, f"{pre / ds.GT_SEGMENTATIONS} does not hold the {len(cases)} training cases")
        return Check(True)

    def check(self) -> Check:
        if not self.ctx.raw.dataset_json.is_file():
            return Check(False, f"{self.ctx.raw.dataset_json} is missing (prepare first)")
        c = self._preprocessing_check()
        if not c.done:
            return c
        if not (self.ctx.pre / ds.SPLITS_JSON).is_file():
            return Check(False, f"{self.ctx.pre / ds.SPLITS_JSON} is missing")
        return Check(True, f"{', '.join(self.o.configs)} preprocessed with {self.o.plans}")

    def disk_check(self) -> None:
        gb = 1024 ** 3
        need = estimate_preprocessed_bytes(self.ctx.raw, len(self.o.configs))
        self.o.preprocessed.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.o.preprocessed).free
        if free < need:
            raise PipelineError(f"preprocessing {self.ctx.raw.root} needs about {need / gb:.1f} GiB in "
                                f"{self.o.preprocessed}, only {free / gb:.1f} GiB are free (free space, or set "
                                f"nnUNet_preprocessed elsewhere; --skip-disk-check to try anyway)")
        print(f"  disk: preprocessing needs about {need / gb:.2f} GiB, {free / gb:.1f} GiB free in "
              f"{self.o.preprocessed}", flush=True)  # noqa: T201

    def write_splits(self) -> None:
        """nnU-Net's default split, as nnUNetTrainer.do_split makes it (generate_crossval_split of the
        sorted case ids, seed 12345, 5 folds), written before any training: folds started side by
        side (here or as Slurm array tasks on other nodes) then never race to create it."""
        from nnunet_heart_ext.data.io import write_text
        from nnunet_heart_ext.pipeline.options import nnunet_split

        cases = self.ctx.raw.training_cases()
        if len(cases) < 5:
            return  # nnU-Net's trainer will say what is wrong
        splits = nnunet_split(cases)
        write_text(json.dumps(splits, indent=4), self.ctx.pre / ds.SPLITS_JSON)

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        if not self.ctx.raw.dataset_json.is_file():
            if not assume:
                raise NotReady(f"{self.ctx.raw.dataset_json} missing: run the prepare step first")
        if forced or not self.ctx.raw.dataset_json.is_file() or not self._preprocessing_check().done:
            if not self.o.skip_disk_check:
                yield Wave([Action("disk", "estimate the disk space preprocessing needs", self.disk_check)])
            np_args = ["-np", self.ctx.n_proc, "-npfp", self.ctx.n_proc] if self.ctx.n_proc else []
            yield Wave([Job("plan", ["nnUNetv2_plan_and_preprocess", "-d", str(ds.DATASET_ID), "-pl", self.o.planner,
                                     "-c", *self.o.configs, *np_args, "--verify_dataset_integrity"],
                            self.ctx.log("plan"))])
        if not (self.ctx.pre / ds.SPLITS_JSON).is_file():  # a split of the user's own is kept, even when forced
            yield Wave([Action("splits", f"write {self.ctx.pre / ds.SPLITS_JSON} (nnU-Net's generate_crossval_split, "
                                         f"seed 12345, 5 folds, as nnUNetv2_train would)", self.write_splits)])


def _plans_match(model_dir: Path, plans_file: Path) -> bool:
    """The model was trained with the current plans (nnUNetv2_train copies them beside its folds)."""
    trained = model_dir / "plans.json"
    if not trained.is_file() or not plans_file.is_file():
        return True  # nothing to compare with
    return json.loads(trained.read_text()) == json.loads(plans_file.read_text())


def checkpoint_loads(path: Path) -> Optional[str]:
    """None if torch can load the checkpoint (one cut short while being saved cannot be continued)."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to load means: not usable)
        return f"{type(e).__name__}: {e}"
    return None


class Train(Step):
    name = "train"

    def fold_state(self, config: str, fold: int) -> Check:
        d = self.ctx.fold_dir(config, fold)
        final = d / ds.CHECKPOINTS[0]
        if final.is_file():
            if not _plans_match(self.ctx.model_dir(config), self.ctx.plans_file):
                return Check(False, f"{final} was trained with other plans than {self.ctx.plans_file}")
            return Check(True, "trained")
        present = [c for c in ds.CHECKPOINTS[1:] if (d / c).is_file()]
        return Check(False, f"{present[0]} (will continue)" if present else "not started")

    def todo(self) -> List[tuple]:
        return [(c, f) for c in self.o.configs for f in self.o.folds if not self.fold_state(c, f).done]

    def check(self) -> Check:
        if not self.ctx.plans_file.is_file():
            return Check(False, f"{self.ctx.plans_file} is missing (plan first)")
        todo = {f"{c} fold {f}": self.fold_state(c, f).reason for c, f in self.todo()}
        if todo:
            return Check(False, "; ".join(f"{k}: {v}" for k, v in todo.items()))
        return Check(True, f"{len(self.o.configs) * len(self.o.folds)} fold(s) trained")

    def job(self, config: str, fold: int, fresh: bool = False) -> Job:
        d = self.ctx.fold_dir(config, fold)
        cont = not fresh and any((d / c).is_file() for c in ds.CHECKPOINTS)
        argv = ["nnUNetv2_train", str(ds.DATASET_ID), config, str(fold), "-tr", self.o.trainer, "-p", self.o.plans,
                "--npz", "-device", self.o.device] + (["--c"] if cont else [])
        note = "" if not cont else "continuing from checkpoint_latest.pth" if (d / ds.CHECKPOINTS[1]).is_file() \
            else "continuing from its last checkpoint"
        return Job(f"train_{config}_fold{fold}", argv, self.ctx.log(f"train_{config}_fold{fold}"), slot=True, note=note)

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        if not assume and not self.ctx.plans_file.is_file():
            raise NotReady(f"{self.ctx.plans_file} missing: run the plan step first")
        todo = [(c, f) for c in self.o.configs for f in self.o.folds] if forced else self.todo()
        for c, f in todo:
            state = self.fold_state(c, f)
            if not forced and "other plans" in state.reason:
                raise PipelineError(f"{state.reason}: the data or plans changed since it was trained. Retrain "
                                    f"with --force train (this deletes the trained folds), or restore the plans")
        if not todo:
            return

        def before():
            for c, f in todo:
                d = self.ctx.fold_dir(c, f)
                if forced:
                    shutil.rmtree(d, ignore_errors=True)
                latest = d / ds.CHECKPOINTS[1]
                if latest.is_file():
                    problem = checkpoint_loads(latest)
                    if problem:  # cut short while saving: nnU-Net's --c then falls back to checkpoint_best.pth
                        print(f"  {latest} cannot be loaded ({problem}); set aside as .broken", flush=True)
                        os.replace(latest, latest.with_name(latest.name + ".broken"))

        yield Wave([self.job(c, f, fresh=forced) for c, f in todo], before=before)


class Validate(Step):
    name = "validate"

    def fold_check(self, config: str, fold: int) -> Check:
        d = self.ctx.fold_dir(config, fold)
        validation = d / ds.VALIDATION_FOLDER
        summary = validation / "summary.json"
        if not (d / ds.CHECKPOINTS[0]).is_file():
            return Check(False, "not trained yet (training validates at its end)")
        if not summary.is_file():
            return Check(False, f"{summary} is missing")
        if _mtime(summary) < _mtime(d / ds.CHECKPOINTS[0]):
            return Check(False, f"{summary} is older than the fold's {ds.CHECKPOINTS[0]}")
        splits_file = self.ctx.pre / ds.SPLITS_JSON
        if not splits_file.is_file():
            return Check(False, f"{splits_file} is missing")
        splits = json.loads(splits_file.read_text())
        val_cases = splits[fold]["val"] if fold < len(splits) else []
        problems = {}
        for case in val_cases:
            p = segmentation_problem(validation / ds.PREDICTION.name(case)) or \
                npz_problem(validation / ds.PROBABILITIES.name(case))
            if p:
                problems[case] = p
        if problems:
            return Check(False, _first(problems, len(val_cases), validation))
        return Check(True, "validated")

    def check(self) -> Check:
        todo = {f"{c} fold {f}": r.reason for c in self.o.configs for f in self.o.folds
                for r in [self.fold_check(c, f)] if not r.done}
        if todo:
            return Check(False, "; ".join(f"{k}: {v}" for k, v in todo.items()))
        return Check(True, f"{len(self.o.configs) * len(self.o.folds)} fold(s) validated")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        jobs, untrained = [], []
        for c in self.o.configs:
            for f in self.o.folds:
                if not (self.ctx.fold_dir(c, f) / ds.CHECKPOINTS[0]).is_file():
                    untrained.append(f"{c} fold {f}")
                    continue
                if forced or not self.fold_check(c, f).done:
                    jobs.append(Job(f"validate_{c}_fold{f}", ["nnUNetv2_train", str(ds.DATASET_ID), c, str(f), "-tr",
                                                              self.o.trainer, "-p", self.o.plans, "--val", "--npz",
                                                              "-device", self.o.device],
                                    self.ctx.log(f"validate_{c}_fold{f}"), slot=True))
        if untrained and not assume:
            raise NotReady(f"{', '.join(untrained)} not trained ({ds.CHECKPOINTS[0]} missing): run the train step "
                           f"first (it validates each fold at its end)")
        if jobs or untrained:
            yield Wave(jobs, comment=f"# {', '.join(untrained)}: validated by nnUNetv2_train at the end of training"
                       if untrained else "")


class Best(Step):
    name = "best"

    def model_dirs(self) -> List[Path]:
        return [self.ctx.model_dir(c) for c in self.o.configs]

    def check(self) -> Check:
        info_file = self.ctx.inference_information
        if not info_file.is_file():
            return Check(False, f"{info_file} is missing")
        info = json.loads(info_file.read_text())
        considered = sorted(ds.model_folder(m["trainer"], m["plans"], m["configuration"])
                            for m in info["considered_models"])
        if considered != sorted(d.name for d in self.model_dirs()):
            return Check(False, f"{info_file} compared other models: {', '.join(considered)}")
        if [int(f) for f in info["folds"]] != list(self.o.folds):
            return Check(False, f"{info_file} used folds {info['folds']}")
        pp = Path(info["best_model_or_ensemble"]["postprocessing_file"])
        if not pp.is_file():
            return Check(False, f"{pp} is missing")
        summaries = [d / ds.fold_folder(f) / ds.VALIDATION_FOLDER / "summary.json" for d in self.model_dirs()
                     for f in self.o.folds]
        if _mtime(info_file) < _newest(summaries):
            return Check(False, f"{info_file} is older than a fold's validation")
        return Check(True, "best: " + " + ".join(m["configuration"] for m in self.chosen()))

    def chosen(self) -> List[dict]:
        """What find_best_configuration chose: trainer, plans_identifier, configuration per model."""
        info = json.loads(self.ctx.inference_information.read_text())
        return info["best_model_or_ensemble"]["selected_model_or_models"]

    def check_labels(self) -> None:
        """Fail before nnUNetv2_find_best_configuration does (a bare IndexError) when a label is in
        no validation case of the folds, naming the label and what to do."""
        summaries = [d / ds.fold_folder(f) / ds.VALIDATION_FOLDER / "summary.json" for d in self.model_dirs()
                     for f in self.o.folds]
        missing = labels_without_validation_dice([p for p in summaries if p.is_file()])
        if missing:
            folds = ",".join(map(str, self.o.folds))
            raise PipelineError(
                f"label {', '.join(missing)} is in no validation case of fold(s) {folds} (neither reference nor "
                f"prediction), so its mean Dice is NaN and nnUNetv2_find_best_configuration would fail "
                f"(IndexError). Use --folds with a fold whose validation cases hold it "
                f"({self.ctx.pre / ds.SPLITS_JSON} lists each fold's validation cases)")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        if not assume:
            self.check_labels()
        yield Wave([Job("best", ["nnUNetv2_find_best_configuration", str(ds.DATASET_ID), "-c", *self.o.configs,
                                 "-tr", self.o.trainer, "-p", self.o.plans, "-f", *map(str, self.o.folds),
                                 "-np", self.ctx.n_proc_or_default], self.ctx.log("best"))])

    def after(self) -> None:
        info = json.loads(self.ctx.inference_information.read_text())
        for name, value in info["all_results"].items():
            print(f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}")
        print("  chosen: " + " + ".join(m["configuration"] for m in self.chosen()), flush=True)


class Predict(Step):
    name = "predict"

    def models(self, assume: bool = False) -> List[dict]:
        """The chosen models; with `assume` (a dry run before the best step), every configuration."""
        if self.ctx.inference_information.is_file():
            return Best(self.ctx).chosen()
        if assume:
            return [dict(trainer=self.o.trainer, plans_identifier=self.o.plans, configuration=c)
                    for c in self.o.configs]
        raise NotReady(f"{self.ctx.inference_information} missing: run the best step first")

    def pred_dir(self, model: dict) -> Path:
        return self.o.predictions / f"{model['trainer']}_{model['plans_identifier']}_{model['configuration']}"

    @property
    def ensemble_dir(self) -> Path:
        return self.o.predictions / "ensemble"

    def final_dir(self, assume: bool = False) -> Path:
        models = self.models(assume)
        return self.ensemble_dir if len(models) > 1 else self.pred_dir(models[0])

    def test_cases(self) -> Dict[str, Path]:
        cases = self.ctx.raw.test_cases()
        if not cases:
            raise PipelineError(f"no test images ({ds.RAW_IMAGE.example}) in {self.ctx.raw.images_ts}: the organizer "
                                f"folder has no test folder ({', '.join(ds.TEST_IMAGE_DIRS)}); name it with --test-dir")
        return cases

    def model_problems(self, model: dict, need_npz: bool) -> Dict[str, str]:
        d = self.pred_dir(model)
        chosen_at = _mtime(self.ctx.inference_information)
        problems = {}
        for case, image in self.test_cases().items():
            p = segmentation_problem(d / ds.PREDICTION.name(case), max(chosen_at, _mtime(image)))
            if p is None and need_npz:
                p = npz_problem(d / ds.PROBABILITIES.name(case))
            if p:
                problems[case] = p
        return problems

    def ensemble_problems(self, models: List[dict]) -> Dict[str, str]:
        chosen_at = _mtime(self.ctx.inference_information)
        return {case: p for case, image in self.test_cases().items()
                for p in [segmentation_problem(self.ensemble_dir / ds.PREDICTION.name(case),
                                               max(chosen_at, _mtime(image)))] if p}

    def check(self) -> Check:
        if not self.ctx.inference_information.is_file():
            return Check(False, f"{self.ctx.inference_information} is missing (best first)")
        models = self.models()
        n = len(self.test_cases())
        if len(models) > 1:
            problems = self.ensemble_problems(models)
            if problems:
                return Check(False, _first(problems, n, self.ensemble_dir))
            return Check(True, f"{n} test case(s) in {self.final_dir()}")
        problems = self.model_problems(models[0], False)
        if problems:
            return Check(False, _first(problems, n, self.pred_dir(models[0])))
        return Check(True, f"{n} test case(s) in {self.final_dir()}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        models = self.models(assume)
        chosen = self.ctx.inference_information.is_file()
        if len(models) == 1 or not chosen:  # before the best step (a dry run): every configuration's command
            for m in models:
                if forced or not chosen or self.model_problems(m, False):
                    yield self._model_wave(m, forced, "" if chosen else "# the model nnUNetv2_find_best_configuration "
                                                                         "picks; shown: every configuration")
        if len(models) > 1 and (forced or not chosen or self.ensemble_problems(models)):
            yield self._ensemble_wave(models, forced, "" if chosen else "# only if the best is an ensemble")

    def _tail(self) -> List[str]:
        return ["-f", *map(str, self.o.folds), "-chk", self.o.checkpoint, "-device", self.o.device]

    def _model_wave(self, m: dict, forced: bool, comment: str) -> Wave:
        parts = max(1, len(self.ctx.slots))
        jobs = [Job(f"predict_{m['configuration']}_part{i}", [
            "nnUNetv2_predict", "-i", str(self.ctx.raw.images_ts), "-o", str(self.pred_dir(m)),
            "-d", str(ds.DATASET_ID), "-tr", m["trainer"], "-p", m["plans_identifier"], "-c", m["configuration"],
            *self._tail(), *(["-npp", self.ctx.n_proc, "-nps", self.ctx.n_proc] if self.ctx.n_proc else []),
            "--continue_prediction", "--disable_progress_bar", "-num_parts", str(parts), "-part_id", str(i),
            *(["--disable_tta"] if self.o.no_tta else [])],
            self.ctx.log(f"predict_{m['configuration']}_part{i}"), slot=True) for i in range(parts)]

        def before():
            # cut-short, stale or (forced) all outputs go, so that --continue_prediction redoes them
            d = self.pred_dir(m)
            if forced:
                shutil.rmtree(d, ignore_errors=True)
                return
            for case in self.model_problems(m, False):
                (d / ds.PREDICTION.name(case)).unlink(missing_ok=True)

        return Wave(jobs, before=before, comment=comment)

    def _ensemble_wave(self, models: List[dict], forced: bool, comment: str) -> Wave:
        """The models' probabilities averaged in one process per part (on its GPU), no .npz files."""
        parts = max(1, len(self.ctx.slots))
        folders = [str(self.ctx.model_dir(m["configuration"], m["trainer"], m["plans_identifier"])) for m in models]
        jobs = [Job(f"predict_ensemble_part{i}", [
            "nnunet-heart", "predict-ensemble", "-i", str(self.ctx.raw.images_ts), "-o", str(self.ensemble_dir),
            "-m", *folders, *self._tail(), "--continue_prediction", "-num_parts", str(parts), "-part_id", str(i),
            *(["--disable_tta"] if self.o.no_tta else [])],
            self.ctx.log(f"predict_ensemble_part{i}"), slot=True) for i in range(parts)]

        def before():
            if forced:
                shutil.rmtree(self.ensemble_dir, ignore_errors=True)
                return
            for case in self.ensemble_problems(models):
                (self.ensemble_dir / ds.PREDICTION.name(case)).unlink(missing_ok=True)

        return Wave(jobs, before=before, comment=comment)


class Postprocess(Step):
    name = "postprocess"

    @property
    def out(self) -> Path:
        return self.o.predictions / "postprocessed"

    def problems(self) -> Dict[str, str]:
        final = Predict(self.ctx).final_dir()
        return {case: p for case in Predict(self.ctx).test_cases()
                for p in [segmentation_problem(self.out / ds.PREDICTION.name(case),
                                               _newest([final / ds.PREDICTION.name(case)]))] if p}

    def check(self) -> Check:
        if not self.ctx.inference_information.is_file():
            return Check(False, f"{self.ctx.inference_information} is missing (best first)")
        problems = self.problems()
        if problems:
            return Check(False, _first(problems, len(Predict(self.ctx).test_cases()), self.out))
        return Check(True, f"{self.out}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        predict = Predict(self.ctx)
        final = predict.final_dir(assume)
        if self.ctx.inference_information.is_file():
            best = json.loads(self.ctx.inference_information.read_text())["best_model_or_ensemble"]
            pkl, plans = best["postprocessing_file"], best["some_plans_file"]
            if not assume and not predict.check().done:
                raise NotReady(f"predictions incomplete in {final}: run the predict step first")
            dataset_json = str(Path(plans).parent / ds.DATASET_JSON)
        else:
            pkl, plans, dataset_json = ("<postprocessing.pkl of the best>", "<plans.json of the best>",
                                        "<dataset.json beside it>")
        yield Wave([Job("postprocess", ["nnUNetv2_apply_postprocessing", "-i", str(final), "-o", str(self.out),
                                        "-pp_pkl_file", pkl, "-np", self.ctx.n_proc_or_default, "-plans_json", plans,
                                        "-dataset_json", dataset_json],
                        self.ctx.log("postprocess"))],
                   before=lambda: shutil.rmtree(self.out, ignore_errors=True))


class Export(Step):
    name = "export"

    def check(self) -> Check:
        pp = Postprocess(self.ctx).out
        out = self.o.out
        if not out.is_file():
            return Check(False, f"{out} is missing")
        cases = sorted(ds.cases_in(pp, ds.PREDICTION))
        try:
            with zipfile.ZipFile(out) as z:
                names = sorted(z.namelist())
        except (OSError, zipfile.BadZipFile):
            return Check(False, f"{out} is not a readable zip")
        if names != sorted(ds.SUBMISSION.name(c) for c in cases):
            return Check(False, f"{out} does not hold exactly the {len(cases)} predictions of {pp}")
        if _mtime(out) < _newest(pp / ds.PREDICTION.name(c) for c in cases):
            return Check(False, f"{out} is older than the predictions")
        return Check(True, f"{out}: {len(cases)} case(s)")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        pp = Postprocess(self.ctx)
        if not assume and (not self.ctx.inference_information.is_file() or pp.problems()):
            raise NotReady(f"postprocessed predictions incomplete in {pp.out}: run the postprocess step first")
        yield Wave([Job("export", ["nnunet-heart", "export", "--pred", str(pp.out), "--images",
                                   str(self.ctx.raw.images_ts), "--out", str(self.o.out)], self.ctx.log("export"))])


class Score(Step):
    name = "score"

    def ground_truth(self) -> Dict[str, Path]:
        files = ds.find_organizer_files(self.o.src, self.o.test_dir)
        if not files.test_labels:
            raise PipelineError(f"no test ground truth ({ds.ORGANIZER_LABEL.example}) in {self.o.src} "
                                f"({', '.join(ds.TEST_LABEL_DIRS)}) or beside its test images")
        return files.test_labels

    def check(self) -> Check:
        out = self.o.test_dice
        if not out.is_file():
            return Check(False, f"{out} is missing")
        if not self.o.out.is_file() or _mtime(out) < _mtime(self.o.out):
            return Check(False, f"{out} is older than {self.o.out}")
        return Check(True, f"{out}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        from nnunet_heart_ext.pipeline import report

        if not assume and not self.o.out.is_file():
            raise NotReady(f"{self.o.out} missing: run the export step first")

        def run():
            report.score(self.o.out, self.ground_truth(), self.o.test_dice, int(self.ctx.n_proc_or_default))

        yield Wave([Action("score", f"Dice per class of {self.o.out} against the test ground truth "
                                    f"(nnU-Net's compute_metrics_on_folder_simple) -> {self.o.test_dice}", run)])


STEP_CLASSES = {cls.name: cls for cls in (Prepare, Plan, Train, Validate, Best, Predict, Postprocess, Export, Score)}


def make_steps(ctx: Context) -> List[Step]:
    return [STEP_CLASSES[name](ctx) for name in ctx.o.steps()]
