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
