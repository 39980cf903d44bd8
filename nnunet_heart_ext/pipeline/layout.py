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
from nnunet_heart_ext.pipeline.options import LOGS, PREDICTIONS, SLURM, TEST_DICE, Options

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
    @property
    def logs(self) -> Path:
        return self.work / LOGS

    def log(self, name: str) -> Path:
        """The log of one step or job."""
        return self.logs / f"{name}.log"

    @property
    def job_records(self) -> Path:
        return self.logs / JOB_RECORDS

    @property
    def slurm_dir(self) -> Path:
        return self.work / SLURM

    @property
    def slurm_records(self) -> Path:
        return self.slurm_dir / SLURM_RECORDS

    @property
    def slurm_scripts(self) -> Path:
        return self.slurm_dir / SLURM_SCRIPTS

    @property
    def slurm_logs(self) -> Path:
        return self.logs / SLURM_LOGS

    @property
    def work_lock(self) -> Path:
        """Held by the run (or the Slurm submitter) that works in this folder."""
        return self.work / LOCKS / WORK_LOCK

    def step_lock(self, name: str) -> Path:
        """Held while a step (or a fold: `fold-CONFIG-F`) runs, by a local run or a Slurm job."""
        return self.work / LOCKS / f"{name}.lock"

    @property
    def test_dice(self) -> Path:
        return self.work / TEST_DICE

    # ------------------------------------------------------------------ predictions
    @property
    def predictions(self) -> Path:
        return self.work / PREDICTIONS

    def prediction_dir(self, model: Dict[str, str]) -> Path:
        """Where nnUNetv2_predict writes one model's test predictions (a model as
        inference_information.json names it: trainer, plans_identifier, configuration)."""
        return self.predictions / f"{model['trainer']}_{model['plans_identifier']}_{model['configuration']}"

    @property
    def ensemble_dir(self) -> Path:
        return self.predictions / ENSEMBLE

    def final_predictions(self, models: List[Dict[str, str]]) -> Path:
        """The predictions postprocessing reads: the ensemble's when several models were chosen."""
        return self.ensemble_dir if len(models) > 1 else self.prediction_dir(models[0])

    @property
    def postprocessed(self) -> Path:
        return self.predictions / POSTPROCESSED

    # ------------------------------------------------------------------ nnUNet_preprocessed
    @property
    def plans_file(self) -> Path:
        return self.preprocessed / f"{self._plans}.json"

    @property
    def splits_file(self) -> Path:
        return self.preprocessed / ds.SPLITS_JSON

    @property
    def gt_segmentations(self) -> Path:
        return self.preprocessed / ds.GT_SEGMENTATIONS

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

    @property
    def inference_information(self) -> Path:
        return self.results / ds.INFERENCE_INFORMATION
