"""Where Triton does not import (macOS, Windows, a CPU-only image), the extension still works and
never makes nnU-Net worse: kernels import, the start-up hook imports nothing of Triton, and the
official commands run on the CPU paths with the outputs they have where Triton is present.

"Triton absent" is a `sitecustomize` (on PYTHONPATH, so spawned workers get it too) that makes
`import triton` fail as it does where the package is not installed.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
BLOCK_TRITON = '''
import sys


class _NoTriton:
    """`import triton` fails as where the package is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
'''


@pytest.fixture(scope="module")
def no_triton(tmp_path_factory):
    """Environment variables for a subprocess in which `import triton` fails."""
    folder = tmp_path_factory.mktemp("no_triton")
    (folder / "sitecustomize.py").write_text(BLOCK_TRITON)
    # TRITON_INTERPRET (set by conftest for the kernel tests) stays out of the user's commands
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return dict(env, PYTHONPATH=str(folder))


def run(argv, env, **extra):
    proc = subprocess.run([str(a) for a in argv], env=dict(env, **{k: str(v) for k, v in extra.items()}),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{argv[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


CPU_PATHS = """
import sys
import numpy as np
import torch
try:
    import triton
    raise SystemExit("triton imported")
except ImportError:
    pass
sys.modules["nnunetv2"] = None  # and the kernels import without nnU-Net
import nnunet_heart_ext.kernels as kernels
import pkgutil, importlib
for module in pkgutil.iter_modules(kernels.__path__):
    importlib.import_module(f"nnunet_heart_ext.kernels.{module.name}")
from nnunet_heart_ext.kernels import _triton, connected_components, fused_dice_ce, resample
assert not _triton.AVAILABLE and "triton does not import" in _triton.REASON
mask = np.zeros((6, 7, 8), dtype=bool)
mask[0:2, 0:2, 0:2] = mask[4:6, 5:7, 7] = True
assert connected_components.label(mask)[1] == 2
assert connected_components.remove_all_but_largest_component(torch.from_numpy(mask)).sum() == 8
out = resample.resample(np.random.rand(1, 4, 5, 6).astype(np.float32), (5, 6, 7))
assert out.shape == (1, 5, 6, 7)
loss = fused_dice_ce.FusedDiceCELoss({"batch_dice": False, "do_bg": False, "smooth": 1e-5, "ddp": False}, {})
logits = torch.randn(2, 4, 6, 7, 8, requires_grad=True)
loss(logits, torch.randint(0, 4, (2, 1, 6, 7, 8))).backward()
assert torch.isfinite(logits.grad).all()
try:
    connected_components.label_triton(torch.from_numpy(mask))
    raise SystemExit("label_triton ran without Triton")
except ValueError as e:
    assert "triton does not import" in str(e), e
print("cpu paths ok")
"""

HOOK_IMPORTS_NO_TRITON = """
import sys
import numpy as np
import nnunetv2.postprocessing.remove_connected_components as pp
import nnunetv2.utilities.find_class_by_name  # the hook patches this module too
seg = np.zeros((6, 7, 8), dtype=np.uint8)
seg[0:2, 0:2, 0:2], seg[5, 6, 7] = 1, 2
assert pp.remove_all_but_largest_component_from_segmentation(seg, [1, 2]).sum() == 8
assert getattr(pp.remove_all_but_largest_component_from_segmentation, "_nnunet_heart_ext", False)
print("triton imported:", "triton" in sys.modules)
"""


def test_kernels_and_cpu_paths_without_triton_or_nnunet(no_triton):
    assert run([sys.executable, "-c", CPU_PATHS], no_triton).stdout.strip().endswith("cpu paths ok")


def test_nnunet_postprocessing_never_imports_triton():
    """With Triton installed, the hooked modules and nnU-Net's keep-largest (the hook's
    replacement, on the CPU) import no Triton. (nnU-Net's own trainer search imports it, with or
    without the extension; the extension's trainers do too: their GPU loss is a Triton kernel.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = run([sys.executable, "-c", HOOK_IMPORTS_NO_TRITON], env, NNUNET_HEART_EXT_CC_DEVICE="cpu")
    assert out.stdout.strip().splitlines()[-1] == "triton imported: False"


def _preprocessed(folder: Path) -> dict:
    """Every preprocessed case: its image and segmentation arrays (blosc2 files of the same arrays
    need not be the same bytes) and the digest of its properties file."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(folder))
    cases = {}
    for case in sorted(dataset.identifiers):
        data, seg, _, _ = dataset.load_case(case)
        properties = hashlib.sha256((folder / f"{case}.pkl").read_bytes()).hexdigest()
        cases[case] = (np.asarray(data[:]), np.asarray(seg[:]), properties)
    assert cases, f"nothing preprocessed in {folder}"
    return cases


def _segmentations(folder: Path) -> dict:
    import SimpleITK as sitk

    found = {}
    for path in sorted(folder.glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        found[path.name] = (sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert found, f"no segmentations in {folder}"
    return found


def _assert_same_segmentations(folder, reference):
    ours, theirs = _segmentations(folder), _segmentations(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name][0], theirs[name][0])
        assert ours[name][1:] == theirs[name][1:]


@pytest.mark.slow
def test_official_commands_without_triton(tmp_path, no_triton):
    """Plan and preprocess with HeartPlanner, train HeartTrainer_smoke on the CPU, predict, find
    the postprocessing and apply it, all with `import triton` failing; then preprocess, predict
    and postprocess again with Triton present: the same files."""
    dirs = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    common = dict(dirs, nnUNet_n_proc_DA=1, nnUNet_def_n_proc=1, OMP_NUM_THREADS=1)
    with_triton = {k: v for k, v in no_triton.items() if k != "PYTHONPATH"}
    trainer, plans = "HeartTrainer_smoke", "HeartPlans"

    def official(env, command, *args):
        return run([BIN / command, *args], env, **common)

    official(no_triton, "nnunet-heart", "phantom", "--out", tmp_path / "organizer", "--train", 5, "--test", 2,
             "--seed", 4)
    official(no_triton, "nnunet-heart", "prepare", "--src", tmp_path / "organizer")
    official(no_triton, "nnUNetv2_plan_and_preprocess", "-d", 100, "-pl", "HeartPlanner", "-c", "3d_fullres",
             "-overwrite_target_spacing", 4, 4, 4, "-np", 2, "-npfp", 1, "--no_pbar")
    preprocessed = dirs["nnUNet_preprocessed"] / "Dataset100_Heart" / "HeartPlans_3d_fullres"
    preprocessed_without = _preprocessed(preprocessed)
    official(no_triton, "nnUNetv2_train", 100, "3d_fullres", 0, "-tr", trainer, "-p", plans, "-device", "cpu")
    images = dirs["nnUNet_raw"] / "Dataset100_Heart" / "imagesTs"

    def predict_and_postprocess(env, name):
        pred = tmp_path / f"pred_{name}"
        official(env, "nnUNetv2_predict", "-i", images, "-o", pred, "-d", 100, "-c", "3d_fullres", "-f", 0,
                 "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1)
        official(env, "nnUNetv2_apply_postprocessing", "-i", pred, "-o", tmp_path / f"pp_{name}",
                 "-pp_pkl_file", pkl, "-np", 1)
        return pred

    official(no_triton, "nnUNetv2_find_best_configuration", 100, "-c", "3d_fullres", "-tr", trainer, "-p", plans,
             "-f", 0, "-np", 1, "--disable_ensembling")
    crossval = dirs["nnUNet_results"] / "Dataset100_Heart" / f"{trainer}__{plans}__3d_fullres" / \
        "crossval_results_folds_0"
    pkl = crossval / "postprocessing.pkl"
    assert pkl.is_file() and b"nnunet_heart_ext" not in pkl.read_bytes()
    pred_without = predict_and_postprocess(no_triton, "without")

    # the same steps with Triton present give the same files
    official(with_triton, "nnUNetv2_preprocess", "-d", 100, "-plans_name", plans, "-c", "3d_fullres", "-np", 2)
    preprocessed_with = _preprocessed(preprocessed)
    assert preprocessed_with.keys() == preprocessed_without.keys()
    for case, (data, seg, properties) in preprocessed_with.items():
        np.testing.assert_array_equal(data, preprocessed_without[case][0])
        np.testing.assert_array_equal(seg, preprocessed_without[case][1])
        assert properties == preprocessed_without[case][2], case
    pred_with = predict_and_postprocess(with_triton, "with")
    _assert_same_segmentations(pred_with, pred_without)
    _assert_same_segmentations(tmp_path / "pp_with", tmp_path / "pp_without")
