"""Triton and Numba kernels (nnunet_heart_ext.kernels; the top-level `kernels` is a symlink here)."""
