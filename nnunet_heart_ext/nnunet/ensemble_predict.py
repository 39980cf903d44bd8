"""Several models' test-set ensemble in one process: no probability file round trip.

`nnunet-heart predict-ensemble -i IMAGES -o OUT -m MODEL_FOLDER [MODEL_FOLDER ...] [-f 0 1 2 3 4]`
gives what `nnUNetv2_predict --save_probabilities` per model followed by `nnUNetv2_ensemble`
gives (the label map of the mean of the models' class probabilities at each case's original
shape), without writing, reading and deleting a 1.4 GB .npz per model and case: each case is
preprocessed with each model's plans (nnU-Net's preprocessor; in `-npp` spawned worker processes
while the case before is predicted, nnunet_heart_ext/nnunet/prefetch.py), its logits predicted by
nnU-Net's predictor of that model (HeartPredictor for HeartTrainer models, up to `--inference_batch`
network inputs a forward pass, nnunet_heart_ext/nnunet/predictor.py),
turned into probabilities at the original shape (on the GPU when the logits are there,
nnunet_heart_ext/nnunet/prediction_export.py), and summed where they are (predictor.DeviceSum, the
predictor's fold sum); the argmax of the mean is written with the first model's image writer,
atomically. `-num_parts/-part_id` split the cases as nnU-Net's commands do (the pipeline gives one
part to each GPU slot), and `--continue_prediction` skips cases whose label map exists (before
they are queued for preprocessing); the cases are written in their order. A case that cannot be
preprocessed (an unreadable image) stops the command with an error naming its files, the label maps
written before it kept, no partial file and no worker process left.
A fault of the extension's code falls back to nnU-Net's own for that step and case (fallback.py:
nnU-Net's predictor, its export's probabilities, its image writer), with a warning each and the
count at the end.

The models must predict the same labels from the same input channels (nnU-Net's ensembling
assumes it too); otherwise this stops before predicting anything, naming the models.
"""
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
from tqdm import tqdm

from nnunet_heart_ext.data import decision_file as decision_file_
from nnunet_heart_ext.kernels.decision import labels as decided_labels
from nnunet_heart_ext.nnunet import decision, fallback, prediction_export, prefetch
from nnunet_heart_ext.nnunet.prediction_export import Prediction
from nnunet_heart_ext.nnunet.predictor import DeviceSum, HeartPredictor


def _predictor(folder: str, folds, checkpoint: str, device: torch.device, use_mirroring: bool) -> nnUNetPredictor:
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=device, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, folds, checkpoint)
    return predictor


def _case(files: Sequence[str], ending: str) -> str:
    """The case's name: its first file's without _0000<file_ending>."""
    return os.path.basename(files[0])[:-(len(ending) + 5)]


def _check_compatible(predictors: List[nnUNetPredictor], folders: Sequence[str]) -> None:
    first = predictors[0]
    for p, folder in zip(predictors[1:], folders[1:]):
        for key in ("labels", "channel_names", "file_ending"):
            if p.dataset_json.get(key) != first.dataset_json.get(key):
                raise ValueError(f"predict-ensemble: {folder} and {folders[0]} differ in dataset.json's {key!r} "
                                 f"({p.dataset_json.get(key)} vs {first.dataset_json.get(key)}): they cannot be "
                                 "ensembled")


def _probabilities(predictor: nnUNetPredictor, logits: torch.Tensor, properties: dict) -> torch.Tensor:
    """The case's probabilities at its original shape (prediction_export); on a fault of the
    extension's code, those of nnU-Net's own export function."""
    pm, cm, lm = predictor.plans_manager, predictor.configuration_manager, predictor.label_manager

    def nnunet():
        _, probabilities = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.half().cpu().numpy(), pm, cm, lm, properties, True)
        return torch.from_numpy(np.ascontiguousarray(probabilities))

    probabilities, fell_back = fallback.attempt(
        lambda: prediction_export.probabilities_at_original_shape(logits, pm, cm, lm, properties), nnunet,
        case=fallback.current_case(), what="the extension's export", instead="export")
    if fell_back:
        fallback.record("export")
    return probabilities


