"""`nnunet-heart report` (issue 34): every number against a direct computation on the phantom, the
flags on constructed cases, the page in a real browser, and the pipeline's report step.

One small phantom (4 training, 4 test cases) serves every test: its test labels, changed on
purpose, are the predictions (one as it is, one without its valve, one with a second myocardium
blob in the air at the border, one with a calcification far from the valve), its training labels
the distribution, and a model folder made here (two folds: validation predictions scored by
nnU-Net's own compute_metrics, nnUNetTrainer's log lines, one run continued from a checkpoint)
the cross-validation section. Direct computations use numpy and scipy.ndimage.label with the
report's 26-connectivity (a 3x3x3 structure), never the report's own code.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import browser

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.io import DatasetError

SEED = 3
N_TRAIN, N_TEST = 4, 4
STRUCTURE_26 = np.ones((3, 3, 3), bool)  # scipy's labelling with the report's connectivity
EPOCH_SECONDS = 90.0                     # the made-up training log's epoch length: 40 epochs an hour


def _read(path: Path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())), image


def _write_like(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path), True)
    return path


def _far_corner(label: np.ndarray, near_end: bool) -> tuple:
    """A 3x3x3 block in the corner of the volume (air, far from the heart)."""
    if near_end:
        return tuple(slice(1, 4) for _ in range(3))
    return tuple(slice(n - 4, n - 1) for n in label.shape)


def _log(path: Path, start: datetime, epochs, seconds: float = EPOCH_SECONDS):
    """Training log lines as nnUNetTrainer.print_to_log_file writes them (numpy 2 reprs included)."""
    lines = ["", "#######################################################################", "Please cite ...", " "]
    t = start
    for e in epochs:
        stamp = lambda dt: f"{t + timedelta(seconds=dt)}: "  # noqa: E731
        lines += [f"{stamp(0)} ", f"{stamp(0)}Epoch {e} ", f"{stamp(0.001)}Current learning rate: 0.01 ",
                  f"{stamp(seconds - 1)}train_loss {round(-0.01 * e, 4)} ", f"{stamp(seconds - 1)}val_loss "
                  f"{round(-0.005 * e, 4)} ", f"{stamp(seconds - 1)}Pseudo dice [np.float32({0.5 + 0.01 * e}), "
                  f"np.float32(0.3), np.float32(nan)] ", f"{stamp(seconds - 1)}Epoch time: {seconds - 1} s "]
        t += timedelta(seconds=seconds)
    path.write_text("\n".join(lines) + "\n")


class _InThreads:
    """Stands in for the `multiprocessing` module of nnU-Net's evaluation: its pool of spawned
    processes (each importing nnU-Net: seconds) becomes a pool of threads; its code is unchanged."""

    @staticmethod
    def get_context(method):
        import multiprocessing.dummy

        return multiprocessing.dummy


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    from nnunet_heart_ext.data.phantom import make_phantom

    patch = pytest.MonkeyPatch()
    patch.setattr(evaluate_predictions, "multiprocessing", _InThreads)
    try:
        return _data(tmp_path_factory, make_phantom, compute_metrics_on_folder_simple)
    finally:
        patch.undo()


def _data(tmp_path_factory, make_phantom, compute_metrics_on_folder_simple):

    root = tmp_path_factory.mktemp("report")
    src = make_phantom(root / "phantom", n_train=N_TRAIN, n_test=N_TEST, seed=SEED)
    truth = {ds.ORGANIZER_LABEL.case(p.name): p for p in sorted((src / "testing_label").iterdir())}
    cases = sorted(truth)
    changed = {cases[0]: "as drawn", cases[1]: "no valve", cases[2]: "second myocardium blob",
               cases[3]: "calcification far from the valve"}
    pred = root / "pred"
    for case in cases:
        label, _, image = _read(truth[case])
        if changed[case] == "no valve":
            label[label == ds.LABELS["aortic_valve"]] = 0
        elif changed[case] == "second myocardium blob":
            label[_far_corner(label, False)] = ds.LABELS["myocardium"]
        elif changed[case] == "calcification far from the valve":
            label[_far_corner(label, True)] = ds.LABELS["calcification"]
        _write_like(label, image, pred / ds.PREDICTION.name(case))
    with zipfile.ZipFile(root / "predict.zip", "w", zipfile.ZIP_STORED) as z:
        for case in cases:
            z.write(pred / ds.PREDICTION.name(case), ds.SUBMISSION.name(case))

    # a model folder: fold 0 validates two training cases, fold 1 the other two; its predictions are
    # the labels, eroded (fold 0) or with the valve dropped in one case (fold 1)
    labels = src / "training_label"
    train = sorted(ds.cases_in(labels, ds.ORGANIZER_LABEL))
    gt = root / "gt_segmentations"
    model = root / "results" / ds.model_folder("HeartTrainer", "HeartPlans", "3d_fullres")
    gt.mkdir()
    for case in train:
        shutil.copy2(labels / ds.ORGANIZER_LABEL.name(case), gt / ds.RAW_LABEL.name(case))
    for fold, val in ((0, train[:2]), (1, train[2:])):
        validation = model / ds.fold_folder(fold) / ds.VALIDATION_FOLDER
        for i, case in enumerate(val):
            label, _, image = _read(gt / ds.RAW_LABEL.name(case))
            if fold == 0:
                label = np.where(ndimage.binary_erosion(label > 0), label, 0)
            elif i == 0:
                label[label == ds.LABELS["aortic_valve"]] = 0
            _write_like(label, image, validation / ds.PREDICTION.name(case))
        ref = root / f"ref{fold}"
        ref.mkdir()
        for case in val:
            os.symlink(gt / ds.RAW_LABEL.name(case), ref / ds.RAW_LABEL.name(case))
        compute_metrics_on_folder_simple(str(ref), str(validation), list(ds.CLASSES),
                                         str(validation / ds.VALIDATION_SUMMARY), num_processes=1)
        summary = json.loads((validation / ds.VALIDATION_SUMMARY).read_text())
        for entry in summary["metric_per_case"]:  # as nnU-Net's validation names them: the gt_segmentations
            entry["reference_file"] = str(gt / Path(entry["reference_file"]).name)
        (validation / ds.VALIDATION_SUMMARY).write_text(json.dumps(summary))
    start = datetime(2026, 3, 1, 8, 0, 0, 123456)
    _log(model / "fold_0" / "training_log_2026_3_1_08_00_00.txt", start, range(0, 6))
    # fold 1 stopped after epoch 3 and continued from its checkpoint of epoch 2 a day later
    _log(model / "fold_1" / "training_log_2026_3_1_08_00_00.txt", start, range(0, 4))
    _log(model / "fold_1" / "training_log_2026_3_2_08_00_00.txt", start + timedelta(days=1), range(2, 6), 60.0)
    (model / "fold_1" / "training_log_2026_3_2_08_00_00.txt").write_text(
        (model / "fold_1" / "training_log_2026_3_2_08_00_00.txt").read_text().replace("train_loss -0.03",
                                                                                      "train_loss 7.5"))
    test_ref = root / "test_ref"  # the demo's score: the predictions against the test ground truth
    test_ref.mkdir()
    for case in cases:
        os.symlink(truth[case], test_ref / ds.PREDICTION.name(case))
    test_dice = root / "test_dice.json"
    compute_metrics_on_folder_simple(str(test_ref), str(pred), list(ds.CLASSES), str(test_dice), num_processes=1)
    return dict(root=root, src=src, pred=pred, zip=root / "predict.zip", cases=cases, changed=changed,
                truth=truth, model=model, gt=gt, train=train, labels=labels, test_dice=test_dice)


@pytest.fixture(scope="module")
def report(data):
    """The report of the phantom: predict.zip, training labels and images, the model folder."""
    from nnunet_heart_ext.report.build import Inputs, make_report

    out = data["root"] / "report"
    src = data["src"]
    page = make_report(Inputs(predictions=data["zip"], images=src / "testing_image", out=out,
                              train_labels=data["labels"],
                              train_images=[src / d for d in ds.ORGANIZER_TRAIN_IMAGE_DIRS], models=[data["model"]],
                              test_summary=data["test_dice"], worst=1, processes=2))
    return dict(page=page, json=json.loads((out / ds.REPORT_JSON).read_text()), out=out)


# ----------------------------------------------------------------------------- numbers
def _direct(label: np.ndarray, spacing, image=None) -> dict:
    """What the report should say, computed here with numpy and scipy."""
    voxel_mm3 = float(np.prod(spacing))
    out = {}
    for k in ds.CLASSES:
        mask = label == k
        out[k] = dict(voxels=int(mask.sum()), volume_ml=mask.sum() * voxel_mm3 / 1000,
                      components=ndimage.label(mask, structure=STRUCTURE_26)[1],
                      mean_hu=float(image[mask].mean()) if image is not None and mask.any() else None)
    out["mass"] = out[1]["volume_ml"] * 1.05
    out["calcium_mm3"] = out[3]["voxels"] * voxel_mm3
    out["at_130"] = int((image[label == 3] >= 130).sum()) if image is not None else None
    out["centre"] = np.argwhere(label == 1).mean(axis=0) if out[1]["voxels"] else (np.array(label.shape) - 1) / 2
    return out


def _nearest_distances(label: np.ndarray, spacing) -> list:
    """Per calcification component, its nearest voxel's distance (mm) to the nearest valve voxel,
    by brute force over voxel centres."""
    valve = np.argwhere(label == 2) * np.asarray(spacing)
    components, n = ndimage.label(label == 3, structure=STRUCTURE_26)
    if not n or not len(valve):
        return []
    out = []
    for i in range(1, n + 1):
        points = np.argwhere(components == i) * np.asarray(spacing)
        out.append(min(np.sqrt(((valve - p) ** 2).sum(axis=1)).min() for p in points))
    return sorted(out, reverse=True)


def _check(m, direct: dict, spacing):
    for c in m.classes:
        d = direct[c.label]
        assert c.voxels == d["voxels"] and c.components == d["components"], (m.case, c)
        assert c.volume_ml == pytest.approx(d["volume_ml"], abs=1e-6)
        if d["mean_hu"] is None:
            assert c.mean_hu is None
        else:
            assert c.mean_hu == pytest.approx(d["mean_hu"], abs=0.01)
    assert m.myocardium_mass_g == pytest.approx(direct["mass"], abs=1e-5)
    assert m.calcium_mm3 == pytest.approx(direct["calcium_mm3"], abs=1e-5)
    assert m.calcium_voxels_at_threshold == direct["at_130"]
    np.testing.assert_allclose(m.centre, direct["centre"], atol=2e-3)
    assert m.spacing == pytest.approx(spacing)


def test_every_measure_matches_a_direct_computation_on_the_phantom(data):
    """Volumes (ml from the spacing), mass (1.05 g/ml), calcium mm3 and voxels >= 130 HU, mean HU,
    26-connected components (scipy), the centre of mass and the calcification-to-valve distances
    (brute force), on every training and test case of the phantom and on the constructed ones."""
    from nnunet_heart_ext.report.measures import LabelMap, measure

    src = data["src"]
    images = {ds.ORGANIZER_IMAGE.case(p.name): p for d in list(ds.ORGANIZER_TRAIN_IMAGE_DIRS) + ["testing_image"]
              for p in (src / d).iterdir()}
    files = [(c, p, images[c]) for c, p in ds.cases_in(data["labels"], ds.ORGANIZER_LABEL).items()]
    files += [(c, data["pred"] / ds.PREDICTION.name(c), images[c]) for c in data["cases"]]
    seen_calcium = seen_components = 0
    for case, path, image_path in files:
        label, spacing, _ = _read(path)
        image = _read(image_path)[0]
        m = measure(case, LabelMap(label, spacing), image)
        _check(m, _direct(label, spacing, image), spacing)
        np.testing.assert_allclose(m.calcium_valve_mm, _nearest_distances(label, spacing), atol=2e-3)
        seen_calcium += m.calcium_mm3 > 0
        seen_components += m.of(1).components > 1
    assert seen_calcium >= 3 and seen_components == 1  # calcified cases, and the second blob


def test_measures_of_made_up_arrays():
    """Edge cases: an empty label map (centre: the image's), one voxel per class, no image."""
    from nnunet_heart_ext.report.measures import LabelMap, bounding_box, measure

    label = np.zeros((5, 6, 7), np.uint8)
    m = measure("empty", LabelMap(label, (2.0, 1.0, 0.5)))
    assert all(c.voxels == 0 and c.components == 0 for c in m.classes) and m.centre == (2.0, 2.5, 3.0)
    assert m.calcium_voxels_at_threshold is None and m.calcium_valve_mm == () and bounding_box(label) is None
    label[1, 1, 1], label[4, 5, 6], label[1, 1, 3], label[3, 3, 3] = 1, 1, 2, 3  # myocardium: corners apart
    m = measure("dots", LabelMap(label, (2.0, 1.0, 0.5)), np.full(label.shape, 129, np.int16))
    assert m.of(1).components == 2 and m.of(1).volume_ml == pytest.approx(2 * 1e-3)
    assert m.calcium_voxels_at_threshold == 0 and m.of(3).mean_hu == 129
    assert m.calcium_valve_mm == pytest.approx((np.sqrt(4 ** 2 + 2 ** 2),), abs=1e-3)  # (2, 2, 0) voxels apart
    label[4, 5, 5] = 1  # touches [4, 5, 6]: still two components; a corner neighbour joins under 26
    label[2, 2, 2] = 1
    assert measure("c", LabelMap(label, (1, 1, 1))).of(1).components == 2


def test_voxels_read_once_are_simpleitks(data, tmp_path):
    """read_voxels_once (SimpleITK's header, ISA-L's inflate) gives SimpleITK's array and geometry;
    a file cut short is a ValueError; a stream of several gzip members still inflates whole."""
    import gzip

    from nnunet_heart_ext.data.io import geometry_of, read_voxels_once
    from nnunet_heart_ext.kernels.gunzip import gunzip

    for path in [data["truth"][data["cases"][0]], data["src"] / "testing_image" /
                 ds.ORGANIZER_IMAGE.name(data["cases"][0])]:
        geometry, array = read_voxels_once(path)
        image = sitk.ReadImage(str(path))
        assert geometry == geometry_of(image) and array.dtype == sitk.GetArrayViewFromImage(image).dtype
        np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(image))
        raw = path.read_bytes()
        cut = tmp_path / path.name
        cut.write_bytes(raw[:len(raw) // 2])
        with pytest.raises(ValueError, match="incomplete or corrupt"):
            read_voxels_once(cut)
        plain = gzip.decompress(raw)
        two = gzip.compress(plain[:1000]) + gzip.compress(plain[1000:])
        assert gunzip(two) == plain and gunzip(raw) == plain


# ----------------------------------------------------------------------------- flags
RULE_OF_CHANGE = {"no valve": "absent", "second myocardium blob": "myocardium",
                  "calcification far from the valve": "calcium", "as drawn": None}


def test_flags_on_constructed_cases(data, report):
    """A class absent, a second myocardium blob, a calcification far from the valve: each flagged
    by its rule and by none of the other two; the case as drawn by none of the three. Flagged cases
    come first."""
    by_case = {t["case"]: {f["rule"] for f in t["flags"]} for t in report["json"]["test"]}
    structural = {"absent", "myocardium", "calcium"}
    for case, why in data["changed"].items():
        expected = {RULE_OF_CHANGE[why]} - {None}
        assert by_case[case] & structural == expected, (case, why, by_case[case])
    tests = report["json"]["test"]
    assert [len(t["flags"]) for t in tests] == sorted((len(t["flags"]) for t in tests), reverse=True)


def test_volume_rule_and_distribution_against_direct_computation(data, report):
    """The training range is min-max over the training labels that hold the class; a test volume
    outside it is flagged, inside it is not."""
    from nnunet_heart_ext.report.flags import TrainingDistribution, flags_of
    from nnunet_heart_ext.report.measures import CaseMeasures

    volumes = {k: [] for k in ds.CLASSES}
    for path in ds.cases_in(data["labels"], ds.ORGANIZER_LABEL).values():
        label, spacing, _ = _read(path)
        for k in ds.CLASSES:
            if (label == k).any():
                volumes[k].append((label == k).sum() * np.prod(spacing) / 1000)
    d = TrainingDistribution.from_json(report["json"]["training_distribution"])
    for k in ds.CLASSES:
        r = d.of_class(k)
        assert r.cases_with == len(volumes[k]) and r.min_ml == pytest.approx(min(volumes[k]), abs=1e-6)
        assert r.max_ml == pytest.approx(max(volumes[k]), abs=1e-6)
    for t in report["json"]["test"]:
        m = CaseMeasures.from_json(t["measures"])
        expected = {k for k in ds.CLASSES if m.of(k).present and not
                    min(volumes[k]) - 1e-9 <= m.of(k).volume_ml <= max(volumes[k]) + 1e-9}
        assert {f.label for f in flags_of(m, d) if f.rule == "volume"} == expected
        assert [f.to_json() for f in flags_of(m, d)] == t["flags"]
    assert d.valve_reach_mm == pytest.approx(max(d.calcium_valve_max_mm, 0) + 5.0)


# ----------------------------------------------------------------------------- the report
def test_report_json_and_page_hold_every_case_with_the_numbers(data, report):
    from nnunet_heart_ext.report.page import TEST_TABLE_ID

    j = report["json"]
    assert sorted(t["case"] for t in j["test"]) == data["cases"]
    for t in j["test"]:
        label, spacing, _ = _read(data["pred"] / ds.PREDICTION.name(t["case"]))
        image = _read(data["src"] / "testing_image" / ds.ORGANIZER_IMAGE.name(t["case"]))[0]
        direct = _direct(label, spacing, image)
        classes = {c["label"]: c for c in t["measures"]["classes"]}
        for k in ds.CLASSES:
            assert classes[k]["voxels"] == direct[k]["voxels"] and classes[k]["components"] == direct[k]["components"]
        assert t["prediction"] == f"{data['zip']}:{ds.SUBMISSION.name(t['case'])}"
    html = report["page"].read_text()
    table = html[html.index(f'id="{TEST_TABLE_ID}"'):]
    table = table[:table.index("</table>")]
    assert table.count('<tr class="case') == len(data["cases"])
    for case in data["cases"]:
        assert f'data-case="{case}"' in table
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert j["constants"] == dict(calcium_hu=130, myocardium_density_g_per_ml=1.05, connectivity=26)
    prov = j["provenance"]
    assert prov["models"][0]["trainer"] == "HeartTrainer" and prov["models"][0]["folds"] == [0, 1]
    assert prov["extension"].startswith(("git ", "nnunet-heart-ext"))


def test_cross_validation_dice_curves_and_worst_cases(data, report):
    """Per fold and case the Dice of nnU-Net's summary.json; the worst case of each fold with its
    picture; the curves from the logs, a continued run's epochs taking the later values; epochs per
    hour from the epochs' start times within each log."""
    cv = {f["fold"]: f for f in report["json"]["cross_validation"]}
    assert sorted(cv) == [0, 1]
    for fold, f in cv.items():
        summary = json.loads((data["model"] / ds.fold_folder(fold) / "validation" / "summary.json").read_text())
        for case, entry in zip(f["cases"], summary["metric_per_case"]):
            for k, dice in zip(ds.CLASSES, case["dice"]):
                expected = entry["metrics"][str(k)]["Dice"]
                assert (dice is None and np.isnan(expected)) or dice == pytest.approx(expected)
    c0, c1 = cv[0]["curve"], cv[1]["curve"]
    assert c0["epochs"] == list(range(6)) and c0["epochs_per_hour"] == pytest.approx(3600 / EPOCH_SECONDS)
    assert c0["pseudo_dice"][3] == pytest.approx((0.53 + 0.3) / 2)  # NaN classes left out of the mean
    assert c1["epochs"] == list(range(6)) and c1["train_loss"][3] == 7.5  # the continued run's epoch 3
    # 3 intervals of 90 s in the first log, 3 of 60 s in the second: the day between them does not count
    assert c1["epochs_per_hour"] == pytest.approx(3600 * 6 / (3 * 90 + 3 * 60))
    worst = report["json"]["worst_validation_cases"]
    assert len(worst) == 2 and {w["fold"] for w in worst} == {0, 1}
    for w in worst:
        scored = [c for c in cv[w["fold"]]["cases"] if any(d is not None for d in c["dice"])]
        lowest = min(scored, key=lambda c: np.mean([d for d in c["dice"] if d is not None]))
        assert w["case"] == lowest["case"]
    assert report["page"].read_text().count('reference above, prediction below">') == len(worst)  # pictures' alt


def test_each_file_is_read_once(data, report, monkeypatch, tmp_path):
    """Every test image, prediction, training label and worst case's file is read once; a second
    report in the same folder takes the training labels' measures from report.json while the files
    are unchanged, and reads a changed one again."""
    from collections import Counter

    from nnunet_heart_ext.report import build

    reads = Counter()
    original = build.read_voxels_once
    monkeypatch.setattr(build, "read_voxels_once", lambda path: reads.update([str(path)]) or original(path))
    out = tmp_path / "again"
    src = data["src"]
    inputs = build.Inputs(predictions=data["pred"], images=src / "testing_image", out=out,
                          train_labels=data["labels"], train_images=[src / d for d in ds.ORGANIZER_TRAIN_IMAGE_DIRS],
                          models=[data["model"]], worst=1, processes=1)
    build.make_report(inputs)
    assert set(reads.values()) == {1}
    assert len(reads) == 2 * N_TEST + N_TRAIN + 3 * 2  # test image + prediction; labels; 2 worst cases x 3 files
    assert json.loads((out / ds.REPORT_JSON).read_text())["training_distribution"] == \
        report["json"]["training_distribution"]
    reads.clear()
    build.make_report(inputs)
    assert not any(str(data["labels"]) in path for path in reads)
    changed = data["labels"] / ds.ORGANIZER_LABEL.name(data["train"][0])
    os.utime(changed)
    reads.clear()
    build.make_report(inputs)
    assert [path for path in reads if str(data["labels"]) in path] == [str(changed)]


def test_bad_input_names_the_file_and_writes_nothing(data, tmp_path):
    from nnunet_heart_ext.report.build import Inputs, make_report

    images = data["src"] / "testing_image"
    pred = Path(shutil.copytree(data["pred"], tmp_path / "pred"))
    missing = pred / ds.PREDICTION.name(data["cases"][0])
    missing.unlink()
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as e:
        make_report(Inputs(predictions=pred, images=images, out=out))
    assert f"no prediction for test image {images / ds.ORGANIZER_IMAGE.name(data['cases'][0])}" in str(e.value)
    label, _, image = _read(pred / ds.PREDICTION.name(data["cases"][1]))
    _write_like(label, image, missing)
    wrong = sitk.GetImageFromArray(label[:-1])  # another grid
    sitk.WriteImage(wrong, str(pred / ds.PREDICTION.name(data["cases"][1])))
    with pytest.raises(DatasetError) as e:
        make_report(Inputs(predictions=pred, images=images, out=out))
    assert f"{pred / ds.PREDICTION.name(data['cases'][1])}: size" in str(e.value)
    assert not out.exists()
    p = subprocess.run([str(Path(sys.executable).parent / "nnunet-heart"), "report", "--pred", str(pred), "--images",
                        str(images), "--out", str(out), "-np", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "nnunet-heart report: error:" in p.stderr and "Traceback" not in p.stderr
    assert f"{pred / ds.PREDICTION.name(data['cases'][1])}: size" in p.stderr and not out.exists()


# ----------------------------------------------------------------------------- in a real browser
def test_the_page_in_a_real_browser(data, report):
    """Chromium opens the page from disk: no console error, every picture decodes, one table row
    per test case."""
    from nnunet_heart_ext.report.page import TEST_TABLE_ID

    if browser.missing():
        pytest.fail(f"the browser test needs {', '.join(browser.missing())}: {browser.INSTALL}")
    with browser.page(report["page"]) as driver:
        assert browser.console_errors(driver) == []
        assert browser.broken_images(driver) == []
        n_images = driver.execute_script("return document.images.length")
        rows = driver.execute_script(f"return Array.from(document.querySelectorAll('#{TEST_TABLE_ID} tbody tr'))"
                                     f".map(r => r.dataset.case)")
        svg = driver.execute_script("return document.querySelectorAll('svg polyline').length")
    assert sorted(rows) == data["cases"]
    assert n_images == len(data["cases"]) + len(report["json"]["worst_validation_cases"])
    assert svg >= 2 * 2 * 2  # two folds, two panels, two lines each


def test_decision_offsets_and_what_they_bought_are_on_the_page(data, tmp_path):
    """Given the heart_decision.json of `nnunet-heart decision`, the page and report.json show the
    offsets and gate chosen and each fold's validation Dice with nnU-Net's argmax and with them,
    the file's own numbers; a file that is no decision is one line naming it, nothing written."""
    from nnunet_heart_ext.data import decision_file
    from nnunet_heart_ext.data.io import DatasetError
    from nnunet_heart_ext.kernels.decision import Choice, Decision, Grid
    from nnunet_heart_ext.report.build import Inputs, make_report

    rng = np.random.default_rng()
    without = {f: [float(v) for v in rng.uniform(0.3, 0.9, 3)] for f in (0, 1)}
    better = {f: [min(1.0, v + float(rng.uniform(0.01, 0.1))) for v in without[f]] for f in (0, 1)}
    offsets = (0.0, 0.0, round(float(rng.uniform(0.1, 1.5)), 2), round(float(rng.uniform(0.1, 3.0)), 2))
    choice = Choice(Decision(offsets, 3, 4.0), without, better, float(np.mean([np.mean(v) for v in without.values()])),
                    float(np.mean([np.mean(v) for v in better.values()])), 42)
    myocardium = sorted(round(float(v), 4) for v in rng.uniform(0.8, 0.99, 2))
    pp = decision_file.Postprocessing((1,), myocardium[0], myocardium[1], "remove_all_but_largest_component_from_"
                                      "segmentation(labels_or_regions=[1, 2, 3])")
    path = decision_file.write(tmp_path / ds.DECISION, choice, [data["model"]], [0, 1],
                               Grid({2: (0.0, offsets[2]), 3: (0.0, offsets[3])}, 3, (0.0, 4.0)), pp)
    assert decision_file.read(path).postprocessing == pp
    src = data["src"]
    out = tmp_path / "report"
    page = make_report(Inputs(predictions=data["zip"], images=src / "testing_image", out=out, models=[data["model"]],
                              decision=path, worst=0, processes=1)).read_text()
    shown = json.loads((out / ds.REPORT_JSON).read_text())["decision"]
    assert shown["offsets"] == list(offsets) and shown["gated_label"] == 3 and shown["gate_mm3"] == 4.0
    assert shown["mean_foreground_dice"]["with_decision"] == pytest.approx(choice.objective_with)
    for f in (0, 1):
        for k, (a, b) in enumerate(zip(without[f], better[f]), start=1):
            assert shown["validation_dice"][str(f)]["nnunet"][str(k)] == pytest.approx(a)
            assert shown["validation_dice"][str(f)]["with_decision"][str(k)] == pytest.approx(b)
            assert f"{a:.4f}" in page and f"{b:.4f}" in page
    assert "id='decision'" in page and f"{offsets[3]:+g}" in page and "kept from 4 mm3" in page
    assert shown["postprocessing"] == dict(keep_largest=[1], myocardium_dice=dict(
        without=myocardium[0], with_keep_largest=myocardium[1]), nnunet_chose=pp.nnunet_chose)
    assert "keep-largest of myocardium" in page and f"{myocardium[1]:.4f} with" in page
    assert "labels_or_regions=[1, 2, 3]" in page
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DatasetError, match="bad.json"):
        make_report(Inputs(predictions=data["zip"], images=src / "testing_image", out=tmp_path / "r2",
                           decision=tmp_path / "bad.json", processes=1))
    assert not (tmp_path / "r2").exists()
