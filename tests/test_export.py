"""`nnunet-heart export`: a flat predict.zip of patientNNNN_predict.nii.gz whose files nnU-Net's own
reader sees on the test images' grids; every bad input of issue 2 part 7 is reported with its file,
no zip (and no partial zip) is written, and the inputs stay byte-identical."""
import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_heart_ext.cli import main
from nnunet_heart_ext.data.export import export
from nnunet_heart_ext.data.io import DatasetError
from nnunet_heart_ext.data.phantom import make_phantom
from nnunet_heart_ext.data.prepare import prepare

TEST_IDS = ("patient0003", "patient0004", "patient0005")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """imagesTs from `prepare`, and a prediction folder laid out like nnUNetv2_predict's output
    (the phantom's test ground truth as the predictions, plus nnU-Net's by-product files)."""
    root = tmp_path_factory.mktemp("export")
    organizer = make_phantom(root / "aicup", n_train=2, n_test=len(TEST_IDS), seed=7)
    dataset = prepare(organizer, raw_root=root / "raw")
    pred = root / "pred"
    pred.mkdir()
    for case in TEST_IDS:
        shutil.copy(organizer / "testing_label" / f"{case}_gt.nii.gz", pred / f"{case}.nii.gz")
    for name in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (pred / name).write_text("{}")
    (pred / "patient0003.npz").write_bytes(b"probabilities")
    return dict(images=dataset / "imagesTs", organizer_images=organizer / "testing_image", pred=pred)


@pytest.fixture
def data(pristine, tmp_path) -> dict:
    """Private copies a test may break, and an earlier predict.zip that must survive failures."""
    out = {key: Path(shutil.copytree(path, tmp_path / key)) for key, path in pristine.items()}
    out["zip"] = tmp_path / "submission" / "predict.zip"
    out["zip"].parent.mkdir()
    out["zip"].write_bytes(b"earlier submission")
    return out


def _digest(*folders: Path) -> dict:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _rewrite(path: Path, array=None, spacing=None, origin=None, direction=None):
    base = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(base) if array is None else array)
    image.SetSpacing(spacing or base.GetSpacing())
    image.SetOrigin(origin or base.GetOrigin())
    image.SetDirection(direction or base.GetDirection())
    sitk.WriteImage(image, str(path))


def _break_missing(d):
    (d["pred"] / "patient0004.nii.gz").unlink()
    return ["pred/patient0004.nii.gz"]


def _break_extra(d):
    shutil.copy(d["pred"] / "patient0003.nii.gz", d["pred"] / "patient0099.nii.gz")
    return ["pred/patient0099.nii.gz"]


def _break_unrecognised_name(d):
    shutil.copy(d["pred"] / "patient0003.nii.gz", d["pred"] / "patient0003_predict.nii.gz")
    return ["pred/patient0003_predict.nii.gz"]


def _break_unreadable(d):
    (d["pred"] / "patient0005.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return ["pred/patient0005.nii.gz"]


def _break_truncated(d):
    path = d["pred"] / "patient0005.nii.gz"
    path.write_bytes(path.read_bytes()[:-40])
    return ["pred/patient0005.nii.gz"]


def _break_size(d):
    path = d["pred"] / "patient0003.nii.gz"
    _rewrite(path, array=sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[:, :-2])
    return ["pred/patient0003.nii.gz"]


def _break_spacing(d):
    path = d["pred"] / "patient0004.nii.gz"
    _rewrite(path, spacing=tuple(s * 0.9 for s in sitk.ReadImage(str(path)).GetSpacing()))
    return ["pred/patient0004.nii.gz"]


def _break_origin(d):
    path = d["pred"] / "patient0004.nii.gz"
    _rewrite(path, origin=tuple(o - 3.0 for o in sitk.ReadImage(str(path)).GetOrigin()))
    return ["pred/patient0004.nii.gz"]


def _break_direction(d):
    _rewrite(d["pred"] / "patient0004.nii.gz", direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0))
    return ["pred/patient0004.nii.gz"]


def _break_label_value(d):
    path = d["pred"] / "patient0005.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[1, 2, 3] = 4
    _rewrite(path, array=array)
    return ["pred/patient0005.nii.gz"]


def _break_4d(d):
    path = d["pred"] / "patient0005.nii.gz"
    volume = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))
    return ["pred/patient0005.nii.gz"]


