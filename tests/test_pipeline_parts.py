"""The pipeline's parts, in-process and without running a command: every path from the layout,
nnU-Net's JSON files read with errors that name the file, a fold's typed state (control flow on
its kind, never on its words), the steps' declared `needs`, and the slots given to the context
when it is built."""
import ast
import io
import json
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline import nnunet_outputs, options
from nnunet_heart_ext.pipeline.checks import Kind, State
from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.options import STEPS, PipelineError, parse
from nnunet_heart_ext.pipeline.steps import STEP_CLASSES, Best, Context, Predict, Train, Validate

PIPELINE = Path(__file__).resolve().parents[1] / "nnunet_heart_ext" / "pipeline"
MODEL = "HeartTrainer_demo__HeartDemoPlans__3d_fullres"


@pytest.fixture
def demo(tmp_path):
    return Context(parse(["--demo", "--folds", "0"], cwd=tmp_path), ["cpu0"])


# ----------------------------------------------------------------------------- layout
def test_layout_owns_every_path(tmp_path):
    o = parse(["--demo", "--folds", "0"], cwd=tmp_path)
    layout = Layout(o)
    work = tmp_path / "nnunet_demo"
    assert layout.work == work and layout.submission == work / options.SUBMISSION
    assert layout.logs == work / options.LOGS and layout.log("plan") == work / "logs" / "plan.log"
    assert layout.job_records == work / "logs" / "jobs.jsonl"
    assert layout.slurm_dir == work / options.SLURM and layout.slurm_records == work / "slurm" / "jobs.json"
    assert layout.slurm_scripts == work / "slurm" / "scripts" and layout.slurm_logs == work / "logs" / "slurm"
    assert layout.test_dice == work / options.TEST_DICE
    assert layout.src == work / options.PHANTOM and layout.test_dir is None

    assert layout.raw.root == work / "nnUNet_raw" / ds.DATASET_NAME
    pre = work / "nnUNet_preprocessed" / ds.DATASET_NAME
    assert layout.preprocessed == pre and layout.plans_file == pre / "HeartDemoPlans.json"
    assert layout.splits_file == pre / ds.SPLITS_JSON and layout.gt_segmentations == pre / ds.GT_SEGMENTATIONS
    assert layout.preprocessed_data("HeartDemoPlans_3d_fullres") == pre / "HeartDemoPlans_3d_fullres"

    res = work / "nnUNet_results" / ds.DATASET_NAME
    assert layout.model_dir("3d_fullres") == res / MODEL
    assert layout.model_dir("2d", "T", "P") == res / "T__P__2d"
    assert layout.trained_plans("3d_fullres") == res / MODEL / "plans.json"
    assert layout.fold_dir("3d_fullres", 2) == res / MODEL / "fold_2"
    assert layout.checkpoint("3d_fullres", 2) == res / MODEL / "fold_2" / "checkpoint_final.pth"
    assert layout.validation_summary("3d_fullres", 2) == res / MODEL / "fold_2" / "validation" / "summary.json"
    assert layout.inference_information == res / ds.INFERENCE_INFORMATION

    one = dict(trainer="T", plans_identifier="P", configuration="3d_fullres")
    two = dict(trainer="T", plans_identifier="P", configuration="2d")
    assert layout.prediction_dir(one) == work / "predictions" / "T_P_3d_fullres"
    assert layout.final_predictions([one]) == layout.prediction_dir(one)
    assert layout.final_predictions([one, two]) == layout.ensemble_dir == work / "predictions" / "ensemble"
    assert layout.postprocessed == work / "predictions" / "postprocessed"

    assert not any(hasattr(o, name) for name in ("logs", "predictions", "slurm_dir", "test_dice")), \
        "the options keep only the user's settings; paths are the layout's"


def test_the_nnunet_folders_follow_the_options(tmp_path):
    o = parse(["--src", str(tmp_path), "--work", str(tmp_path / "w"), "--raw", str(tmp_path / "r"),
               "--results", str(tmp_path / "res"), "--out", str(tmp_path / "sub.zip")], cwd=tmp_path)
    ctx = Context(o, ["0"])
    assert ctx.layout.raw.root == tmp_path / "r" / ds.DATASET_NAME
    assert ctx.layout.inference_information == tmp_path / "res" / ds.DATASET_NAME / ds.INFERENCE_INFORMATION
    assert ctx.layout.submission == tmp_path / "sub.zip"
    env = ctx.env()
    assert env["nnUNet_raw"] == str(tmp_path / "r") and env["nnUNet_results"] == str(tmp_path / "res")
    assert env["nnUNet_preprocessed"] == str(tmp_path / "w" / "nnUNet_preprocessed")


