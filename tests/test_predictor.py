"""The extension's inference (nnunet_heart_ext/nnunet/predictor.py, prediction_export.py) against nnU-Net's
own predictor and export, imported from the installed nnunetv2, on small random-weight networks and
random logits: batched windows and mirrors, folds, export with and without probabilities,
anisotropic spacing, no resampling, transposed plans, and the refusals (NaN logits, other plans)."""
import copy
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_heart_ext._hook  # noqa: F401  (installs the hook where the .pth was not processed)
from nnunet_heart_ext.nnunet import prediction_export
from nnunet_heart_ext.nnunet.predictor import HeartPredictor
from nnunet_heart_ext.nnunet.predictor_hook import use_fast_path

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "myocardium": 1, "valve": 2, "calcium": 3},
                "numTraining": 1, "file_ending": ".nii.gz"}


def plans(patch=(12, 16, 16), spacing=(1.0, 1.0, 1.0), resampling="resample_data_or_seg_to_shape",
          transpose=(0, 1, 2)):
    kw_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    if resampling == "resample_torch_fornnunet":  # as nnU-Net's *_torchres planners write them
        kw_prob = {"is_seg": False, "force_separate_z": None, "memefficient_seg_resampling": False}
    config = {
        "data_identifier": "t", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [30, 30, 30], "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
        "resampling_fn_probabilities": resampling, "resampling_fn_data_kwargs": kw_prob,
        "resampling_fn_seg_kwargs": dict(kw_prob, is_seg=True), "resampling_fn_probabilities_kwargs": kw_prob,
        "batch_dice": False,
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
    }
    back = [int(i) for i in np.argsort(transpose)]
    return PlansManager({
        "dataset_name": "Dataset100_Heart", "plans_name": "t", "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [30, 30, 30], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose), "transpose_backward": back,
        "configurations": {"3d_fullres": config}, "experiment_planner_used": "t", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1000.0, "mean": 150.0, "median": 120.0, "min": -100.0, "percentile_00_5": -31.0,
            "percentile_99_5": 478.0, "std": 90.0}},
    })


def network(seed: int, n_out: int = 4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, padding=1), torch.nn.LeakyReLU(),
                               torch.nn.Conv3d(6, n_out, 3, padding=1))


def predictors(n_folds: int, mirror_axes, pm, make_network=network, cpu_network="float32"):
    """nnU-Net's predictor and the extension's, with the same folds' weights (`make_network(seed)`).
    `cpu_network`: the extension's network path; float32 by default, nnU-Net's passes (the other
    paths: test_network_runtime.py); None leaves it to the environment."""
    weights = [make_network(seed).state_dict() for seed in range(n_folds)]
    made = []
    for trainer in ("nnUNetTrainer", "HeartTrainer"):
        p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirror_axes is not None, device=torch.device("cpu"),
                            allow_tqdm=False)
        p.manual_initialization(make_network(0), pm, pm.get_configuration("3d_fullres"), copy.deepcopy(weights),
                                DATASET_JSON, trainer, mirror_axes)
        p.cpu_network = cpu_network
        made.append(p)
    return made


def compare(got, ref, gaussian: bool):
    """nnU-Net sums in float16: agreement to its precision, labels the same. With Gaussian weights
    its window-corner weights (~1e-40 of the centre's) underflow float16 at the image's outermost
    voxels, where it returns 0 (the extension sums in float32): those are left out."""
    inner = (slice(None),) + (slice(2, -2),) * 3 if gaussian else (slice(None),)
    np.testing.assert_allclose(got[inner], ref[inner], atol=2e-2, rtol=2e-2)
    assert (got[inner].argmax(0) == ref[inner].argmax(0)).mean() >= 0.999


@pytest.mark.parametrize("n_folds,mirror_axes", [(1, None), (1, (0, 1, 2)), (2, (0, 1, 2)), (2, (1, 2))])
@pytest.mark.parametrize("gaussian", [True, False])
def test_logits_equal_nnunet_predictor(n_folds, mirror_axes, gaussian):
    pm = plans()
    plain, heart = predictors(n_folds, mirror_axes, pm)
    assert type(plain) is nnUNetPredictor and type(heart) is HeartPredictor
    plain.use_gaussian = heart.use_gaussian = gaussian
    data = torch.from_numpy(np.random.default_rng(n_folds).normal(size=(1, 22, 35, 30)).astype(np.float32))
    ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
    got = heart.predict_logits_from_preprocessed_data(data).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape == (4, 22, 35, 30)
    compare(got, ref, gaussian)


