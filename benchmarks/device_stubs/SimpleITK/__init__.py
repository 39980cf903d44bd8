"""Placeholder SimpleITK for the lent GPU machine only (benchmarks/gpu_check.sh puts this folder
on PYTHONPATH there; nothing else does). SimpleITK's wheel is too large to carry, yet importing
nnU-Net's trainer, preprocessing or postprocessing imports it, and the extension's io/phantom
modules name `sitk.Image` in annotations. Training from preprocessed data, the loss, keep-largest
and the in-memory phantom never call it. Every name exists (so annotations evaluate), and every
call raises instead of returning something wrong."""


class _Unavailable:
    def __new__(cls, *args, **kwargs):
        raise ImportError(f"SimpleITK.{cls.__name__}: SimpleITK is not installed on this machine (a placeholder "
                          "from benchmarks/device_stubs stands in so that nnU-Net's modules import)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Unavailable,), {})
