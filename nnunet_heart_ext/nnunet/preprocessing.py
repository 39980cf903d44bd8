"""`HeartPreprocessor`: nnU-Net's DefaultPreprocessor with the steps that dominate a CT case made
faster, results identical.

Profile of `DefaultPreprocessor.run_case_npy` on a 300 x 512 x 512 CT case with the Numba
resampling (benchmarks/bench_resample.py's case, float32 labels as nnU-Net's reader gives them,
2-core machine shared with other jobs): resampling about 45 %, `crop_to_nonzero` about 20 %
(scipy's `binary_fill_holes` on the whole volume), foreground location sampling about 17 %
(`np.isin`, `np.argwhere`, a stable argsort of every foreground voxel), dtype copies the rest.
Two steps are replaced, with identical results:

- `crop_to_nonzero_fast`: the same crop, bounding box and seg marking as nnU-Net's
  `crop_to_nonzero`. Holes are filled inside the bounding box only: outside the box
  there is no nonzero voxel, so a background component inside the box reaches the border of the
  array (is not a hole) exactly when it reaches a face of the box (6-connectivity, scipy's
  default structure for `binary_fill_holes`): a flood fill from the faces finds it.
- `_sample_foreground_locations`: the coordinates grouped by label in two Numba passes (count,
  then place), which is the ordering nnU-Net's stable argsort produces; the random draws are
  nnU-Net's own, so the samples are the same.

After both (same case): resampling about 47 %, dtype copies that nnU-Net's own steps make about
30 %, the crop 11 %, the sampling 9 %.

Everything else runs nnU-Net's own code in nnU-Net's order (transpose, crop, normalise,
resample, sample foreground locations). The two Numba passes (the flood fill from the faces, the
grouping by label) are array code and live with the other kernels, in
nnunet_heart_ext.kernels.preprocess; this module is the nnU-Net side.
"""
from typing import Union

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_heart_ext.kernels.preprocess import background_reaching_faces, coordinates_grouped_by_label


def crop_to_nonzero_fast(data: np.ndarray, seg: Union[np.ndarray, None] = None, nonzero_label: int = -1):
    """nnunetv2's `crop_to_nonzero` (same outputs) for (C, Z, Y, X) data."""
    if data.ndim != 4:
        return crop_to_nonzero(data, seg, nonzero_label)
    nonzero = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero |= data[c] != 0
    # holes lie inside the bounding box of the nonzero voxels, so filling does not change it
    bbox = get_bbox_from_mask(nonzero)
    slicer = bounding_box_to_slice(bbox)
    # binary_fill_holes = not (background connected to the outside); outside the box is all
    # background, so inside the box that is the background reaching one of its faces
    outside = background_reaching_faces(np.ascontiguousarray(nonzero[slicer]))[None]
    slicer = (slice(None),) + slicer
    data = data[slicer]
    if seg is not None:
        seg = seg[slicer]
        outside &= seg == 0
        seg[outside] = nonzero_label
    else:
        seg = np.where(outside, np.int8(nonzero_label), np.int8(0))
    return data, seg, bbox


class HeartPreprocessor(DefaultPreprocessor):
    """DefaultPreprocessor with `crop_to_nonzero_fast` and a faster foreground location sampling;
    HeartPlans name it."""

    def run_case_npy(self, data: np.ndarray, seg: Union[np.ndarray, None], properties: dict,
                     plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                     dataset_json: Union[dict, str]):
        # The steps of DefaultPreprocessor.run_case_npy (nnunetv2 2.8.1), in its order; only the
        # crop differs. tests/test_heart_preprocessor.py checks the outputs stay identical.
        data = data.astype(np.float32)  # a copy: the caller's arrays stay untouched
        if seg is not None:
            assert data.shape[1:] == seg.shape[1:], "Shape mismatch between image and segmentation"
            seg = np.copy(seg)
        has_seg = seg is not None
        data = data.transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])
        if seg is not None:
            seg = seg.transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])
        original_spacing = [properties['spacing'][i] for i in plans_manager.transpose_forward]

        properties['shape_before_cropping'] = data.shape[1:]
        data, seg, bbox = crop_to_nonzero_fast(data, seg)
        properties['bbox_used_for_cropping'] = bbox
        properties['shape_after_cropping_and_before_resampling'] = data.shape[1:]

        target_spacing = configuration_manager.spacing
        if len(target_spacing) < len(data.shape[1:]):
            target_spacing = [original_spacing[0]] + target_spacing
        new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)

        # normalisation before resampling, as nnU-Net does (the nonzero mask must keep fitting)
        data = self._normalize(data, seg, configuration_manager,
                               plans_manager.foreground_intensity_properties_per_channel)
        data = configuration_manager.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
        seg = configuration_manager.resampling_fn_seg(seg, new_shape, original_spacing, target_spacing)

        if has_seg:
            label_manager = plans_manager.get_label_manager(dataset_json)
            collect_for_this = label_manager.foreground_regions if label_manager.has_regions \
                else label_manager.foreground_labels
            if label_manager.has_ignore_label:
                collect_for_this.append([-1] + label_manager.all_labels)
            properties['class_locations'] = self._sample_foreground_locations(seg, collect_for_this,
                                                                              verbose=self.verbose)
            seg = self.modify_seg_fn(seg, plans_manager, dataset_json, configuration_manager)
        seg = seg.astype(np.int16) if np.max(seg) > 127 else seg.astype(np.int8)
        return data, seg, properties

    @staticmethod
    def _sample_foreground_locations(seg: np.ndarray, classes_or_regions, seed: int = 1234, verbose: bool = False,
                                     min_num_samples=10000, min_percent_coverage=0.01):
        """DefaultPreprocessor._sample_foreground_locations (same samples: same random draws from
        the same ordering of coordinates), with the grouping by label done in two Numba passes."""
        if seg.ndim != 4:
            return DefaultPreprocessor._sample_foreground_locations(seg, classes_or_regions, seed, verbose,
                                                                    min_num_samples, min_percent_coverage)
        rndst = np.random.RandomState(seed)
        requested = set()
        for c in classes_or_regions:
            requested.update(int(x) for x in c) if isinstance(c, (tuple, list)) else requested.add(int(c))
        labels = np.array(sorted(requested), dtype=np.int64)
        coords_sorted, counts = coordinates_grouped_by_label(np.ascontiguousarray(seg), labels)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        label_to_range = {int(lab): (int(st), int(st + n)) for lab, st, n in zip(labels, starts, counts) if n > 0}

        class_locs = {}
        for c in classes_or_regions:
            is_region = isinstance(c, (tuple, list))
            labs = tuple(int(x) for x in c) if is_region else (int(c),)
            k = labs if is_region else labs[0]
            ranges = [label_to_range[lab] for lab in labs if lab in label_to_range]
            if not ranges:
                class_locs[k] = []
                continue
            sizes = [e - s for s, e in ranges]
            total = int(np.sum(sizes))
            target_num_samples = max(min(min_num_samples, total), int(np.ceil(total * min_percent_coverage)))
            offsets = rndst.choice(total, target_num_samples, replace=False)
            cum = np.cumsum(sizes)
            which = np.searchsorted(cum, offsets, side="right")
            in_range = offsets - np.concatenate(([0], cum[:-1]))[which]
            picked = np.array([ranges[i][0] for i in which], dtype=np.int64) + in_range.astype(np.int64)
            class_locs[k] = coords_sorted[picked]
            if verbose:
                print(c, target_num_samples)
        return class_locs
