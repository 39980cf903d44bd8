"""HeartTrainer: nnU-Net's trainer with the extension's speed-ups, and nothing else changed.

Everything not overridden here is nnU-Net's own `nnUNetTrainer` (data loading, augmentation,
schedule, validation, checkpoints), so results stay comparable with plain nnU-Net.
"""
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_heart_ext.kernels.fused_dice_ce import FusedDiceCELoss


class HeartTrainer(nnUNetTrainer):
    """The extension's trainer. Schedule variants (`HeartTrainer_250epochs`, ...) live in
    `schedules.py`; `HeartTrainer_nnUNetLoss` keeps nnU-Net's own loss for comparisons."""

    # Mirroring at validation and prediction (nnU-Net: on; it is stored in the checkpoint, so
    # nnUNetv2_predict follows it). The CPU schedules switch it off: it costs 8x the sliding-window
    # passes. Training augmentation keeps its mirroring either way.
    test_time_mirroring = True

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        settings = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
        return settings

    def _build_loss(self):
        """nnU-Net's loss exactly as nnUNetTrainer builds it (settings, deep-supervision weights),
        with its Dice + CE swapped for the fused kernel of the same settings (same value and
        gradient, a fraction of the memory traffic). Region-based training keeps nnU-Net's."""
        loss = super()._build_loss()
        wrapped = isinstance(loss, DeepSupervisionWrapper)
        inner = loss.loss if wrapped else loss
        if not isinstance(inner, DC_and_CE_loss):
            return loss
        fused = FusedDiceCELoss.from_nnunet(inner)
        if wrapped:
            loss.loss = fused
            return loss
        return fused


class HeartTrainer_nnUNetLoss(HeartTrainer):
    """HeartTrainer with nnU-Net's own loss (DC_and_CE_loss), to compare the two on one run."""

    def _build_loss(self):
        return nnUNetTrainer._build_loss(self)
