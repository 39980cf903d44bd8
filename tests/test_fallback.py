"""A fault of the extension's own inference or export code falls back to nnU-Net's own code for
that case (nnunet_heart_ext/nnunet/fallback.py), with a warning naming the error and a count at
the end; NNUNET_HEART_EXT_STRICT=1 (tests/conftest.py sets it for every other test) raises instead;
bad input (NaN logits) raises either way.

Faults are injected by replacing a piece of the fast path with one that raises a RuntimeError
standing in for a driver error, on small random-weight networks (tests/test_predictor.py's), and
what comes out is compared with nnU-Net's own predictor and export, imported from the installed
nnunetv2. Worker processes get the fault through the pool's initializer."""
import multiprocessing
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

import nnunet_heart_ext._hook  # noqa: F401  (installs the hook where the .pth was not processed)
from nnunet_heart_ext.kernels import logits_to_labels
from nnunet_heart_ext.nnunet import fallback, patching, prediction_export, validation
from nnunet_heart_ext.nnunet import predictor as predictor_module
from nnunet_heart_ext.nnunet.predictor import HeartPredictor
from test_predictor import DATASET_JSON, export_setup, predictors

FAULT = "CUDA error: an illegal memory access was encountered (simulated)"


@pytest.fixture
def lenient(monkeypatch):
    """Strict mode off (spawned workers inherit the environment)."""
    monkeypatch.setenv(fallback.STRICT_ENV, "0")


def raise_fault(*args, **kwargs):
    raise RuntimeError(FAULT)


def fault_once(monkeypatch, owner, name):
    """owner.<name> raises the fault on its first call, then works."""
    original = getattr(owner, name)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise_fault()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, broken)
    return calls


def break_kernels():
    """In this process (a pool's initializer in the workers), the export kernels fail."""
    logits_to_labels.resample_argmax = raise_fault
    logits_to_labels.resample_softmax_argmax = raise_fault


def setup_case(seed=0, mirror_axes=None, n_folds=2):
    """nnU-Net's predictor and the extension's (same folds), and one case: network input and the
    properties nnU-Net's preprocessing stores."""
    pm, _, _, _, properties = export_setup("resampled", seed=seed)
    plain, heart = predictors(n_folds, mirror_axes, pm)
    assert type(heart) is HeartPredictor
    shape = properties["shape_after_cropping_and_before_resampling"]
    data = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32))
    return plain, heart, data, properties


# ---------------------------------------------------------------------- network passes
def test_inference_fault_falls_back_to_nnunets_predictor(monkeypatch, lenient, capfd):
    plain, heart, data, _ = setup_case()
    monkeypatch.setattr(HeartPredictor, "_internal_maybe_mirror_and_predict", raise_fault)
    got = heart.predict_logits_from_preprocessed_data(data)
    ref = plain.predict_logits_from_preprocessed_data(data)
    assert got.dtype == ref.dtype == torch.float16  # nnU-Net's own sums, not the extension's float32 ones
    assert torch.equal(got, ref)
    err = capfd.readouterr().err
    assert f"fell back to nnU-Net's own predictor: RuntimeError: {FAULT}" in err
    # nnU-Net's validation calls the sliding window itself: the same fallback there
    got = heart.predict_sliding_window_return_logits(data)
    assert torch.equal(got, plain.predict_sliding_window_return_logits(data))
    assert "RuntimeError" in capfd.readouterr().err


def test_strict_mode_raises_the_fault(monkeypatch):
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    _, heart, data, _ = setup_case()
    monkeypatch.setattr(HeartPredictor, "_internal_maybe_mirror_and_predict", raise_fault)
    with pytest.raises(RuntimeError, match="simulated"):
        heart.predict_logits_from_preprocessed_data(data)
    with pytest.raises(RuntimeError, match="simulated"):
        heart.predict_sliding_window_return_logits(data)


