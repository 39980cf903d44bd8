"""Where the pipeline's files lie: one `Layout`, built from the options, owns every path the
pipeline reads or writes (its work folder, logs, predictions, Slurm records, the three nnU-Net
folders and what nnU-Net's commands write in them).

The names come from where they are stated: nnU-Net's folders and files from
`nnunet_heart_ext.data.dataset`, the work folder's own from the constants of options.py. The few
names stated here are those of folders only this layout knows: the prediction folders, the
Slurm job records and scripts, the launchers' record of finished jobs, and the locks.
"""
from pathlib import Path
from typing import Dict, List

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline.options import LOGS, PREDICTIONS, REPORT, SLURM, TEST_DICE, Options

ENSEMBLE, POSTPROCESSED = "ensemble", "postprocessed"  # in the predictions folder
JOB_RECORDS = "jobs.jsonl"                              # in the logs: one line per finished local job
SLURM_LOGS = "slurm"                                    # in the logs: the Slurm jobs' logs
SLURM_RECORDS, SLURM_SCRIPTS = "jobs.json", "scripts"   # in the Slurm folder: submissions, job scripts
LOCKS, WORK_LOCK = "locks", "pipeline.lock"            # in the work folder: the locks of locks.py


class Layout:
    """Every path of one pipeline (one set of options)."""

    def __init__(self, options: Options):
        self.work: Path = options.work
        self.src = options.src                  # the organizer folder (None: take the raw dataset as it is)
        self.test_dir = options.test_dir        # its test images, when not in a test folder inside it
        self.submission: Path = options.out     # predict.zip
        self.raw_root: Path = options.raw       # $nnUNet_raw, $nnUNet_preprocessed, $nnUNet_results
        self.preprocessed_root: Path = options.preprocessed
        self.results_root: Path = options.results
        self.raw = ds.RawDataset.under(options.raw)
        self.preprocessed: Path = options.preprocessed / ds.DATASET_NAME
        self.results: Path = options.results / ds.DATASET_NAME
        self._trainer, self._plans = options.trainer, options.plans

    # ------------------------------------------------------------------ the work folder
    logs = ds.below("work", LOGS)

    def log(self, name: str) -> Path:
        """The log of one step or job."""
        return self.logs / f"{name}.log"

    job_records = ds.below("work", LOGS, JOB_RECORDS)
    slurm_dir = ds.below("work", SLURM)
    slurm_records = ds.below("work", SLURM, SLURM_RECORDS)
    slurm_scripts = ds.below("work", SLURM, SLURM_SCRIPTS)
    slurm_logs = ds.below("work", LOGS, SLURM_LOGS)
    work_lock = ds.below("work", LOCKS, WORK_LOCK, doc="Held by the run (or the Slurm submitter) that works here.")

    def step_lock(self, name: str) -> Path:
        """Held while a step (or a fold: `fold-CONFIG-F`) runs, by a local run or a Slurm job."""
        return self.work / LOCKS / f"{name}.lock"

    test_dice = ds.below("work", TEST_DICE)

    # ------------------------------------------------------------------ the report (`nnunet-heart report`)
    report_dir = ds.below("work", REPORT)
    report_html = ds.below("work", REPORT, ds.REPORT_HTML, doc="The report's page: open it in a browser.")
    report_json = ds.below("work", REPORT, ds.REPORT_JSON, doc="The report's numbers, written after the page.")

    # ------------------------------------------------------------------ predictions
    predictions = ds.below("work", PREDICTIONS)

    def prediction_dir(self, model: Dict[str, str]) -> Path:
        """Where nnUNetv2_predict writes one model's test predictions (a model as
        inference_information.json names it: trainer, plans_identifier, configuration)."""
        return self.predictions / f"{model['trainer']}_{model['plans_identifier']}_{model['configuration']}"

    ensemble_dir = ds.below("work", PREDICTIONS, ENSEMBLE)

    def final_predictions(self, models: List[Dict[str, str]]) -> Path:
        """The predictions postprocessing reads: the ensemble's when several models were chosen."""
        return self.ensemble_dir if len(models) > 1 else self.prediction_dir(models[0])

    postprocessed = ds.below("work", PREDICTIONS, POSTPROCESSED)

    # ------------------------------------------------------------------ nnUNet_preprocessed
    @property
    def plans_file(self) -> Path:
        return self.preprocessed / f"{self._plans}.json"

    splits_file = ds.below("preprocessed", ds.SPLITS_JSON)
    gt_segmentations = ds.below("preprocessed", ds.GT_SEGMENTATIONS)

    def preprocessed_data(self, data_identifier: str) -> Path:
        """The preprocessed cases of one configuration (its plans' data identifier)."""
        return self.preprocessed / data_identifier

    # ------------------------------------------------------------------ nnUNet_results
    def model_dir(self, config: str, trainer: str = None, plans: str = None) -> Path:
        return self.results / ds.model_folder(trainer or self._trainer, plans or self._plans, config)

    def trained_plans(self, config: str) -> Path:
        """The plans nnUNetv2_train copied beside the model's folds."""
        return self.model_dir(config) / ds.MODEL_PLANS

    def fold_dir(self, config: str, fold: int) -> Path:
        return self.model_dir(config) / ds.fold_folder(fold)

    def checkpoint(self, config: str, fold: int, name: str = ds.CHECKPOINTS[0]) -> Path:
        return self.fold_dir(config, fold) / name

    def validation_dir(self, config: str, fold: int) -> Path:
        return self.fold_dir(config, fold) / ds.VALIDATION_FOLDER

    def validation_summary(self, config: str, fold: int) -> Path:
        return self.validation_dir(config, fold) / ds.VALIDATION_SUMMARY

    @staticmethod
    def decision_file(info) -> Path:
        """The decision (offsets, gate) chosen for the best model or ensemble: beside its
        postprocessing.pkl (`info`: nnunet_outputs.InferenceInformation)."""
        return info.postprocessing_file.parent / ds.DECISION

    @staticmethod
    def heart_postprocessing_file(info) -> Path:
        """The postprocessing the decision step chose with the decision (keep-largest never removes
        the small classes), beside nnU-Net's postprocessing.pkl."""
        return info.postprocessing_file.parent / ds.HEART_POSTPROCESSING

    @staticmethod
    def postprocessing_file(info) -> Path:
        """The postprocessing the pipeline applies: heart_postprocessing.pkl where the decision step
        wrote one (and NNUNET_HEART_EXT_DECISION is not 0), else nnU-Net's postprocessing.pkl."""
        from nnunet_heart_ext.data.decision_file import postprocessing_to_apply

        return postprocessing_to_apply(info.postprocessing_file)

    @property
    def inference_information(self) -> Path:
        return self.results / ds.INFERENCE_INFORMATION
