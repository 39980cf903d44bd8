"""nnU-Net's side of the device augmentation (nnunet_heart_ext.kernels.augment).

`HeartDataLoader` is nnU-Net's `nnUNetDataLoader` (same case sampling, foreground oversampling and
enlarged-patch placement, same RNG calls for them) whose workers only load and cut: per batch they
draw every augmentation choice (`DeviceAugmentation.sample_parameters`, from a generator seeded by
the worker's numpy RNG, which batchgenerators seeds per worker) and cut from each case only the box
of the enlarged patch that the sample's transform reads (`sample_box`: the patch itself when
nothing rotates or scales). The image box goes out as float32, the segmentation as int8 where the
labels fit. The trainer moves the boxes to its device and augments there
(`DeviceAugmentation.apply_boxes`), inside the training step.

`unsupported_reason(trainer)` says why a configuration keeps nnU-Net's CPU augmentation
(what kernels.augment does not reproduce), or None.
"""
from typing import Dict, Optional

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_heart_ext.kernels.augment import SEG_PAD, DeviceAugmentation


def unsupported_reason(trainer, patch_size, do_dummy_2d_data_aug) -> str:
    """Why `trainer`'s configuration needs nnU-Net's own transforms, or None."""
    if len(patch_size) != 3:
        return "2D configurations"
    if do_dummy_2d_data_aug:
        return "dummy-2D augmentation (anisotropic patch)"
    if trainer.is_cascaded:
        return "cascades (segmentations of a previous stage)"
    if trainer.label_manager.has_regions:
        return "region-based training"
    if any(trainer.configuration_manager.use_mask_for_norm):
        return "normalisation masked to the foreground (MaskImageTransform)"
    return None


def _present_classes(class_locations: dict) -> list:
    """The labels with at least one location in a case's preprocessed class_locations (region and
    annotated-class keys, which are tuples, left out)."""
    return [k for k, where in class_locations.items() if not isinstance(k, tuple) and len(where) > 0]


class HeartDataLoader(nnUNetDataLoader):
    """nnUNetDataLoader that hands out boxes and augmentation parameters instead of augmented
    patches: {'data': [(C, *box_b) float32], 'target': [(1, *box_b) int8/int16],
    'offsets': [box_b's start in the enlarged patch], 'enlarged_shape': the enlarged patch,
    'params': dict of (B, ...) numpy arrays (kernels.augment.as_tensors), 'keys': case ids}."""

    # the augmentation parameters as numpy arrays (False: tensors, as before; benchmarks/bench_loader.py)
    send_params_as_numpy = True

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, *,
                 augmentation: DeviceAugmentation, class_weights: Optional[Dict[int, float]] = None, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, transforms=None, **kwargs)
        if self.patch_size_was_2d:
            raise ValueError("HeartDataLoader cuts 3D patches only")
        if class_weights is not None:
            bad = {k: w for k, w in class_weights.items() if k not in label_manager.foreground_labels or not w > 0}
            if bad:
                raise ValueError(f"class_weights {bad}: keys must be foreground labels "
                                 f"{label_manager.foreground_labels}, weights > 0")
        self.class_weights = class_weights
        if class_weights is not None and kwargs.get("sampling_probabilities") is None:
            self.sampling_probabilities = self.case_probabilities(data, class_weights)
        self.augmentation = augmentation
        self.seg_dtype = np.int8 if max(label_manager.all_labels) <= np.iinfo(np.int8).max else np.int16

    def generate_train_batch(self):
        keys = self.get_indices()
        cases = [self._data.load_case(key) for key in keys]
        channels = cases[0][0].shape[0]
        generator = torch.Generator().manual_seed(int(np.random.randint(0, 2 ** 63 - 1, dtype=np.int64)))
        params = self.augmentation.sample_parameters(len(keys), generator, num_channels=channels)
        data, target, offsets = [], [], []
        for j, (image, seg, _, properties) in enumerate(cases):
            force_fg = self.get_do_oversample(j)
            chosen = self.choose_class(properties["class_locations"]) if force_fg else None
            bbox_lbs, _ = self.get_bbox(image.shape[1:], force_fg, properties["class_locations"], overwrite_class=chosen)
            box = self.augmentation.sample_box(params, j, self.patch_size)
            bbox = [[lb + lo, lb + hi] for lb, (lo, hi) in zip(bbox_lbs, box)]
            data.append(torch.from_numpy(crop_and_pad_nd(image, bbox, 0, cast_cropped_to=np.float32)))
            target.append(torch.from_numpy(crop_and_pad_nd(seg, bbox, SEG_PAD, cast_cropped_to=self.seg_dtype)))
            offsets.append([lo for lo, _ in box])
        # the parameters travel as numpy arrays, pickled inline: as tensors each of the ~20 would be
        # a shared-memory segment whose file descriptor the main process receives and maps, batch
        # after batch (kernels.augment.as_tensors turns them back, without a copy)
        return {"data": data, "target": target, "offsets": offsets, "enlarged_shape": [int(i) for i in self.patch_size],
                "params": {k: v.numpy() for k, v in params.items()} if self.send_params_as_numpy else params,
                "keys": keys}

    @staticmethod
    def case_probabilities(data, class_weights: Dict[int, float]) -> np.ndarray:
        """Probability of drawing each case of `data` (in `data.identifiers` order): proportional to
        the largest weight among the foreground classes the case holds (1 for a class without a
        weight, and for a case without foreground), read from the preprocessed class_locations. With
        calcium in a third of the cases and weight 6 against 1-3, half the draws are calcified cases."""
        weights = []
        for key in data.identifiers:
            locations = data.load_case(key)[3]["class_locations"]
            weights.append(max((class_weights.get(k, 1.0) for k in _present_classes(locations)), default=1.0))
        weights = np.asarray(weights, dtype=np.float64)
        return weights / weights.sum()

    def choose_class(self, class_locations: dict) -> Optional[int]:
        """The class a forced-foreground sample is centred on: None (nnU-Net's uniform draw among the
        classes present in the case, inside get_bbox) without `class_weights`; otherwise a class
        present in the case drawn with probability proportional to its weight (a class without a
        weight: 1), so that rare small classes get more of the forced samples."""
        if self.class_weights is None:
            return None
        present = _present_classes(class_locations)
        if not present:
            return None
        weights = np.array([self.class_weights.get(k, 1.0) for k in present], dtype=np.float64)
        return present[np.random.choice(len(present), p=weights / weights.sum())]
