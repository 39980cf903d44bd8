"""HeartPreprocessor and HeartPlans' resampling give what nnU-Net's defaults give.

The end-to-end test runs the real `nnUNetv2_plan_and_preprocess -pl HeartPlanner` (its spawned
workers must resolve HeartPreprocessor and resample_data_or_seg_to_shape_numba by name) on a
tiny CT-like Dataset100_Heart and compares every preprocessed case with DefaultPreprocessor and
nnU-Net's own resampling run on the same plans, and nnU-Net's export of logits (resampling back
to the original shape) with either plans.
"""
import json
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba
from nnunet_heart_ext.nnunet.preprocessing import HeartPreprocessor, crop_to_nonzero_fast

LABELS = {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}
# (shape z, y, x), spacing (z, y, x): the last case is anisotropic enough for the separate-z path
CASES = [((14, 30, 28), (2.0, 0.8, 0.8)), ((22, 26, 30), (1.2, 0.9, 0.9)), ((8, 34, 32), (3.3, 0.7, 0.7))]


def ct_case(shape, seed):
    """int16 CT-like image (air, body with noise and a few exact zeros, bright heart) + labels 0-3."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(grid[0] ** 2 * 0.5 + grid[1] ** 2 + grid[2] ** 2)
    img = np.where(r < 0.95, 40, -1024).astype(np.int16)
    img[r < 0.6] = 300
    img += (rng.normal(0, 20, size=shape) * (r < 0.95)).astype(np.int16)
    img[(rng.random(shape) < 0.02) & (r < 0.9)] = 0  # holes of the nonzero mask
    img[:, :2] = 0  # an empty margin that cropping removes
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(r > 0.45) & (r < 0.6)] = 1
    seg[(np.abs(grid[0]) < 0.3) & (np.abs(grid[1]) < 0.15) & (np.abs(grid[2] - 0.3) < 0.15)] = 2
    z, y, x = (int(s * f) for s, f in zip(shape, rng.uniform(0.4, 0.6, 3)))
    seg[z:z + 2, y:y + 2, x:x + 2] = 3
    img[seg == 3] = 900
    return img, seg


def write_dataset(raw_dir):
    root = raw_dir / "Dataset100_Heart"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (shape, spacing) in enumerate(CASES):
        img, seg = ct_case(shape, seed=i)
        for arr, path in ((img, root / "imagesTr" / f"heart_{i:03d}_0000.nii.gz"),
                          (seg, root / "labelsTr" / f"heart_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(arr)
            image.SetSpacing(spacing[::-1])  # SimpleITK: x, y, z
            sitk.WriteImage(image, str(path))
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(CASES), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def assert_same_case(ours, ref):
    (data, seg, props), (data_ref, seg_ref, props_ref) = ours, ref
    assert data.shape == data_ref.shape and data.dtype == data_ref.dtype
    scale = float(data_ref.max() - data_ref.min())
    assert np.abs(data.astype(np.float64) - data_ref).max() <= 1e-4 * scale
    np.testing.assert_array_equal(seg, seg_ref)
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert tuple(map(tuple, np.atleast_2d(props[key]))) == tuple(map(tuple, np.atleast_2d(props_ref[key]))), key
    assert props["class_locations"].keys() == props_ref["class_locations"].keys()
    for k, locs in props_ref["class_locations"].items():
        np.testing.assert_array_equal(props["class_locations"][k], locs)


def with_default_preprocessing(plans: dict, configuration: str) -> dict:
    plans = deepcopy(plans)
    config = plans["configurations"][configuration]
    config["preprocessor_name"] = "DefaultPreprocessor"
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        config[key] = "resample_data_or_seg_to_shape"
    return plans


@pytest.mark.slow
def test_plan_and_preprocess_with_heart_planner_matches_nnunet_defaults(nnunet_dirs):
    root = write_dataset(nnunet_dirs["nnUNet_raw"])
    env = dict(os.environ, nnUNet_def_n_proc="2")
    run = subprocess.run([Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess", "-d", "100", "-pl", "HeartPlanner", "-c", "3d_fullres",
                          "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    pre = nnunet_dirs["nnUNet_preprocessed"] / "Dataset100_Heart"
    plans = json.loads((pre / "HeartPlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["preprocessor_name"] == "HeartPreprocessor"
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        assert config[key] == "resample_data_or_seg_to_shape_numba"
    # the lookup nnUNetv2_predict does for export finds the kernel
    manager = PlansManager(plans).get_configuration("3d_fullres")
    assert manager.resampling_fn_probabilities.func is resample_data_or_seg_to_shape_numba

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    preprocessed = nnUNetDatasetBlosc2(str(pre / config["data_identifier"]))
    ref_plans = PlansManager(with_default_preprocessing(plans, "3d_fullres"))
    ref_config = ref_plans.get_configuration("3d_fullres")
    dataset_json = json.loads((root / "dataset.json").read_text())
    assert sorted(preprocessed.identifiers) == [f"heart_{i:03d}" for i in range(len(CASES))]
    for case in preprocessed.identifiers:
        data, seg, _, props = preprocessed.load_case(case)
        ref = DefaultPreprocessor(verbose=False).run_case(
            [str(root / "imagesTr" / f"{case}_0000.nii.gz")], str(root / "labelsTr" / f"{case}.nii.gz"),
            ref_plans, ref_config, dataset_json)
        # run_case_save stores the seg as int16
        assert_same_case((np.asarray(data[:]), np.asarray(seg[:]).astype(ref[1].dtype), props), ref)

        # export (nnUNetv2_predict's path): logits resampled back to the original shape
        logits = torch.from_numpy(np.random.default_rng(0).normal(size=(4, *data.shape[1:])).astype(np.float32))
        label_manager = ref_plans.get_label_manager(dataset_json)
        seg_ours, probs_ours = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.clone(), PlansManager(plans), manager, label_manager, props, return_probabilities=True)
        seg_ref, probs_ref = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.clone(), ref_plans, ref_config, label_manager, props, return_probabilities=True)
        assert np.abs(probs_ours - probs_ref).max() <= 1e-4
        top2 = np.sort(probs_ref, axis=0)[-2:]
        near_tie = top2[1] - top2[0] < 1e-5
        assert np.all((seg_ours == seg_ref) | near_tie)


@pytest.mark.parametrize("seed", range(3))
def test_heart_preprocessor_equals_default_preprocessor(seed):
    # same plans (Numba resampling for both), so only the preprocessor's own steps are compared
    shape, spacing = CASES[seed]
    img, seg = ct_case(shape, seed)
    plans = {
        "dataset_name": "Dataset100_Heart", "plans_name": "t", "original_median_spacing_after_transp": [1.5, 0.8, 0.8],
        "original_median_shape_after_transp": list(shape), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 2, 1], "transpose_backward": [0, 2, 1], "experiment_planner_used": "t",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 900.0, "mean": 150.0, "median": 120.0, "min": -30.0, "percentile_00_5": -31.0,
            "percentile_99_5": 478.0, "std": 90.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "t", "preprocessor_name": "HeartPreprocessor", "batch_size": 2,
            "patch_size": [16, 16, 16], "median_image_size_in_voxels": list(shape), "spacing": [1.5, 0.8, 0.8],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape_numba",
            "resampling_fn_seg": "resample_data_or_seg_to_shape_numba",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape_numba",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "batch_dice": False,
            "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}},
    }
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "file_ending": ".nii.gz"}
    image, labels = img[None].astype(np.float32), seg[None].astype(np.float32)
    image_before = image.copy()
    ours = HeartPreprocessor(verbose=False).run_case_npy(image, labels, {"spacing": list(spacing)}, manager, config,
                                                         dataset_json)
    ref = DefaultPreprocessor(verbose=False).run_case_npy(image, labels, {"spacing": list(spacing)}, manager, config,
                                                          dataset_json)
    np.testing.assert_array_equal(image, image_before)  # the caller's arrays are untouched
    np.testing.assert_array_equal(ours[0], ref[0])
    assert ours[1].dtype == ref[1].dtype
    assert_same_case(ours, ref)


@pytest.mark.parametrize("seed", range(40))
def test_crop_to_nonzero_fast_equals_nnunet(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 12, size=3))
    density = rng.random()
    data = (rng.random((2, *shape)) < density) * rng.normal(size=(2, *shape)).astype(np.float32)
    if seed % 4 == 0:
        data[:, : shape[0] // 2] = 0  # margins to crop
    seg = rng.integers(0, 3, size=(1, *shape)).astype(np.int8)
    for s in (seg, None):
        ours = crop_to_nonzero_fast(data.copy(), None if s is None else s.copy())
        ref = crop_to_nonzero(data.copy(), None if s is None else s.copy())
        assert ours[2] == ref[2]
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[1], ref[1])
        assert ours[1].dtype == ref[1].dtype


@pytest.mark.parametrize("seed", range(6))
def test_foreground_sampling_equals_nnunet(seed):
    rng = np.random.default_rng(seed)
    shape = (1, *(int(s) for s in rng.integers(1, 30, size=3)))
    seg = rng.choice([-1, 0, 0, 0, 1, 1, 2, 3], size=shape).astype([np.float32, np.int8, np.int16][seed % 3])
    if seed == 5:
        seg[seg == 3] = 0  # a requested label that is absent
    classes = [1, 2, 3, (1, 2), (2, 3), [-1, 0, 1, 2, 3]]
    kwargs = dict(min_num_samples=[10000, 50][seed % 2])
    ours = HeartPreprocessor._sample_foreground_locations(seg, classes, seed=seed, **kwargs)
    ref = DefaultPreprocessor._sample_foreground_locations(seg, classes, seed=seed, **kwargs)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k])
    empty = np.zeros(shape, np.float32)  # no requested label anywhere
    assert HeartPreprocessor._sample_foreground_locations(empty, classes[:5]) == \
        DefaultPreprocessor._sample_foreground_locations(empty, classes[:5]) == {k if isinstance(k, int) else tuple(k): []
                                                                                 for k in classes[:5]}
