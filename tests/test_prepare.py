"""`nnunet-heart prepare`: every bad input of issue 2 part 6 is reported with its file, nothing is
written and the originals stay byte-identical; a good input becomes a raw dataset that nnU-Net's
own file discovery and reader accept; reruns copy only what changed."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_heart_ext.cli import main
from nnunet_heart_ext.data.io import DatasetError
from nnunet_heart_ext.data.phantom import make_phantom
from nnunet_heart_ext.data.prepare import prepare

N_TRAIN, N_TEST = 4, 2  # training_image1: 0001 0002, training_image2: 0003, training_image3: 0004


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("pristine") / "aicup", n_train=N_TRAIN, n_test=N_TEST, seed=5)


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    """A private copy of the organizer folder that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "aicup", symlinks=True))


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "nnUNet_raw"
    path.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(path))
    return path


def _digest(folder: Path) -> dict:
    """Content and metadata of every file: 'unchanged' means neither bytes nor mtime moved."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _rewrite(path: Path, array=None, spacing=None, origin=None, direction=None, like: Path = None):
    """Replace a NIfTI file by one with changed voxels or geometry (starting from `like` or itself)."""
    base = sitk.ReadImage(str(like or path))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(base) if array is None else array)
    image.SetSpacing(spacing or base.GetSpacing())
    image.SetOrigin(origin or base.GetOrigin())
    image.SetDirection(direction or base.GetDirection())
    sitk.WriteImage(image, str(path))


def _break_unreadable(src):
    (src / "training_image1" / "patient0001.nii.gz").write_bytes(b"not a nifti file")
    return ["training_image1/patient0001.nii.gz"]


def _break_truncated(src):
    path = src / "training_label" / "patient0002_gt.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header fine, voxels cut off
    return ["training_label/patient0002_gt.nii.gz"]


def _break_2d(src):
    _rewrite(src / "training_image2" / "patient0003.nii.gz", array=np.zeros((20, 30), np.int16),
             spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    return ["training_image2/patient0003.nii.gz"]


def _break_4d(src):
    path = src / "training_image2" / "patient0003.nii.gz"
    volume = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))
    return ["training_image2/patient0003.nii.gz"]


def _break_two_channels(src):
    path = src / "testing_image" / "patient0005.nii.gz"
    volume = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.Compose(volume, volume), str(path))
    return ["testing_image/patient0005.nii.gz"]


def _break_size(src):
    label = src / "training_label" / "patient0004_gt.nii.gz"
    _rewrite(label, array=sitk.GetArrayFromImage(sitk.ReadImage(str(label)))[:-1])
    return ["training_label/patient0004_gt.nii.gz"]


def _break_spacing(src):
    label = src / "training_label" / "patient0001_gt.nii.gz"
    _rewrite(label, spacing=tuple(s * 1.1 for s in sitk.ReadImage(str(label)).GetSpacing()))
    return ["training_label/patient0001_gt.nii.gz"]


def _break_origin(src):
    label = src / "training_label" / "patient0001_gt.nii.gz"
    _rewrite(label, origin=tuple(o + 5.0 for o in sitk.ReadImage(str(label)).GetOrigin()))
    return ["training_label/patient0001_gt.nii.gz"]


def _break_direction(src):
    _rewrite(src / "training_label" / "patient0001_gt.nii.gz", direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return ["training_label/patient0001_gt.nii.gz"]


def _break_label_value(src):
    label = src / "training_label" / "patient0003_gt.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    array[0, 0, :3] = 5
    _rewrite(label, array=array)
    return ["training_label/patient0003_gt.nii.gz"]


def _break_fractional_label(src):
    label = src / "training_label" / "patient0003_gt.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label))).astype(np.float32)
    array[0, 0, 0] = 1.5
    _rewrite(label, array=array)
    return ["training_label/patient0003_gt.nii.gz"]


def _break_duplicate_id(src):
    shutil.copy(src / "training_image1" / "patient0001.nii.gz", src / "training_image3" / "patient0001.nii.gz")
    return ["training_image3/patient0001.nii.gz", "training_image1/patient0001.nii.gz"]


def _break_test_reuses_training_id(src):
    shutil.copy(src / "training_image1" / "patient0002.nii.gz", src / "testing_image" / "patient0002.nii.gz")
    return ["testing_image/patient0002.nii.gz"]


def _break_label_without_image(src):
    os.remove(src / "training_image3" / "patient0004.nii.gz")
    return ["training_label/patient0004_gt.nii.gz"]


def _break_image_without_label(src):
    os.remove(src / "training_label" / "patient0002_gt.nii.gz")
    return ["training_image1/patient0002.nii.gz"]


def _break_unrecognised_names(src):
    os.rename(src / "training_image1" / "patient0001.nii.gz", src / "training_image1" / "patient1.nii.gz")
    (src / "training_label" / "notes.txt").write_text("x")
    (src / "testing_image" / "patient0005.nii").write_bytes(b"")
    return ["training_image1/patient1.nii.gz", "training_label/notes.txt", "testing_image/patient0005.nii"]


def _break_nan_image(src):
    image = src / "training_image2" / "patient0003.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    array[2, 3, 4] = np.nan
    _rewrite(image, array=array)
    return ["training_image2/patient0003.nii.gz"]


def _break_infinite_image(src):
    image = src / "training_image1" / "patient0002.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    array[0, 0, 0] = np.inf
    _rewrite(image, array=array)
    return ["training_image1/patient0002.nii.gz"]


def _break_nan_label(src):
    label = src / "training_label" / "patient0004_gt.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label))).astype(np.float32)
    array[1, 1, 1] = np.nan
    _rewrite(label, array=array)
    return ["training_label/patient0004_gt.nii.gz"]


def _break_nan_test_image(src):
    image = src / "testing_image" / "patient0006.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    array[0, 5, 5] = np.nan
    _rewrite(image, array=array)
    return ["testing_image/patient0006.nii.gz"]


def _break_spacing_slightly(src):
    """Beyond np.allclose's rtol 1e-5, the tolerance of nnU-Net's own check (a header rounding
    error is far below it)."""
    label = src / "training_label" / "patient0002_gt.nii.gz"
    _rewrite(label, spacing=tuple(s * (1 + 5e-5) for s in sitk.ReadImage(str(label)).GetSpacing()))
    return ["training_label/patient0002_gt.nii.gz"]


BREAKS = [_break_nan_image, _break_infinite_image, _break_nan_label, _break_nan_test_image, _break_spacing_slightly,
          _break_unreadable, _break_truncated, _break_2d, _break_4d, _break_two_channels, _break_size, _break_spacing,
          _break_origin, _break_direction, _break_label_value, _break_fractional_label, _break_duplicate_id,
          _break_test_reuses_training_id, _break_label_without_image, _break_image_without_label,
          _break_unrecognised_names]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[len("_break_"):])
def test_bad_input_is_reported_with_its_file_and_nothing_written(breaker, src, raw, capsys):
    bad_files = breaker(src)
    before = _digest(src)
    with pytest.raises(DatasetError) as error:
        prepare(src)
    message = str(error.value)
    for name in bad_files:
        assert str(src / name) in message, f"{name} not named in:\n{message}"
    assert all(str(src) in p or "nnUNet_raw" in p for p in error.value.problems)
    assert list(raw.iterdir()) == [], "nothing may be written when the input is invalid"
    assert _digest(src) == before, "the originals must not change"

    # the command line prints the same problems and exits non-zero
    assert main(["prepare", "--src", str(src)]) == 1
    err = capsys.readouterr().err
    assert all(str(src / name) in err for name in bad_files)
    assert list(raw.iterdir()) == [] and _digest(src) == before


def test_all_problems_are_listed_together(src, raw):
    expected = _break_spacing(src) + _break_label_value(src) + _break_unrecognised_names(src)
    with pytest.raises(DatasetError) as error:
        prepare(src)
    assert len(error.value.problems) == len(expected)
    assert all(str(src / name) in str(error.value) for name in expected)


def test_missing_raw_root_and_test_dir(src, monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DatasetError, match="nnUNet_raw"):
        prepare(src)
    with pytest.raises(DatasetError, match="does not exist") as error:
        prepare(src, raw_root=tmp_path / "raw", test_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert not (tmp_path / "raw").exists()


def test_good_input_becomes_an_nnunet_raw_dataset(src, raw):
    before = _digest(src)
    out = prepare(src)
    assert out == raw / "Dataset100_Heart"
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}
    assert dataset["numTraining"] == N_TRAIN

    # nnU-Net's own discovery pairs each image with its label under the organizer's case id
    found = get_filenames_of_train_images_and_targets(str(out), dataset)
    assert sorted(found) == [f"patient{i:04d}" for i in range(1, N_TRAIN + 1)]
    for case, entry in found.items():
        (image,) = entry["images"]
        (original,) = src.glob(f"training_image*/{case}.nii.gz")
        assert Path(image).read_bytes() == original.read_bytes()
        assert Path(entry["label"]).read_bytes() == (src / "training_label" / f"{case}_gt.nii.gz").read_bytes()
        data, props = SimpleITKIO().read_images([image])
        seg, seg_props = SimpleITKIO().read_seg(entry["label"])
        assert data.shape == seg.shape and np.allclose(props["spacing"], seg_props["spacing"])
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == \
        [f"patient{i:04d}_0000.nii.gz" for i in range(N_TRAIN + 1, N_TRAIN + N_TEST + 1)]
    assert _digest(src) == before


def test_rerun_copies_only_what_changed_and_drops_removed_cases(src, raw, capsys):
    out = prepare(src)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    capsys.readouterr()
    prepare(src)
    assert "0 file(s) copied" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == stamps

    _break_origin(src)  # a source file changed (origin shift applied to image and label keeps them aligned)
    _rewrite(src / "training_image1" / "patient0001.nii.gz",
             origin=sitk.ReadImage(str(src / "training_label" / "patient0001_gt.nii.gz")).GetOrigin())
    os.remove(src / "testing_image" / "patient0006.nii.gz")
    prepare(src)
    log = capsys.readouterr().out
    assert "2 file(s) copied" in log and "1 stale removed" in log
    assert (out / "labelsTr" / "patient0001.nii.gz").read_bytes() == \
        (src / "training_label" / "patient0001_gt.nii.gz").read_bytes()
    assert not (out / "imagesTs" / "patient0006_0000.nii.gz").exists()
    assert (out / "labelsTr" / "patient0002.nii.gz").stat().st_mtime_ns == stamps["patient0002.nii.gz"]


def test_link_mode_and_test_dir_elsewhere(src, raw, tmp_path):
    elsewhere = tmp_path / "my_tests"
    shutil.move(src / "testing_image", elsewhere)
    (elsewhere / "patient0005_gt.nii.gz").write_bytes(b"ignored ground truth")
    before = _digest(src)
    assert main(["prepare", "--src", str(src), "--test-dir", str(elsewhere), "--link"]) == 0
    out = raw / "Dataset100_Heart"
    for link in list((out / "imagesTr").iterdir()) + list((out / "imagesTs").iterdir()):
        assert link.is_symlink() and link.resolve().parent.parent in (src, tmp_path)
    assert (out / "imagesTs" / "patient0006_0000.nii.gz").resolve() == elsewhere / "patient0006.nii.gz"
    assert _digest(src) == before
    prepare(src, test_dir=elsewhere)  # back to copies: links are replaced, originals untouched
    assert not any(p.is_symlink() for p in out.rglob("*.nii.gz"))
    assert _digest(src) == before


@pytest.mark.parametrize("name", ["test_images", "imagesTs"])
def test_test_folder_found_under_other_names(src, raw, name):
    os.rename(src / "testing_image", src / name)
    out = prepare(src)
    assert len(list((out / "imagesTs").iterdir())) == N_TEST


def test_dataset_folder_made_by_hand_is_left_alone(src, raw):
    handmade = raw / "Dataset100_Heart" / "imagesTr"
    handmade.mkdir(parents=True)
    (handmade / "patient0001_0000.nii.gz").write_bytes(b"renamed in place by the seed's script")
    (handmade / "patient0077_0000.nii.gz").write_bytes(b"a case not in the source")
    before = _digest(raw)
    with pytest.raises(DatasetError, match="not made by") as error:
        prepare(src)
    assert str(raw / "Dataset100_Heart") in str(error.value)
    assert _digest(raw) == before and len(before) == 2


# What nnU-Net's `--verify_dataset_integrity` refuses (its check_cases / verify_labels, called here on
# the broken organizer files), prepare refuses too, naming the file. (NaN is not among them here:
# SimpleITK's NIfTI reader, which nnU-Net's check reads through, turns NaN voxels into 0; prepare
# reads the stored values and refuses them, see BREAKS.)
NNUNET_REFUSES = [_break_size, _break_spacing, _break_spacing_slightly, _break_label_value, _break_fractional_label]


@pytest.mark.parametrize("breaker", NNUNET_REFUSES, ids=lambda f: f.__name__[len("_break_"):])
def test_refuses_at_least_what_nnunet_verify_dataset_integrity_refuses(breaker, src, raw, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels

    (bad,) = breaker(src)
    case = Path(bad).name.split(".")[0].replace("_gt", "")
    (image,) = src.glob(f"training_image*/{case}.nii.gz")
    label = src / "training_label" / f"{case}_gt.nii.gz"
    nnunet_ok = check_cases([str(image)], str(label), 1, SimpleITKIO) and \
        verify_labels(str(label), SimpleITKIO, [0, 1, 2, 3])
    assert not nnunet_ok, "the break must be one that nnU-Net's own check refuses"
    assert "rror" in capsys.readouterr().out  # nnU-Net printed why
    with pytest.raises(DatasetError) as error:
        prepare(src)
    assert str(src / bad) in str(error.value)
    assert list(raw.iterdir()) == []


def test_nan_and_infinite_voxels_are_named_as_such(src, raw):
    _break_nan_image(src)
    _break_infinite_image(src)
    with pytest.raises(DatasetError) as error:
        prepare(src)
    lines = {p.split(": ", 1)[0]: p for p in error.value.problems}
    assert "1 NaN voxel value(s)" in lines[str(src / "training_image2" / "patient0003.nii.gz")]
    assert "1 infinite voxel value(s)" in lines[str(src / "training_image1" / "patient0002.nii.gz")]


def test_pending_says_whether_a_rerun_would_change_anything(src, raw):
    """What the pipeline asks before running prepare: file names and metadata only."""
    from nnunet_heart_ext.data.prepare import pending

    assert "not written by prepare" in pending(src)
    prepare(src)
    assert pending(src) is None
    shutil.copy(src / "testing_label" / "patient0005_gt.nii.gz", src / "testing_image")  # ignored by prepare
    assert pending(src) is None
    os.utime(src / "training_label" / "patient0001_gt.nii.gz", (1, 1))  # a source changed
    assert "differ from their originals" in pending(src)
    prepare(src)
    os.remove(src / "testing_image" / "patient0006.nii.gz")  # a test case dropped
    assert "holds other cases" in pending(src)
    (src / "training_label" / "stray.txt").write_text("x")
    assert "problems" in pending(src) and "stray.txt" in pending(src)
