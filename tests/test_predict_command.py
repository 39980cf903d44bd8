"""The official prediction command on a HeartTrainer model takes the extension's inference, with
no flag, and writes what nnU-Net's own predictor writes from the same weights (the same checkpoint
under nnUNetTrainer's name, predicted with the hook off: plain nnU-Net): label maps, and with
--save_probabilities the .npz/.pkl that nnUNetv2_ensemble reads.
Bad input (a missing fold, a checkpoint of other plans) ends with nnU-Net's error and no file.

The model folder is made here: a small nnU-Net PlainConvUNet named by the plans, random weights
saved as nnU-Net's checkpoints (two folds), test images with isotropic and anisotropic spacing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

BIN = Path(sys.executable).parent
ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                    "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "myocardium": 1, "valve": 2, "calcium": 3},
                "numTraining": 1, "file_ending": ".nii.gz"}


def plans(name="TinyPlans"):
    kw = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"{name}_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 24, 24], "median_image_size_in_voxels": [30, 40, 40], "spacing": [1.5, 1.0, 1.0],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": dict(kw, order=3), "resampling_fn_seg_kwargs": dict(kw, is_seg=True),
        "resampling_fn_probabilities_kwargs": kw, "batch_dice": False, "architecture": ARCH,
    }
    return {
        "dataset_name": "Dataset100_Heart", "plans_name": name, "original_median_spacing_after_transp": [1.5, 1, 1],
        "original_median_shape_after_transp": [30, 40, 40], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
        "experiment_planner_used": "x", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1000.0, "mean": 150.0, "median": 120.0, "min": -100.0, "percentile_00_5": -31.0,
            "percentile_99_5": 478.0, "std": 90.0}},
    }


def network(p, seed):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = p["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 4,
                                 deep_supervision=False)
    with torch.no_grad():  # random weights that give every class somewhere
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.normal_(0, 0.4)
    return net


def model_folder(root: Path, trainer: str, p: dict, folds=(0, 1)) -> Path:
    folder = root / f"{trainer}__{p['plans_name']}__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(p))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": network(p, fold).state_dict(), "trainer_name": trainer,
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagesTs")
    rng = np.random.default_rng(0)
    for case, shape, spacing in (("iso", (26, 38, 35), (1.2, 0.9, 0.9)), ("aniso", (9, 40, 36), (5.0, 0.8, 0.8))):
        z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
        img = 300 * np.sin(z / 3.0) * np.cos(y / 5.0) + 200 * np.sin(x / 4.0) + rng.normal(0, 30, shape)
        image = sitk.GetImageFromArray(img.astype(np.int16))
        image.SetSpacing(tuple(reversed(spacing)))
        image.SetOrigin((3.0, -2.0, 7.0))
        sitk.WriteImage(image, str(folder / f"{case}_0000.nii.gz"))
    return folder


def predict(model: Path, images: Path, out: Path, *extra, disable=False, folds=("0", "1"), check=True,
            cpu_network=None):
    env = dict(os.environ, nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if cpu_network is not None:
        env["NNUNET_HEART_EXT_CPU_NETWORK"] = cpu_network
    if disable:
        env["NNUNET_HEART_EXT_DISABLE"] = "1"
    proc = subprocess.run([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(images), "-o", str(out),
                           "-m", str(model), "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1", *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def labels(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))


@pytest.mark.slow
def test_official_predict_takes_the_fast_path_and_writes_nnunets_files(tmp_path, images):
    model = model_folder(tmp_path / "results", "HeartTrainer", plans())
    same_weights = model_folder(tmp_path / "results", "nnUNetTrainer", plans())
    plain, heart = tmp_path / "plain", tmp_path / "heart"
    out_plain = predict(same_weights, images, plain, "--save_probabilities", disable=True)
    # nnU-Net's float32 passes: what is compared here is the rest of the fast path and its files (the
    # default network path, bfloat16, against nnU-Net's: test_network_runtime, network_accuracy.py)
    out_heart = predict(model, images, heart, "--save_probabilities", cpu_network="float32")
    assert "the extension's inference" in out_heart.stdout and "CPU network: float32" in out_heart.stdout
    assert "the extension's inference" not in out_plain.stdout
    for case in ("iso", "aniso"):
        ref, got = labels(plain, case), labels(heart, case)
        # nnU-Net sums the Gaussian-weighted windows in float16, where the window-corner weights
        # underflow: its logits at the image's outermost voxels are 0 or coarse (the extension sums in
        # float32). Inside that shell the two agree to float16 rounding.
        inner = (slice(2, -2),) * 3
        assert got.shape == ref.shape and (got[inner] == ref[inner]).mean() >= 0.999, case
        assert (got == ref).mean() >= 0.99, case
        assert len(np.unique(ref)) >= 3, "the random network should predict several classes"
        p_ref = np.load(plain / f"{case}.npz")["probabilities"]
        p_got = np.load(heart / f"{case}.npz")["probabilities"]
        assert p_got.shape == p_ref.shape and p_got.dtype == p_ref.dtype
        np.testing.assert_allclose(p_got[(slice(None), *inner)], p_ref[(slice(None), *inner)], atol=2e-2)
        assert (heart / f"{case}.pkl").is_file()
    assert not [p for p in heart.iterdir() if p.name.startswith(".")], "no temporary file left"
    # nnU-Net's own ensembling reads the extension's probability files
    env = dict(os.environ)
    subprocess.run([str(BIN / "nnUNetv2_ensemble"), "-i", str(heart), str(plain), "-o", str(tmp_path / "ens"),
                    "-np", "1"], env=env, check=True, capture_output=True)
    assert (labels(tmp_path / "ens", "iso") == labels(plain, "iso")).mean() >= 0.999


@pytest.mark.slow
def test_nnunet_models_keep_nnunets_predictor(tmp_path, images):
    model = model_folder(tmp_path / "results", "nnUNetTrainer", plans(), folds=(0,))
    out = predict(model, images, tmp_path / "pred", "--disable_tta", folds=("0",))
    assert "the extension's inference" not in out.stdout
    assert (tmp_path / "pred" / "iso.nii.gz").is_file()


@pytest.mark.slow
def test_bad_models_end_with_nnunets_error_and_no_file(tmp_path, images):
    model = model_folder(tmp_path / "results", "HeartTrainer", plans(), folds=(0,))
    missing = predict(model, images, tmp_path / "a", "--disable_tta", folds=("0", "3"), check=False)
    assert missing.returncode != 0 and "fold_3" in missing.stderr
    # a checkpoint trained with other plans (another network) does not load into this one
    other = plans("OtherPlans")
    other["configurations"]["3d_fullres"]["architecture"] = json.loads(json.dumps(ARCH))
    other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [6, 12]
    other_model = model_folder(tmp_path / "other", "HeartTrainer", other, folds=(0,))
    (model / "fold_0" / "checkpoint_final.pth").write_bytes((other_model / "fold_0" / "checkpoint_final.pth")
                                                           .read_bytes())
    mismatched = predict(model, images, tmp_path / "b", "--disable_tta", folds=("0",), check=False)
    assert mismatched.returncode != 0 and "size mismatch" in mismatched.stderr
    for out in (tmp_path / "a", tmp_path / "b"):
        assert not list(out.glob("*.nii.gz")) if out.exists() else True


@pytest.mark.slow
def test_predict_ensemble_equals_predict_with_probabilities_and_nnunets_ensemble(tmp_path, images):
    """nnunet-heart predict-ensemble of two models (no .npz written) against nnUNetv2_predict
    --save_probabilities of each and nnUNetv2_ensemble."""
    first = model_folder(tmp_path / "a", "HeartTrainer", plans(), folds=(0,))
    second_plans = plans("OtherPlans")
    second_plans["configurations"]["3d_fullres"]["spacing"] = [1.2, 1.1, 1.1]  # other preprocessing too
    second = model_folder(tmp_path / "b", "HeartTrainer", second_plans, folds=(1,))
    env = dict(os.environ, nnUNet_def_n_proc="1")
    env.pop("TRITON_INTERPRET", None)
    official = []
    for model, fold in ((first, "0"), (second, "1")):
        predict(model, images, tmp_path / model.name, "--save_probabilities", folds=(fold,))
        official.append(str(tmp_path / model.name))
    subprocess.run([str(BIN / "nnUNetv2_ensemble"), "-i", *official, "-o", str(tmp_path / "ens"), "-np", "1"],
                   env=env, check=True, capture_output=True)
    # each model with its own folds: the command takes one -f for all models, so fold 0 of both
    (second / "fold_0").mkdir()
    (second / "fold_0" / "checkpoint_final.pth").write_bytes((second / "fold_1" / "checkpoint_final.pth").read_bytes())
    out = tmp_path / "ours"
    proc = subprocess.run([str(BIN / "nnunet-heart"), "predict-ensemble", "-i", str(images), "-o", str(out),
                           "-m", str(first), str(second), "-f", "0", "-device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not list(out.glob("*.npz"))
    for case in ("iso", "aniso"):
        ref, got = labels(tmp_path / "ens", case), labels(out, case)
        inner = (slice(2, -2),) * 3
        assert got.shape == ref.shape and (got[inner] == ref[inner]).mean() >= 0.999, case
    # models that predict other labels are refused before any prediction, naming them
    other = plans("ThirdPlans")
    third = model_folder(tmp_path / "c", "HeartTrainer", other, folds=(0,))
    dataset = json.loads((third / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "heart": 1, "x": 2, "y": 3}
    (third / "dataset.json").write_text(json.dumps(dataset))
    bad = subprocess.run([str(BIN / "nnunet-heart"), "predict-ensemble", "-i", str(images), "-o", str(tmp_path / "bad"),
                          "-m", str(first), str(third), "-f", "0", "-device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and str(third) in bad.stderr and "labels" in bad.stderr
    assert not list((tmp_path / "bad").glob("*.nii.gz")) if (tmp_path / "bad").exists() else True
