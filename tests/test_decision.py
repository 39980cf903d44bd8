"""Decision offsets and the has-calcium gate (issue 33), chosen on cross-validation.

- Zero offsets and no gate are nnU-Net's decision exactly (its LabelManager's argmax).
- The search's reduced scoring (only the voxels whose label can change kept) equals scoring the
  whole volumes directly, for every setting of a grid, on random cases.
- On constructed probability maps whose best offset and gate are known, the search finds them;
  where nothing beats nnU-Net's decision by the minimum gain, it keeps zeros.
- The postprocessing chosen with it (heart_postprocessing.pkl) never removes the small classes,
  is chosen by nnU-Net's rule for a per-class step, and is a file plain nnU-Net reads and applies.
"""
from dataclasses import replace

import numpy as np
import pytest

from nnunet_heart_ext.kernels.decision import Decision, Grid, labels, objective, reduce_case, score, search


def _softmax(z):
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _random_case(rng, shape=(6, 10, 12), n=4):
    z = rng.normal(0, 2, (n, *shape))
    z[3] -= 3  # a rare class
    probabilities = _softmax(z).astype(np.float32)
    reference = np.argmax(z + rng.normal(0, 1.5, z.shape), axis=0)
    return probabilities, reference


def test_zero_offsets_are_nnunets_argmax():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    rng = np.random.default_rng(0)
    probabilities, _ = _random_case(rng)
    lm = LabelManager({"background": 0, "a": 1, "b": 2, "c": 3}, regions_class_order=None)
    ours = labels(np.log(probabilities), Decision.nnunet(4))
    assert np.array_equal(ours, lm.convert_probabilities_to_segmentation(probabilities))


def _direct_dice(probabilities, reference, decision, voxel_mm3):
    lab = labels(np.log(np.maximum(probabilities, 1e-30)), decision, voxel_mm3)
    out = []
    for c in range(1, probabilities.shape[0]):
        a, b = lab == c, reference == c
        out.append(2 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else np.nan)
    return np.array(out)


def test_reduced_scoring_equals_the_whole_volumes():
    rng = np.random.default_rng(1)
    grid = Grid({2: (0.0, 0.5, 1.5), 3: (0.0, 1.0, 3.0)}, gated=3, gates_mm3=(0.0, 2.0, 40.0))
    raw = [(*_random_case(rng), fold) for fold in (0, 0, 1, 1, 1)]
    cases = [reduce_case(p, r, fold, 0.5, grid.offset_range(4), grid.gated) for p, r, fold in raw]
    assert sum(c.log_p.shape[1] for c in cases) < sum(p[0].size for p, _, _ in raw)  # something was reduced
    for decision in grid.settings(4):
        got = score(cases, decision)
        for fold in (0, 1):
            direct = np.stack([_direct_dice(p, r, decision, 0.5) for p, r, f in raw if f == fold])
            with np.errstate(invalid="ignore"):
                np.testing.assert_allclose(got[fold], np.nanmean(direct, axis=0), rtol=1e-6)


def _case_with_a_faint_small_class(rng, present: bool, shape=(8, 16, 16), noise: int = 20):
    """Background everywhere; a 'myocardium' block; where the reference holds class 3 (present),
    its probability is 0.3 against background's 0.6: argmax misses it, an offset >= log 2 finds it.
    Elsewhere class 3 has scattered voxels at 0.2 against 0.7 (an offset >= log 3.5 adds them)."""
    p = np.zeros((4, *shape), np.float32)
    p[0] = 0.9
    p[1] = 0.05
    p[2] = 0.03
    p[3] = 0.02
    ref = np.zeros(shape, np.int64)
    ref[2:6, 2:8, 2:8] = 1
    p[:, 2:6, 2:8, 2:8] = np.array([0.1, 0.8, 0.05, 0.05])[:, None, None, None]
    if present:
        ref[3:5, 10:12, 10:12] = 3
        p[:, 3:5, 10:12, 10:12] = np.array([0.6, 0.05, 0.05, 0.3])[:, None, None, None]
    background = np.flatnonzero(ref == 0)
    scattered = np.zeros(ref.size, bool)
    scattered[rng.choice(background, noise, replace=False)] = True
    p[:, scattered.reshape(shape)] = np.array([0.7, 0.05, 0.05, 0.2])[:, None]
    return p / p.sum(0, keepdims=True), ref


