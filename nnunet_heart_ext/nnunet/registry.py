"""Where nnU-Net's name lookups fall back to when its own folders lack a name: an explicit table.

nnU-Net finds trainers (`-tr`), planners (`-pl`), preprocessors, normalisation schemes and
resampling functions (named in plans files) with `recursive_find_python_class(folder, name, package)`, which imports every
module under one of its own folders and returns the first attribute of that name. The import
hook (_hook.py) wraps that function: when nnU-Net's own search finds nothing,
`find_extension_object(name, package)` answers from the table below and imports only the module
of the object asked for. Only the extension's trainers, planners, preprocessors and resampling
functions answer, and each only to a search of the nnU-Net package where nnU-Net would look for
it (or a package above, as nnU-Net's recursive search would find it there): `-pl HeartTrainer`
is not found. Any other name, including anything else the extension's modules define or import,
falls through to nnU-Net's own "not found".

Names are what plans files and checkpoints store (`preprocessor_name`, `resampling_fn_*`,
`experiment_planner_used`, `trainer_name`), so a published name keeps resolving wherever its
object moves: `resample_data_or_seg_to_shape_numba` lived in the kernel module until the kernel
lost its nnU-Net adapter; plans written then resolve it here, at its new place. Names must be
unique across nnU-Net's own (a checkpoint stores only the trainer's class name).
"""
import importlib

from nnunet_heart_ext.nnunet import patching

# The nnU-Net package whose folder nnU-Net searches for each kind of object.
TRAINERS = "nnunetv2.training.nnUNetTrainer"
PLANNERS = "nnunetv2.experiment_planning"
PREPROCESSORS = "nnunetv2.preprocessing"
RESAMPLING = "nnunetv2.preprocessing.resampling"
NORMALIZATION = "nnunetv2.preprocessing.normalization"

# name -> (package nnU-Net searches for it, "module:attribute")
REGISTRY = {
    "HeartTrainer": (TRAINERS, "nnunet_heart_ext.trainers.heart_trainer:HeartTrainer"),
    "HeartTrainer_nnUNetLoss": (TRAINERS, "nnunet_heart_ext.trainers.heart_trainer:HeartTrainer_nnUNetLoss"),
    "HeartTrainer_nnUNetDA": (TRAINERS, "nnunet_heart_ext.trainers.heart_trainer:HeartTrainer_nnUNetDA"),
    "HeartTrainer_tversky": (TRAINERS, "nnunet_heart_ext.trainers.heart_trainer:HeartTrainer_tversky"),
    "HeartPlanner": (PLANNERS, "nnunet_heart_ext.nnunet.planners:HeartPlanner"),
    "HeartDemoPlanner": (PLANNERS, "nnunet_heart_ext.nnunet.planners:HeartDemoPlanner"),
    "HeartPreprocessor": (PREPROCESSORS, "nnunet_heart_ext.nnunet.preprocessing:HeartPreprocessor"),
    "HeartCTNormalization": (NORMALIZATION, "nnunet_heart_ext.nnunet.normalization:HeartCTNormalization"),
    "HeartCTFloorNormalization": (NORMALIZATION, "nnunet_heart_ext.nnunet.normalization:HeartCTFloorNormalization"),
    "resample_data_or_seg_to_shape_numba": (
        RESAMPLING, "nnunet_heart_ext.nnunet.resampling:resample_data_or_seg_to_shape_numba"),
}

# Families of generated names: prefix -> (package, module whose __all__ lists the names). The
# schedule variants (HeartTrainer_250epochs, HeartTrainer_nnUNetLoss_demo, ...) are made from
# one table in trainers/schedules.py; that module is imported only for names with the prefix.
GENERATED = {
    "HeartTrainer_": (TRAINERS, "nnunet_heart_ext.trainers.schedules"),
}


def resolve(name: str):
    """(package, "module:attribute") registered for `name`, or None."""
    entry = REGISTRY.get(name)
    if entry is not None:
        return entry
    for prefix, (package, module_name) in GENERATED.items():
        if name.startswith(prefix) and name in importlib.import_module(module_name).__all__:
            return package, f"{module_name}:{name}"
    return None


def names() -> dict:
    """Every registered name -> the package nnU-Net searches for it (imports the generating modules)."""
    found = {name: package for name, (package, _) in REGISTRY.items()}
    for package, module_name in GENERATED.values():
        found.update((name, package) for name in importlib.import_module(module_name).__all__)
    return found


def find_extension_object(name: str, searched_package):
    """The extension's object registered as `name` for a search of `searched_package` (the
    `current_module` nnU-Net passes: an nnunetv2 package), or None."""
    entry = resolve(name)
    if entry is None or searched_package is None:
        return None
    package, target = entry
    if package != searched_package and not package.startswith(searched_package + "."):
        return None
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def patch_find_class_module(module):
    """Hook target for nnunetv2.utilities.find_class_by_name: wrap its recursive_find_python_class
    with the registry as a fallback (patching.wrap)."""

    def make_wrapper(original):
        def recursive_find_python_class(folder, class_name, current_module, *args, **kwargs):
            found = original(folder, class_name, current_module, *args, **kwargs)
            if found is None:
                found = find_extension_object(class_name, current_module)
            return found

        return recursive_find_python_class

    patching.wrap(module, "recursive_find_python_class", make_wrapper)
