"""nnU-Net's prediction export (logits -> label map file, optionally probabilities) on the kernels.

`export_prediction_from_logits` and `convert_predicted_logits_to_segmentation_with_correct_shape`
have the signatures of nnunetv2.inference.export_prediction's and give the same outputs; HeartTrainer
models use them (nnunet_heart_ext/nnunet/predictor.py for nnUNetv2_predict,
nnunet_heart_ext/nnunet/validation.py for the validation). nnU-Net's own models never reach this
module.

One record. A case's prediction is a `Prediction` (the label map, the probabilities or None) at the
case's original shape and axis order, from the moment it is computed (`convert` on the host,
`prediction_on_device` on the GPU) until it is written (`write_prediction`) or handed back. nnU-Net's
flag-dependent return shapes (an array, or a (label map, probabilities) pair) are made only by the
functions that keep nnU-Net's signatures (`nnunet_return`). The transpose back to the original axis
order is `_in_original_axes`, for arrays and tensors alike; NaN logits are refused by `_refuse_nan`.

What differs from nnU-Net's export (`convert_predicted_logits_to_segmentation_with_correct_shape`):
- Without probabilities, the logits are resampled and arg-maxed in one Numba pass
  (kernels/logits_to_labels.py) straight into the crop of the full-size label map: nnU-Net
  resamples all C channels to a float array first (skimage, float64), then arg-maxes.
- With probabilities, the same pass also writes the softmax of the resampled logits straight into
  the uncropped probability volume (kernels/logits_to_labels.resample_softmax_argmax), and the
  `.npz` is written by the threaded writer (data/npz_file.py over kernels/npz.py): the same file
  np.load reads, written >= 10x faster than np.savez_compressed (benchmarks/RESULTS.md).
- On a GPU (`prediction_on_device`), the predictor resamples, arg-maxes and reverts the crop on the
  device and hands the uint8 map (and the probabilities, when asked) to the export worker.
This path applies when the plans resample probabilities with nnU-Net's default function or the
extension's Numba one, with order 1 (what every nnU-Net planner writes) and the labels are not
regions; anything else goes to nnU-Net's own function, unchanged.

Faults (issue 31, nnunet_heart_ext/nnunet/fallback.py): `export_case` and `write_case`, what the
export workers run, fall back to nnU-Net's own export of the case (in the worker, where the logits
are) when the extension's code raises, and say so in their `ExportOutcome`.

Output files are written atomically: under a hidden temporary name beside them that ends like them
(nnunet_heart_ext.data.files.replace_atomically, what the project's other writers use), then moved into
place; the .npz likewise (data/npz_file.py). NaN logits raise FloatingPointError naming the case
instead of writing an arbitrary label map.
"""
import os
import uuid
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union, overload

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_pickle
from nnunetv2.configuration import ANISO_THRESHOLD, default_num_processes
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

from nnunet_heart_ext.data import npz_file
from nnunet_heart_ext.data.files import replace_atomically
from nnunet_heart_ext.kernels import logits_to_labels
from nnunet_heart_ext.kernels.decision import NEG, Decision, labels as decided_labels
from nnunet_heart_ext.nnunet import fallback
from nnunet_heart_ext.nnunet.resampling import numba_threads

Array = Union[np.ndarray, torch.Tensor]


@dataclass
class Prediction:
    """One case's prediction at its original shape and axis order: the label map and, when asked
    for, the class probabilities (C, *label map's shape). numpy arrays, or tensors on the device
    that computed them (`on_host`)."""
    segmentation: Array
    probabilities: Optional[Array] = None

    def on_host(self) -> "Prediction":
        """numpy arrays (a label map computed as int32 on the device becomes uint16, nnU-Net's)."""
        segmentation, probabilities = self.segmentation, self.probabilities
        if isinstance(segmentation, torch.Tensor):
            segmentation = segmentation.cpu().numpy()
            if segmentation.dtype != np.uint8:
                segmentation = segmentation.astype(np.uint16)
        if isinstance(probabilities, torch.Tensor):
            probabilities = probabilities.cpu().numpy()
        return Prediction(segmentation, probabilities)

    @classmethod
    def from_nnunet(cls, returned, with_probabilities: bool) -> "Prediction":
        """The record of what nnU-Net's convert function returned."""
        return cls(*returned) if with_probabilities else cls(returned)


# resampling functions whose order-1 maths the kernels compute exactly (names as plans store them)
FUSABLE_RESAMPLING = ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_shape_numba")