def test_the_search_finds_a_known_offset_and_gate():
    rng = np.random.default_rng(2)
    grid = Grid({3: (0.0, 0.5, 1.0, 1.5)}, gated=3, gates_mm3=(0.0, 4.0), min_gain=0.002)
    raw = [(*_case_with_a_faint_small_class(rng, present=i % 2 == 0), i % 2) for i in range(6)]
    cases = [reduce_case(p, r, f, 1.0, grid.offset_range(4), grid.gated) for p, r, f in raw]
    choice = search(cases, grid, 4)
    # log(0.6/0.3) = 0.69: the offset 1.0 finds class 3 where it is; log(0.7/0.2) = 1.25 > 1.0 keeps the
    # scattered voxels out (1.5 would add them); the gate changes nothing on validation then, and its ties
    # go to the largest gate up to half the smallest calcification (8 voxels of 1 mm3: 4 mm3)
    assert choice.gate_cap_mm3 == pytest.approx(4.0)
    assert choice.decision == Decision((0.0, 0.0, 0.0, 1.0), 3, 4.0)
    assert search(cases, replace(grid, gate_tie_fraction=0.0), 4).decision == Decision((0.0, 0.0, 0.0, 1.0))
    assert choice.objective_with > choice.objective_without + 0.1
    assert np.isclose(choice.with_decision[0][2], 1.0)  # class 3 found exactly in fold 0's cases

    # class 3 at 0.1 vs 0.6 needs an offset of 2 (> log 6), which also adds the 3 scattered voxels (0.2
    # vs 0.7) of every case: the gate (at least 6 voxels) removes them where there is no class 3 and
    # keeps them beside the 8 true ones
    raw = [(*_case_with_a_faint_small_class(rng, present=i % 2 == 0, noise=3), i % 2) for i in range(6)]
    for p, r, f in raw:
        if (r == 3).any():
            p[:, r == 3] = np.array([0.6, 0.2, 0.1, 0.1])[:, None]
    grid = Grid({3: (0.0, 1.0, 2.0)}, gated=3, gates_mm3=(0.0, 6.0, 100.0))
    cases = [reduce_case(p, r, f, 1.0, grid.offset_range(4), grid.gated) for p, r, f in raw]
    choice = search(cases, grid, 4)
    # 6 mm3 is above the cap (4 mm3): taken because it scores strictly better, not as a tie
    assert choice.gate_cap_mm3 == pytest.approx(4.0)
    assert choice.decision == Decision((0.0, 0.0, 0.0, 2.0), 3, 6.0), choice.decision


