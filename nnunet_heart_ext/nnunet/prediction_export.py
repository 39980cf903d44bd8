"""nnU-Net's prediction export (logits -> label map file, optionally probabilities) on the kernels.

The functions here have the signatures of nnunetv2.inference.export_prediction's and give the
same outputs; HeartTrainer models use them (nnunet_heart_ext/nnunet/predictor.py for nnUNetv2_predict,
HeartTrainer.perform_actual_validation for validation). nnU-Net's own models never reach this
module.

What differs from nnU-Net's export (`convert_predicted_logits_to_segmentation_with_correct_shape`):
- Without probabilities, the logits are resampled and arg-maxed in one Numba pass
  (kernels/logits_to_labels.py) straight into the crop of the full-size label map: nnU-Net
  resamples all C channels to a float array first (skimage, float64), then arg-maxes.
- With probabilities, the same pass also writes the softmax of the resampled logits straight into
  the uncropped probability volume (kernels/logits_to_labels.resample_softmax_argmax), and the
  `.npz` is written by the threaded writer (kernels/npz.py): the same file np.load reads, written
  >= 10x faster than np.savez_compressed (benchmarks/RESULTS.md).
- On a GPU (`convert_on_device`), the predictor resamples, arg-maxes and reverts the crop on the
  device and hands the uint8 map (and the probabilities, when asked) to the export worker.
This path applies when the plans resample probabilities with nnU-Net's default function or the
extension's Numba one, with order 1 (what every nnU-Net planner writes) and the labels are not
regions; anything else goes to nnU-Net's own function, unchanged.

Output files are written atomically: under a hidden temporary name beside them that ends like them
(nnunet_heart_ext.data.io.replace_atomically, what the project's other writers use), then moved into
place; the .npz likewise (kernels/npz.py). NaN logits raise FloatingPointError
naming the case instead of writing an arbitrary label map.
"""
from typing import Optional, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_pickle
from nnunetv2.configuration import ANISO_THRESHOLD, default_num_processes
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

from nnunet_heart_ext.data.io import replace_atomically
from nnunet_heart_ext.kernels import logits_to_labels
from nnunet_heart_ext.data import npz_file
from nnunet_heart_ext.nnunet.resampling import numba_threads

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


def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits: Union[torch.Tensor, np.ndarray], plans_manager, configuration_manager, label_manager,
        properties_dict: dict, return_probabilities: bool = False, num_threads_torch: int = default_num_processes):
    """nnU-Net's function of the same name (same arguments, same outputs) on the kernels."""
    fused = fused_resampling(plans_manager, configuration_manager, label_manager, properties_dict)
    if fused is None:
        return nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
            predicted_logits, plans_manager, configuration_manager, label_manager, properties_dict,
            return_probabilities, num_threads_torch)
    separate_axis, order_z = fused
    if isinstance(predicted_logits, torch.Tensor):
        predicted_logits = predicted_logits.cpu().numpy()
    threads = numba_threads()
    seg = np.zeros(properties_dict["shape_before_cropping"], dtype=_label_dtype(label_manager))
    crop = seg[_crop(properties_dict["bbox_used_for_cropping"])]
    if not return_probabilities:
        _refuse_nan(logits_to_labels.resample_argmax(predicted_logits, crop, separate_axis, order_z, threads),
                    properties_dict)
        return seg.transpose(plans_manager.transpose_backward)
    # probabilities: nnU-Net's order (resampled logits in their dtype, softmax in float32, argmax of
    # the probabilities), one pass straight into the uncropped volume (background 1 outside the crop)
    bbox = _crop(properties_dict["bbox_used_for_cropping"])
    full = np.zeros((predicted_logits.shape[0], *properties_dict["shape_before_cropping"]), dtype=np.float32)
    full[0] = 1  # nnU-Net's revert_cropping_on_probabilities (no regions on this path)
    nan = logits_to_labels.resample_softmax_argmax(predicted_logits, full[(slice(None), *bbox)], crop,
                                                   separate_axis, order_z, threads)
    _refuse_nan(nan, properties_dict)
    return seg.transpose(plans_manager.transpose_backward), \
        full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def _on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
               properties_dict: dict, return_probabilities: bool):
    """(label map, probabilities or None) as tensors on the logits' device, in nnU-Net's
    preprocessed axis order (transpose_backward not applied); None when the kernels do not cover
    the plans' resampling."""
    fused = fused_resampling(plans_manager, configuration_manager, label_manager, properties_dict)
    if fused is None:
        return None
    separate_axis, order_z = fused
    logits = predicted_logits.half()  # what nnU-Net's predictor hands its export: float16 logits
    if torch.isnan(logits).any():
        _refuse_nan(int(torch.isnan(logits).sum()), properties_dict)
    shape_after = [int(i) for i in properties_dict["shape_after_cropping_and_before_resampling"]]
    resampled = logits_to_labels.resample_logits_torch(logits, shape_after, separate_axis, order_z)
    del logits
    bbox = _crop(properties_dict["bbox_used_for_cropping"])
    shape_before = [int(i) for i in properties_dict["shape_before_cropping"]]
    label_dtype = torch.uint8 if _label_dtype(label_manager) == np.uint8 else torch.int32
    seg = torch.zeros(shape_before, dtype=label_dtype, device=resampled.device)
    if not return_probabilities:
        seg[bbox] = resampled.argmax(0).to(label_dtype)
        return seg, None
    probabilities = torch.softmax(resampled.float(), 0)
    del resampled
    seg[bbox] = probabilities.argmax(0).to(label_dtype)
    full = torch.zeros((probabilities.shape[0], *shape_before), dtype=probabilities.dtype,
                       device=probabilities.device)
    full[0] = 1
    full[(slice(None), *bbox)] = probabilities
    return seg, full


