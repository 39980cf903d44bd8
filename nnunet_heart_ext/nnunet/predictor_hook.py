"""Where nnU-Net's predictor becomes the extension's: the patch the import hook applies to
nnunetv2.inference.predict_from_raw_data (predictor.py's docstring says what changes).

Apart from predictor.py so that importing predictor.py first (which imports nnU-Net's predictor
module, whose import runs this patch) finds this module whole; predictor.py is imported here only
when a predictor is switched, by then complete.
"""
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_heart_ext.nnunet import decision, patching


def extension_inference_for(trainer_name) -> bool:
    """Whether nnU-Net's trainer lookup gives, for this name, a class that asks for the
    extension's inference (patching.uses_extension_inference)."""
    if not trainer_name:
        return False
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except Exception:  # a name nnU-Net cannot find: nnU-Net's predictor decides what happens
        return False
    return patching.uses_extension_inference(trainer_class)


def use_fast_path(predictor) -> bool:
    """Turn nnU-Net's own predictor of such a model into a HeartPredictor (in place)."""
    if type(predictor) is not nnUNetPredictor or not extension_inference_for(predictor.trainer_name):
        return False
    from nnunet_heart_ext.nnunet.predictor import HeartPredictor, _log

    predictor.__class__ = HeartPredictor
    _log(f"{predictor.trainer_name}: the extension's inference (batched windows and mirrors, folds on the device, "
         "fused export)")
    return True


def patch_predict_from_raw_data(module) -> None:
    """Hook target for nnunetv2.inference.predict_from_raw_data: nnUNetPredictor's two
    initialisations end with `use_fast_path`."""

    def make_wrapper(original):
        def initialization(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            use_fast_path(self)
            return result

        return initialization

    def from_model_folder(original):
        def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds, *args, **kwargs):
            result = original(self, model_training_output_dir, use_folds, *args, **kwargs)
            if use_fast_path(self):
                checkpoint = args[0] if args else kwargs.get("checkpoint_name", "checkpoint_final.pth")
                folds = use_folds if use_folds is not None else \
                    nnUNetPredictor.auto_detect_available_folds(model_training_output_dir, checkpoint)
                from nnunet_heart_ext.nnunet.predictor import _log

                self.decision = decision.load_for(model_training_output_dir, folds)
                _log(f"decision: {decision.describe(self.decision)}" + (
                    f" ({decision.crossval_folder(model_training_output_dir, folds) / decision.DECISION_FILE})"
                    if self.decision is not None else f" (no {decision.DECISION_FILE} for folds "
                                                      f"{' '.join(map(str, folds))})"))
            return result

        return initialize_from_trained_model_folder

    patching.wrap(module.nnUNetPredictor, "initialize_from_trained_model_folder", from_model_folder)
    patching.wrap(module.nnUNetPredictor, "manual_initialization", make_wrapper)