def test_the_gates_ties_go_to_the_largest_gate_under_half_the_smallest_calcification():
    """Validation where no gate changes a score (no case has a stray class-3 voxel): the gate goes to
    the largest grid value up to half of the smallest class-3 volume of the validation cases, so a new
    case's stray voxels go while a calcification half the size of the smallest one stays; with no
    class 3 in any validation case (cap 0) ties go to no gate; offsets stay zero without min_gain."""
    rng = np.random.default_rng(5)
    raw = []
    for i, size in enumerate((2, 3, 0, 0)):  # class-3 blocks of 2^3 and 3^3 voxels of 2 mm3, and none
        p, r = _case_with_a_faint_small_class(rng, present=False, noise=0)
        if size:
            r[1:1 + size, 10:10 + size, 10:10 + size] = 3
            p[:, r == 3] = np.array([0.05, 0.05, 0.05, 0.85])[:, None]
        raw.append((p, r, i % 2))
    grid = Grid({3: (0.0, 0.5)}, gated=3, gates_mm3=(0.0, 2.0, 6.0, 8.0, 10.0, 40.0), min_gain=0.002)
    cases = [reduce_case(p, r, f, 2.0, grid.offset_range(4), grid.gated) for p, r, f in raw]
    choice = search(cases, grid, 4)
    assert choice.gate_cap_mm3 == pytest.approx(0.5 * 8 * 2.0)
    assert choice.decision == Decision((0.0, 0.0, 0.0, 0.0), 3, 8.0), choice.decision  # 10 and 40 only tie
    assert choice.objective_with == choice.objective_without
    # a new case: two stray class-3 voxels (4 mm3) go, a 4-voxel calcification (8 mm3) stays
    p, _ = _case_with_a_faint_small_class(rng, present=False, noise=0)
    stray, small = p.copy(), p.copy()
    stray[:, 0, 0, :2] = np.array([0.1, 0.1, 0.1, 0.7])[:, None]
    small[:, 0, 0, :4] = np.array([0.1, 0.1, 0.1, 0.7])[:, None]
    assert not (labels(np.log(stray), choice.decision, 2.0) == 3).any()
    assert (labels(np.log(small), choice.decision, 2.0) == 3).sum() == 4
    # no class 3 in the validation references: nothing to bound the gate by, ties to no gate
    for p, r, _ in raw:
        p[:, r == 3] = np.array([0.85, 0.05, 0.05, 0.05])[:, None]
        r[r == 3] = 0
    cases = [reduce_case(p, r, f, 2.0, grid.offset_range(4), grid.gated) for p, r, f in raw]
    choice = search(cases, grid, 4)
    assert choice.gate_cap_mm3 == 0.0 and not choice.decision.gated


def test_no_gain_keeps_nnunets_decision():
    rng = np.random.default_rng(3)
    raw = [(*_random_case(rng), f) for f in (0, 1)]
    for p, r, f in raw:
        r[...] = np.argmax(p, axis=0)  # nnU-Net's decision is already perfect
    grid = Grid({1: (0.0, 0.3), 2: (0.0, 0.3), 3: (0.0, 0.3)}, gated=3, gates_mm3=(0.0, 1.0))
    cases = [reduce_case(p, r, f, 1.0, grid.offset_range(4), grid.gated) for p, r, f in raw]
    choice = search(cases, grid, 4)
    # zero offsets; the gate (1 mm3, under half of every case's class 3) loses nothing, so it stays
    assert not any(choice.decision.offsets) and choice.decision.gate_mm3 == 1.0
    assert objective(score(cases, choice.decision)) == pytest.approx(1.0)
    assert choice.settings_tried == 16
    assert search(cases, replace(grid, gate_tie_fraction=0.0), 4).decision.is_nnunet


# ----------------------------------------------------------------------------- applied in the export
DECISIONS = [Decision((0.0, 0.0, 0.6, 1.2)), Decision((0.0, 0.3, 0.0, 2.0), 3, 50.0),
             Decision((0.0, 0.0, 0.0, 2.0), 3, 1e6)]  # the last: the gate always closes


