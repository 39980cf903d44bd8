"""The validation of a trainer that asks for the extension's inference exports on the kernels.

nnU-Net's `nnUNetTrainer.perform_actual_validation` (the end of `nnUNetv2_train`, and `--val`)
predicts each validation case with an `nnUNetPredictor` (for these trainers a HeartPredictor,
nnunet_heart_ext/nnunet/predictor.py) and hands the logits to `export_prediction_from_logits` in
its export workers, a name its module binds at import. The import hook (_hook.py) wraps the method
(patching.py): for a trainer class with `nnunet_heart_ext_inference = True` (HeartTrainer and its
subclasses) nnU-Net's own method runs with that name bound, for its duration, to
prediction_export.ReportingExport: the extension's export (same files), nnU-Net's own for a case
where the extension's code fails (fallback.py). Every other trainer runs nnU-Net's method untouched.
The validation ends with the count of the cases that fell back, when any did.
"""
import tempfile

from nnunet_heart_ext.nnunet import fallback, patching, prediction_export


def patch_trainer_module(module) -> None:
    """Hook target for nnunetv2.training.nnUNetTrainer.nnUNetTrainer."""

    def make_wrapper(original):
        def perform_actual_validation(self, save_probabilities: bool = False):
            if not patching.uses_extension_inference(type(self)):
                return original(self, save_probabilities)
            nnunet_export = module.export_prediction_from_logits
            with fallback.tally() as run, tempfile.TemporaryDirectory(prefix="nnunet_heart_ext_") as reports:
                module.export_prediction_from_logits = prediction_export.ReportingExport(reports)
                try:
                    return original(self, save_probabilities)
                finally:
                    module.export_prediction_from_logits = nnunet_export
                    exported, fell_back = prediction_export.read_reports(reports)
                    run.cases = max(run.cases, exported)
                    for _ in range(fell_back):
                        run.record("export", object())

        return perform_actual_validation

    patching.wrap(module.nnUNetTrainer, "perform_actual_validation", make_wrapper)
