"""Placeholder SimpleITK for the lent GPU machine only (benchmarks/gpu_check.sh puts this folder
on PYTHONPATH there; nothing else does). SimpleITK's wheel is too large to carry, yet importing
nnU-Net's trainer or postprocessing imports it. Training from preprocessed data, the loss and
keep-largest never call it; any use raises instead of returning something wrong."""


def __getattr__(name):
    raise ImportError(f"SimpleITK.{name}: SimpleITK is not installed on this machine (a placeholder "
                      "from benchmarks/device_stubs stands in so that nnU-Net's modules import)")
