"""Triton and Numba kernels (installed as nnunet_heart_ext.kernels)."""
