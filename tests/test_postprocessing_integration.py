"""nnU-Net's postprocessing with the extension's connected components hooked in gives what plain
nnU-Net gives: the same postprocessing.pkl (byte for byte), postprocessing.json and files from
the postprocessing search (nnU-Net's `determine_postprocessing`, what
`nnUNetv2_find_best_configuration` runs), and the same files from the
`nnUNetv2_apply_postprocessing` command. Plain nnU-Net is the same run with
NNUNET_HEART_EXT_DISABLE=1; both modes run side by side. A pickle written with the extension
loads and applies without it, and the other way round.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LABELS = {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}
SHAPE = (14, 40, 36)
SPACING = (0.7, 0.7, 1.5)


def heart(rng):
    """Ground truth: myocardium shell around a valve, two separate calcifications (so that
    keeping only the largest calcification makes things worse)."""
    z, y, x = np.ogrid[tuple(slice(-1, 1, complex(0, s)) for s in SHAPE)]
    radius = np.sqrt((z / 0.8) ** 2 + ((y - rng.uniform(-0.1, 0.1)) / 0.7) ** 2 + (x / 0.65) ** 2)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[(radius < 1) & (radius > 0.6)] = 1
    seg[radius < 0.35] = 2
    seg[6:8, 4:6, 17:19] = 3
    seg[6:8, 34:36, 17:19] = 3
    return seg


def prediction(truth, rng):
    """The truth plus spurious blobs of myocardium and valve away from the heart, a lost part
    of the valve, and voxels that touch the myocardium or valve only at a corner (kept by
    26-connectivity, which nnU-Net uses, removed by 6)."""
    seg = truth.copy()
    for _ in range(4):
        z, y, x = rng.integers(0, SHAPE[0] - 2), rng.integers(0, 4), rng.integers(0, SHAPE[2] - 2)
        seg[z:z + 2, y:y + 2, x:x + 2] = rng.integers(1, 3)
    seg[(seg == 2) & (rng.random(SHAPE) < 0.1)] = 0
    for label in (1, 2, 1):
        seg[corner_only_neighbour(seg, label, rng)] = label
    return seg


def corner_only_neighbour(seg, label, rng):
    """A random background voxel whose only foreground neighbours are `label` voxels at corners."""
    from scipy.ndimage import correlate

    faces_and_edges = np.ones((3, 3, 3), dtype=np.uint8)
    faces_and_edges[::2, ::2, ::2] = 0
    corners = 1 - faces_and_edges
    foreground = (seg != 0).astype(np.uint8)
    candidates = ((foreground == 0) & (correlate(foreground, faces_and_edges, mode="constant") == 0)
                  & (correlate((seg == label).astype(np.uint8), corners, mode="constant") > 0)
                  & (correlate(foreground, corners, mode="constant") == correlate(
                      (seg == label).astype(np.uint8), corners, mode="constant")))
    positions = np.argwhere(candidates)
    return tuple(positions[rng.integers(len(positions))])


def write(seg, path):
    image = sitk.GetImageFromArray(seg)
    image.SetSpacing(SPACING)
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def case_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    rng = np.random.default_rng(0)
    (root / "ref").mkdir()
    (root / "pred").mkdir()
    for i in range(3):
        truth = heart(rng)
        write(truth, root / "ref" / f"heart_{i:03d}.nii.gz")
        write(prediction(truth, rng), root / "pred" / f"heart_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 3, "file_ending": ".nii.gz"}))
    (root / "plans.json").write_text(json.dumps({
        "dataset_name": "Dataset100_Heart", "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {}}))
    return root


# The search's worker pools as threads: nnU-Net's code runs unchanged, but without starting a
# fresh interpreter for each of its six pools (a minute a run on the CI machine). Spawned workers
# are covered by the apply command below and by test_spawned_workers_are_hooked.
DETERMINE_WITH_THREAD_POOLS = """
import sys, types, multiprocessing.dummy
import nnunetv2.evaluation.evaluate_predictions as evaluation
import nnunetv2.postprocessing.remove_connected_components as postprocessing
evaluation.multiprocessing = postprocessing.multiprocessing = types.SimpleNamespace(
    get_context=lambda method: multiprocessing.dummy)
