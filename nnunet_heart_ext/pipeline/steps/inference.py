"""The inference steps: predict (the chosen model, or the chosen models' ensemble, on the test
images), postprocess (the chosen postprocessing), export (predict.zip), score (the demo's
Dice against its ground truth) and report (`nnunet-heart report`: the page to look at before
uploading).

The module functions say what the predict and postprocess steps' outputs are; the later steps
ask them (and the layout) instead of constructing those steps.
"""
import shutil
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline import nnunet_outputs
from nnunet_heart_ext.pipeline.checks import Check, first_problem, json_problem, mtime, newest, segmentation_problem
from nnunet_heart_ext.pipeline.context import Context
from nnunet_heart_ext.pipeline.errors import NotReady, PipelineError
from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.steps.base import Action, Job, Step, Wave


def chosen_models(layout: Layout) -> List[dict]:
    """What find_best_configuration chose: trainer, plans_identifier, configuration per model."""
    return nnunet_outputs.read_inference_information(layout.inference_information).selected


def models_to_predict(ctx: Context, assume: bool = False) -> List[dict]:
    """The chosen models; with `assume` (a dry run before the best step), every configuration."""
    if ctx.layout.inference_information.is_file():
        return chosen_models(ctx.layout)
    if assume:
        return [dict(trainer=ctx.o.trainer, plans_identifier=ctx.o.plans, configuration=c) for c in ctx.o.configs]
    raise NotReady(f"{ctx.layout.inference_information} missing: run the best step first")


def test_cases(layout: Layout) -> Dict[str, Path]:
    cases = layout.raw.test_cases()
    if not cases:
        raise PipelineError(f"no test images ({ds.RAW_IMAGE.example}) in {layout.raw.images_ts}: the organizer "
                            f"folder has no test folder ({', '.join(ds.TEST_IMAGE_DIRS)}); name it with --test-dir")
    return cases


def model_problems(layout: Layout, model: dict) -> Dict[str, str]:
    """The test cases whose prediction by `model` is missing, cut short, or older than the model
    choice or the image."""
    d = layout.prediction_dir(model)
    chosen_at = chosen_time(layout)
    return {case: p for case, image in test_cases(layout).items()
            for p in [segmentation_problem(d / ds.PREDICTION.name(case), max(chosen_at, mtime(image)))] if p}


def chosen_time(layout: Layout) -> float:
    """When the best step last chose: the model choice, or the decision chosen after it (the
    predictions apply it, so they must be newer)."""
    info = nnunet_outputs.read_inference_information(layout.inference_information)
    return newest([layout.inference_information, layout.decision_file(info)])


def ensemble_problems(layout: Layout) -> Dict[str, str]:
    chosen_at = chosen_time(layout)
    return {case: p for case, image in test_cases(layout).items()
            for p in [segmentation_problem(layout.ensemble_dir / ds.PREDICTION.name(case),
                                           max(chosen_at, mtime(image)))] if p}


def prediction_problems(layout: Layout, models: List[dict]) -> Dict[str, str]:
    """The test cases whose final prediction (the ensemble's when several models were chosen) is
    not finished: the predict step's outputs."""
    return ensemble_problems(layout) if len(models) > 1 else model_problems(layout, models[0])


def postprocessed_problems(layout: Layout) -> Dict[str, str]:
    """The test cases whose postprocessed segmentation is not finished or older than the prediction
    it came from: the postprocess step's outputs."""
    final = layout.final_predictions(chosen_models(layout))
    return {case: p for case in test_cases(layout)
            for p in [segmentation_problem(layout.postprocessed / ds.PREDICTION.name(case),
                                           newest([final / ds.PREDICTION.name(case)]))] if p}


