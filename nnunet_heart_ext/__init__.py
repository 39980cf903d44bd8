"""nnunet-heart-ext: an installable extension of nnU-Net v2 for CT heart segmentation (AICUP 2025).

Importing this package is cheap on purpose (it runs at every interpreter start through the
`.pth` hook, see `_hook.py`): no torch, no nnunetv2 here.
"""
__version__ = "0.1.0"
