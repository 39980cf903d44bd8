"""HeartTrainer: nnU-Net's trainer with the extension's speed-ups, and nothing else changed.

- The loss: nnU-Net's Dice + CE as one fused kernel (same value and gradient).
- The training augmentation: nnU-Net's default transforms, on the training device inside the
  training step (nnunet_heart_ext.kernels.augment); the `nnUNet_n_proc_DA` loader workers only
  load and cut (trainers/device_augmentation.py). Configurations it does not cover keep nnU-Net's
  CPU transforms, with a line in the log.

- Checkpoints: nnU-Net's own, written atomically (to a temporary file beside them, flushed, then
  renamed: nnunet_heart_ext/data/files.py), so a kill or a full disk while one is saved leaves the
  previous one whole instead of a cut-short file that --c cannot load.

Everything else is nnU-Net's own `nnUNetTrainer` (case sampling, schedule, validation,
checkpoints), so results stay comparable with plain nnU-Net. The class attribute
`nnunet_heart_ext_inference` asks for the extension's inference at prediction and validation.
"""
import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_heart_ext.data.files import replace_atomically, sweep
from nnunet_heart_ext.kernels.augment import DeviceAugmentation
from nnunet_heart_ext.kernels.fused_dice_ce import FusedDiceCELoss
from nnunet_heart_ext.trainers.device_augmentation import HeartDataLoader, unsupported_reason