def fused_resampling(plans_manager, configuration_manager, label_manager, properties: dict):
    """(separate_axis, order_z) of the export resampling of this case when the kernels compute it
    (plans resampling probabilities with a fusable function at order 1, no regions), else None."""
    config = configuration_manager.configuration
    kwargs = config.get("resampling_fn_probabilities_kwargs", {}) or {}
    if config.get("resampling_fn_probabilities") not in FUSABLE_RESAMPLING or label_manager.has_regions:
        return None
    if kwargs.get("is_seg", False) or kwargs.get("order", 3) != 1 or kwargs.get("order_z", 0) not in (0, 1):
        return None
    current, target = _spacings(plans_manager, configuration_manager, properties)
    do_separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), current, target,
                                                    kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
    return (axis if do_separate else None), int(kwargs.get("order_z", 0))


def _spacings(plans_manager, configuration_manager, properties):
    # nnU-Net's export: the configuration's spacing (with the case's first axis for 2d) -> the case's
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing \
        if len(configuration_manager.spacing) == len(properties["shape_after_cropping_and_before_resampling"]) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    return current, spacing_transposed


def _label_dtype(label_manager):
    return np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16


def _crop(bbox):
    return tuple(slice(int(a), int(b)) for a, b in bbox)


def _refuse_nan(count: int, properties: dict):
    if count:
        raise FloatingPointError(f"nnunet_heart_ext: {count} NaN values in the predicted logits of "
                                 f"{_case_name(properties)}: no label map written (check the input image and "
                                 "the checkpoint)")


def _case_name(properties: dict) -> str:
    files = properties.get("list_of_data_files") or []
    return str(files[0]) if files else "this case"


def _in_original_axes(segmentation: Array, probabilities: Optional[Array], plans_manager) -> Prediction:
    """The record of a label map (and probabilities) in nnU-Net's preprocessed axis order, in the
    case's own (transpose_backward; views, for arrays and tensors alike)."""
    back = [int(i) for i in plans_manager.transpose_backward]

    def permute(x, order):
        return x.permute(*order) if isinstance(x, torch.Tensor) else x.transpose(order)

    return Prediction(permute(segmentation, back),
                      None if probabilities is None else permute(probabilities, [0] + [i + 1 for i in back]))


@overload
def nnunet_return(prediction: Prediction, return_probabilities: Literal[False]) -> np.ndarray: ...


@overload
def nnunet_return(prediction: Prediction, return_probabilities: Literal[True]) -> Tuple[np.ndarray, np.ndarray]: ...


def nnunet_return(prediction: Prediction, return_probabilities: bool):
    """nnU-Net's convert function's return: the label map, or (label map, probabilities)."""
    prediction = prediction.on_host()
    return (prediction.segmentation, prediction.probabilities) if return_probabilities else prediction.segmentation


# ---------------------------------------------------------------------- the decision (decision.py)
def _applies(decision: Optional[Decision]) -> bool:
    return decision is not None and not decision.is_nnunet


def _voxel_mm3(properties: dict) -> float:
    return float(np.prod(properties["spacing"]))


def _gated_off(segmentation: Array, decision: Decision, properties: dict) -> bool:
    """Whether the case loses the gated label: its voxels add up to less than the gate's volume."""
    if decision.gated is None or decision.gate_mm3 <= 0:
        return False
    count = int((segmentation == decision.gated).sum())
    return count * _voxel_mm3(properties) < decision.gate_mm3