@pytest.mark.parametrize("name", ["resampled", "separate_z"])
@pytest.mark.parametrize("d", DECISIONS, ids=["offsets", "offsets_and_gate", "gate_closed"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_the_exports_decision_is_the_decision_on_nnunets_probabilities(name, d, probabilities):
    """Offsets added to the logits before the export's resampling give the decision on nnU-Net's
    resampled probabilities (CPU kernels and the device path alike), the gate counted at the case's
    resolution; the probabilities stay the model's."""
    import torch
    from nnunetv2.inference import export_prediction as nnunet_export
    from test_predictor import export_setup

    from nnunet_heart_ext.nnunet import prediction_export

    pm, cm, lm, logits, properties = export_setup(name, seed=5)
    ref_seg, ref_p = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), pm, cm, lm, properties, True)
    with np.errstate(divide="ignore"):
        expected = labels(np.log(np.asarray(ref_p, np.float64)), d, float(np.prod(properties["spacing"])))
    assert (expected != np.asarray(ref_seg)).mean() > 0.001  # the decision changes something
    for on_device in (False, True):
        if on_device:
            got = prediction_export.prediction_on_device(torch.from_numpy(logits.copy()), pm, cm, lm, properties,
                                                         with_probabilities=probabilities, decision=d)
        else:
            got = prediction_export.convert(logits.copy(), pm, cm, lm, properties, with_probabilities=probabilities,
                                            decision=d).on_host()
        assert got.segmentation.shape == expected.shape and got.segmentation.dtype == np.uint8
        assert (got.segmentation == expected).mean() >= 0.999, (on_device, (got.segmentation == expected).mean())
        if probabilities:
            np.testing.assert_allclose(got.probabilities, np.asarray(ref_p), atol=2e-3)


def test_zero_offsets_change_nothing_in_the_export():
    from test_predictor import export_setup

    from nnunet_heart_ext.nnunet import prediction_export

    pm, cm, lm, logits, properties = export_setup("resampled", seed=6)
    plain = prediction_export.convert(logits.copy(), pm, cm, lm, properties, with_probabilities=False)
    zero = prediction_export.convert(logits.copy(), pm, cm, lm, properties, with_probabilities=False,
                                     decision=Decision((0.0, 0.0, 0.0, 0.0), 3, 0.0))
    np.testing.assert_array_equal(plain.segmentation, zero.segmentation)