def test_nan_logits_raise_with_strict_mode_off(lenient, tmp_path):
    """Bad input is no fault: NaN weights give NaN logits, which stop the case."""
    _, heart, data, properties = setup_case()
    heart.list_of_parameters[0]["0.weight"][0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        heart.predict_logits_from_preprocessed_data(data)
    pm, cm, lm, logits, properties = export_setup("resampled")
    logits[1, 2, 3, 4] = np.nan
    with pytest.raises(FloatingPointError, match="case_0000.nii.gz"):  # the export names the case
        prediction_export.export_case(logits, properties, plans_manager=pm, configuration_manager=cm,
                                      dataset_json=DATASET_JSON, output_file=str(tmp_path / "case"),
                                      with_probabilities=False)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_does_not_fit_is_no_fault(lenient, capfd):
    _, heart, data, _ = setup_case()
    heart.list_of_parameters[0]["0.weight"] = torch.zeros(2, 1, 3, 3, 3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        heart.predict_logits_from_preprocessed_data(data)
    assert "fell back" not in capfd.readouterr().err


def test_prediction_completes_and_counts_the_case_that_fell_back(monkeypatch, lenient, capfd):
    """predict_from_data_iterator (nnUNetv2_predict's loop) over two cases, the network passes of
    the first failing: that case is nnU-Net's own predictor's logits (exported by the extension),
    the other the extension's; the run ends with the count."""
    plain, heart, data, properties = setup_case(seed=1)
    pm, cm, lm = heart.plans_manager, heart.configuration_manager, heart.label_manager
    other = data.flip(3).contiguous()
    fault_once(monkeypatch, HeartPredictor, "_internal_maybe_mirror_and_predict")
    cases = [{"data": data, "ofile": None, "data_properties": properties},
             {"data": other, "ofile": None, "data_properties": properties}]
    got = heart.predict_from_data_iterator(iter(cases), False, 1)
    first = plain.predict_logits_from_preprocessed_data(data).numpy()
    np.testing.assert_array_equal(got[0], prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        first, pm, cm, lm, properties))
    reference = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(first, pm, cm, lm, properties)
    assert (got[0] == reference).mean() >= 0.999  # nnU-Net's export of nnU-Net's logits
    second = heart.predict_logits_from_preprocessed_data(other).half().numpy()
    np.testing.assert_array_equal(got[1], prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        second, pm, cm, lm, properties))
    err = capfd.readouterr().err
    assert err.count("fell back to nnU-Net's own predictor") == 1 and FAULT in err
    assert "nnunet_heart_ext: 1 of 2 case(s) fell back to nnU-Net's own inference (see the warnings above)" in err


# ---------------------------------------------------------------------- export
@pytest.mark.parametrize("probabilities", [False, True])
def test_export_fault_in_the_worker_falls_back_to_nnunets_export(monkeypatch, lenient, capfd, tmp_path,
                                                                 probabilities):
    pm, cm, lm, logits, properties = export_setup("separate_z", seed=2)
    (tmp_path / "nnunet").mkdir()
    (tmp_path / "heart").mkdir()
    nnunet_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                str(tmp_path / "nnunet" / "case"), probabilities)
    break_kernels_here(monkeypatch)
    outcome = prediction_export.export_case(logits, properties, plans_manager=pm, configuration_manager=cm,
                                            dataset_json=DATASET_JSON, output_file=str(tmp_path / "heart" / "case"),
                                            with_probabilities=probabilities)
    assert outcome.fell_back and outcome.prediction is None
    assert f"case: the extension's export fell back to nnU-Net's own export: RuntimeError: {FAULT}" in \
        capfd.readouterr().err
    assert_same_files(tmp_path / "heart", tmp_path / "nnunet", probabilities)
    # without an output file: nnU-Net's convert function's outputs, as a record
    outcome = prediction_export.export_case(logits, properties, plans_manager=pm, configuration_manager=cm,
                                            dataset_json=DATASET_JSON, output_file=None,
                                            with_probabilities=probabilities)
    ref = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, properties,
                                                                                    probabilities)
    assert outcome.fell_back
    np.testing.assert_array_equal(outcome.prediction.segmentation, ref[0] if probabilities else ref)
    if probabilities:
        np.testing.assert_array_equal(outcome.prediction.probabilities, ref[1])


