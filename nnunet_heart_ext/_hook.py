"""Teach an unmodified nnunetv2 the extension's names, in every process, with no env variable.

How it works. The installed `nnunet_heart_ext.pth` (site-packages, see setup.py) imports this
module at interpreter start-up. It puts one finder at the front of `sys.meta_path` that does
nothing until a module named in `PATCHES` is imported. When that module has executed, the
finder calls the extension's patch function on it. Because spawned worker processes start a new
interpreter, they process the `.pth` too and get the same patches; nothing is written into
nnunetv2's folder, and uninstalling the extension (which removes the `.pth`) undoes all of it.

Cost at start-up: importing this file and one dict lookup per later import (microseconds).
Set `NNUNET_HEART_EXT_DISABLE=1` to switch the hook off (for comparisons with plain nnU-Net).
"""
import os
import sys

# nnunetv2 module -> "extension_module:function" called with the freshly executed module. Every
# patch function wraps named functions or methods of that module with patching.wrap; the table
# of what is wrapped and when each wrapper runs the extension's code is in
# nnunet_heart_ext/nnunet/patching.py.
PATCHES = {
    # Name lookups (trainers, planners, preprocessors, resampling functions) fall back to the
    # extension's registry. Callers bind the function at their own import time, after this ran.
    "nnunetv2.utilities.find_class_by_name": "nnunet_heart_ext.nnunet.registry:patch_find_class_module",
    # nnU-Net's keep-largest postprocessing function replaced by one of the same name and output
    # on the extension's connected components (imports neither Triton nor the kernels until called).
    "nnunetv2.postprocessing.remove_connected_components":
        "nnunet_heart_ext.nnunet.postprocessing:patch_remove_connected_components",
    # nnU-Net's predictor of a model whose trainer asks for it (HeartTrainer) takes the extension's
    # inference (batched windows and mirrors, folds on the device, fused export); others are untouched.
    "nnunetv2.inference.predict_from_raw_data": "nnunet_heart_ext.nnunet.predictor_hook:patch_predict_from_raw_data",
    # ... and such a trainer's validation exports with the extension's export.
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer": "nnunet_heart_ext.nnunet.validation:patch_trainer_module",
}


class _PostImportFinder:
    # A plain class, not importlib.abc.MetaPathFinder: importing importlib.abc costs milliseconds
    # at every interpreter start; the import system only needs find_spec.
    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        _wrap_loader(spec.loader, PATCHES[fullname])
        return spec


def _wrap_loader(loader, patch_target):
    exec_module = loader.exec_module

    def exec_then_patch(module):
        exec_module(module)
        _apply_patch(patch_target, module)

    loader.exec_module = exec_then_patch


def _apply_patch(patch_target, module):
    import importlib

    module_name, func_name = patch_target.split(":")
    getattr(importlib.import_module(module_name), func_name)(module)
    module._nnunet_heart_ext_patched = True


def install():
    if os.environ.get("NNUNET_HEART_EXT_DISABLE", "0") not in ("", "0"):
        return
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    # nnunetv2 already imported (e.g. the hook installed late, in a test): patch in place.
    for name, target in PATCHES.items():
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "_nnunet_heart_ext_patched", False):
            _apply_patch(target, module)


install()
