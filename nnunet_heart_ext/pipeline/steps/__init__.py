"""The pipeline's steps: for each, the official commands it runs and what "done" means.

    base.py       Step (check, waves, needs), Job, Action, Wave, NotReady
    data.py       prepare, plan
    model.py      train, validate, best (a fold's typed state)
    inference.py  predict, postprocess, export, score, report

A step's `check()` decides from the step's outputs alone, in this process and without running
anything, whether the step is finished, and says why not: outputs missing, incomplete (a file
cut short by a kill), or older than what they are made from (make's rule: an output older than
its input is stale). `waves()` yields what to run, in order: each wave a list of jobs that may
run side by side (folds, prediction parts) or one in-process action. Nothing is deleted or
written while checking; the few preparations a rerun needs (dropping a cut-short prediction so
that `--continue_prediction` redoes it, setting a broken checkpoint aside) are a wave's `before`,
which a dry run skips. A step's `needs` names the steps whose outputs it reads; their paths come
from the context's `Layout`.

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
  report       WORK/report/index.html and report.json (`nnunet-heart report`), newer than the zip, every
               fold's validation summary and (demo) test_dice.json
"""
from typing import List

from nnunet_heart_ext.pipeline.checks import Check, Kind, State
from nnunet_heart_ext.pipeline.context import Context
from nnunet_heart_ext.pipeline.steps.base import Action, Job, NotReady, Step, Wave
from nnunet_heart_ext.pipeline.steps.data import Plan, Prepare
from nnunet_heart_ext.pipeline.steps.inference import Export, Postprocess, Predict, Report, Score
from nnunet_heart_ext.pipeline.steps.model import Best, Train, Validate, labels_without_validation_dice

STEP_CLASSES = {cls.name: cls for cls in (Prepare, Plan, Train, Validate, Best, Predict, Postprocess, Export, Score,
                                          Report)}

__all__ = ["Action", "Best", "Check", "Context", "Export", "Job", "Kind", "NotReady", "Plan", "Postprocess",
           "Predict", "Prepare", "Report", "STEP_CLASSES", "Score", "State", "Step", "Train", "Validate", "Wave",
           "labels_without_validation_dice", "make_steps"]


def make_steps(ctx: Context) -> List[Step]:
    return [STEP_CLASSES[name](ctx) for name in ctx.o.steps()]