# ----------------------------------------------------------------------------- chosen on validation, stored
def _model_folder(tmp_path, rng, folds=(0, 1)):
    """A model folder with validation probabilities (.npz) of faint-class-3 cases, and nnU-Net's
    reference copies in gt_segmentations."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    model = tmp_path / "Dataset100_Heart" / "T__P__3d_fullres"
    gt = tmp_path / "gt_segmentations"
    gt.mkdir(parents=True)
    truth = {}
    k = 1
    for fold in folds:
        validation = model / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True)
        for i in range(3):
            case = f"patient{k:04d}"
            k += 1
            p, ref = _case_with_a_faint_small_class(rng, present=i != 2, noise=3)
            np.savez_compressed(validation / f"{case}.npz", probabilities=p.astype(np.float32))
            props = {"spacing": [1.0, 1.0, 1.0], "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                                              "direction": tuple(np.eye(3).ravel())}}
            SimpleITKIO().write_seg(ref.astype(np.uint8), str(gt / f"{case}.nii.gz"), props)
            truth[case] = ref
    return model, gt


def test_choose_writes_the_decision_beside_postprocessing_and_reads_back(tmp_path):
    import json

    from nnunet_heart_ext.nnunet import decision

    model, gt = _model_folder(tmp_path, np.random.default_rng(7))
    path = decision.choose([model], [0, 1], gt)
    assert path == model / "crossval_results_folds_0_1" / "heart_decision.json"
    content = json.loads(path.read_text())
    from nnunet_heart_ext.data import decision_file

    chosen = decision_file.read(path).decision
    # class 3 at 0.3 against 0.6 needs an offset >= log 2; the 3 scattered voxels (0.2 vs 0.7) join at
    # >= log 3.5, so the grid's 1.0 finds class 3 alone; every gate up to 20 mm3 ties then, and the tie goes
    # to the largest of the grid up to half the smallest calcification (8 voxels of 1 mm3): 2 mm3
    assert chosen == Decision((0.0, 0.0, 0.0, 1.0), 3, 2.0)
    assert content["gate_cap_mm3"] == pytest.approx(4.0) and decision_file.read(path).gate_cap_mm3 == pytest.approx(4.0)
    assert decision.load_for(model, [0, 1]) == chosen and decision.load_for(model, [0]) is None
    for fold in ("0", "1"):
        assert content["validation_dice"][fold]["nnunet"]["3"] == 0.0
        assert content["validation_dice"][fold]["with_decision"]["3"] == pytest.approx(1.0)
    assert content["mean_foreground_dice"]["with_decision"] > content["mean_foreground_dice"]["nnunet"]
    assert "min_gain" in content["grid"] and content["rule"]
    (path.parent / "broken.json").write_text('{"offsets": ')
    with pytest.raises(ValueError, match="broken.json: not a decision file"):
        decision_file.read(path.parent / "broken.json")
    assert decision_file.read(path).describe() == "offsets calcification +1; calcification kept from 2 mm3"
    # the postprocessing chosen with it: the myocardium blocks are predicted whole, so keep-largest
    # changes no Dice and is not chosen (nnU-Net's rule: strictly better); no nnU-Net pkl was there
    pp = decision_file.read(path).postprocessing
    assert pp.keep_largest == () and pp.dice_without == pp.dice_with == pytest.approx(1.0)
    assert pp.nnunet_chose == "" and content["postprocessing"]["file"] == "heart_postprocessing.pkl"
    assert _load_pickle(path.parent / "heart_postprocessing.pkl") == ([], [])
    # the rule's version: this one's is current; files of earlier versions (before the field, read by
    # the fields they hold) say what changed since, which makes the pipeline choose again
    assert content["format"] == decision_file.FORMAT and decision_file.read(path).outdated() is None
    for dropped, version in ((("format",), 3), (("format", "gate_cap_mm3"), 2),
                             (("format", "gate_cap_mm3", "postprocessing"), 1)):
        old = {k: v for k, v in content.items() if k not in dropped}
        (path.parent / "old.json").write_text(json.dumps(old))
        record = decision_file.read(path.parent / "old.json")
        assert record.format == version and record.decision == chosen
        why = record.outdated()
        assert (why is None) == (version == decision_file.FORMAT)
        if why:
            assert why.startswith(f"format {version}, chosen before ")
            assert ("heart_postprocessing.pkl" in why) == (version < 2) and "gate_cap_mm3" in why


def _load_pickle(path):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def test_choose_leaves_nnunets_postprocessing_as_it_was_and_names_it(tmp_path):
    import pickle

    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    from nnunet_heart_ext.data import decision_file
    from nnunet_heart_ext.nnunet import decision

    model, gt = _model_folder(tmp_path, np.random.default_rng(9), folds=(0,))
    nnunet_pkl = decision.crossval_folder(model, [0]) / "postprocessing.pkl"
    nnunet_pkl.parent.mkdir(parents=True)
    with open(nnunet_pkl, "wb") as f:  # what determine_postprocessing writes when the foreground step won
        pickle.dump(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1, 2, 3]}]), f)
    before = nnunet_pkl.read_bytes()
    path = decision.choose([model], [0], gt)
    assert nnunet_pkl.read_bytes() == before
    pp = decision_file.read(path).postprocessing
    assert pp.nnunet_chose == "remove_all_but_largest_component_from_segmentation(labels_or_regions=[1, 2, 3])"
    # a rerun (a second launch, or after a kill) writes the same files again
    first = (path.parent / "heart_postprocessing.pkl").read_bytes()
    decision.choose([model], [0], gt)
    assert (path.parent / "heart_postprocessing.pkl").read_bytes() == first
    assert decision_file.read(path).postprocessing == pp
    assert not [p for p in path.parent.rglob("*") if p.name.startswith(".")]  # no temporary left


# ----------------------------------------------------------------------------- postprocessing chosen with it
def _heart_with_detached_parts(shape=(10, 18, 18)):
    """A myocardium block; a stray myocardium blob; a valve and a calcification that touch neither."""
    seg = np.zeros(shape, np.uint8)
    seg[2:6, 2:8, 2:8] = 1
    seg[0:2, 15:17, 0:2] = 1     # stray myocardium
    seg[7:9, 10:12, 2:4] = 2     # valve, detached
    seg[3:5, 12:14, 12:14] = 3   # calcification, detached
    return seg


def test_heart_postprocessing_never_removes_the_small_classes(tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing, remove_all_but_largest_component_from_segmentation)

    from nnunet_heart_ext.data.decision_file import Postprocessing
    from nnunet_heart_ext.nnunet.decision import write_postprocessing

    nnunets_own = getattr(remove_all_but_largest_component_from_segmentation, "__wrapped__",
                          remove_all_but_largest_component_from_segmentation)
    seg = _heart_with_detached_parts()
    # what went wrong on a demo seed: nnU-Net's foreground step deletes the detached small classes
    foreground = nnunets_own(seg, [1, 2, 3])
    assert not np.any(foreground == 3) and not np.any(foreground == 2)

    pkl = write_postprocessing(tmp_path / "heart_postprocessing.pkl", Postprocessing((1,), 0.8, 0.9))
    fns, kwargs = _load_pickle(pkl)
    assert [f.__module__ for f in fns] == ["nnunetv2.postprocessing.remove_connected_components"]
    out = apply_postprocessing(seg.copy(), fns, kwargs)
    np.testing.assert_array_equal(out, nnunets_own(seg, 1))
    for small in (2, 3):
        np.testing.assert_array_equal(out == small, seg == small)
    assert np.count_nonzero(out == 1) == np.count_nonzero(seg == 1) - 8  # the stray blob (2x2x2), gone

    none = write_postprocessing(tmp_path / "none.pkl", Postprocessing((), 0.9, 0.8))
    fns, kwargs = _load_pickle(none)
    assert (fns, kwargs) == ([], [])
    np.testing.assert_array_equal(apply_postprocessing(seg.copy(), fns, kwargs), seg)


# Where the extension is not installed (it cannot be imported), heart_postprocessing.pkl loads and applies.
PLAIN_APPLY = """
import hashlib, pickle, sys
sys.modules["nnunet_heart_ext"] = None
import numpy as np
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
fns, kwargs = pickle.load(open(sys.argv[1], "rb"))
seg = np.load(sys.argv[2])
print(fns[0].__code__.co_filename, hashlib.sha1(apply_postprocessing(seg, fns, kwargs).tobytes()).hexdigest())
"""


def test_heart_postprocessing_is_read_by_plain_nnunet(tmp_path):
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    from nnunet_heart_ext.data.decision_file import Postprocessing
    from nnunet_heart_ext.nnunet.decision import write_postprocessing

    pkl = write_postprocessing(tmp_path / "heart_postprocessing.pkl", Postprocessing((1,), 0.8, 0.9))
    seg = _heart_with_detached_parts()
    np.save(tmp_path / "seg.npy", seg)
    p = subprocess.run([sys.executable, "-c", PLAIN_APPLY, str(pkl), str(tmp_path / "seg.npy")], capture_output=True,
                       text=True, env=dict(os.environ, NNUNET_HEART_EXT_DISABLE="1"))
    assert p.returncode == 0, p.stderr
    code, digest = p.stdout.split()
    assert Path(code).as_posix().endswith("nnunetv2/postprocessing/remove_connected_components.py")
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    assert digest == hashlib.sha1(remove_all_but_largest_component_from_segmentation(seg, 1).tobytes()).hexdigest()


def _probabilities_of(seg, n=4):
    """Probabilities whose argmax is `seg`."""
    p = np.full((n, *seg.shape), 0.1, np.float32)
    np.put_along_axis(p, seg[None].astype(np.int64), 0.7, axis=0)
    return p / p.sum(0, keepdims=True)


def test_keep_largest_of_the_myocardium_is_chosen_by_nnunets_rule():
    from nnunet_heart_ext.nnunet.decision import choose_postprocessing, keep_largest_case

    predicted = _heart_with_detached_parts()
    p = _probabilities_of(predicted)
    truth_without_blob = predicted.copy()
    truth_without_blob[0:2, 15:17, 0:2] = 0
    stray = keep_largest_case(0, "a", p, truth_without_blob)
    tp, fp = np.count_nonzero(truth_without_blob == 1), 8
    assert stray.dice_without == pytest.approx(2 * tp / (2 * tp + fp)) and stray.dice_with == pytest.approx(1.0)
    real = keep_largest_case(0, "b", p, predicted)  # the second component is real myocardium
    assert real.dice_without == pytest.approx(1.0) and real.dice_with < 1.0
    empty = keep_largest_case(1, "c", _probabilities_of(np.zeros((4, 5, 6), np.uint8)), np.zeros((4, 5, 6), np.uint8))
    assert np.isnan(empty.dice_without) and np.isnan(empty.dice_with)

    assert choose_postprocessing([stray, empty]).keep_largest == (1,)
    assert choose_postprocessing([real, empty]).keep_largest == ()
    assert choose_postprocessing([stray, real]).keep_largest == ((1,) if stray.dice_with + real.dice_with >
                                                                 stray.dice_without + real.dice_without else ())
    assert choose_postprocessing([empty]).keep_largest == ()
    # equal is not better (nnU-Net's strict rule): one myocardium component, nothing to remove
    whole = keep_largest_case(0, "d", _probabilities_of(truth_without_blob), truth_without_blob)
    assert whole.dice_without == whole.dice_with == pytest.approx(1.0)
    assert choose_postprocessing([whole]).keep_largest == ()


def test_the_pipeline_applies_heart_postprocessing_unless_turned_off(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nnunet_heart_ext.pipeline.layout import Layout

    info = SimpleNamespace(postprocessing_file=tmp_path / "postprocessing.pkl")
    assert Layout.postprocessing_file(info) == tmp_path / "postprocessing.pkl"  # none written: nnU-Net's
    (tmp_path / "heart_postprocessing.pkl").write_bytes(b"")
    assert Layout.postprocessing_file(info) == tmp_path / "heart_postprocessing.pkl"
    monkeypatch.setenv("NNUNET_HEART_EXT_DECISION", "0")
    assert Layout.postprocessing_file(info) == tmp_path / "postprocessing.pkl"


def test_the_command_and_its_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model, gt = _model_folder(tmp_path, np.random.default_rng(8), folds=(0,))
    exe = str(Path(sys.executable).parent / "nnunet-heart")
    p = subprocess.run([exe, "decision", "-m", str(model), "-f", "0", "--gt", str(gt)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "decision: offsets calcification +1" in p.stdout
    assert "postprocessing: no keep-largest, the small classes never removed" in p.stdout
    assert "nnU-Net's postprocessing.pkl: not found); apply with nnUNetv2_apply_postprocessing" in p.stdout
    assert (model / "crossval_results_folds_0" / "heart_decision.json").is_file()
    p = subprocess.run([exe, "decision", "-m", str(model), "-f", "0", "1", "--gt", str(gt)], capture_output=True,
                       text=True)
    assert p.returncode == 1 and "fold_1/validation: no validation probabilities" in p.stderr



def test_a_killed_decision_leaves_whole_files_and_the_same_command_finishes(tmp_path):
    """SIGKILL of `nnunet-heart decision` at moments spread over its run (reading the validation,
    searching, writing): it leaves nothing, or whole files (a heart_decision.json only beside a whole
    heart_postprocessing.pkl), never a temporary where nnU-Net's files are; the same command then
    finishes with the bytes of a run never killed, and sweeps what the killed writers left."""
    import json
    import pickle
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from nnunet_heart_ext.data.files import _HOST, PARTIAL_DIR

    model, gt = _model_folder(tmp_path, np.random.default_rng(9))
    out = model / "crossval_results_folds_0_1"
    argv = [str(Path(sys.executable).parent / "nnunet-heart"), "decision", "-m", str(model), "-f", "0", "1",
            "--gt", str(gt)]
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    whole_run = time.monotonic() - started
    expected = {name: (out / name).read_bytes() for name in ("heart_decision.json", "heart_postprocessing.pkl")}
    for f in out.iterdir():
        f.unlink()
    # most of a run is Python's start-up and imports: the kills lean towards its end, where it writes
    for delay in sorted(whole_run * np.random.default_rng(0).uniform(0.5, 1.02, 8)):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        present = {f.name for f in out.iterdir()} if out.is_dir() else set()
        assert present <= {"heart_decision.json", "heart_postprocessing.pkl", PARTIAL_DIR}, present
        if "heart_decision.json" in present:
            json.loads((out / "heart_decision.json").read_text())
            assert "heart_postprocessing.pkl" in present
        if "heart_postprocessing.pkl" in present:
            with open(out / "heart_postprocessing.pkl", "rb") as f:
                pickle.load(f)
    # the writes take milliseconds, so a kill rarely lands inside one: what it would leave is planted
    # (a temporary of a writer that is gone, cut short), and the next run must sweep it
    (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_DIR / f"{_HOST}~{2 ** 22 + 4321}~0badc0de~heart_decision.json").write_text('{"offsets": ')
    subprocess.run(argv, check=True, capture_output=True)
    assert {name: (out / name).read_bytes() for name in expected} == expected
    assert not (out / PARTIAL_DIR).exists()


# ----------------------------------------------------------------------------- read by nnUNetv2_predict
@pytest.mark.slow
def test_nnunet_predict_of_a_heart_trainer_model_applies_the_decision_of_its_folds(tmp_path):
    """A heart_decision.json beside the folds' postprocessing.pkl: nnUNetv2_predict of a HeartTrainer
    model says which decision applies and its labels are that decision on its probabilities; of
    nnU-Net's own trainer's model (same weights), nnU-Net's argmax; with other folds, none applies."""
    import json

    from test_predict_command import labels as read_labels, model_folder, plans, predict

    import SimpleITK as sitk

    images = tmp_path / "imagesTs"
    images.mkdir()
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:20, :30, :28]
    img = 300 * np.sin(z / 3.0) * np.cos(y / 5.0) + 200 * np.sin(x / 4.0) + rng.normal(0, 30, (20, 30, 28))
    image = sitk.GetImageFromArray(img.astype(np.int16))
    image.SetSpacing((0.9, 0.9, 1.2))
    sitk.WriteImage(image, str(images / "case_0000.nii.gz"))
    decision_json = {"offsets": {"1": 0.0, "2": 0.8, "3": 1.5}, "gated_label": 3, "gate_mm3": 0.5}
    heart = model_folder(tmp_path / "results", "HeartTrainer", plans(), folds=(0,))
    plain = model_folder(tmp_path / "results", "nnUNetTrainer", plans(), folds=(0,))
    for m in (heart, plain):
        (m / "crossval_results_folds_0").mkdir()
        (m / "crossval_results_folds_0" / "heart_decision.json").write_text(json.dumps(decision_json))
    out = predict(heart, images, tmp_path / "heart", "--save_probabilities", "--disable_tta", folds=("0",))
    assert "decision: offsets aortic_valve +0.8, calcification +1.5; calcification kept from 0.5 mm3" in out.stdout
    p = np.load(tmp_path / "heart" / "case.npz")["probabilities"]
    with np.errstate(divide="ignore"):
        expected = labels(np.log(p.astype(np.float64)), Decision((0.0, 0.0, 0.8, 1.5), 3, 0.5), 0.9 * 0.9 * 1.2)
    got = read_labels(tmp_path / "heart", "case")
    assert (got == expected).mean() >= 0.999 and (got != np.argmax(p, 0)).mean() > 0.001
    out = predict(plain, images, tmp_path / "plain", "--disable_tta", folds=("0",))
    assert "decision:" not in out.stdout
    assert (read_labels(tmp_path / "plain", "case") == np.argmax(p, 0)).mean() >= 0.99