def _column(values, like: Array):
    """Per-class values shaped to broadcast over (C, ...) `like`, in float32."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    if isinstance(like, torch.Tensor):
        return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(shape)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _decided_from_probabilities(prediction: Prediction, decision: Decision, properties: dict) -> Prediction:
    """The label map of the decision from the (unchanged) probabilities at the original shape."""
    probabilities = prediction.on_host().probabilities
    with np.errstate(divide="ignore"):
        log_p = np.log(probabilities)
    segmentation = decided_labels(log_p, decision, _voxel_mm3(properties)).astype(prediction.on_host().segmentation.dtype)
    return Prediction(segmentation, probabilities)


# ---------------------------------------------------------------------- computing the prediction
def convert(predicted_logits: Array, plans_manager, configuration_manager, label_manager, properties: dict, *,
            with_probabilities: bool, num_threads_torch: int = default_num_processes,
            decision: Optional[Decision] = None) -> Prediction:
    """The case's prediction from its logits, on the host: the kernels where they cover the plans'
    resampling (`fused_resampling`), else nnU-Net's own function. `decision` (decision.py): its
    offsets are added to the logits and its gate applied to the label map; the probabilities stay
    the model's."""
    fused = fused_resampling(plans_manager, configuration_manager, label_manager, properties)
    if fused is None:
        if _applies(decision):  # the decision from nnU-Net's probabilities
            prediction = Prediction.from_nnunet(
                nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
                    predicted_logits, plans_manager, configuration_manager, label_manager, properties, True,
                    num_threads_torch), True)
            prediction = _decided_from_probabilities(prediction, decision, properties)
            return prediction if with_probabilities else Prediction(prediction.segmentation)
        return Prediction.from_nnunet(nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
            predicted_logits, plans_manager, configuration_manager, label_manager, properties, with_probabilities,
            num_threads_torch), with_probabilities)
    separate_axis, order_z = fused
    if isinstance(predicted_logits, torch.Tensor):
        predicted_logits = predicted_logits.cpu().numpy()
    bbox = _crop(properties["bbox_used_for_cropping"])
    seg = np.zeros(properties["shape_before_cropping"], dtype=_label_dtype(label_manager))
    if not with_probabilities:
        logits = predicted_logits
        if _applies(decision):  # offsets on the logits: exact (kernels/decision.py)
            logits = predicted_logits.astype(np.float32) + _column(decision.offsets, predicted_logits)
        nan = logits_to_labels.resample_argmax(logits, seg[bbox], separate_axis, order_z, numba_threads())
        _refuse_nan(nan, properties)
        if _applies(decision) and _gated_off(seg, decision, properties):
            logits[decision.gated] = NEG
            logits_to_labels.resample_argmax(logits, seg[bbox], separate_axis, order_z, numba_threads())
        return _in_original_axes(seg, None, plans_manager)
    # probabilities: nnU-Net's order (resampled logits in their dtype, softmax in float32, argmax of
    # the probabilities), one pass straight into the uncropped volume (background 1 outside the crop)
    full = np.zeros((predicted_logits.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full[0] = 1  # nnU-Net's revert_cropping_on_probabilities (no regions on this path)
    nan = logits_to_labels.resample_softmax_argmax(predicted_logits, full[(slice(None), *bbox)], seg[bbox],
                                                   separate_axis, order_z, numba_threads())
    _refuse_nan(nan, properties)
    prediction = _in_original_axes(seg, full, plans_manager)
    return _decided_from_probabilities(prediction, decision, properties) if _applies(decision) else prediction


def _on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
               properties: dict, *, with_probabilities: bool, decision: Optional[Decision] = None
               ) -> Optional[Prediction]:
    """The case's prediction as tensors on the logits' device; None when the kernels do not cover
    the plans' resampling. `decision`: as in `convert`."""
    fused = fused_resampling(plans_manager, configuration_manager, label_manager, properties)
    if fused is None:
        return None
    separate_axis, order_z = fused
    logits = predicted_logits.half()  # what nnU-Net's predictor hands its export: float16 logits
    _refuse_nan(int(torch.isnan(logits).sum()), properties)
    shape_after = [int(i) for i in properties["shape_after_cropping_and_before_resampling"]]
    resampled = logits_to_labels.resample_logits_torch(logits, shape_after, separate_axis, order_z)
    del logits
    bbox = _crop(properties["bbox_used_for_cropping"])
    shape_before = [int(i) for i in properties["shape_before_cropping"]]
    label_dtype = torch.uint8 if _label_dtype(label_manager) == np.uint8 else torch.int32
    seg = torch.zeros(shape_before, dtype=label_dtype, device=resampled.device)
    if _applies(decision):
        decided = resampled.float() + _column(decision.offsets, resampled)
        seg[bbox] = decided.argmax(0).to(label_dtype)
        if _gated_off(seg, decision, properties):
            decided[decision.gated] = NEG
            seg[bbox] = decided.argmax(0).to(label_dtype)
        del decided
    if not with_probabilities:
        if not _applies(decision):
            seg[bbox] = resampled.argmax(0).to(label_dtype)
        return _in_original_axes(seg, None, plans_manager)
    probabilities = torch.softmax(resampled.float(), 0)
    del resampled
    if not _applies(decision):
        seg[bbox] = probabilities.argmax(0).to(label_dtype)
    full = torch.zeros((probabilities.shape[0], *shape_before), dtype=probabilities.dtype,
                       device=probabilities.device)
    full[0] = 1
    full[(slice(None), *bbox)] = probabilities
    return _in_original_axes(seg, full, plans_manager)


def prediction_on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
                         properties: dict, *, with_probabilities: bool,
                         decision: Optional[Decision] = None) -> Optional[Prediction]:
    """The case's prediction computed on the logits' device (the GPU), brought to the host (only
    the label map and the probabilities travel); None when the plans' resampling is not one the
    kernels compute (then use the CPU path)."""
    prediction = _on_device(predicted_logits, plans_manager, configuration_manager, label_manager, properties,
                            with_probabilities=with_probabilities, decision=decision)
    return None if prediction is None else prediction.on_host()


