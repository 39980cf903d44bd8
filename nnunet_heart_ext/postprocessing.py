"""nnU-Net's keep-largest-component postprocessing on the extension's connected components.

What changes. `nnunetv2.postprocessing.remove_connected_components` imports acvl_utils'
`remove_all_but_largest_component` (skimage labelling + `np.isin`, about 1.5-3 s a CT volume)
and calls it by that module-level name from `remove_all_but_largest_component_from_segmentation`.
`patch_remove_connected_components` (run by the import hook, _hook.py, in every process,
spawned workers included) rebinds that one name to `remove_all_but_largest_component_like_acvl`,
which computes the same mask with nnunet_heart_ext.kernels.connected_components: cc3d on the
CPU, the Triton kernels when a GPU is there.

Pickle design. `determine_postprocessing` (`nnUNetv2_find_best_configuration`) pickles the
function objects it chose into postprocessing.pkl by reference. nnU-Net's own
`remove_all_but_largest_component_from_segmentation` stays untouched and is what gets pickled,
so the pickle is byte for byte the one plain nnU-Net writes: it names only nnunetv2, loads where
the extension is installed without a GPU, and where it is not installed at all (then nnU-Net's
original code runs). The decisions and output files are the same because the swapped function
returns the same mask (tests/test_postprocessing_integration.py checks both).

Device: NNUNET_HEART_EXT_CC_DEVICE = auto (default: the GPU when torch sees one), cpu, or cuda.
"""
import os
import warnings

import numpy as np
from acvl_utils.morphology import morphology_helper as _acvl

# skimage's connectivity (what acvl_utils passes on: 1 = faces .. ndim = full, None = full)
# -> the number of neighbours used by the extension's kernels.
_SKIMAGE_TO_NEIGHBOURS = {2: {1: 4, 2: 8}, 3: {1: 6, 2: 18, 3: 26}}
_DEVICE_ENV = "NNUNET_HEART_EXT_CC_DEVICE"


def remove_all_but_largest_component_like_acvl(binary_image: np.ndarray, connectivity: int = None) -> np.ndarray:
    """acvl_utils.morphology.morphology_helper.remove_all_but_largest_component, same arguments and
    output, on the extension's kernels. Inputs skimage treats differently (non-boolean images,
    whose components are runs of equal value; other dimensions; unusual connectivity) go to
    acvl_utils' own function."""
    neighbours = None
    if isinstance(binary_image, np.ndarray) and binary_image.dtype == bool:
        skimage_connectivity = binary_image.ndim if connectivity is None else connectivity
        neighbours = _SKIMAGE_TO_NEIGHBOURS.get(binary_image.ndim, {}).get(skimage_connectivity)
    if neighbours is None:
        return _acvl.remove_all_but_largest_component(binary_image, connectivity)
    from nnunet_heart_ext.kernels.connected_components import remove_all_but_largest_component

    if _use_cuda():
        import torch

        try:
            mask = torch.from_numpy(binary_image).cuda()
            return remove_all_but_largest_component(mask, neighbours).cpu().numpy()
        except torch.cuda.OutOfMemoryError:  # e.g. a training run holds the GPU: same result on the CPU
            warnings.warn("nnunet_heart_ext: GPU out of memory in keep-largest postprocessing, using the CPU")
    return remove_all_but_largest_component(binary_image, neighbours)


def _use_cuda() -> bool:
    choice = os.environ.get(_DEVICE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{_DEVICE_ENV}={choice!r}: use auto, cpu or cuda")
    if choice == "cpu":
        return False
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{_DEVICE_ENV}=cuda but torch sees no CUDA device")
    return torch.cuda.is_available()


def patch_remove_connected_components(module) -> None:
    """Hook target for nnunetv2.postprocessing.remove_connected_components: rebind the
    acvl_utils function it calls; every function object of nnU-Net stays as it is."""
    module.remove_all_but_largest_component = remove_all_but_largest_component_like_acvl
    module._nnunet_heart_ext_patched = True
