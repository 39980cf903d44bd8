"""HeartTrainer schedule variants, generated from one table in nnU-Net's naming.

`HeartTrainer_250epochs` is HeartTrainer with `num_epochs = 250`, as nnU-Net's
`nnUNetTrainer_250epochs` is to `nnUNetTrainer` (and `HeartTrainer_nnUNetLoss_250epochs`,
`HeartTrainer_nnUNetDA_250epochs` the same with nnU-Net's own loss, or augmentation). `HeartTrainer_demo` trains on the synthetic
phantom (`nnunet-heart phantom`) on 2 CPU cores in minutes.
"""
import torch

from nnunet_heart_ext.trainers.heart_trainer import (HeartTrainer, HeartTrainer_nnUNetDA, HeartTrainer_nnUNetLoss,
                                                      HeartTrainer_tversky)

# suffix -> attributes set after nnUNetTrainer.__init__
SCHEDULES = {
    "1epoch": {"num_epochs": 1},
    "5epochs": {"num_epochs": 5},
    "10epochs": {"num_epochs": 10},
    "50epochs": {"num_epochs": 50},
    "100epochs": {"num_epochs": 100},
    "250epochs": {"num_epochs": 250},
    "500epochs": {"num_epochs": 500},
    "2000epochs": {"num_epochs": 2000},
    "4000epochs": {"num_epochs": 4000},
    # Tests and smoke runs of the official commands: seconds, learns nothing.
    "smoke": {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
              "test_time_mirroring": False},
    # Synthetic phantom on a CPU, one fold on both cores (9-10 s an epoch on this project's 2-core
    # machine). What makes the small classes learnable in 1,250 iterations (benchmarks/RESULTS.md):
    # - AdamW (nnU-Net's nnUNetTrainerAdam) at 3e-3: with nnU-Net's SGD the valve never appeared;
    # - the cross-entropy weighted 3x on the valve and 30x on the calcifications: without it the few
    #   calcium voxels are outvoted by the bright bone and contrast, and their probability goes to 0;
    # - forced-foreground samples (probability 0.8) centred on the valve and calcium 3x and 6x as
    #   often as on the myocardium, and calcified cases drawn more often (foreground_class_weights);
    #   1.0 left no background-only patches and the network over-segmented the body in a trial;
    # - deep-supervision targets that keep the calcium (deep_supervision_keep_labels): a calcification
    #   of 2-40 voxels is background in nnU-Net's nearest-exact 1/2 and 1/4 targets, so 43% of the
    #   loss taught the decoder to call it background (seed 21: no calcium at all). Only the calcium:
    #   keeping the valve too dilates it in the coarse targets (runs with (3, 2): RESULTS.md).
    "demo": {"num_epochs": 50, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 3,
             "oversample_foreground_percent": 0.8, "probabilistic_oversampling": True,
             "foreground_class_weights": {2: 3.0, 3: 6.0}, "ce_class_weights": {2: 3.0, 3: 30.0},
             "optimizer_name": "adamw", "initial_lr": 3e-3, "save_every": 10, "test_time_mirroring": False,
             "deep_supervision_keep_labels": (3,)},
}


def make_schedule_variant(base: type, suffix: str, attributes: dict) -> type:
    """A subclass of `base` named `{base}_{suffix}` that sets `attributes` after __init__."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for name, value in attributes.items():
            setattr(self, name, value)

    name = f"{base.__name__}_{suffix}"
    doc = f"{base.__name__} with " + ", ".join(f"{k}={v}" for k, v in attributes.items()) + "."
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": doc})


# HeartTrainer_nnUNetLoss_<schedule> (nnU-Net's loss) and HeartTrainer_nnUNetDA_<schedule> (nnU-Net's
# CPU augmentation) too: the same schedule with one speed-up left out, for comparisons; and
# HeartTrainer_tversky_<schedule> (Tversky + CE, oversampling 0.5).
BASES = (HeartTrainer, HeartTrainer_nnUNetLoss, HeartTrainer_nnUNetDA, HeartTrainer_tversky)
for _base in BASES:
    for _suffix, _attributes in SCHEDULES.items():
        _cls = make_schedule_variant(_base, _suffix, _attributes)
        globals()[_cls.__name__] = _cls

__all__ = [f"{base.__name__}_{s}" for base in BASES for s in SCHEDULES]
