"""HeartTrainer models predicted by the official nnUNetv2_predict take a faster inference path.

How a model gets here. The import hook (_hook.py) runs predictor_hook.patch_predict_from_raw_data right after
nnunetv2.inference.predict_from_raw_data has executed: it wraps (patching.py) nnUNetPredictor's
`initialize_from_trained_model_folder` (nnUNetv2_predict) and `manual_initialization` (the
trainer's validation, predict-ensemble), which then end with `use_fast_path(self)`. When the
model's trainer class carries the marker `nnunet_heart_ext_inference = True` (HeartTrainer and its
subclasses: patching.uses_extension_inference) and the predictor is nnU-Net's own class (not a
user's subclass), the instance becomes a `HeartPredictor`, with a log line; every other model keeps
nnU-Net's predictor untouched. NNUNET_HEART_EXT_DISABLE=1 switches the hook, and so this, off.

What HeartPredictor changes (the results are nnU-Net's up to floating-point summation order:
tests/test_predictor.py compares them on random-weight networks):
- Sliding window: windows go through the network in batches, each window's mirror passes in the
  same batch (nnU-Net: one window, then 7 more passes of it, at batch 1); up to
  `inference_batch` inputs per forward pass, halved on out-of-memory. Sums are float32.
- Folds: accumulated where the logits are (the GPU, `DeviceSum`), not moved to the host one by one
  and summed there in float16; on out-of-memory the sum moves to the host, with a log line.
- Export (`predict_from_data_iterator`): on a GPU the logits are resampled, arg-maxed and put
  back into the uncropped volume on the device (prediction_export.prediction_on_device), and only
  the label map (and, with --save_probabilities, the probabilities) go to the export workers,
  which only write files (without an output file the prediction is returned as it is); on the
  CPU, or for plans the kernels do not cover, the workers run prediction_export's export (fused
  Numba resampling + argmax, threaded .npz writer).
nnU-Net's fallbacks are kept: sliding-window results on the host when the device runs out of
memory (nnU-Net's own `predict_sliding_window_return_logits` wraps the methods below).

Faults (fallback.py): an exception of the extension's code in the network passes or the fold sum
makes the case run nnU-Net's own `nnUNetPredictor` methods (all of them: `_as_nnunet`), in the
device export nnU-Net's export on the CPU, in the workers' export nnU-Net's export there; a warning
line each, and the count at the end of `predict_from_data_iterator`. NNUNET_HEART_EXT_STRICT=1 raises.
"""
import itertools
import multiprocessing
import os
from time import sleep
from typing import Optional

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from nnunetv2.utilities.helpers import empty_cache
from torch._dynamo import OptimizedModule
from tqdm import tqdm

from nnunet_heart_ext.nnunet import fallback, network_runtime, prediction_export
from nnunet_heart_ext.nnunet.prediction_export import ExportOutcome

_OOM = (torch.cuda.OutOfMemoryError,)
BATCH_ENV = "NNUNET_HEART_EXT_INFERENCE_BATCH"