def probabilities_at_original_shape(predicted_logits: torch.Tensor, plans_manager, configuration_manager,
                                    label_manager, properties: dict) -> torch.Tensor:
    """The class probabilities of the case at its original shape and axis order, as the .npz of
    --save_probabilities holds them (a float32 tensor): on the logits' device when the kernels cover
    the plans' resampling, else computed by the CPU export (nnU-Net's where it is not covered)."""
    prediction = None
    if predicted_logits.device.type != "cpu":
        prediction = _on_device(predicted_logits, plans_manager, configuration_manager, label_manager, properties,
                                with_probabilities=True)
    if prediction is None:
        prediction = convert(predicted_logits.half().cpu().numpy(), plans_manager, configuration_manager,
                             label_manager, properties, with_probabilities=True)
        return torch.from_numpy(np.ascontiguousarray(prediction.probabilities))
    return prediction.probabilities


# ---------------------------------------------------------------------- nnU-Net's signatures
@overload
def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits: Array, plans_manager, configuration_manager, label_manager, properties_dict: dict,
        return_probabilities: Literal[False] = False, num_threads_torch: int = ...) -> np.ndarray: ...


@overload
def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits: Array, plans_manager, configuration_manager, label_manager, properties_dict: dict,
        return_probabilities: Literal[True], num_threads_torch: int = ...) -> Tuple[np.ndarray, np.ndarray]: ...


def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits: Array, plans_manager, configuration_manager, label_manager, properties_dict: dict,
        return_probabilities: bool = False, num_threads_torch: int = default_num_processes):
    """nnU-Net's function of the same name (same arguments, same outputs) on the kernels."""
    return nnunet_return(convert(predicted_logits, plans_manager, configuration_manager, label_manager,
                                  properties_dict, with_probabilities=return_probabilities,
                                  num_threads_torch=num_threads_torch), return_probabilities)


@overload
def convert_on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
                      properties_dict: dict, return_probabilities: Literal[False] = False) -> Optional[np.ndarray]: ...


@overload
def convert_on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
                      properties_dict: dict, return_probabilities: Literal[True]
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]: ...


def convert_on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
                      properties_dict: dict, return_probabilities: bool = False):
    """`convert_predicted_logits_to_segmentation_with_correct_shape`'s outputs, computed on the
    logits' device (prediction_on_device); None when the kernels do not cover the plans' resampling."""
    prediction = prediction_on_device(predicted_logits, plans_manager, configuration_manager, label_manager,
                                      properties_dict, with_probabilities=return_probabilities)
    return None if prediction is None else nnunet_return(prediction, return_probabilities)


def export_prediction_from_logits(predicted_array_or_file: Array, properties_dict: dict, configuration_manager,
                                  plans_manager, dataset_json_dict_or_file: Union[dict, str],
                                  output_file_truncated: str, save_probabilities: bool = False,
                                  num_threads_torch: int = default_num_processes) -> None:
    """nnU-Net's `export_prediction_from_logits` (same arguments, same files) on the kernels."""
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    label_manager = plans_manager.get_label_manager(dataset_json_dict_or_file)
    prediction = convert(predicted_array_or_file, plans_manager, configuration_manager, label_manager,
                         properties_dict, with_probabilities=save_probabilities, num_threads_torch=num_threads_torch)
    del predicted_array_or_file
    write_prediction(prediction, properties_dict, plans_manager, dataset_json_dict_or_file, output_file_truncated)


# ---------------------------------------------------------------------- writing
def write_prediction(prediction: Prediction, properties: dict, plans_manager,
                     dataset_json_dict_or_file: Union[dict, str], output_file_truncated: str) -> None:
    """Write what nnU-Net's export writes: OUT.npz + OUT.pkl (when the prediction holds
    probabilities) and the label map OUT<file_ending>, each atomically."""
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    prediction = prediction.on_host()
    if prediction.probabilities is not None:
        npz_file.savez_compressed(output_file_truncated + ".npz", threads=numba_threads(),
                                  probabilities=prediction.probabilities)
        replace_atomically(lambda tmp: save_pickle(properties, str(tmp)), output_file_truncated + ".pkl")
    rw = plans_manager.image_reader_writer_class()
    replace_atomically(lambda tmp: rw.write_seg(prediction.segmentation, str(tmp), properties),
                       output_file_truncated + dataset_json_dict_or_file["file_ending"])


