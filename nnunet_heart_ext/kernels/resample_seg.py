"""Resampling of (Z, Y, X) label maps, with Numba: the segmentation half of `resample`
(kernels/resample.py, which holds the public function, the shared maths and the image path).

Reference maths (nnunetv2 2.8.1 `preprocessing/resampling/default_resampling.py`, batchgenerators
`resize_segmentation`; source coordinates and tables in kernels/_resample_tables.py):

- Order 0: the input voxel `floor(clamp(x, 0, n_in - 1) + 0.5)` on every axis.
- Order 1 (`resize_segmentation` of batchgenerators 0.25.5, the version installed with nnunetv2
  2.8.1, seg_tiebreak='nearest'): every label's indicator is interpolated (order 1, clipped to
  [0, 1]); the label with the largest value wins; on an exact tie the nearest-neighbour label
  wins if it is among the tied labels, else the smallest tied label. Here one pass over the
  output decides every voxel from its 8 neighbours; the indicator values are summed in scipy's
  corner order with scipy's weights, in float64, so ties are the same ties.
- Separate axis: the other two axes as above per slice, then the low-resolution axis with
  `map_coordinates(order=order_z, mode='nearest')`; with order_z 1 the largest label whose
  interpolated indicator exceeds 0.5 wins, 0 where none does (nnU-Net's rule on that path).

Kernels are compiled with `cache=True`, as in kernels/resample.py.
"""
from typing import Optional

import numpy as np
from numba import njit, prange

from nnunet_heart_ext.kernels._resample_tables import identity_linear_table, linear_table, nearest_table


@njit(cache=True, parallel=True)
def _gather_nearest(src, dst, i0, i1, i2):
    for a in prange(dst.shape[0]):
        for b in range(dst.shape[1]):
            for c in range(dst.shape[2]):
                dst[a, b, c] = src[i0[a], i1[b], i2[c]]


@njit(cache=True, parallel=True)
def _seg_linear_argmax(src, dst, idx0, w0, nn0, idx1, w1, nn1, idx2, w2, nn2):
    """Per voxel: order-1 indicator of every label among its 8 neighbours (float64, scipy's
    corner order and weights), clip to 1, largest wins; exact ties go to the nearest neighbour's
    label if it is tied, else to the smallest tied label (batchgenerators seg_tiebreak='nearest').
    Where all 8 neighbours agree (most voxels) that label is the answer without any arithmetic."""
    n0, n1, n2 = dst.shape
    for ab in prange(n0 * n1):
        a = ab // n1
        b = ab % n1
        rows = (src[idx0[a, 0], idx1[b, 0]], src[idx0[a, 0], idx1[b, 1]],
                src[idx0[a, 1], idx1[b, 0]], src[idx0[a, 1], idx1[b, 1]])
        labels = np.empty(8, dtype=src.dtype)
        scores = np.empty(8, dtype=np.float64)
        corner = np.empty(8, dtype=src.dtype)
        for c in range(n2):
            x0, x1 = idx2[c, 0], idx2[c, 1]
            first = rows[0][x0]
            if (rows[0][x1] == first and rows[1][x0] == first and rows[1][x1] == first and rows[2][x0] == first
                    and rows[2][x1] == first and rows[3][x0] == first and rows[3][x1] == first):
                dst[a, b, c] = first
                continue
            nl = 0
            for pq in range(4):  # corner order (z, y, x) with x fastest, as scipy sums them
                for r in range(2):
                    v = rows[pq][idx2[c, r]]
                    corner[pq * 2 + r] = v
                    coeff = (w0[a, pq // 2] * w1[b, pq % 2]) * w2[c, r]
                    s = 0
                    while s < nl and labels[s] != v:
                        s += 1
                    if s == nl:
                        labels[s] = v
                        scores[s] = 0.0
                        nl += 1
                    scores[s] += coeff
            best = -1.0
            win = labels[0]
            for s in range(nl):
                sc = min(scores[s], 1.0)
                scores[s] = sc
                if sc > best or (sc == best and labels[s] < win):
                    best = sc
                    win = labels[s]
            nn = corner[nn0[a] * 4 + nn1[b] * 2 + nn2[c]]
            for s in range(nl):
                if labels[s] == nn and scores[s] == best and best > 0.0:
                    win = nn
            dst[a, b, c] = win


@njit(cache=True, parallel=True)
def _seg_linear_threshold_axis0(src, dst, idx, w):
    """nnU-Net's separate-z rule along axis 0 of (n_in, m) -> (n_out, m): the largest label whose
    interpolated indicator exceeds 0.5, else 0."""
    n_out, m = dst.shape
    for k in prange(n_out):
        i0, i1 = idx[k, 0], idx[k, 1]
        a, b = w[k, 0], w[k, 1]
        for j in range(m):
            lab0 = src[i0, j]
            lab1 = src[i1, j]
            if lab0 == lab1:
                dst[k, j] = lab0 if a + b > 0.5 else 0
            elif a > 0.5 and (b <= 0.5 or lab0 > lab1):
                dst[k, j] = lab0
            elif b > 0.5:
                dst[k, j] = lab1
            else:
                dst[k, j] = 0


def _resample_seg(seg: np.ndarray, dst: np.ndarray, order: int, sep_axis: Optional[int]) -> np.ndarray:
    """Order 0 or 1 to dst.shape over all axes, or (sep_axis given) in-plane only."""
    shape = seg.shape
    in_plane = [a for a in range(3) if a != sep_axis]
    target = dst.shape
    if order == 0:
        tables = [nearest_table(shape[a], target[a]) if a in in_plane else np.arange(shape[a]) for a in range(3)]
        _gather_nearest(seg, dst, *tables)
        return dst
    tables = []
    for a in range(3):
        tables += linear_table(shape[a], target[a]) if a in in_plane else identity_linear_table(shape[a])
    _seg_linear_argmax(seg, dst, *tables)
    return dst


def _resample_seg_along(seg: np.ndarray, dst: np.ndarray, axis: int, order_z: int) -> np.ndarray:
    """The low-resolution axis of the separate-z path (map_coordinates, mode 'nearest')."""
    n_out = dst.shape[axis]
    moved = np.ascontiguousarray(np.moveaxis(seg, axis, 0))
    flat = moved.reshape(moved.shape[0], -1)
    if order_z == 0:
        out = flat[nearest_table(flat.shape[0], n_out)]
    else:
        idx, w, _ = linear_table(flat.shape[0], n_out)
        out = np.empty((n_out, flat.shape[1]), dtype=seg.dtype)
        _seg_linear_threshold_axis0(flat, out, idx, w)
    dst[...] = np.moveaxis(out.reshape((n_out,) + moved.shape[1:]), 0, axis)
    return dst


def resample_seg_channel(data_c: np.ndarray, dst: np.ndarray, order: int, order_z: int,
                         separate_axis: Optional[int]) -> None:
    """Resample one label map (3-D) into dst, a C-contiguous (Z, Y, X) array of its dtype."""
    axis = separate_axis
    if data_c.size == 0:
        dst[...] = 0
    elif axis is None:
        _resample_seg(np.ascontiguousarray(data_c), dst, order, None)
    elif data_c.shape[axis] == dst.shape[axis]:
        _resample_seg(np.ascontiguousarray(data_c), dst, order, axis)
    else:
        plane_shape = list(dst.shape)
        plane_shape[axis] = data_c.shape[axis]
        plane = np.empty(plane_shape, dtype=dst.dtype)
        _resample_seg(np.ascontiguousarray(data_c), plane, order, axis)
        _resample_seg_along(plane, dst, axis, order_z)
