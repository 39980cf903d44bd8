"""The one way the extension changes what nnU-Net's own code does: `wrap`.

The import hook (nnunet_heart_ext/_hook.py, whose PATCHES table lists every patched nnunetv2
module) calls a patch function right after an nnunetv2 module has executed. Each patch function
does one thing: `wrap(owner, name, make_wrapper)` replaces a function of that module, or a method
of one of its classes, by a wrapper with nnU-Net's signature, name, module and docstring
(functools; `__wrapped__` is nnU-Net's), marked so that patching twice changes nothing. Each
wrapper decides per call whether nnU-Net's original or the extension's code runs:

| nnU-Net's | wrapper | the extension's code runs when |
|---|---|---|
| `find_class_by_name.recursive_find_python_class` | registry.py | nnU-Net's own search finds nothing |
| `remove_connected_components.remove_all_but_largest_component_from_segmentation` | postprocessing.py | the input is an array the kernel takes |
| `nnUNetPredictor.initialize_from_trained_model_folder`, `.manual_initialization` | predictor_hook.py | the predictor is nnU-Net's own class and the model's trainer class says `nnunet_heart_ext_inference = True` (HeartTrainer and its subclasses): the instance becomes a HeartPredictor |
| `nnUNetTrainer.perform_actual_validation` | validation.py | the trainer's class says `nnunet_heart_ext_inference = True`: its export workers run the extension's export |

The marker attribute is how the trainers (nnunet_heart_ext/trainers/) ask for the extension's
inference without this layer importing them.
"""
import functools

MARK = "_nnunet_heart_ext"
# The class attribute of a trainer that asks for the extension's inference and validation export.
INFERENCE_MARKER = "nnunet_heart_ext_inference"


def wrap(owner, name: str, make_wrapper) -> None:
    """owner.<name> = make_wrapper(nnU-Net's owner.<name>), with nnU-Net's names; once."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return
    wrapper = functools.update_wrapper(make_wrapper(original), original)
    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)


def uses_extension_inference(trainer_class) -> bool:
    """Whether models of this trainer class take the extension's inference (its marker)."""
    return isinstance(trainer_class, type) and getattr(trainer_class, INFERENCE_MARKER, False) is True