def test_window_batches_of_any_size_and_images_smaller_than_the_patch():
    pm = plans(patch=(12, 16, 16))
    plain, heart = predictors(1, (0, 1, 2), pm)
    for inference_batch in (1, 3, 64):
        heart.inference_batch = inference_batch
        data = torch.from_numpy(np.random.default_rng(inference_batch).normal(size=(1, 9, 30, 14)).astype(np.float32))
        ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
        got = heart.predict_logits_from_preprocessed_data(data).numpy()
        compare(got, ref, gaussian=True)


def test_only_nnunets_own_predictor_of_a_heart_trainer_model_is_switched():
    pm = plans()
    plain, heart = predictors(1, None, pm)
    assert not use_fast_path(plain)  # nnUNetTrainer: nnU-Net's predictor stays

    class UserPredictor(nnUNetPredictor):
        pass

    user = UserPredictor(device=torch.device("cpu"))
    user.manual_initialization(network(0), pm, pm.get_configuration("3d_fullres"), None, DATASET_JSON,
                               "HeartTrainer", None)
    assert type(user) is UserPredictor
    for name in ("HeartTrainer_5epochs", "HeartTrainer_nnUNetDA"):
        p = nnUNetPredictor(device=torch.device("cpu"))
        p.manual_initialization(network(0), pm, pm.get_configuration("3d_fullres"), None, DATASET_JSON, name, None)
        assert type(p) is HeartPredictor


# ---------------------------------------------------------------------- export
def case(rng, shape_after, shape_before, bbox, spacing, transpose=(0, 1, 2)):
    """Smooth random logits at the network's spacing and the properties nnU-Net's preprocessing
    would have stored for them."""
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape_after], indexing="ij")
    logits = np.stack([np.sin(rng.uniform(3, 9) * z + rng.uniform(2, 7) * y + rng.uniform(1, 8) * x
                              + rng.uniform(0, 6)) * rng.uniform(1, 4) for _ in range(4)])
    logits += rng.normal(scale=0.3, size=logits.shape)
    inverse = np.argsort(transpose)
    properties = {
        "spacing": [spacing[i] for i in inverse], "shape_before_cropping": list(shape_before),
        "bbox_used_for_cropping": [list(b) for b in bbox],
        "shape_after_cropping_and_before_resampling": [b - a for a, b in bbox],
        "sitk_stuff": {"spacing": tuple(float(s) for s in reversed([spacing[i] for i in inverse])),
                       "origin": (1.0, 2.0, 3.0), "direction": tuple(np.eye(3).ravel())},
        "list_of_data_files": ["case_0000.nii.gz"],
    }
    return logits.astype(np.float16), properties


EXPORT_CASES = {
    # network spacing -> case spacing, cropped, isotropic
    "resampled": dict(shape_after=(20, 26, 24), shape_before=(24, 30, 31), bbox=((2, 21), (1, 29), (3, 28)),
                      spacing=(1.25, 0.9, 0.8), net_spacing=(1.0, 1.0, 1.0)),
    # anisotropic: nnU-Net's separate-z path (in-plane linear, nearest along z)
    "separate_z": dict(shape_after=(30, 20, 22), shape_before=(9, 26, 27), bbox=((0, 9), (0, 26), (1, 27)),
                       spacing=(4.0, 0.7, 0.75), net_spacing=(1.2, 0.9, 0.9)),
    # the network's spacing is the case's: nothing to resample
    "no_resampling": dict(shape_after=(12, 15, 14), shape_before=(14, 15, 16), bbox=((1, 13), (0, 15), (2, 16)),
                          spacing=(1.0, 1.0, 1.0), net_spacing=(1.0, 1.0, 1.0)),
}


def export_setup(name, transpose=(0, 1, 2), resampling="resample_data_or_seg_to_shape", seed=0):
    c = EXPORT_CASES[name]
    pm = plans(spacing=c["net_spacing"], resampling=resampling, transpose=transpose)
    logits, properties = case(np.random.default_rng(seed), c["shape_after"], c["shape_before"], c["bbox"],
                              c["spacing"], transpose)
    return pm, pm.get_configuration("3d_fullres"), pm.get_label_manager(DATASET_JSON), logits, properties


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
@pytest.mark.parametrize("probabilities", [False, True])
def test_export_equals_nnunet(name, probabilities):
    pm, cm, lm, logits, properties = export_setup(name)
    assert prediction_export.fused_resampling(pm, cm, lm, properties) is not None
    ref = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), pm, cm, lm, properties, probabilities)
    got = prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), pm, cm, lm, properties, probabilities)
    on_device = prediction_export.convert_on_device(torch.from_numpy(logits.copy()), pm, cm, lm, properties,
                                                    probabilities)
    for out in (got, on_device):
        seg, ref_seg = (out[0], ref[0]) if probabilities else (out, ref)
        assert seg.shape == ref_seg.shape and seg.dtype == np.uint8
        assert (seg == np.asarray(ref_seg)).mean() >= 0.9995
        if probabilities:
            np.testing.assert_allclose(out[1], np.asarray(ref[1]), atol=2e-3)
            assert out[1].shape == ref[1].shape


