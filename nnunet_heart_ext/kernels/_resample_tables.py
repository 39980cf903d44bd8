"""Per-axis sampling tables of the resampling kernels (resample.py for images, resample_seg.py
for segmentations): which input voxels and weights each output voxel of one axis reads.

Output voxel k along an axis of n_in -> n_out samples the input at
`x = (k + 0.5) * n_in / n_out - 0.5` (scipy's `zoom(grid_mode=True)`); order 0 takes the voxel
`floor(clamp(x, 0, n_in - 1) + 0.5)`, order 1 the two voxels around the clamped x with scipy's
weights. Plain numpy, computed once per axis and call; the kernels read them.
"""
import numpy as np


def source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (float(n_in) / n_out) - 0.5


def mirror(i: np.ndarray, n: int) -> np.ndarray:
    # scipy's border offset for a tap past the end (its weight is 0 there, but it must index)
    return np.where(i >= n, np.maximum(2 * n - 2 - i, 0), i) if n > 1 else np.zeros_like(i)


def nearest_table(n_in: int, n_out: int) -> np.ndarray:
    x = np.clip(source_coordinates(n_in, n_out), 0, n_in - 1)
    return np.floor(x + 0.5).astype(np.int64)


def linear_table(n_in: int, n_out: int):
    """Indices (n_out, 2), weights (n_out, 2) float64 exactly as scipy computes them, and which
    of the two taps is the nearest neighbour (n_out,)."""
    x = np.clip(source_coordinates(n_in, n_out), 0, n_in - 1)
    i0 = np.floor(x)
    w0 = 1.0 - (x - i0)
    w1 = 1.0 - w0
    i0 = i0.astype(np.int64)
    idx = np.stack([i0, mirror(i0 + 1, n_in)], axis=1)
    nearest_is_upper = (np.floor(x + 0.5).astype(np.int64) != i0).astype(np.int64)
    return idx, np.stack([w0, w1], axis=1), nearest_is_upper


def identity_linear_table(n: int):
    idx = np.stack([np.arange(n), mirror(np.arange(n) + 1, n)], axis=1).astype(np.int64)
    w = np.zeros((n, 2))
    w[:, 0] = 1.0
    return idx, w, np.zeros(n, dtype=np.int64)