def predict_ensemble(model_folders: Sequence[str], input_folder: str, output_folder: str, *,
                     folds: Optional[Sequence] = None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
                     use_mirroring: bool = True, num_parts: int = 1, part_id: int = 0,
                     overwrite: bool = True, decision_file: Optional[str] = None,
                     num_processes_preprocessing: Optional[int] = None,
                     inference_batch: Optional[int] = None) -> List[str]:
    """Write OUT/CASE<file_ending> for every case of this part, in their order; return the cases written.
    `decision_file`: a heart_decision.json chosen on the ensemble's validation (decision.py),
    applied to the mean of the models' probabilities; None: nnU-Net's argmax.
    `num_processes_preprocessing`: worker processes preprocessing the next cases (prefetch.py);
    0: each case here, in series with the network; None: prefetch.default_workers().
    `inference_batch`: the most network inputs in one forward pass of HeartPredictor models
    (predictor.py); None: the predictor's default. Other models' predictors do not batch."""
    if len(model_folders) < 1:
        raise ValueError("predict-ensemble: give at least one model folder (-m)")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"predict-ensemble: part_id {part_id} must be in [0, num_parts={num_parts})")
    if num_processes_preprocessing is not None and num_processes_preprocessing < 0:
        raise ValueError(f"predict-ensemble: -npp {num_processes_preprocessing} must be >= 0")
    if inference_batch is not None and inference_batch < 1:
        raise ValueError(f"predict-ensemble: --inference_batch {inference_batch} must be >= 1")
    for folder in model_folders:
        if not (Path(folder) / "plans.json").is_file():
            raise FileNotFoundError(f"predict-ensemble: {folder} is not a trained model folder (no plans.json)")
    if not Path(input_folder).is_dir():
        raise FileNotFoundError(f"predict-ensemble: no input folder {input_folder}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("predict-ensemble: -device cuda but torch sees no CUDA device")
    chosen = decision_file_.read(Path(decision_file)).decision if decision_file else None
    predictors = [_predictor(f, folds, checkpoint, torch_device, use_mirroring) for f in model_folders]
    for p in predictors:
        if inference_batch is not None and isinstance(p, HeartPredictor):
            p.inference_batch = inference_batch
    print(f"nnunet_heart_ext: the ensemble's decision: {decision.describe(chosen)}"
          + (f" ({decision_file})" if decision_file else ""), flush=True)
    _check_compatible(predictors, model_folders)
    first = predictors[0]
    ending = first.dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, ending)[part_id::num_parts]
    os.makedirs(output_folder, exist_ok=True)
    save_json({"models": [str(f) for f in model_folders], "folds": folds, "checkpoint": checkpoint,
               "use_mirroring": use_mirroring}, os.path.join(output_folder, "predict_ensemble_args.json"))
    todo = [files for files in cases  # skipped before they are queued for preprocessing
            if overwrite or not os.path.isfile(os.path.join(output_folder, _case(files, ending)) + ending)]
    models = [prefetch.Model(str(folder), p.plans_manager, p.configuration_manager, p.dataset_json)
              for folder, p in zip(model_folders, predictors)]
    workers = prefetch.default_workers() if num_processes_preprocessing is None else num_processes_preprocessing
    written = []
    with fallback.tally() as run, prefetch.Prefetch(models, todo, workers=workers) as inputs:
        for files, preprocessed in tqdm(inputs, total=len(todo), desc="cases", disable=len(todo) < 2):
            case = _case(files, ending)
            run.begin(case)
            summed, properties = DeviceSum("the models' probabilities"), None
            for predictor in predictors:
                data, props = preprocessed.pop(0)  # each model's input freed once predicted
                logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
                del data
                summed.add(_probabilities(predictor, logits, props))
                if properties is None:  # the first model's: its image writer writes the label map
                    properties = props
                del logits
            mean = summed.mean().cpu()
            del summed
            if chosen is not None and not chosen.is_nnunet:
                with np.errstate(divide="ignore"):
                    segmentation = decided_labels(np.log(mean.numpy()), chosen, float(np.prod(properties["spacing"])))
            else:
                segmentation = first.label_manager.convert_probabilities_to_segmentation(mean)
            del mean
            segmentation = segmentation.numpy() if isinstance(segmentation, torch.Tensor) else segmentation
            outcome = prediction_export.write_case(Prediction(segmentation), properties,
                                                   plans_manager=first.plans_manager, dataset_json=first.dataset_json,
                                                   output_file=os.path.join(output_folder, case))
            if outcome.fell_back:
                run.record("export")
            print(f"{case}: ensemble of {len(predictors)} model(s) written", flush=True)
            written.append(case)
    return written