class HeartTrainer(nnUNetTrainer):
    """The extension's trainer. Schedule variants (`HeartTrainer_250epochs`, ...) live in
    `schedules.py`; `HeartTrainer_nnUNetLoss` keeps nnU-Net's own loss and `HeartTrainer_nnUNetDA`
    nnU-Net's CPU augmentation, for comparisons; `HeartTrainer_tversky` trains with Tversky + CE."""

    # nnU-Net's predictor of a model of this class (nnUNetv2_predict, the validation) takes the
    # extension's inference, and the validation its export: the marker the import hook's wrappers
    # read (nnunet_heart_ext/nnunet/patching.py). False in a subclass keeps nnU-Net's inference.
    nnunet_heart_ext_inference = True
    # Mirroring at validation and prediction (nnU-Net: on; it is stored in the checkpoint, so
    # nnUNetv2_predict follows it). The CPU schedules switch it off: it costs 8x the sliding-window
    # passes. Training augmentation keeps its mirroring either way.
    test_time_mirroring = True
    # Training augmentation on the training device (False: nnU-Net's CPU transforms in the workers).
    device_augmentation = True
    # The Dice term's Tversky weights of false positives and false negatives (0.5, 0.5: Dice).
    tversky_alpha = 0.5
    tversky_beta = 0.5
    # Forced-foreground samples: the class each is centred on, drawn among those present in the case
    # with these weights (label -> weight, 1 if missing). None: nnU-Net's uniform draw.
    foreground_class_weights = None
    # The cross-entropy's class weights (label -> weight, 1 if missing; torch's weighted mean over the
    # voxels). None: nnU-Net's plain cross-entropy.
    ce_class_weights = None
    # "sgd": nnU-Net's SGD (Nesterov, momentum 0.99); "adamw": nnU-Net's nnUNetTrainerAdam (AdamW, amsgrad).
    # Both with nnU-Net's poly learning-rate decay from initial_lr.
    optimizer_name = "sgd"
    # Labels that every deep-supervision target keeps (device augmentation only): a coarse target's
    # voxel whose block holds one takes it, the first listed winning (kernels/downsample_labels.py).
    # (): nnU-Net's nearest-exact targets, in which a few-voxel structure mostly vanishes.
    deep_supervision_keep_labels = ()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        settings = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
        return settings

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return super().configure_optimizers()
        if self.optimizer_name != "adamw":
            raise ValueError(f"optimizer_name {self.optimizer_name!r}: 'sgd' or 'adamw'")
        return nnUNetTrainerAdam.configure_optimizers(self)

    def _build_loss(self):
        """nnU-Net's loss exactly as nnUNetTrainer builds it (settings, deep-supervision weights),
        with its Dice + CE swapped for the fused kernel of the same settings (same value and
        gradient, a fraction of the memory traffic). Region-based training keeps nnU-Net's."""
        loss = super()._build_loss()
        wrapped = isinstance(loss, DeepSupervisionWrapper)
        inner = loss.loss if wrapped else loss
        if not isinstance(inner, DC_and_CE_loss):
            return loss
        if self.ce_class_weights is not None:  # nnU-Net's own CE, given class weights
            weights = [float(self.ce_class_weights.get(label, 1.0))
                       for label in range(self.label_manager.num_segmentation_heads)]
            inner.ce = RobustCrossEntropyLoss(weight=torch.tensor(weights, device=self.device),
                                              ignore_index=inner.ce.ignore_index)
        fused = FusedDiceCELoss.from_nnunet(inner)
        fused.alpha, fused.beta = self.tversky_alpha, self.tversky_beta
        if wrapped:
            loss.loss = fused
            return loss
        return fused

    def get_dataloaders(self):
        """nnU-Net's loaders; the training one only loads and cuts when the device augments."""
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        reason = unsupported_reason(self, patch_size, dummy_2d) if self.device_augmentation else "switched off"
        self.augmentation = None
        if reason is not None:
            if self.device_augmentation:
                self.print_to_log_file(f"HeartTrainer: the device augmentation does not cover {reason}; "
                                       f"nnU-Net's CPU augmentation is used")
            if self.foreground_class_weights is not None:
                self.print_to_log_file("HeartTrainer: foreground_class_weights need HeartTrainer's loader; "
                                       "nnU-Net's loader draws cases and classes uniformly")
            if self.deep_supervision_keep_labels:
                self.print_to_log_file("HeartTrainer: deep_supervision_keep_labels need the device augmentation; "
                                       "nnU-Net's transforms take the coarse targets nearest-exact")
            return super().get_dataloaders()
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        deep_supervision_scales = self._get_deep_supervision_scales()
        self.augmentation = DeviceAugmentation(patch_size, rotation, deep_supervision_scales, mirror_axes, dummy_2d,
                                               ignore_label=self.label_manager.ignore_label,
                                               labels=self.label_manager.all_labels,
                                               keep_labels=self.deep_supervision_keep_labels)
        val_transforms = self.get_validation_transforms(deep_supervision_scales, is_cascaded=False,
                                                        foreground_labels=self.label_manager.foreground_labels,
                                                        regions=None, ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        sampling = dict(oversample_foreground_percent=self.oversample_foreground_percent, sampling_probabilities=None,
                        pad_sides=None, probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = HeartDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                augmentation=self.augmentation, class_weights=self.foreground_class_weights,
                                **sampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  transforms=val_transforms, **sampling)
        self.print_to_log_file(f"HeartTrainer: training batches augmented on {self.device}; loader workers only "
                               f"load and cut (enlarged patch {[int(i) for i in initial_patch_size]})")
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, processes, num_cached=max(6, processes // 2), seeds=None,
                                                pin_memory=pin, wait_time=0.002)
        mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, processes // 2), num_cached=max(3, processes // 4),
                                              seeds=None, pin_memory=pin, wait_time=0.002)
        next(mt_train)
        next(mt_val)
        return mt_train, mt_val

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: under a temporary name, flushed, then renamed
        (a save cut short by a kill or a full disk leaves the previous checkpoint as it was; lack
        of room raises data.files.WriteError naming the file and the free space)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        replace_atomically(lambda tmp: nnUNetTrainer.save_checkpoint(self, str(tmp)), filename, "save checkpoint")

    def on_train_start(self):
        removed = sweep(self.output_folder)  # what a killed save left (its writer gone), never a running one
        if removed:
            self.print_to_log_file(f"HeartTrainer: removed {len(removed)} leftover file(s) of killed writers in "
                                   f"{self.output_folder}")
        return super().on_train_start()

    def train_step(self, batch: dict) -> dict:
        if "params" in batch:
            batch = self.augment_on_device(batch)
        return super().train_step(batch)

    @torch.no_grad()
    def augment_on_device(self, batch: dict) -> dict:
        """A HeartDataLoader batch (boxes + parameters) -> nnU-Net's {'data', 'target'}, on the device."""
        data = [d.to(self.device, non_blocking=True) for d in batch["data"]]
        seg = [s.to(self.device, non_blocking=True) for s in batch["target"]]
        data, target = self.augmentation.apply_boxes(data, seg, batch["offsets"], batch["enlarged_shape"],
                                                     batch["params"])
        return {"data": data, "target": target, "keys": batch["keys"]}


class HeartTrainer_nnUNetLoss(HeartTrainer):
    """HeartTrainer with nnU-Net's own loss (DC_and_CE_loss), to compare the two on one run."""

    def _build_loss(self):
        return nnUNetTrainer._build_loss(self)


class HeartTrainer_nnUNetDA(HeartTrainer):
    """HeartTrainer with nnU-Net's CPU augmentation in the loader workers, for comparisons."""

    device_augmentation = False


class HeartTrainer_tversky(HeartTrainer):
    """Tversky + CE (alpha 0.3, beta 0.7: a missed voxel weighs more than an extra one) and
    foreground oversampling 0.5, what the AICUP 2025 teams near the top used for the small classes."""

    tversky_alpha = 0.3
    tversky_beta = 0.7

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.oversample_foreground_percent = 0.5