def _positive_int(value, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise ValueError(f"{name}={value!r}: give a whole number of network inputs per forward pass, at least 1")
    return n


def _log(message: str) -> None:
    print(f"nnunet_heart_ext: {message}", flush=True)


class DeviceSum:
    """The running float32 sum of tensors (the folds' logits, the models' probabilities), kept on
    the device of the first; on out-of-memory it moves to the host, with a log line."""

    def __init__(self, what: str):
        self.what = what
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add x (the first one becomes the sum: the caller hands it over)."""
        if self.total is None:
            self.total = x.float()
        else:
            try:
                self.total += x.to(self.total.device)
            except _OOM:
                _log(f"out of GPU memory summing {self.what}; summing them on the host")
                self.total = self.total.cpu()
                self.total += x.cpu()
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.count > 1:
            self.total /= self.count
        return self.total


class _Ready:
    """A result computed in this process, where the export pool's results are listed (ready())."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout=None):
        return self.value


class HeartPredictor(nnUNetPredictor):
    """nnU-Net's predictor with batched windows and mirrors, folds summed on the device and the
    export on the device (GPU) or on the kernels (CPU). See the module docstring."""

    # Most network inputs in one forward pass (windows x mirror variants); out-of-memory halves it for
    # that call (sliding window) only. None: NNUNET_HEART_EXT_INFERENCE_BATCH, else 8 on a GPU and
    # 1 on a CPU, where a larger batch only moves the working set out of the caches.
    inference_batch = None
    # How the network runs (network_runtime.py); None: NNUNET_HEART_EXT_CPU_NETWORK / _CUDA_NETWORK.
    cpu_network = None
    cuda_network = None
    # The decision chosen on cross-validation (decision.py), set when the model folder is loaded;
    # None: nnU-Net's argmax (the validation, and models without a decision file).
    decision = None

    # ------------------------------------------------------------------ network passes
    def _batch(self) -> int:
        """This call's batch: the setting, or what an out-of-memory in this call halved it to."""
        batch = getattr(self, "_call_batch", None)
        return batch if batch is not None else self._batch_setting()

    def _batch_setting(self) -> int:
        with fallback.input_errors():  # a bad setting is the user's to fix, not a fault to fall back from
            if self.inference_batch is not None:
                return _positive_int(self.inference_batch, "inference_batch")
            env = os.environ.get(BATCH_ENV)
            if env:
                return _positive_int(env, BATCH_ENV)
        return 8 if self.device.type == "cuda" else 1

    def _runner(self) -> network_runtime.NetworkRunner:
        """The network's runner for the current settings (one per network object and settings)."""
        with fallback.input_errors():  # as in _batch_setting
            cpu = network_runtime.CpuNetwork(self.cpu_network) if self.cpu_network is not None \
                else network_runtime.cpu_network_from_env(os.environ)
            cuda = network_runtime.CudaNetwork(self.cuda_network) if self.cuda_network is not None \
                else network_runtime.cuda_network_from_env(os.environ)
        runner = getattr(self, "_network_runner", None)
        if runner is None or runner.network is not self.network or (runner.cpu, runner.cuda) != (cpu, cuda) \
                or runner.device != self.device:
            runner = self._network_runner = network_runtime.NetworkRunner(
                self.network, self.device, cpu=cpu, cuda=cuda, batch=self._batch_setting())
            _log(network_runtime.describe(runner))
        return runner

    def _mirror_axes(self):
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if not axes:
            return []
        return [tuple(m + 2 for m in c) for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *patch) -> the mean over nnU-Net's mirror passes of each window (float32),
        summed in nnU-Net's order; the variants go through the network `inference_batch` inputs
        at a time (all of them together on a GPU)."""
        combos = [()] + self._mirror_axes()
        assert max(max(c, default=0) for c in combos) <= x.ndim - 1, \
            'mirror_axes does not match the dimension of the input!'
        b = x.shape[0]
        per_pass = max(1, self._batch() // b)
        prediction = None
        for start in range(0, len(combos), per_pass):
            group = combos[start:start + per_pass]
            inputs = [torch.flip(x, axes) if axes else x for axes in group]
            out = self._runner()(inputs[0] if len(inputs) == 1 else torch.cat(inputs),
                                 getattr(self, "_weights", None))
            for k, axes in enumerate(group):
                part = out[k * b:(k + 1) * b]
                part = torch.flip(part, axes) if axes else part
                if prediction is None:
                    prediction = part.float().clone() if part.dtype == torch.float32 else part.float()
                else:
                    prediction += part
        if len(combos) > 1:
            prediction /= len(combos)
        return prediction

    def _windows_per_batch(self) -> int:
        return max(1, self._batch() // (len(self._mirror_axes()) + 1))

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        results_device = self.device if do_on_device else torch.device("cpu")
        predicted_logits = n_predictions = None
        self._call_batch = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.float32, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.float32, device=results_device)
            if self.use_gaussian:  # nnU-Net's float16 weights, used in float32
                gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                            value_scaling_factor=10, device=results_device).float()
            else:
                gaussian = torch.ones(tuple(self.configuration_manager.patch_size), device=results_device)
            with tqdm(total=len(slicers), disable=not self.allow_tqdm) as pbar:
                start = 0
                while start < len(slicers):
                    batch = slicers[start:start + self._windows_per_batch()]
                    windows = torch.stack([data[s] for s in batch]).to(self.device, non_blocking=True)
                    try:
                        prediction = self._internal_maybe_mirror_and_predict(windows).to(results_device)
                    except _OOM:
                        if self._batch() == 1:
                            raise
                        del windows
                        empty_cache(self.device)
                        self._call_batch = self._batch() // 2
                        _log(f"out of GPU memory in the network; {self._call_batch} inputs a forward pass for this "
                             "case")
                        continue
                    for p, sl in zip(prediction, batch):
                        predicted_logits[sl] += p * gaussian
                        n_predictions[sl[1:]] += gaussian
                    del prediction, windows
                    start += len(batch)
                    pbar.update(len(batch))
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            # nnU-Net's check for inf, and NaN in the same pass (a NaN would make an arbitrary label map)
            if not bool(torch.isfinite(predicted_logits).all()):
                if bool(torch.isnan(predicted_logits).any()):
                    raise FloatingPointError("nnunet_heart_ext: NaN in the predicted logits (the input image or the "
                                             "checkpoint holds NaN): nothing written")
                raise RuntimeError('Encountered inf in predicted array. Aborting...')
            return predicted_logits
        except Exception:
            del predicted_logits, n_predictions
            empty_cache(self.device)
            raise
        finally:
            self._call_batch = None

    # ------------------------------------------------------------------ faults: nnU-Net's own predictor
    def _as_nnunet(self) -> nnUNetPredictor:
        """nnU-Net's own predictor with this one's state (network, folds' weights, settings): all
        of its methods, the sliding window's included, are nnU-Net's."""
        plain = nnUNetPredictor.__new__(nnUNetPredictor)
        plain.__dict__.update(self.__dict__)
        return plain

    def _or_nnunet(self, fast, method: str, *args):
        """fast(); on a fault of the extension's code, nnU-Net's own `method`(*args) for this call."""

        def nnunet():
            empty_cache(self.device)
            return getattr(self._as_nnunet(), method)(*args)

        value, fell_back = fallback.attempt(fast, nnunet, case=fallback.current_case(),
                                            what="the extension's inference", instead="predictor")
        if fell_back:
            fallback.record("inference")
        return value

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's (padding, results on the host after a device error) over the batched passes
        above; nnU-Net's own passes on a fault (what nnU-Net's validation calls, once a case)."""
        return self._or_nnunet(lambda: super(HeartPredictor, self).predict_sliding_window_return_logits(input_image),
                                "predict_sliding_window_return_logits", input_image)

    # ------------------------------------------------------------------ folds
    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """The mean of the folds' logits (float32), kept where the sliding window left them (the
        GPU with perform_everything_on_device); on out-of-memory the sum moves to the host. On a
        fault of the extension's code, nnU-Net's own predictor for the case (all folds)."""
        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))
        try:
            return self._or_nnunet(lambda: self._folds_mean(data), "predict_logits_from_preprocessed_data", data)
        finally:
            torch.set_num_threads(n_threads)

    def _folds_mean(self, data: torch.Tensor) -> torch.Tensor:
        folds = DeviceSum("the folds")
        network = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        try:
            for fold, params in enumerate(self.list_of_parameters):
                with fallback.input_errors():  # a checkpoint that does not fit the network is not a fault
                    network.load_state_dict(params)
                self._weights = ("fold", fold)  # the runner keeps what it built of each fold's weights
                folds.add(super().predict_sliding_window_return_logits(data))
        finally:
            self._weights = None
        return folds.mean()

    # ------------------------------------------------------------------ cases and export
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """nnU-Net's loop (same inputs, outputs and files) with the export on the device when the
        logits are there, else in the workers on the kernels; ends with the count of the cases that
        fell back to nnU-Net's code (fallback.py), when any did."""
        with fallback.tally() as run, \
                multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export) as export_pool:
            workers = list(export_pool._pool)
            pending = []  # (case, result giving an ExportOutcome)
            for preprocessed in data_iterator:
                data = preprocessed["data"]
                if isinstance(data, str):
                    delfile = data
                    data = torch.from_numpy(np.load(data))
                    os.remove(delfile)
                ofile = preprocessed["ofile"]
                properties = preprocessed["data_properties"]
                case = os.path.basename(ofile) if ofile is not None else None
                run.begin(case)
                key = case if case is not None else object()  # the case in the run's count
                print(f"\nPredicting {case}:" if ofile is not None else f"\nPredicting image of shape {data.shape}:")
                while check_workers_alive_and_busy(export_pool, workers, [r for _, r in pending], allowed_num_queued=2):
                    sleep(0.1)
                logits = self.predict_logits_from_preprocessed_data(data)
                pending.append((key, self._export(export_pool, logits, properties, ofile, save_probabilities)))
                del logits
                print(f"done with {case}" if ofile is not None else f"\nDone with image of shape {data.shape}:")
            print("Prediction completed. Waiting for remaining segmentation exports to finish...")
            ret = []
            with tqdm(desc="Collecting results", total=len(pending), disable=not self.allow_tqdm) as pbar:
                for key, result in pending:
                    outcome = _collect(result, workers)
                    if outcome.fell_back:  # the worker printed the warning
                        run.record("export", key)
                    ret.append(None if outcome.prediction is None
                               else prediction_export.nnunet_return(outcome.prediction, save_probabilities))
                    pbar.update()
            print("Segmentation export complete.")
        if hasattr(data_iterator, "_finish"):
            data_iterator._finish()
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return ret

    def _export(self, pool, logits: torch.Tensor, properties: dict, ofile, save_probabilities: bool):
        """One case's export, as a result giving an ExportOutcome: on the device when the logits
        are there (a worker then only writes the files), else in a worker on the kernels. A fault
        of the device path hands the logits to nnU-Net's own export in a worker."""
        nnunet_only = False
        if logits.device.type != "cpu":
            try:
                prediction, nnunet_only = fallback.attempt(
                    lambda: prediction_export.prediction_on_device(
                        logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
                        with_probabilities=save_probabilities, decision=self.decision),
                    lambda: None, case=fallback.current_case(), what="the extension's export on the device",
                    instead="export, on the CPU")
            except _OOM:
                prediction = None
                empty_cache(self.device)
                _log("out of GPU memory in the export; exporting on the CPU")
            if nnunet_only:
                fallback.record("export")
            if prediction is not None:
                if ofile is None:
                    return _Ready(ExportOutcome(prediction))
                return pool.apply_async(prediction_export.write_case, (prediction, properties),
                                        dict(plans_manager=self.plans_manager, dataset_json=self.dataset_json,
                                             output_file=ofile))
        # nnU-Net hands its workers float16 logits; so does this path (half the bytes to pickle)
        return pool.apply_async(prediction_export.export_case, (logits.half().cpu().numpy(), properties),
                                dict(plans_manager=self.plans_manager, configuration_manager=self.configuration_manager,
                                     dataset_json=self.dataset_json, output_file=ofile,
                                     with_probabilities=save_probabilities, nnunet_only=nnunet_only,
                                     decision=self.decision))


def _collect(result, workers) -> ExportOutcome:
    """The result of one export, watching that the workers stay alive (as nnU-Net does)."""
    while True:
        if not all(w.is_alive() for w in workers):
            raise RuntimeError("Segmentation export worker died. It was likely killed by your OS "
                               "because of insufficient available CPU RAM.")
        try:
            return result.get(timeout=0.1)
        except multiprocessing.TimeoutError:
            pass