def convert_on_device(predicted_logits: torch.Tensor, plans_manager, configuration_manager, label_manager,
                      properties_dict: dict, return_probabilities: bool = False):
    """The same outputs as `convert_predicted_logits_to_segmentation_with_correct_shape`, computed
    on the logits' device (the GPU); only the label map (and the probabilities) come back to the
    host. None when the plans' resampling is not one the kernels compute (then use the CPU path)."""
    out = _on_device(predicted_logits, plans_manager, configuration_manager, label_manager, properties_dict,
                     return_probabilities)
    if out is None:
        return None
    seg, probabilities = out
    seg_np = seg.cpu().numpy()
    seg_np = (seg_np if seg_np.dtype == np.uint8 else seg_np.astype(np.uint16)).transpose(
        plans_manager.transpose_backward)
    if not return_probabilities:
        return seg_np
    return seg_np, probabilities.cpu().numpy().transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def probabilities_at_original_shape(predicted_logits: torch.Tensor, plans_manager, configuration_manager,
                                    label_manager, properties_dict: dict) -> torch.Tensor:
    """The class probabilities of the case at its original shape and axis order, as the .npz of
    --save_probabilities holds them (a float32 tensor): on the logits' device when the kernels cover
    the plans' resampling, else computed by the CPU export (nnU-Net's where it is not covered)."""
    out = None
    if predicted_logits.device.type != "cpu":
        out = _on_device(predicted_logits, plans_manager, configuration_manager, label_manager, properties_dict,
                         True)
    if out is not None:
        return out[1].permute(0, *[i + 1 for i in plans_manager.transpose_backward])
    _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits.half().cpu().numpy(), plans_manager, configuration_manager, label_manager, properties_dict,
        True)
    return torch.from_numpy(np.ascontiguousarray(probabilities))


def write_prediction(segmentation: np.ndarray, probabilities: Optional[np.ndarray], properties_dict: dict,
                     plans_manager, dataset_json_dict_or_file: Union[dict, str], output_file_truncated: str) -> None:
    """Write what nnU-Net's export writes: OUT.npz + OUT.pkl (when probabilities are given) and the
    label map OUT<file_ending>, each atomically."""
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    if probabilities is not None:
        npz_file.savez_compressed(output_file_truncated + ".npz", threads=numba_threads(), probabilities=probabilities)
        replace_atomically(lambda tmp: save_pickle(properties_dict, str(tmp)), output_file_truncated + ".pkl")
    rw = plans_manager.image_reader_writer_class()
    replace_atomically(lambda tmp: rw.write_seg(segmentation, str(tmp), properties_dict),
                       output_file_truncated + dataset_json_dict_or_file["file_ending"])


def export_prediction_from_logits(predicted_array_or_file: Union[np.ndarray, torch.Tensor], properties_dict: dict,
                                  configuration_manager, plans_manager, dataset_json_dict_or_file: Union[dict, str],
                                  output_file_truncated: str, save_probabilities: bool = False,
                                  num_threads_torch: int = default_num_processes) -> None:
    """nnU-Net's `export_prediction_from_logits` (same arguments, same files) on the kernels."""
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    label_manager = plans_manager.get_label_manager(dataset_json_dict_or_file)
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_array_or_file, plans_manager, configuration_manager, label_manager, properties_dict,
        return_probabilities=save_probabilities, num_threads_torch=num_threads_torch)
    del predicted_array_or_file
    segmentation, probabilities = ret if save_probabilities else (ret, None)
    write_prediction(segmentation, probabilities, properties_dict, plans_manager, dataset_json_dict_or_file,
                     output_file_truncated)