def test_export_follows_the_plans_transpose():
    pm, cm, lm, logits, properties = export_setup("resampled", transpose=(2, 0, 1))
    ref = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, properties)
    got = prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm,
                                                                                         properties)
    assert got.shape == ref.shape and (got == ref).mean() >= 0.9995


def test_plans_with_other_resampling_get_nnunets_own_export():
    pm, cm, lm, logits, properties = export_setup("resampled", resampling="resample_torch_fornnunet")
    assert prediction_export.fused_resampling(pm, cm, lm, properties) is None
    assert prediction_export.convert_on_device(torch.from_numpy(logits), pm, cm, lm, properties) is None
    ref = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, properties)
    got = prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm,
                                                                                         properties)
    np.testing.assert_array_equal(got, ref)


def test_files_equal_nnunets_and_load_where_nnunet_loads_them(tmp_path):
    pm, cm, lm, logits, properties = export_setup("resampled", seed=3)
    (tmp_path / "nnunet").mkdir()
    (tmp_path / "heart").mkdir()
    nnunet_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                str(tmp_path / "nnunet" / "case"), True)
    prediction_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                    str(tmp_path / "heart" / "case"), True)
    assert sorted(p.name for p in (tmp_path / "heart").iterdir()) == ["case.nii.gz", "case.npz", "case.pkl"]
    ref_img, got_img = (sitk.ReadImage(str(tmp_path / d / "case.nii.gz")) for d in ("nnunet", "heart"))
    assert got_img.GetSpacing() == ref_img.GetSpacing() and got_img.GetOrigin() == ref_img.GetOrigin()
    assert (sitk.GetArrayFromImage(got_img) == sitk.GetArrayFromImage(ref_img)).mean() >= 0.9995
    ref_p, got_p = (np.load(tmp_path / d / "case.npz")["probabilities"] for d in ("nnunet", "heart"))
    assert got_p.dtype == ref_p.dtype and got_p.shape == ref_p.shape
    np.testing.assert_allclose(got_p, ref_p, atol=2e-3)
    with open(tmp_path / "heart" / "case.pkl", "rb") as f:
        assert pickle.load(f)["bbox_used_for_cropping"] == properties["bbox_used_for_cropping"]


def test_nan_logits_are_refused_and_nothing_is_written(tmp_path):
    pm, cm, lm, logits, properties = export_setup("resampled")
    logits[2, 3, 4, 5] = np.nan
    for probabilities in (False, True):
        with pytest.raises(FloatingPointError, match="case_0000.nii.gz"):
            prediction_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                            str(tmp_path / "case"), probabilities)
        with pytest.raises(FloatingPointError, match="NaN"):
            prediction_export.convert_on_device(torch.from_numpy(logits), pm, cm, lm, properties, probabilities)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- CUDA (benchmarks/gpu_check.sh)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n_folds", [1, 2])
def test_cuda_predictor_equals_nnunet_on_the_cpu(n_folds):
    pm = plans()
    plain, heart = predictors(n_folds, (0, 1, 2), pm)
    heart.device, heart.perform_everything_on_device = torch.device("cuda"), True
    data = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 22, 35, 30)).astype(np.float32))
    ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
    got = heart.predict_logits_from_preprocessed_data(data)
    assert got.is_cuda, "the folds' sum stays on the device"
    compare(got.cpu().numpy(), ref, gaussian=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
@pytest.mark.parametrize("probabilities", [False, True])
def test_cuda_export_equals_nnunet(name, probabilities):
    pm, cm, lm, logits, properties = export_setup(name, seed=7)
    ref = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), pm, cm, lm, properties, probabilities)
    got = prediction_export.convert_on_device(torch.from_numpy(logits).cuda(), pm, cm, lm, properties, probabilities)
    seg, ref_seg = (got[0], ref[0]) if probabilities else (got, ref)
    assert (seg == np.asarray(ref_seg)).mean() >= 0.9995
    if probabilities:
        np.testing.assert_allclose(got[1], np.asarray(ref[1]), atol=2e-3)
