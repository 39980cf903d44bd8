"""The model steps: train (nnUNetv2_train per configuration and fold), validate (its --val) and
best (nnUNetv2_find_best_configuration). A fold's state is typed (`checks.State`): the steps and
the Slurm launcher branch on its kind, the user reads its reason."""
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline import nnunet_outputs
from nnunet_heart_ext.pipeline.checks import Check, Kind, State, checkpoint_problem, first_problem, json_problem, \
    mtime, newest, npz_problem, pickle_problem, segmentation_problem
from nnunet_heart_ext.pipeline.errors import NotReady, PipelineError
from nnunet_heart_ext.pipeline.steps.base import Job, Step, Wave

BROKEN = ".broken"  # a checkpoint that cannot be loaded is set aside under its name + this


def fold_lock(config: str, fold: int) -> str:
    """The lock a fold's training and validation hold (locks.py)."""
    return f"fold-{config}-{fold}"


class FoldStep(Step):
    """A step run per configuration and fold (train, validate): it holds each fold's lock, and its
    sweeps of the fold folders are exclusive."""
    sweep_exclusive = True

    def folds(self) -> List[tuple]:
        return [(c, f) for c in self.o.configs for f in self.o.folds]

    def locks(self) -> Dict[str, str]:
        return {fold_lock(c, f): f"{c} fold {f}" for c, f in self.folds()}

    def usable_checkpoints(self, config: str, fold: int) -> List[str]:
        """The fold's checkpoints that load, in the order nnU-Net's --c takes them (final, latest, best)."""
        d = self.layout.fold_dir(config, fold)
        return [c for c in ds.CHECKPOINTS if checkpoint_problem(d / c) is None]


class Train(FoldStep):
    name = "train"
    needs = ("plan",)

    def _plans_match(self, config: str) -> bool:
        """The model was trained with the current plans (nnUNetv2_train copies them beside its folds)."""
        trained, current = self.layout.trained_plans(config), self.layout.plans_file
        if not trained.is_file() or not current.is_file():
            return True  # nothing to compare with
        return nnunet_outputs.read_plans(trained) == nnunet_outputs.read_plans(current)

    def writes(self) -> List[Path]:
        return [self.layout.fold_dir(c, f) for c, f in self.folds()]

    def fold_state(self, config: str, fold: int) -> State:
        d = self.layout.fold_dir(config, fold)
        final = self.layout.checkpoint(config, fold)
        usable = self.usable_checkpoints(config, fold)
        broken = [(c, checkpoint_problem(d / c)) for c in ds.CHECKPOINTS if (d / c).is_file() and c not in usable]
        if usable and usable[0] == final.name:
            if not self._plans_match(config):
                return State(Kind.OTHER_PLANS, f"{final} was trained with other plans than {self.layout.plans_file}")
            return State(Kind.DONE, "trained")
        why = "; ".join(f"{c} {problem}" for c, problem in broken)
        if usable:
            return State(Kind.RESUMABLE, f"{usable[0]} (will continue)" + (f"; {why}" if why else ""))
        if broken:
            return State(Kind.NOT_STARTED, f"no usable checkpoint ({why}): will train from the start")
        return State(Kind.NOT_STARTED, "not started")

    def todo(self) -> List[tuple]:
        return [(c, f) for c, f in self.folds() if not self.fold_state(c, f).done]

    def check(self) -> Check:
        if not self.layout.plans_file.is_file():
            return Check(False, f"{self.layout.plans_file} is missing (plan first)")
        todo = {f"{c} fold {f}": self.fold_state(c, f).reason for c, f in self.todo()}
        if todo:
            return Check(False, "; ".join(f"{k}: {v}" for k, v in todo.items()))
        return Check(True, f"{len(self.o.configs) * len(self.o.folds)} fold(s) trained")

    def job(self, config: str, fold: int, fresh: bool = False) -> Job:
        """nnUNetv2_train of one fold; --c when a usable checkpoint is there to continue from
        (broken ones are set aside before it starts, so nnU-Net's --c takes the first usable one)."""
        usable = [] if fresh else self.usable_checkpoints(config, fold)
        argv = ["nnUNetv2_train", str(ds.DATASET_ID), config, str(fold), "-tr", self.o.trainer, "-p", self.o.plans,
                "--npz", "-device", self.o.device.value] + (["--c"] if usable else [])
        note = f"continuing from {usable[0]}" if usable else ""
        return Job(f"train_{config}_fold{fold}", argv, self.layout.log(f"train_{config}_fold{fold}"), slot=True,
                   note=note)

    def set_aside_broken(self, config: str, fold: int) -> None:
        """Rename the fold's checkpoints that cannot be loaded to NAME.broken (nnU-Net's --c would
        take a cut-short checkpoint_final.pth and fail on it), saying which and what follows."""
        d = self.layout.fold_dir(config, fold)
        usable = self.usable_checkpoints(config, fold)
        for c in ds.CHECKPOINTS:
            path = d / c
            if path.is_file() and c not in usable:
                then = f"continuing from {usable[0]}" if usable else "training from the start"
                print(f"  {path} {checkpoint_problem(path)}: set aside as {c}{BROKEN}; {then}", flush=True)
                os.replace(path, path.with_name(c + BROKEN))

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        if not assume and not self.layout.plans_file.is_file():
            raise NotReady(f"{self.layout.plans_file} missing: run the plan step first")
        todo = self.folds() if forced else self.todo()
        for c, f in todo:
            state = self.fold_state(c, f)
            if not forced and state.kind is Kind.OTHER_PLANS:
                raise PipelineError(f"{state.reason}: the data or plans changed since it was trained. Retrain "
                                    f"with --force train (this deletes the trained folds), or restore the plans")
        if not todo:
            return

        def before():
            for c, f in todo:
                if forced:
                    shutil.rmtree(self.layout.fold_dir(c, f), ignore_errors=True)
                else:
                    self.set_aside_broken(c, f)

        yield Wave([self.job(c, f, fresh=forced) for c, f in todo], before=before)


