"""HeartTrainer: nnU-Net's trainer with the extension's speed-ups, and nothing else changed.

Everything not overridden here is nnU-Net's own `nnUNetTrainer` (data loading, augmentation,
schedule, validation, checkpoints), so results stay comparable with plain nnU-Net.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class HeartTrainer(nnUNetTrainer):
    """The extension's trainer. Schedule variants (`HeartTrainer_250epochs`, ...) live in
    `schedules.py`; `HeartTrainer_nnUNetLoss` keeps nnU-Net's own loss for comparisons."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
