"""`nnunet-heart phantom`: organizer layout, determinism, geometry and intensities that imitate
contrast cardiac CT (/work/shared/reference/aicup2025-heart.md), read back through nnU-Net's own
SimpleITKIO reader."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_heart_ext.cli import main
from nnunet_heart_ext.data.io import DatasetError
from nnunet_heart_ext.data.phantom import _case_grid, make_phantom

N_TRAIN, N_TEST = 5, 2  # ids 0002 and 0007 are the anisotropic ones


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("phantom") / "aicup", n_train=N_TRAIN, n_test=N_TEST, seed=0)


def _cases(root: Path):
    """(image path, label path) of every case, train and test."""
    out = []
    for label in sorted(root.glob("*_label/patient*_gt.nii.gz")):
        name = label.name.replace("_gt", "")
        (image,) = [p for p in root.glob(f"*_image*/{name}")]
        out.append((image, label))
    return out


def test_layout_and_names(phantom):
    train = sorted(p.name for p in phantom.glob("training_image*/*.nii.gz"))
    assert train == [f"patient{i:04d}.nii.gz" for i in range(1, N_TRAIN + 1)]
    assert all(len(list((phantom / f"training_image{k}").glob("*.nii.gz"))) >= 1 for k in (1, 2, 3))
    assert sorted(p.name for p in (phantom / "training_label").iterdir()) == \
        [f"patient{i:04d}_gt.nii.gz" for i in range(1, N_TRAIN + 1)]
    test_ids = range(N_TRAIN + 1, N_TRAIN + N_TEST + 1)  # continue after the training ids
    assert sorted(p.name for p in (phantom / "testing_image").iterdir()) == [f"patient{i:04d}.nii.gz" for i in test_ids]
    assert sorted(p.name for p in (phantom / "testing_label").iterdir()) == \
        [f"patient{i:04d}_gt.nii.gz" for i in test_ids]


def test_same_seed_same_bytes_other_seed_differs(phantom, tmp_path):
    again = make_phantom(tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    assert _digest(again) == _digest(phantom)
    other = make_phantom(tmp_path / "other", n_train=N_TRAIN, n_test=N_TEST, seed=1)
    a, b = _digest(other), _digest(phantom)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".nii.gz"))


def test_geometry_labels_and_intensities(phantom):
    rw = SimpleITKIO()
    spacings, shapes, calcified = [], set(), 0
    for image_path, label_path in _cases(phantom):
        image, props = rw.read_images([str(image_path)])
        seg, seg_props = rw.read_seg(str(label_path))
        assert image.shape == seg.shape and image.ndim == 4 and image.shape[0] == 1
        assert np.allclose(props["spacing"], seg_props["spacing"])
        for key in ("origin", "direction"):
            assert np.allclose(props["sitk_stuff"][key], seg_props["sitk_stuff"][key])
        image, seg = image[0], seg[0].astype(np.int64)
        counts = np.bincount(seg.ravel(), minlength=4)
        assert counts.size == 4, f"{label_path}: labels outside 0-3"
        voxel_mm3 = float(np.prod(props["spacing"]))
        assert counts[1] > 5000, f"{label_path}: myocardium too small"
        # sizes in mm^3 whatever the spacing: 1-2 mm leaflets and the annulus of a ~2-2.6 cm root,
        # 1-4 calcifications of 4-65 mm^3 each (fewer voxels at a coarse spacing, never inflated)
        assert 300 < counts[2] * voxel_mm3 < 3000, f"{label_path}: valve {counts[2] * voxel_mm3:.0f} mm^3"
        calcified += counts[3] > 0
        if counts[3]:
            assert counts[3] * voxel_mm3 < 4 * 66 * 1.5 and counts[3] < counts[2], \
                f"{label_path}: calcification {counts[3] * voxel_mm3:.0f} mm^3"
            assert np.median(image[seg == 3]) > 600
        # left-ventricle blood pool: inside the myocardium's bounding box, brighter than the muscle;
        # the valve label holds soft-tissue leaflets (with some contrast blood at their edges)
        zz, yy, xx = np.nonzero(seg == 1)
        box = image[zz.min():zz.max() + 1, yy.min():yy.max() + 1, xx.min():xx.max() + 1]
        blood = np.median(box[(box > 250) & (box < 600)])
        assert ((box > 250) & (box < 600)).sum() > counts[1] / 4 and 290 <= blood <= 460
        myo, valve = np.median(image[seg == 1]), np.median(image[seg == 2])
        assert 80 < myo < 170 and 40 < valve < blood - 100
        assert np.median(image[0, :3, :3]) < -950  # air in the corner of the first slice
        assert ((image > -950) & (image < -750)).mean() > 0.01  # lungs
        assert image.dtype == np.float32 and 10 < np.std(image[0, :8, :8]) < 40  # noise on the air
        spacings.append(props["spacing"])  # nnU-Net order (z, y, x)
        shapes.add(image.shape)
    assert 0 < calcified < len(spacings), "calcifications must be in some cases only"
    ratios = [s[0] / s[1] for s in spacings]
    assert max(ratios) > 3, "need an anisotropic case (slice spacing > 3 x in-plane)"
    assert len(shapes) > 2 and len({round(s[1], 3) for s in spacings}) > 2, "shape and spacing must vary"
    assert max(np.prod(s) for s in shapes) < 1.6e6, "default cases must stay small enough for CPU training"


def test_full_size_grid_is_like_the_organizers():
    rng = np.random.default_rng(0)
    for anisotropic in (False, True):
        for _ in range(5):
            shape, spacing = _case_grid(rng, anisotropic, full_size=True)
            assert shape[1:] == (512, 512) and 0.29 <= spacing[1] <= 0.51 and spacing[1] == spacing[2]
            if anisotropic:
                assert spacing[0] > 3 * spacing[1]
            else:
                assert 250 <= shape[0] <= 400 and spacing[0] in (0.4, 0.5)


def test_refuses_foreign_folder_and_rerun_drops_old_cases(tmp_path):
    foreign = tmp_path / "real_data"
    (foreign / "training_image1").mkdir(parents=True)
    (foreign / "training_image1" / "patient0001.nii.gz").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="not made by"):
        make_phantom(foreign, n_train=1, n_test=0)
    assert (foreign / "training_image1" / "patient0001.nii.gz").read_bytes() == b"precious"

    out = make_phantom(tmp_path / "p", n_train=4, n_test=1, seed=3)
    make_phantom(out, n_train=2, n_test=1, seed=3)
    names = sorted(p.name for p in out.rglob("patient*.nii.gz"))
    assert names == ["patient0001.nii.gz", "patient0001_gt.nii.gz", "patient0002.nii.gz", "patient0002_gt.nii.gz",
                     "patient0003.nii.gz", "patient0003_gt.nii.gz"]


def test_cli_matches_api(phantom, tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "cli"), "--train", str(N_TRAIN), "--test", str(N_TEST),
                 "--seed", "0"]) == 0
    assert _digest(tmp_path / "cli") == _digest(phantom)
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--train", "0"]) == 1
    assert "train" in capsys.readouterr().err


def test_phantom_differs_says_when_it_would_write(tmp_path):
    """What the demo asks before writing its phantom (names only, no image read)."""
    from nnunet_heart_ext.data.phantom import phantom_differs

    out = tmp_path / "p"
    assert "holds no phantom" in phantom_differs(out, 2, 1, seed=4)
    make_phantom(out, n_train=2, n_test=1, seed=4)
    assert phantom_differs(out, 2, 1, seed=4) is None
    assert "seed" in phantom_differs(out, 2, 1, seed=5)
    assert phantom_differs(out, 3, 1, seed=4) is not None
    (out / "testing_label" / "patient0003_gt.nii.gz").unlink()
    assert "missing" in phantom_differs(out, 2, 1, seed=4)


@pytest.mark.parametrize("seed, case", [(6, 7), (24, 2)])
def test_a_calcification_smaller_than_a_voxel_still_labels_the_voxel_it_sits_in(seed, case):
    """A 1 mm calcification between two ~4 mm slices covers no voxel centre; before, such a case was
    drawn as calcified (`calcified_training_cases`) yet held no label 3, and the demo could pick a
    fold whose validation had no calcium at all (find_best_configuration then fails). These two cases
    had no calcium voxel; now each calcification marks at least the voxel nearest its centre, bright."""
    from nnunet_heart_ext.data.phantom import _plan, synth_case

    entry = _plan(24, 4, seed)[case]
    assert entry["calcified"] and entry["anisotropic"]
    image, label, spacing = synth_case(np.random.default_rng([seed, case]), entry["anisotropic"], True)
    assert spacing[0] > 3.0
    assert 1 <= (label == 3).sum() <= 4
    assert image[label == 3].min() > image[label == 1].mean() + 150  # brighter than the muscle


def test_draw_case_gives_the_arrays_make_phantom_wrote(phantom):
    """`draw_case` (what benchmarks/phantom_calcium.py reads instead of files) redraws a case exactly:
    the test cases it names calcified hold calcium, the others none, and every array and spacing is
    what make_phantom wrote (read back through nnU-Net's reader)."""
    import SimpleITK as sitk

    from nnunet_heart_ext.data.phantom import calcified_test_cases, calcified_training_cases, draw_case

    calcified = set(calcified_test_cases(N_TRAIN, N_TEST, 0)) | set(calcified_training_cases(N_TRAIN, N_TEST, 0))
    assert calcified_test_cases(N_TRAIN, N_TEST, 0) and all(int(c[-4:]) > N_TRAIN for c in
                                                            calcified_test_cases(N_TRAIN, N_TEST, 0))
    for image_file, label_file in _cases(phantom):
        case = image_file.name[:-len(".nii.gz")]
        image, label, spacing = draw_case(case, N_TRAIN, N_TEST, 0)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
        written_label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        assert np.array_equal(image, written) and np.array_equal(label, written_label)
        assert np.allclose(spacing[::-1], sitk.ReadImage(str(image_file)).GetSpacing())
        assert ((label == 3).any()) == (case in calcified)
    with pytest.raises(KeyError, match="patient0099: not a case"):
        draw_case("patient0099", N_TRAIN, N_TEST, 0)


def test_the_calcium_bound_counts_a_calcification_no_brighter_than_its_surroundings_as_missed():
    """benchmarks/phantom_calcium.py: a blob brighter than everything around it is visible, one as
    bright as the blood beside it is not, and a case's Dice bound is 2v / (1 + v)."""
    from benchmarks.phantom_calcium import calcifications, case_bound, seed_bound

    image = np.full((20, 20, 20), 40.0)
    label = np.zeros(image.shape, np.uint8)
    image[2:5, 2:5, 2:5], label[2:5, 2:5, 2:5] = 900.0, 3        # 27 voxels, bright
    image[12:18, 12:18, 12:18] = 400.0                           # contrast blood
    image[14, 14, 14], label[14, 14, 14] = 390.0, 3              # 1 voxel inside it, dimmer
    rows = sorted(calcifications(image, label), key=lambda r: -r["voxels"])
    assert [(r["voxels"], r["visible"]) for r in rows] == [(27, True), (1, False)]
    assert rows[1]["peak_hu"] == 390.0 and rows[1]["around_hu"] == 400.0
    assert case_bound(rows) == pytest.approx(dict(visible_share=27 / 28, dice_bound=54 / 55))
    bound = seed_bound(41, 24, 4)  # the seed whose test calcification (2 voxels) the image does not show
    assert bound["dice_bound"] == 0.0 and bound["cases"][0]["visible_share"] == 0.0
    assert seed_bound(20, 24, 4)["dice_bound"] == 1.0