class Validate(FoldStep):
    name = "validate"
    needs = ("plan", "train")  # splits_final.json; the fold's final checkpoint

    def writes(self) -> List[Path]:
        return [self.layout.validation_dir(c, f) for c, f in self.folds()]

    def trained(self, config: str, fold: int) -> bool:
        return checkpoint_problem(self.layout.checkpoint(config, fold)) is None

    def fold_check(self, config: str, fold: int) -> State:
        final = self.layout.checkpoint(config, fold)
        validation = self.layout.validation_dir(config, fold)
        summary = self.layout.validation_summary(config, fold)
        if not self.trained(config, fold):
            return State(Kind.NOT_TRAINED, "not trained yet (training validates at its end)" if not final.is_file()
                         else f"{final.name} {checkpoint_problem(final)} (the train step continues the fold)")
        if not summary.is_file():
            return State(Kind.MISSING, f"{summary} is missing")
        problem = json_problem(summary)
        if problem:
            return State(Kind.INCOMPLETE, f"{summary} is {problem}")
        if mtime(summary) < mtime(final):
            return State(Kind.STALE, f"{summary} is older than the fold's {ds.CHECKPOINTS[0]}")
        splits_file = self.layout.splits_file
        if not splits_file.is_file():
            return State(Kind.MISSING, f"{splits_file} is missing")
        val_cases = nnunet_outputs.validation_cases(splits_file, fold)
        problems = {}
        for case in val_cases:
            p = segmentation_problem(validation / ds.PREDICTION.name(case)) or \
                npz_problem(validation / ds.PROBABILITIES.name(case)) or \
                pickle_problem(validation / ds.PROBABILITIES_PROPERTIES.name(case))
            if p:
                problems[case] = p
        if problems:
            return State(Kind.INCOMPLETE, first_problem(problems, len(val_cases), validation))
        return State(Kind.DONE, "validated")

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
                if not self.trained(c, f):
                    untrained.append(f"{c} fold {f}")
                    continue
                if forced or not self.fold_check(c, f).done:
                    jobs.append(Job(f"validate_{c}_fold{f}", ["nnUNetv2_train", str(ds.DATASET_ID), c, str(f), "-tr",
                                                              self.o.trainer, "-p", self.o.plans, "--val", "--npz",
                                                              "-device", self.o.device.value],
                                    self.layout.log(f"validate_{c}_fold{f}"), slot=True))
        if untrained and not assume:
            raise NotReady(f"{', '.join(untrained)} not trained ({ds.CHECKPOINTS[0]} missing): run the train step "
                           f"first (it validates each fold at its end)")
        if jobs or untrained:
            yield Wave(jobs, comment=f"# {', '.join(untrained)}: validated by nnUNetv2_train at the end of training"
                       if untrained else "")


def labels_without_validation_dice(summaries: List[Path]) -> List[str]:
    """Foreground labels that have no Dice in any case of these validation summaries (nnU-Net's
    summary.json: a case where neither the reference nor the prediction holds the label gives NaN).
    nnUNetv2_find_best_configuration ranks by the mean over the labels of their mean over the cases;
    such a label makes it NaN, and the command then fails with IndexError."""
    scored: Dict[str, bool] = {}
    for summary in summaries:
        for case in nnunet_outputs.metric_per_case(summary):
            for label, metrics in case.items():
                dice = metrics.get("Dice")
                scored[label] = scored.get(label, False) or (dice is not None and dice == dice)
    names = []
    for label, ok in scored.items():
        if not ok:
            names.append(f"{label} ({ds.CLASSES[int(label)]})" if label.isdigit() and int(label) in ds.CLASSES
                         else label)
    return names


