"""nnU-Net's resampling signature over the Numba kernel (nnunet_heart_ext.kernels.resample).

`resample_data_or_seg_to_shape_numba` is a drop-in for nnunetv2's
`preprocessing.resampling.default_resampling.resample_data_or_seg_to_shape`: the same parameters
in the same order with the same defaults (`force_separate_z=False`, like nnU-Net's), the same
"separate z" decision (nnU-Net's own `determine_do_sep_z_and_axis`), the same output. HeartPlans
name it for images, segmentations and probabilities (preprocessing, export in
`nnUNetv2_predict`); nnU-Net finds it by that name through the registry (registry.py), also
for plans written before it moved here from the kernel module.

Orders the kernel does not compute (`kernels.resample.supports`) go to nnU-Net's own function.

Threads: in the main process Numba uses every core it may; in a worker process (nnU-Net's
preprocessing and export pools) `cores // nnUNet_def_n_proc`, at least one, so that a pool of N
workers does not run N x cores threads. NUMBA_NUM_THREADS caps both (the kernel applies it).
"""
import multiprocessing
from typing import List, Tuple, Union

import numpy as np
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.default_resampling import (
    determine_do_sep_z_and_axis,
    resample_data_or_seg_to_shape,
)

from nnunet_heart_ext.kernels import resample as kernel
from nnunet_heart_ext.kernels.cores import usable_cores


def resample_data_or_seg_to_shape_numba(data: Union[torch.Tensor, np.ndarray],
                                        new_shape: Union[Tuple[int, ...], List[int], np.ndarray],
                                        current_spacing: Union[Tuple[float, ...], List[float], np.ndarray],
                                        new_spacing: Union[Tuple[float, ...], List[float], np.ndarray],
                                        is_seg: bool = False,
                                        order: int = 3, order_z: int = 0,
                                        force_separate_z: Union[bool, None] = False,
                                        separate_z_anisotropy_threshold: float = ANISO_THRESHOLD):
    """nnU-Net's `resample_data_or_seg_to_shape`, computed by the Numba kernel: `data`
    (C, Z, Y, X) numpy array or tensor -> numpy array (C, *new_shape) in data's dtype (data
    itself when the shape does not change)."""
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    if not kernel.supports(is_seg, order, order_z):
        return resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg, order,
                                             order_z, force_separate_z, separate_z_anisotropy_threshold)
    assert data.ndim == 4, "data must be c x y z"
    if tuple(data.shape[1:]) == tuple(int(i) for i in new_shape):
        return data
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                      separate_z_anisotropy_threshold)
    return kernel.resample(data, new_shape, is_seg, order, order_z, axis if do_separate_z else None,
                           threads=numba_threads())


def numba_threads() -> int:
    """Threads for one Numba call: every usable core in the main process; in a worker process
    (nnU-Net's preprocessing and export pools) `cores // nnUNet_def_n_proc`, at least one."""
    cores = usable_cores()
    if multiprocessing.parent_process() is None:
        return cores
    from nnunetv2.configuration import default_num_processes  # reads nnUNet_def_n_proc

    return max(1, cores // max(1, default_num_processes))