def break_kernels_here(monkeypatch):
    monkeypatch.setattr(logits_to_labels, "resample_argmax", raise_fault)
    monkeypatch.setattr(logits_to_labels, "resample_softmax_argmax", raise_fault)


def assert_same_files(got_folder, ref_folder, probabilities):
    names = ["case.nii.gz"] + (["case.npz", "case.pkl"] if probabilities else [])
    assert sorted(p.name for p in got_folder.iterdir()) == sorted(names)
    got, ref = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / "case.nii.gz"))) for f in (got_folder, ref_folder))
    np.testing.assert_array_equal(got, ref)
    if probabilities:
        np.testing.assert_array_equal(np.load(got_folder / "case.npz")["probabilities"],
                                      np.load(ref_folder / "case.npz")["probabilities"])


class WorkersWithBrokenKernels:
    """Stands for the multiprocessing module in predictor.py: its pools' workers have broken kernels."""
    TimeoutError = multiprocessing.TimeoutError

    @staticmethod
    def get_context(method):
        context = multiprocessing.get_context(method)
        return types.SimpleNamespace(Pool=lambda n: context.Pool(n, initializer=break_kernels))


def test_export_fault_in_the_worker_pool_is_counted_by_the_prediction(monkeypatch, lenient, capfd, tmp_path):
    """The real worker pool of predict_from_data_iterator: the worker falls back (the logits are
    there) and the parent, which counts, learns it from the worker's outcome."""
    _, heart, data, properties = setup_case(seed=3, n_folds=1)
    pm, cm = heart.plans_manager, heart.configuration_manager
    monkeypatch.setattr(predictor_module, "multiprocessing", WorkersWithBrokenKernels)
    (tmp_path / "heart").mkdir()
    (tmp_path / "nnunet").mkdir()
    ret = heart.predict_from_data_iterator(
        iter([{"data": data, "ofile": str(tmp_path / "heart" / "case"), "data_properties": properties}]), True, 1)
    assert ret == [None]
    logits = heart.predict_logits_from_preprocessed_data(data).half().numpy()
    nnunet_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                str(tmp_path / "nnunet" / "case"), True)
    assert_same_files(tmp_path / "heart", tmp_path / "nnunet", True)
    err = capfd.readouterr().err
    assert f"the extension's export fell back to nnU-Net's own export: RuntimeError: {FAULT}" in err
    assert "nnunet_heart_ext: 1 of 1 case(s) fell back to nnU-Net's own export (see the warnings above)" in err