# ----------------------------------------------------------------------------- nnU-Net's JSON files
@pytest.mark.parametrize("reader, content, message", [
    (nnunet_outputs.read_plans, '{"configurations": {"3d', "cannot read the plans"),
    (nnunet_outputs.read_plans, '{"plans_name": "x"}', "not a plans file"),
    (nnunet_outputs.read_splits, '{"train": []}', "not a split"),
    (nnunet_outputs.read_splits, "", "cannot read the split"),
    (nnunet_outputs.read_summary, '[]', "not a metrics summary"),
    (nnunet_outputs.dice_per_class, '{"metric_per_case": []}', "not a metrics summary"),
    (nnunet_outputs.metric_per_case, '{"metric_per_case": [{}], "mean": {}, "foreground_mean": {}}',
     "not a metrics summary"),
    (nnunet_outputs.read_inference_information, '{"folds": [0]}', "not inference information"),
])
def test_a_malformed_nnunet_file_is_named(tmp_path, reader, content, message):
    path = tmp_path / "some.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match=re.escape(f"{path}: {message}" if "cannot" in message else
                                                      f"{path} is {message}")):
        reader(path)


def test_a_missing_nnunet_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match=re.escape(f"{tmp_path / 'none.json'}: cannot read the split")):
        nnunet_outputs.read_splits(tmp_path / "none.json")


def test_the_readers_give_what_the_steps_use(tmp_path):
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "P_3d"},
                                                    "3d_lowres": {"inherits_from": "3d_fullres"}}}))
    p = nnunet_outputs.read_plans(plans)
    assert p.configurations == ["3d_fullres", "3d_lowres"] and p.data_identifier("3d_lowres") == "P_3d"
    with pytest.raises(PipelineError, match=re.escape(f"{plans} is not a plans file")):
        p.data_identifier("2d")
    assert p == nnunet_outputs.read_plans(plans)

    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert nnunet_outputs.validation_cases(splits, 0) == ["b"] and nnunet_outputs.validation_cases(splits, 3) == []

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"metric_per_case": [{"metrics": {"1": {"Dice": 0.5}}}],
                                   "mean": {"1": {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.5}}))
    assert nnunet_outputs.metric_per_case(summary) == [{"1": {"Dice": 0.5}}]
    per_class, mean = nnunet_outputs.dice_per_class(summary)
    assert per_class[1] == 0.5 and np.isnan(per_class[2]) and mean == 0.5


def test_a_broken_inference_information_is_named_by_the_steps_and_status(demo):
    from nnunet_heart_ext.pipeline import report
    from nnunet_heart_ext.pipeline.steps import Postprocess

    info = demo.layout.inference_information
    info.parent.mkdir(parents=True)
    info.write_text('{"best_model_or_ensemble": ')  # cut short
    # the best step wrote it (nnU-Net writes it in place): not done, redone by the next run
    c = Best(demo).check()
    assert not c.done and f"{info} is cut short or not JSON" in c.reason
    for step in (Predict(demo), Postprocess(demo)):  # the steps after it name it
        with pytest.raises(PipelineError, match=re.escape(f"{info}: cannot read the best configuration")):
            step.check()
    rows = report.status([Best(demo), Predict(demo)], out=io.StringIO())
    assert all(not r["done"] and str(info) in r["reason"] for r in rows)


# ----------------------------------------------------------------------------- typed fold states
def _segmentation(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(path))


