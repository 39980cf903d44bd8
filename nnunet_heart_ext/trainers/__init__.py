"""nnU-Net trainers of the extension (nnunet_heart_ext.trainers; the top-level `trainers` is a symlink here).

nnU-Net finds these by name (`-tr HeartTrainer`) through the registry fallback, see
nnunet_heart_ext/nnunet/registry.py.
"""
from nnunet_heart_ext.trainers.heart_trainer import (HeartTrainer, HeartTrainer_nnUNetDA, HeartTrainer_nnUNetLoss,
                                                      HeartTrainer_tversky)
from nnunet_heart_ext.trainers.schedules import *  # noqa: F401,F403  (HeartTrainer_<schedule>)
from nnunet_heart_ext.trainers import schedules as _schedules

__all__ = ["HeartTrainer", "HeartTrainer_nnUNetLoss", "HeartTrainer_nnUNetDA", "HeartTrainer_tversky"] \
    + _schedules.__all__
