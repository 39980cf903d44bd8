"""Where nnU-Net's name lookups fall back to when its own folders lack a name.

nnU-Net finds trainers (`-tr`), planners (`-pl`), preprocessors and resampling functions (named
in plans files) by importing every module under its own folders. The extension's names live in
the modules below; `find_extension_object` imports them only when nnU-Net's search failed, so
plain nnU-Net runs pay nothing.
"""
import importlib

# Every module whose public names nnU-Net may ask for. Names must be unique across nnU-Net's
# own (a checkpoint stores only the trainer's class name).
EXTENSION_MODULES = (
    "nnunet_heart_ext.trainers",
    "nnunet_heart_ext.planners",
    "nnunet_heart_ext.preprocessing",
    "nnunet_heart_ext.normalization",
    "nnunet_heart_ext.kernels.resample",
)


def find_extension_object(name: str):
    """The class or function called `name` in the extension, or None."""
    for module_name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # a module not written yet; anything else is a real error
                continue
            raise
        obj = getattr(module, name, None)
        if obj is not None:
            return obj
    return None


def patch_find_class_module(module):
    """Wrap nnunetv2.utilities.find_class_by_name.recursive_find_python_class with a fallback."""
    original = module.recursive_find_python_class
    if getattr(original, "_nnunet_heart_ext", False):
        return

    def recursive_find_python_class(folder, class_name, current_module, *args, **kwargs):
        found = original(folder, class_name, current_module, *args, **kwargs)
        if found is None:
            found = find_extension_object(class_name)
        return found

    recursive_find_python_class.__doc__ = original.__doc__
    recursive_find_python_class._nnunet_heart_ext = True
    recursive_find_python_class.__wrapped__ = original
    module.recursive_find_python_class = recursive_find_python_class
    module._nnunet_heart_ext_patched = True
