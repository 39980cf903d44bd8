"""nnU-Net's keep-largest-component postprocessing at the kernel's speed, under nnU-Net's name.

What changes. `patch_remove_connected_components` (run by the import hook, _hook.py, in every
process, spawned workers included, right after nnunetv2.postprocessing.remove_connected_components
has executed) binds a replacement of that module's
`remove_all_but_largest_component_from_segmentation`: the same arguments and defaults, the same
output (input untouched), computed by nnunet_heart_ext.kernels.connected_components (cc3d on the
CPU, only around the components that could be the largest; the Triton kernels on a GPU).
Inputs the kernel does not take (not a numpy array, not 2D or 3D, not a plain number dtype) go
to nnU-Net's own function. Replacing the whole function, not the acvl_utils labelling it calls,
is what makes nnU-Net's function as fast as the kernel's: nnU-Net's mask building and copies
around the labelling cost as much as the labelling.

Pickle design. `determine_postprocessing` (`nnUNetv2_find_best_configuration`) pickles the
function objects it chose into postprocessing.pkl, and pickle stores a function by module and
qualified name. The replacement carries nnU-Net's `__module__`, `__qualname__`, `__name__` and
docstring (functools.wraps; `__wrapped__` is nnU-Net's function), and it is what that module's
attribute holds, so it pickles as nnU-Net's own: postprocessing.pkl is byte for byte the one
plain nnU-Net writes, names only nnunetv2, and loads where the extension is not installed (there
nnU-Net's code runs); a pickle written by plain nnU-Net loads here and runs the replacement.
tests/test_postprocessing_integration.py checks both directions and the decisions.

Device: NNUNET_HEART_EXT_CC_DEVICE = auto (default: the GPU when torch sees one and Triton
imports), cpu, or cuda. Nothing here imports Triton unless the GPU path is chosen.
"""
import functools
import os
import warnings

import numpy as np

from nnunet_heart_ext.nnunet import patching

_DEVICE_ENV = "NNUNET_HEART_EXT_CC_DEVICE"
# dtypes whose torch tensors support the comparisons and writes of the GPU path
_GPU_DTYPES = {np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32,
                                     np.float64)}


def keep_largest_like_nnunet(original):
    """A replacement for nnU-Net's `remove_all_but_largest_component_from_segmentation`
    (`original`): its signature, defaults, names and output, on the extension's kernel."""

    @functools.wraps(original)
    def remove_all_but_largest_component_from_segmentation(segmentation, labels_or_regions, background_label=0):
        if not (isinstance(segmentation, np.ndarray) and segmentation.ndim in (2, 3)
                and segmentation.dtype.kind in "biuf"):
            return original(segmentation, labels_or_regions, background_label)
        from nnunet_heart_ext.kernels import connected_components as kernel

        if segmentation.dtype in _GPU_DTYPES and _use_cuda():
            import torch

            try:
                on_gpu = torch.from_numpy(np.ascontiguousarray(segmentation)).cuda()
                return kernel.remove_all_but_largest_component_from_segmentation(
                    on_gpu, labels_or_regions, background_label).cpu().numpy()
            except torch.cuda.OutOfMemoryError:  # e.g. a training run holds the GPU: same result on the CPU
                warnings.warn("nnunet_heart_ext: GPU out of memory in keep-largest postprocessing, using the CPU")
        return kernel.remove_all_but_largest_component_from_segmentation(
            segmentation, labels_or_regions, background_label)

    setattr(remove_all_but_largest_component_from_segmentation, patching.MARK, True)
    return remove_all_but_largest_component_from_segmentation


def _use_cuda() -> bool:
    choice = os.environ.get(_DEVICE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{_DEVICE_ENV}={choice!r}: use auto, cpu or cuda")
    if choice == "cpu":
        return False
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{_DEVICE_ENV}=cuda but torch sees no CUDA device")
    if not torch.cuda.is_available():
        return False
    from nnunet_heart_ext.kernels import _triton

    if choice == "cuda" and not _triton.AVAILABLE:
        raise RuntimeError(f"{_DEVICE_ENV}=cuda but {_triton.REASON}")
    return _triton.AVAILABLE


def patch_remove_connected_components(module) -> None:
    """Hook target for nnunetv2.postprocessing.remove_connected_components: bind the replacement
    under nnU-Net's name (determine_postprocessing and apply_postprocessing look it up there)."""
    patching.wrap(module, "remove_all_but_largest_component_from_segmentation", keep_largest_like_nnunet)