def _break_second_channel(d):
    shutil.copy(d["images"] / "patient0003_0000.nii.gz", d["images"] / "patient0003_0001.nii.gz")
    return ["images/patient0003_0001.nii.gz"]


def _break_duplicate_test_image(d):
    shutil.copy(d["images"] / "patient0003_0000.nii.gz", d["images"] / "patient0003.nii.gz")
    return ["images/patient0003.nii.gz"]


BREAKS = [_break_missing, _break_extra, _break_unrecognised_name, _break_unreadable, _break_truncated, _break_size,
          _break_spacing, _break_origin, _break_direction, _break_label_value, _break_4d, _break_second_channel,
          _break_duplicate_test_image]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[len("_break_"):])
def test_bad_input_is_reported_with_its_file_and_no_zip_written(breaker, data, capsys):
    bad_files = breaker(data)
    before = _digest(data["pred"], data["images"], data["zip"].parent)
    with pytest.raises(DatasetError) as error:
        export(data["pred"], data["images"], data["zip"])
    for name in bad_files:
        assert str(data["zip"].parent.parent / name) in str(error.value), f"{name} not named in:\n{error.value}"
    assert _digest(data["pred"], data["images"], data["zip"].parent) == before, \
        "inputs and the earlier zip must be untouched, and no temporary file left behind"

    assert main(["export", "--pred", str(data["pred"]), "--images", str(data["images"]),
                 "--out", str(data["zip"])]) == 1
    assert all(str(data["zip"].parent.parent / name) in capsys.readouterr().err for name in bad_files)
    assert _digest(data["pred"], data["images"], data["zip"].parent) == before


def test_all_problems_are_listed_together(data):
    expected = _break_missing(data) + _break_size(data) + _break_label_value(data)
    with pytest.raises(DatasetError) as error:
        export(data["pred"], data["images"], data["zip"])
    assert len(error.value.problems) == len(expected)
    assert all(str(data["zip"].parent.parent / name) in str(error.value) for name in expected)


def test_missing_folders_are_named(data, tmp_path):
    with pytest.raises(DatasetError) as error:
        export(tmp_path / "no_pred", tmp_path / "no_images", data["zip"])
    assert str(tmp_path / "no_pred") in str(error.value) and str(tmp_path / "no_images") in str(error.value)
    assert data["zip"].read_bytes() == b"earlier submission"


@pytest.mark.parametrize("images_key", ["images", "organizer_images"])
def test_zip_is_flat_and_lies_on_the_test_images_grids(data, images_key):
    before = _digest(data["pred"], data[images_key])
    assert main(["export", "--pred", str(data["pred"]), "--images", str(data[images_key]),
                 "--out", str(data["zip"])]) == 0
    assert _digest(data["pred"], data[images_key]) == before
    assert sorted(p.name for p in data["zip"].parent.iterdir()) == ["predict.zip"]  # no temporary left
    unpacked = data["zip"].parent / "unpacked"
    with zipfile.ZipFile(data["zip"]) as zf:
        assert sorted(zf.namelist()) == [f"{case}_predict.nii.gz" for case in TEST_IDS]
        zf.extractall(unpacked)
    rw = SimpleITKIO()
    for case in TEST_IDS:
        exported = unpacked / f"{case}_predict.nii.gz"
        assert exported.read_bytes() == (data["pred"] / f"{case}.nii.gz").read_bytes()
        (image,) = data[images_key].glob(f"{case}*.nii.gz")
        pixels, props = rw.read_images([str(image)])
        seg, seg_props = rw.read_seg(str(exported))
        assert seg.shape == pixels.shape and np.allclose(seg_props["spacing"], props["spacing"])
        for key in ("origin", "direction"):
            assert np.allclose(seg_props["sitk_stuff"][key], props["sitk_stuff"][key])
        assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg == 1).any()


def test_failure_while_zipping_leaves_the_earlier_zip_and_no_partial_file(data, monkeypatch):
    calls = []
    real_write = zipfile.ZipFile.write

    def write_then_fail(self, filename, arcname=None, *args, **kwargs):
        calls.append(arcname)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(self, filename, arcname, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export(data["pred"], data["images"], data["zip"])
    assert calls and data["zip"].read_bytes() == b"earlier submission"
    assert sorted(p.name for p in data["zip"].parent.iterdir()) == ["predict.zip"]
