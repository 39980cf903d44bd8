"""The extension as a user installs it: pip install (regular and editable) into a fresh virtual
environment, then nnU-Net's official commands as subprocesses on a tiny synthetic dataset.

Checks: the commands find HeartPlanner / HeartTrainer_* with no environment variable set (also
in nnU-Net's spawned workers), training and prediction run on CPU with HeartPlans and with the
default nnUNetPlans, predictions have the test images' geometry and labels 0-3, and install +
uninstall leave nnunetv2's folder byte-for-byte as it was.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnunetv2
from freshenv import FreshEnv, tree_digest

pytestmark = pytest.mark.slow

NNUNETV2_DIR = Path(nnunetv2.__path__[0])
SMOKE_TRAINER = "HeartTrainer_smoke"  # 2 epochs x 2 iterations: the commands, not the learning


@pytest.fixture(scope="module")
def nnunetv2_digest():
    return tree_digest(NNUNETV2_DIR)


def _official_flow(env: FreshEnv, work: Path, planner_args: list, plans: str) -> dict:
    """phantom -> prepare -> plan/preprocess -> train fold 0 -> predict -> export, all as the
    installed console scripts. Returns the folders involved."""
    dirs = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir(parents=True)
    run_env = dict(dirs, nnUNet_n_proc_DA=1, nnUNet_def_n_proc=1, OMP_NUM_THREADS=1)
    env.console_script("nnunet-heart", "phantom", "--out", work / "organizer", "--train", 5, "--test", 2,
                       "--seed", 3, **run_env)
    env.console_script("nnunet-heart", "prepare", "--src", work / "organizer", **run_env)
    # A coarse target spacing (nnU-Net's own flag) keeps the full-size networks cheap on a CPU.
    env.console_script("nnUNetv2_plan_and_preprocess", "-d", 100, *planner_args, "-c", "3d_fullres",
                       "-overwrite_target_spacing", 4, 4, 4, "-np", 2, "-npfp", 1, "--no_pbar", **run_env)
    env.console_script("nnUNetv2_train", 100, "3d_fullres", 0, "-tr", SMOKE_TRAINER, "-p", plans,
                       "-device", "cpu", **run_env)
    images_ts = dirs["nnUNet_raw"] / "Dataset100_Heart" / "imagesTs"
    pred = work / "pred"
    env.console_script("nnUNetv2_predict", "-i", images_ts, "-o", pred, "-d", 100, "-c", "3d_fullres",
                       "-f", 0, "-tr", SMOKE_TRAINER, "-p", plans, "-device", "cpu", "--disable_tta",
                       "-npp", 1, "-nps", 1, **run_env)
    env.console_script("nnunet-heart", "export", "--pred", pred, "--images", images_ts,
                       "--out", work / "predict.zip", **run_env)
    return dict(dirs, images_ts=images_ts, pred=pred, zip=work / "predict.zip")


def _check_predictions(images_ts: Path, pred: Path):
    images = sorted(images_ts.glob("*_0000.nii.gz"))
    assert images, "no test images were prepared"
    for image_file in images:
        case = image_file.name[: -len("_0000.nii.gz")]
        image, seg = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(pred / f"{case}.nii.gz"))
        assert seg.GetSize() == image.GetSize()
        assert np.allclose(seg.GetSpacing(), image.GetSpacing())
        assert np.allclose(seg.GetOrigin(), image.GetOrigin())
        assert np.allclose(seg.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}


def _checkpoint(results: Path, plans: str) -> dict:
    import torch

    checkpoint = results / "Dataset100_Heart" / f"{SMOKE_TRAINER}__{plans}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_official_commands_after_pip_install(tmp_path, nnunetv2_digest, editable):
    env = FreshEnv(tmp_path / "env", editable=editable)
    assert (env.site_packages / "nnunet_heart_ext.pth").is_file()
    # Starting Python stays cheap: the hook is in place, torch and nnunetv2 are not imported.
    probe = env.run_python("import sys, json; print(json.dumps([type(f).__name__ for f in sys.meta_path]"
                           " + sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules)))")
    loaded = json.loads(probe.stdout)
    assert "_PostImportFinder" in loaded and "torch" not in loaded and "nnunetv2" not in loaded

    if editable:  # the default planner and nnUNetPlans, trained with the extension's trainer
        planner_args, plans = [], "nnUNetPlans"
    else:
        planner_args, plans = ["-pl", "HeartPlanner"], "HeartPlans"
    out = _official_flow(env, tmp_path / "work", planner_args, plans)

    plans_json = json.loads((out["nnUNet_preprocessed"] / "Dataset100_Heart" / f"{plans}.json").read_text())
    if not editable:
        arch = plans_json["configurations"]["3d_fullres"]["architecture"]
        assert arch["network_class_name"].endswith("ResidualEncoderUNet")
        assert (out["nnUNet_preprocessed"] / "Dataset100_Heart" / "HeartPlans_3d_fullres").is_dir()
    checkpoint = _checkpoint(out["nnUNet_results"], plans)
    assert checkpoint["trainer_name"] == SMOKE_TRAINER
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # the CPU schedules predict unmirrored
    _check_predictions(out["images_ts"], out["pred"])
    assert out["zip"].is_file()

    env.pip("uninstall", "-y", "nnunet-heart-ext")
    assert not (env.site_packages / "nnunet_heart_ext.pth").exists()
    gone = env.run_python(
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; f('HeartTrainer')",
        check=False)
    assert gone.returncode != 0 and "Could not find requested nnunet trainer HeartTrainer" in gone.stderr
    assert tree_digest(NNUNETV2_DIR) == nnunetv2_digest