def _write_like_nnunet(prediction: Prediction, properties: dict, plans_manager, dataset_json: dict,
                       output_file_truncated: str) -> None:
    """The files as nnU-Net's export_prediction_from_logits writes them (its own calls, in place)."""
    prediction = prediction.on_host()
    if prediction.probabilities is not None:
        np.savez_compressed(output_file_truncated + ".npz", probabilities=prediction.probabilities)
        save_pickle(properties, output_file_truncated + ".pkl")
    plans_manager.image_reader_writer_class().write_seg(
        prediction.segmentation, output_file_truncated + dataset_json["file_ending"], properties)


# ---------------------------------------------------------------------- export workers, with fallback
@dataclass
class ExportOutcome:
    """What an export worker hands back: the case's prediction when no file was asked for, and
    whether the extension's export fell back to nnU-Net's (the worker printed the warning)."""
    prediction: Optional[Prediction] = None
    fell_back: bool = False


def export_case(logits: Array, properties: dict, *, plans_manager, configuration_manager,
                dataset_json: Union[dict, str], output_file: Optional[str], with_probabilities: bool,
                nnunet_only: bool = False, decision: Optional[Decision] = None) -> ExportOutcome:
    """One case's export where the logits are (an export worker): the files at `output_file`
    (truncated, as nnU-Net's), or the prediction when it is None. The extension's export; on a
    fault of its code, nnU-Net's own for this case (with nnU-Net's argmax). `nnunet_only`: nnU-Net's
    own at once (the caller's device export already fell back and counted the case). `decision`:
    the offsets and gate of decision.py (None: nnU-Net's argmax)."""
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if output_file is None:
        def fast():
            return convert(logits, plans_manager, configuration_manager, label_manager, properties,
                           with_probabilities=with_probabilities, decision=decision)

        def nnunet():
            return Prediction.from_nnunet(nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, plans_manager, configuration_manager, label_manager, properties, with_probabilities),
                with_probabilities)
    else:
        def fast():
            prediction = convert(logits, plans_manager, configuration_manager, label_manager, properties,
                                 with_probabilities=with_probabilities, decision=decision)
            write_prediction(prediction, properties, plans_manager, dataset_json, output_file)

        def nnunet():
            nnunet_export.export_prediction_from_logits(logits, properties, configuration_manager, plans_manager,
                                                        dataset_json, output_file, with_probabilities)
    if nnunet_only:
        return ExportOutcome(nnunet())
    prediction, fell_back = fallback.attempt(
        fast, nnunet, case=os.path.basename(output_file) if output_file else _case_name(properties),
        what="the extension's export", instead="export")
    return ExportOutcome(prediction, fell_back)


def write_case(prediction: Prediction, properties: dict, *, plans_manager, dataset_json: Union[dict, str],
               output_file: str) -> ExportOutcome:
    """Write a prediction computed elsewhere (on the device): the extension's writers; on a fault of
    their code, nnU-Net's own calls (np.savez_compressed, save_pickle, its image writer)."""
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    _, fell_back = fallback.attempt(
        lambda: write_prediction(prediction, properties, plans_manager, dataset_json, output_file),
        lambda: _write_like_nnunet(prediction, properties, plans_manager, dataset_json, output_file),
        case=os.path.basename(output_file), what="the extension's writing of the export", instead="export")
    return ExportOutcome(None, fell_back)


class ReportingExport:
    """nnU-Net's `export_prediction_from_logits` (its signature, for nnU-Net's validation loop) as
    `export_case`. nnU-Net's validation drops its workers' results, so each call leaves a file in
    `report_folder` instead: `ok-*` or `fell_back-*` (`read_reports` counts them)."""

    def __init__(self, report_folder: str):
        self.report_folder = report_folder

    def __call__(self, predicted_array_or_file, properties_dict, configuration_manager, plans_manager,
                 dataset_json_dict_or_file, output_file_truncated, save_probabilities=False,
                 num_threads_torch=default_num_processes) -> None:
        outcome = export_case(predicted_array_or_file, properties_dict, plans_manager=plans_manager,
                              configuration_manager=configuration_manager, dataset_json=dataset_json_dict_or_file,
                              output_file=output_file_truncated, with_probabilities=save_probabilities)
        status = "fell_back" if outcome.fell_back else "ok"
        open(os.path.join(self.report_folder, f"{status}-{uuid.uuid4().hex}"), "w").close()


def read_reports(report_folder: str) -> Tuple[int, int]:
    """(cases exported, cases whose export fell back) from a ReportingExport's folder."""
    names = os.listdir(report_folder)
    return len(names), sum(name.startswith("fell_back-") for name in names)