sys.argv = ["nnUNetv2_determine_postprocessing", *sys.argv[1:]]
postprocessing.entry_point_determine_postprocessing_folder()
"""


def run_both_modes(make_command):
    """Run `make_command(mode)` for mode "extension" and "plain" (NNUNET_HEART_EXT_DISABLE=1)
    at the same time; return their stdout by mode."""
    processes = {}
    for mode in ("extension", "plain"):
        env = dict(os.environ, NNUNET_HEART_EXT_DISABLE="1" if mode == "plain" else "0")
        processes[mode] = subprocess.Popen([str(a) for a in make_command(mode)], env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = {}
    for mode, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{mode} run failed:\n{stdout}\n{stderr}"
        outputs[mode] = stdout
    return outputs


def read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_files(folder, reference):
    files = sorted(p.name for p in Path(reference).glob("*.nii.gz"))
    assert files and files == sorted(p.name for p in Path(folder).glob("*.nii.gz"))
    for name in files:
        ours, theirs = read(Path(folder) / name), read(Path(reference) / name)
        assert ours[0].dtype == theirs[0].dtype
        np.testing.assert_array_equal(ours[0], theirs[0])
        assert ours[1:] == theirs[1:]


@pytest.fixture(scope="module")
def determined(case_folders):
    """`nnUNetv2_determine_postprocessing` run with and without the extension, each on its own
    copy of the predictions (it writes into that folder)."""
    root = case_folders
    runs = {}
    for mode in ("extension", "plain"):
        runs[mode] = root / f"pred_{mode}"
        runs[mode].mkdir()
        for f in (root / "pred").iterdir():
            (runs[mode] / f.name).write_bytes(f.read_bytes())
    run_both_modes(lambda mode: [sys.executable, "-c", DETERMINE_WITH_THREAD_POOLS, "-i", runs[mode],
                                 "-ref", root / "ref", "-plans_json", root / "plans.json",
                                 "-dataset_json", root / "dataset.json", "-np", "2"])
    return runs


def test_determine_postprocessing_decides_the_same(determined):
    ours, plain = determined["extension"], determined["plain"]
    pickle_bytes = (ours / "postprocessing.pkl").read_bytes()
    assert pickle_bytes == (plain / "postprocessing.pkl").read_bytes()
    assert b"nnunet_heart_ext" not in pickle_bytes
    decisions = json.loads((ours / "postprocessing.json").read_text())
    assert decisions == json.loads((plain / "postprocessing.json").read_text())
    # the blobs make nnU-Net choose something, so the pickle holds functions to apply
    assert decisions["postprocessing_fns"], decisions
    assert_same_files(ours / "postprocessed", plain / "postprocessed")


def test_apply_postprocessing_writes_the_same_files(case_folders, determined):
    root = case_folders
    pkl = determined["plain"] / "postprocessing.pkl"
    run_both_modes(lambda mode: [BIN / "nnUNetv2_apply_postprocessing", "-i", root / "pred",
                                 "-o", root / f"applied_{mode}", "-pp_pkl_file", pkl,
                                 "-plans_json", root / "plans.json", "-dataset_json", root / "dataset.json",
                                 "-np", "1"])
    assert_same_files(root / "applied_extension", root / "applied_plain")
    # and postprocessing changed the predictions, i.e. the hooked code had work to do
    changed = [not np.array_equal(read(p)[0], read(root / "applied_plain" / p.name)[0])
               for p in (root / "pred").glob("*.nii.gz")]
    assert any(changed)


# Load each pickle given, apply it to a segmentation with stray voxels of every label, print the
# file of the code that ran and a digest of the result. In "plain" mode nnunet_heart_ext cannot
# even be imported, as where the extension is not installed.
LOAD_AND_APPLY = """
import hashlib, os, pickle, sys
if os.environ["NNUNET_HEART_EXT_DISABLE"] == "1":
    sys.modules["nnunet_heart_ext"] = None
import numpy as np
for path in sys.argv[1:]:
    fns, kwargs = pickle.load(open(path, "rb"))
    seg = np.zeros((6, 7, 8), dtype=np.uint8)
    seg[0:2, 0:2, 0:3] = 1
    seg[0:2, 4:6, 0:2] = 2
    seg[3:6, 4:6, 6:8] = 3
    seg[5, 0, 0], seg[5, 2, 3], seg[3, 6, 0] = 1, 2, 3
    for fn, kw in zip(fns, kwargs):
        assert fn.__module__ == "nnunetv2.postprocessing.remove_connected_components", fn.__module__
        seg = fn(seg, **kw)
    print(fns[0].__code__.co_filename, hashlib.sha1(seg.tobytes()).hexdigest())
"""


def test_pickles_load_with_and_without_the_extension(determined):
    """postprocessing.pkl written with the extension installed loads and applies where it is not,
    and the one written by plain nnU-Net loads and applies with the extension: the same result,
    nnU-Net's code without the extension, the extension's replacement with it."""
    pickles = [determined["extension"] / "postprocessing.pkl", determined["plain"] / "postprocessing.pkl"]
    outputs = run_both_modes(lambda mode: [sys.executable, "-c", LOAD_AND_APPLY, *pickles])
    results = {mode: [line.split() for line in out.strip().splitlines()[-2:]] for mode, out in outputs.items()}
    for mode, ran in (("extension", "nnunet_heart_ext/nnunet/postprocessing.py"),
                      ("plain", "nnunetv2/postprocessing/remove_connected_components.py")):
        assert [Path(code).as_posix().endswith(ran) for code, _ in results[mode]] == [True, True], results[mode]
    digests = {digest for lines in results.values() for _, digest in lines}
    assert len(digests) == 1, results


def test_spawned_workers_are_hooked():
    """nnU-Net runs postprocessing in spawned worker processes: they get the hook too."""
    import multiprocessing

    expression = ("__import__('nnunetv2.postprocessing.remove_connected_components', fromlist=['_'])"
                  ".remove_all_but_largest_component_from_segmentation.__code__.co_filename")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(eval, (expression,)).endswith("nnunet_heart_ext/nnunet/postprocessing.py")