class LogitsOnTheDevice:
    """Stands for the logits on a GPU (this machine may have none): what `_export` reads of them."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.device = logits, torch.device("cuda")

    def half(self):
        return self.logits.half()


def test_device_export_fault_falls_back_to_nnunets_cpu_export(monkeypatch, lenient, capfd, tmp_path):
    pm, cm, lm, logits, properties = export_setup("resampled", seed=4)
    _, heart, _, _ = setup_case(n_folds=1)
    heart.plans_manager, heart.configuration_manager = pm, cm
    monkeypatch.setattr(prediction_export, "prediction_on_device", raise_fault)
    (tmp_path / "heart").mkdir()
    (tmp_path / "nnunet").mkdir()
    nnunet_export.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON,
                                                str(tmp_path / "nnunet" / "case"), False)
    # workers with broken kernels: had they run the extension's export, they would fall back too
    with fallback.tally() as run, multiprocessing.get_context("spawn").Pool(1, initializer=break_kernels) as pool:
        run.begin("case")
        outcome = heart._export(pool, LogitsOnTheDevice(torch.from_numpy(logits).float()), properties,
                                str(tmp_path / "heart" / "case"), False).get(timeout=300)
    assert not outcome.fell_back, "the worker ran nnU-Net's export at once"
    assert_same_files(tmp_path / "heart", tmp_path / "nnunet", False)
    err = capfd.readouterr().err
    assert f"case: the extension's export on the device fell back to nnU-Net's own export, on the CPU: " \
           f"RuntimeError: {FAULT}" in err
    assert "1 of 1 case(s) fell back to nnU-Net's own export" in err


def test_device_export_fault_raises_in_strict_mode(monkeypatch):
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    pm, cm, lm, logits, properties = export_setup("resampled")
    _, heart, _, _ = setup_case(n_folds=1)
    monkeypatch.setattr(prediction_export, "prediction_on_device", raise_fault)
    with pytest.raises(RuntimeError, match="simulated"):
        heart._export(None, LogitsOnTheDevice(torch.from_numpy(logits)), properties, None, False)


def test_strict_mode_raises_export_faults(monkeypatch, tmp_path):
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    pm, cm, lm, logits, properties = export_setup("resampled")
    break_kernels_here(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        prediction_export.export_case(logits, properties, plans_manager=pm, configuration_manager=cm,
                                      dataset_json=DATASET_JSON, output_file=str(tmp_path / "case"),
                                      with_probabilities=False)


# ---------------------------------------------------------------------- validation
def test_validation_export_falls_back_and_is_counted(monkeypatch, lenient, capfd, tmp_path):
    """The hook's wrapper of nnU-Net's perform_actual_validation, on a stand-in of nnU-Net's trainer
    module: for a trainer class with the marker, the validation's export name is bound to the
    extension's export for the validation (which reports its fallbacks through files, since
    nnU-Net drops its workers' results); other trainers keep nnU-Net's."""
    pm, cm, lm, logits, properties = export_setup("resampled", seed=5)
    module = types.SimpleNamespace(export_prediction_from_logits=nnunet_export.export_prediction_from_logits)
    seen = []

    class Trainer:  # nnU-Net's validation loop, reduced to its export call
        def perform_actual_validation(self, save_probabilities=False):
            seen.append(module.export_prediction_from_logits)
            for case in ("a", "b"):
                module.export_prediction_from_logits(logits, properties, cm, pm, DATASET_JSON, str(tmp_path / case),
                                                     save_probabilities)

    module.nnUNetTrainer = Trainer
    validation.patch_trainer_module(module)
    assert getattr(Trainer.perform_actual_validation, patching.MARK, False)

    class Marked(Trainer):
        nnunet_heart_ext_inference = True

    fault_once(monkeypatch, logits_to_labels, "resample_argmax")
    Marked().perform_actual_validation()
    assert isinstance(seen[-1], prediction_export.ReportingExport)
    assert module.export_prediction_from_logits is nnunet_export.export_prediction_from_logits  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    err = capfd.readouterr().err
    assert "nnunet_heart_ext: 1 of 2 case(s) fell back to nnU-Net's own export (see the warnings above)" in err
    Trainer().perform_actual_validation()
    assert seen[-1] is nnunet_export.export_prediction_from_logits
    assert "fell back" not in capfd.readouterr().err


def test_nnunets_trainer_is_wrapped_by_the_hook():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_heart_ext.trainers import HeartTrainer

    assert getattr(nnUNetTrainer.perform_actual_validation, patching.MARK, False)
    assert "perform_actual_validation" not in vars(HeartTrainer)  # nnU-Net's, through the wrapper
    assert patching.uses_extension_inference(HeartTrainer)
    assert not patching.uses_extension_inference(nnUNetTrainer)
    assert nnUNetPredictor.manual_initialization.__wrapped__ is not nnUNetPredictor.manual_initialization