class Predict(Step):
    name = "predict"
    needs = ("prepare", "train", "best")  # the test images, the trained models, the choice among them

    def writes(self) -> List[Path]:
        if not self.layout.inference_information.is_file() or json_problem(self.layout.inference_information):
            return []  # the best step comes first and makes it
        models = self.models()
        return [self.layout.final_predictions(models)]

    def reads(self) -> List[Path]:
        return [self.layout.raw.images_ts]

    def models(self, assume: bool = False) -> List[dict]:
        return models_to_predict(self.ctx, assume)

    def check(self) -> Check:
        if not self.layout.inference_information.is_file():
            return Check(False, f"{self.layout.inference_information} is missing (best first)")
        models = self.models()
        n = len(test_cases(self.layout))
        final = self.layout.final_predictions(models)
        problems = prediction_problems(self.layout, models)
        if problems:
            return Check(False, first_problem(problems, n, final))
        return Check(True, f"{n} test case(s) in {final}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        models = self.models(assume)
        chosen = self.layout.inference_information.is_file()
        if len(models) == 1 or not chosen:  # before the best step (a dry run): every configuration's command
            for m in models:
                if forced or not chosen or model_problems(self.layout, m):
                    yield self._model_wave(m, forced, "" if chosen else "# the model nnUNetv2_find_best_configuration "
                                                                         "picks; shown: every configuration")
        if len(models) > 1 and (forced or not chosen or ensemble_problems(self.layout)):
            yield self._ensemble_wave(models, forced, "" if chosen else "# only if the best is an ensemble")

    def _tail(self) -> List[str]:
        return ["-f", *map(str, self.o.folds), "-chk", self.o.checkpoint, "-device", self.o.device.value]

    def _model_wave(self, m: dict, forced: bool, comment: str) -> Wave:
        parts = max(1, len(self.ctx.slots))
        out = self.layout.prediction_dir(m)
        jobs = [Job(f"predict_{m['configuration']}_part{i}", [
            "nnUNetv2_predict", "-i", str(self.layout.raw.images_ts), "-o", str(out),
            "-d", str(ds.DATASET_ID), "-tr", m["trainer"], "-p", m["plans_identifier"], "-c", m["configuration"],
            *self._tail(), *(["-npp", self.ctx.n_proc, "-nps", self.ctx.n_proc] if self.ctx.n_proc else []),
            "--continue_prediction", "--disable_progress_bar", "-num_parts", str(parts), "-part_id", str(i),
            *(["--disable_tta"] if self.o.no_tta else [])],
            self.layout.log(f"predict_{m['configuration']}_part{i}"), slot=True) for i in range(parts)]

        def before():
            # cut-short, stale or (forced) all outputs go, so that --continue_prediction redoes them
            if forced:
                shutil.rmtree(out, ignore_errors=True)
                return
            for case in model_problems(self.layout, m):
                (out / ds.PREDICTION.name(case)).unlink(missing_ok=True)

        return Wave(jobs, before=before, comment=comment)

    def _ensemble_wave(self, models: List[dict], forced: bool, comment: str) -> Wave:
        """The models' probabilities averaged in one process per part (on its GPU), no .npz files."""
        parts = max(1, len(self.ctx.slots))
        out = self.layout.ensemble_dir
        folders = [str(self.layout.model_dir(m["configuration"], m["trainer"], m["plans_identifier"]))
                   for m in models]
        decision = []  # the ensemble's decision, chosen by the best step beside its postprocessing.pkl
        if self.layout.inference_information.is_file():
            path = self.layout.decision_file(nnunet_outputs.read_inference_information(self.layout.inference_information))
            decision = ["--decision", str(path)] if path.is_file() else []
        jobs = [Job(f"predict_ensemble_part{i}", [
            "nnunet-heart", "predict-ensemble", "-i", str(self.layout.raw.images_ts), "-o", str(out),
            "-m", *folders, *self._tail(), "--continue_prediction", "-num_parts", str(parts), "-part_id", str(i),
            *(["--disable_tta"] if self.o.no_tta else []), *decision],
            self.layout.log(f"predict_ensemble_part{i}"), slot=True) for i in range(parts)]

        def before():
            if forced:
                shutil.rmtree(out, ignore_errors=True)
                return
            for case in ensemble_problems(self.layout):
                (out / ds.PREDICTION.name(case)).unlink(missing_ok=True)

        return Wave(jobs, before=before, comment=comment)


class Postprocess(Step):
    name = "postprocess"
    needs = ("best", "predict")  # the chosen postprocessing; the final predictions

    def writes(self) -> List[Path]:
        return [self.layout.postprocessed]

    def reads(self) -> List[Path]:
        info = self.layout.inference_information
        return [self.layout.final_predictions(chosen_models(self.layout))] if info.is_file() and \
            not json_problem(info) else []

    def check(self) -> Check:
        if not self.layout.inference_information.is_file():
            return Check(False, f"{self.layout.inference_information} is missing (best first)")
        problems = postprocessed_problems(self.layout)
        if problems:
            return Check(False, first_problem(problems, len(test_cases(self.layout)), self.layout.postprocessed))
        return Check(True, f"{self.layout.postprocessed}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        out = self.layout.postprocessed
        if self.layout.inference_information.is_file():
            info = nnunet_outputs.read_inference_information(self.layout.inference_information)
            final = self.layout.final_predictions(info.selected)
            pkl, plans = str(self.layout.postprocessing_file(info)), str(info.some_plans_file)
            if not assume and prediction_problems(self.layout, info.selected):
                raise NotReady(f"predictions incomplete in {final}: run the predict step first")
            dataset_json = str(info.some_plans_file.parent / ds.DATASET_JSON)
        else:  # a dry run before the best step
            final = self.layout.final_predictions(models_to_predict(self.ctx, assume))
            pkl, plans, dataset_json = ("<heart_postprocessing.pkl (or postprocessing.pkl) of the best>", "<plans.json of the best>",
                                        "<dataset.json beside it>")
        yield Wave([Job("postprocess", ["nnUNetv2_apply_postprocessing", "-i", str(final), "-o", str(out),
                                        "-pp_pkl_file", pkl, "-np", self.ctx.n_proc_or_default, "-plans_json", plans,
                                        "-dataset_json", dataset_json],
                        self.layout.log("postprocess"))],
                   before=lambda: shutil.rmtree(out, ignore_errors=True))


class Export(Step):
    name = "export"
    needs = ("prepare", "postprocess")  # the test images (their headers); the postprocessed predictions

    def writes(self) -> List[Path]:
        return [self.layout.submission.parent]

    def reads(self) -> List[Path]:
        return [self.layout.postprocessed]

    def check(self) -> Check:
        pp, out = self.layout.postprocessed, self.layout.submission
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
        if mtime(out) < newest(pp / ds.PREDICTION.name(c) for c in cases):
            return Check(False, f"{out} is older than the predictions")
        return Check(True, f"{out}: {len(cases)} case(s)")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        pp = self.layout.postprocessed
        if not assume and (not self.layout.inference_information.is_file() or postprocessed_problems(self.layout)):
            raise NotReady(f"postprocessed predictions incomplete in {pp}: run the postprocess step first")
        yield Wave([Job("export", ["nnunet-heart", "export", "--pred", str(pp), "--images",
                                   str(self.layout.raw.images_ts), "--out", str(self.layout.submission)],
                        self.layout.log("export"))])


class Score(Step):
    name = "score"
    needs = ("export",)  # predict.zip (the ground truth is the organizer folder's)

    def writes(self) -> List[Path]:
        return [self.layout.test_dice.parent]

    def ground_truth(self) -> Dict[str, Path]:
        files = ds.find_organizer_files(self.layout.src, self.layout.test_dir)
        if not files.test_labels:
            raise PipelineError(f"no test ground truth ({ds.ORGANIZER_LABEL.example}) in {self.layout.src} "
                                f"({', '.join(ds.TEST_LABEL_DIRS)}) or beside its test images")
        return files.test_labels

    def check(self) -> Check:
        out, submission = self.layout.test_dice, self.layout.submission
        if not out.is_file():
            return Check(False, f"{out} is missing")
        if json_problem(out):
            return Check(False, f"{out} is {json_problem(out)}")
        if not submission.is_file() or mtime(out) < mtime(submission):
            return Check(False, f"{out} is older than {submission}")
        return Check(True, f"{out}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        from nnunet_heart_ext.pipeline import report

        submission, out = self.layout.submission, self.layout.test_dice
        if not assume and not submission.is_file():
            raise NotReady(f"{submission} missing: run the export step first")

        def run():
            report.score(submission, self.ground_truth(), out, int(self.ctx.n_proc_or_default))

        yield Wave([Action("score", f"Dice per class of {submission} against the test ground truth "
                                    f"(nnU-Net's compute_metrics_on_folder_simple) -> {out}", run)])


class Report(Step):
    """`nnunet-heart report` (nnunet_heart_ext/report/, run as a command: the pipeline does not import
    it): WORK/report/index.html and report.json, of predict.zip (exactly what is uploaded), the
    training labels, and every configuration's folds. Done when both are there, report.json
    whole, and neither is older than what they are made from (`inputs`)."""
    name = "report"
    needs = ("prepare", "validate", "export")  # test images and training labels; the folds' validation; the zip

    def writes(self) -> List[Path]:
        return [self.layout.report_dir]

    def inputs(self) -> List[Path]:
        """What the report is made from: the submission, each fold's validation summary, the demo's
        test score."""
        paths = [self.layout.submission]
        paths += [self.layout.validation_summary(c, f) for c in self.o.configs for f in self.o.folds]
        return paths + ([self.layout.test_dice] if self.o.demo else [])

    def check(self) -> Check:
        page, numbers = self.layout.report_html, self.layout.report_json
        for path in (page, numbers):
            if not path.is_file():
                return Check(False, f"{path} is missing")
        problem = json_problem(numbers)  # written last: a whole report.json means the page is whole too
        if problem:
            return Check(False, f"{numbers} is {problem}")
        made = min(mtime(page), mtime(numbers))
        newer = [p for p in self.inputs() if p.exists() and mtime(p) > made]
        if newer:
            return Check(False, f"{numbers} is older than {newer[0]}")
        return Check(True, f"{page}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        layout, raw = self.layout, self.layout.raw
        if not assume and not layout.submission.is_file():
            raise NotReady(f"{layout.submission} missing: run the export step first")
        argv = ["nnunet-heart", "report", "--pred", str(layout.submission), "--images", str(raw.images_ts),
                "--train-labels", str(raw.labels_tr), "--train-images", str(raw.images_tr),
                "--model", *(str(layout.model_dir(c)) for c in self.o.configs), "--folds", *map(str, self.o.folds),
                "--out", str(layout.report_dir)]
        info = layout.inference_information
        if info.is_file() and not json_problem(info):
            chosen = nnunet_outputs.read_inference_information(info)
            argv += ["--postprocessing", str(layout.postprocessing_file(chosen))]
            if layout.decision_file(chosen).is_file():
                argv += ["--decision", str(layout.decision_file(chosen))]
        if self.o.demo and (assume or layout.test_dice.is_file()):
            argv += ["--test-summary", str(layout.test_dice)]
        if self.ctx.n_proc:
            argv += ["-np", self.ctx.n_proc]
        yield Wave([Job("report", argv, layout.log("report"))])