def _checkpoint(path: Path, epoch: int = 1):
    """A small checkpoint as nnU-Net writes them (torch.save of a dict with weights and state)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {"w": torch.rand(64, 64)}, "current_epoch": epoch, "logging": {}}, path)


def test_train_fold_states_have_kinds(demo):
    train, layout = Train(demo), demo.layout
    assert train.fold_state("3d_fullres", 0) == State(Kind.NOT_STARTED, "not started")
    fold = layout.fold_dir("3d_fullres", 0)
    _checkpoint(fold / ds.CHECKPOINTS[1])
    assert train.fold_state("3d_fullres", 0).kind is Kind.RESUMABLE
    _checkpoint(layout.checkpoint("3d_fullres", 0))
    assert train.fold_state("3d_fullres", 0) == State(Kind.DONE, "trained")
    layout.plans_file.parent.mkdir(parents=True)
    layout.plans_file.write_text('{"configurations": {}}')
    layout.trained_plans("3d_fullres").write_text('{"configurations": {"2d": {}}}')
    state = train.fold_state("3d_fullres", 0)
    assert state.kind is Kind.OTHER_PLANS and not state.done and "other plans" in state.reason
    with pytest.raises(PipelineError, match="Retrain with --force train"):
        list(train.waves(False))
    assert [j.name for j in next(train.waves(True)).items] == ["train_3d_fullres_fold0"]


def test_control_flow_follows_the_kind_not_the_words(demo, monkeypatch):
    train = Train(demo)
    demo.layout.plans_file.parent.mkdir(parents=True)
    demo.layout.plans_file.write_text('{"configurations": {}}')
    monkeypatch.setattr(Train, "fold_state", lambda self, c, f: State(Kind.RESUMABLE, "other plans, in words"))
    assert [j.name for j in next(train.waves(False)).items] == ["train_3d_fullres_fold0"]
    monkeypatch.setattr(Train, "fold_state", lambda self, c, f: State(Kind.OTHER_PLANS, "no such words"))
    with pytest.raises(PipelineError, match="no such words: the data or plans changed"):
        list(train.waves(False))


def test_validate_fold_states_have_kinds(demo):
    validate, layout = Validate(demo), demo.layout
    assert validate.fold_check("3d_fullres", 0).kind is Kind.NOT_TRAINED
    final = layout.checkpoint("3d_fullres", 0)
    _checkpoint(final)
    assert validate.fold_check("3d_fullres", 0).kind is Kind.MISSING
    summary = layout.validation_summary("3d_fullres", 0)
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    os.utime(summary, (time.time() - 100, time.time() - 100))
    assert validate.fold_check("3d_fullres", 0).kind is Kind.STALE
    summary.write_text("{}")
    state = validate.fold_check("3d_fullres", 0)
    assert state.kind is Kind.MISSING and str(layout.splits_file) in state.reason
    layout.splits_file.parent.mkdir(parents=True)
    layout.splits_file.write_text(json.dumps([{"train": ["patient0001"], "val": ["patient0002"]}]))
    state = validate.fold_check("3d_fullres", 0)
    assert state.kind is Kind.INCOMPLETE and "patient0002: missing" in state.reason
    validation = layout.validation_dir("3d_fullres", 0)
    _segmentation(validation / ds.PREDICTION.name("patient0002"))
    np.savez(validation / ds.PROBABILITIES.name("patient0002"), probabilities=np.zeros(2))
    (validation / ds.PROBABILITIES_PROPERTIES.name("patient0002")).write_bytes(pickle.dumps({"spacing": [1, 1, 1]}))
    assert validate.fold_check("3d_fullres", 0) == State(Kind.DONE, "validated")


# ----------------------------------------------------------------------------- needs
def test_needs_name_earlier_steps():
    assert list(STEP_CLASSES) == list(STEPS)
    for name, cls in STEP_CLASSES.items():
        assert cls.name == name and isinstance(cls.needs, tuple)
        for need in cls.needs:
            assert need in STEPS and STEPS.index(need) < STEPS.index(name), (name, need)
    assert STEP_CLASSES["prepare"].needs == ()
    assert all(cls.needs for name, cls in STEP_CLASSES.items() if name != "prepare")


def test_no_step_constructs_another():
    """Paths come from the layout, never from constructing the step that writes them."""
    for path in sorted((PIPELINE / "steps").glob("*.py")):
        calls = {node.func.id for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not calls & {cls.__name__ for cls in STEP_CLASSES.values()}, path.name


# ----------------------------------------------------------------------------- slots
def test_slots_are_given_when_the_context_is_built(tmp_path):
    import dataclasses

    from nnunet_heart_ext.pipeline import launchers, local, slurm_launcher

    o = parse(["--demo", "--parallel", "3"], cwd=tmp_path)
    on_slurm = dataclasses.replace(o, launcher="slurm")
    assert local.resolve_slots(o) == launchers.slots(o) == launchers.slots(on_slurm) == ["cpu0", "cpu1", "cpu2"]
    assert launchers.slots(dataclasses.replace(o, status=True)) == []
    ctx = Context(o, ["a", "b"])
    local.LocalLauncher(ctx)
    slurm_launcher.SlurmLauncher(ctx)
    assert ctx.slots == ["a", "b"], "no launcher changes the context's slots"
    assert launchers.slots(dataclasses.replace(on_slurm, device="cuda")) == ["gpu"]
    jobs = next(Predict(ctx).waves(False, assume=True)).items
    assert [j.argv[j.argv.index("-part_id") + 1] for j in jobs] == ["0", "1"]
    assert all(j.argv[j.argv.index("-num_parts") + 1] == "2" for j in jobs)
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    assert not (isinstance(t, ast.Attribute) and t.attr == "slots"
                                and not (isinstance(t.value, ast.Name) and t.value.id == "self")), path


def test_status_looks_for_no_gpu(tmp_path, monkeypatch, capsys):
    """--status runs nothing: main builds its context without resolving the local slots (as before
    the slots were given at construction, --status never asked torch for GPUs)."""
    from nnunet_heart_ext.pipeline import local, main

    def no_gpu_lookup(*args, **kwargs):
        raise AssertionError("--status resolved the slots")

    monkeypatch.setattr(local, "resolve_slots", no_gpu_lookup)
    assert main(["--src", str(tmp_path), "--work", str(tmp_path / "w"), "--device", "cuda", "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("prepare")