class Best(Step):
    name = "best"
    needs = ("validate",)  # every fold's validation summary

    def writes(self) -> List[Path]:
        return [self.layout.results]

    def model_dirs(self) -> List[Path]:
        return [self.layout.model_dir(c) for c in self.o.configs]

    def summaries(self) -> List[Path]:
        return [self.layout.validation_summary(c, f) for c in self.o.configs for f in self.o.folds]

    def _choice_check(self) -> Check:
        """nnUNetv2_find_best_configuration's part: inference_information.json and postprocessing.pkl."""
        info_file = self.layout.inference_information
        if not info_file.is_file():
            return Check(False, f"{info_file} is missing")
        problem = json_problem(info_file)  # nnU-Net writes it in place: a kill can cut it short
        if problem:
            return Check(False, f"{info_file} is {problem}")
        info = nnunet_outputs.read_inference_information(info_file)
        considered = sorted(info.considered)
        if considered != sorted(d.name for d in self.model_dirs()):
            return Check(False, f"{info_file} compared other models: {', '.join(considered)}")
        if info.folds != list(self.o.folds):
            return Check(False, f"{info_file} used folds {info.folds}")
        problem = pickle_problem(info.postprocessing_file)
        if problem:
            return Check(False, f"{info.postprocessing_file} is {problem}")
        if mtime(info_file) < newest(self.summaries()):
            return Check(False, f"{info_file} is older than a fold's validation")
        return Check(True, "best: " + " + ".join(m["configuration"] for m in info.selected))

    def check(self) -> Check:
        c = self._choice_check()
        if not c.done:
            return c
        info = nnunet_outputs.read_inference_information(self.layout.inference_information)
        decision = self.layout.decision_file(info)
        problem = json_problem(decision)
        if problem:
            return Check(False, f"{decision} is {problem}")
        if mtime(decision) < mtime(self.layout.inference_information):
            return Check(False, f"{decision} is older than {self.layout.inference_information}")
        heart_pkl = self.layout.heart_postprocessing_file(info)
        chosen = nnunet_outputs.read_decision(decision)
        outdated = chosen.outdated()
        if outdated:
            return Check(False, f"{decision} is of an earlier rule ({outdated})")
        problem = pickle_problem(heart_pkl)
        if problem:
            return Check(False, f"{heart_pkl} is {problem}")
        return Check(True, f"{c.reason}; decision in {decision.name}")

    def check_labels(self) -> None:
        """Fail before nnUNetv2_find_best_configuration does (a bare IndexError) when a label is in
        no validation case of the folds, naming the label and what to do."""
        missing = labels_without_validation_dice([p for p in self.summaries() if p.is_file()])
        if missing:
            folds = ",".join(map(str, self.o.folds))
            raise PipelineError(
                f"label {', '.join(missing)} is in no validation case of fold(s) {folds} (neither reference nor "
                f"prediction), so its mean Dice is NaN and nnUNetv2_find_best_configuration would fail "
                f"(IndexError). Use --folds with a fold whose validation cases hold it "
                f"({self.layout.splits_file} lists each fold's validation cases)")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        if forced or not self._choice_check().done:
            if not assume:
                self.check_labels()
            yield Wave([Job("best", ["nnUNetv2_find_best_configuration", str(ds.DATASET_ID), "-c", *self.o.configs,
                                     "-tr", self.o.trainer, "-p", self.o.plans, "-f", *map(str, self.o.folds),
                                     "-np", self.ctx.n_proc_or_default], self.layout.log("best"))])
        # the decision offsets and gate, on the chosen model's (or ensemble's) validation: read now,
        # after the wave above ran (a dry run, before it: the chosen model is not known yet)
        folds = [str(f) for f in self.o.folds]
        if self.layout.inference_information.is_file() and not json_problem(self.layout.inference_information):
            info = nnunet_outputs.read_inference_information(self.layout.inference_information)
            models = [str(self.layout.model_dir(m["configuration"], m["trainer"], m["plans_identifier"]))
                      for m in info.selected]
            out = str(self.layout.decision_file(info).parent)
        else:
            models, out = ["<the chosen model(s)>"], "<the folder of its postprocessing.pkl>"
        yield Wave([Job("decision", ["nnunet-heart", "decision", "-m", *models, "-f", *folds, "-o", out, "--gt",
                                     str(self.layout.gt_segmentations)], self.layout.log("decision"))])

    def after(self) -> None:
        info = nnunet_outputs.read_inference_information(self.layout.inference_information)
        for name, value in info.all_results.items():
            print(f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}")
        print("  chosen: " + " + ".join(m["configuration"] for m in info.selected), flush=True)
        decision = nnunet_outputs.read_decision(self.layout.decision_file(info))
        print(f"  decision: {decision.describe()}; validation mean foreground Dice {decision.dice_without:.4f} "
              f"(argmax) -> {decision.dice_with:.4f}", flush=True)
        pp = decision.postprocessing
        if pp is not None:
            print(f"  postprocessing: {pp.summary()}; applied: {self.layout.postprocessing_file(info).name}",
                  flush=True)
