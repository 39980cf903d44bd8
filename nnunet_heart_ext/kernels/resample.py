"""Resampling of (C, Z, Y, X) arrays to a new shape, separable, with Numba: the results of nnU-Net's
default resampling (`resample_data_or_seg_to_shape`) for the orders it uses.

`resample(data, new_shape, is_seg, order, order_z, separate_axis, threads)` takes and gives numpy
arrays and knows nothing of nnU-Net: spacings, the anisotropy rule that picks `separate_axis`,
the fallback for other orders and the thread policy of nnU-Net's worker pools live in the
adapter with nnU-Net's signature, nnunet_heart_ext/nnunet/resampling.py.

Reference maths (nnunetv2 2.8.1 `preprocessing/resampling/default_resampling.py`, which calls
skimage `resize(mode='edge', anti_aliasing=False, clip=True)` = scipy `zoom(grid_mode=True,
mode='nearest')`, and batchgenerators `resize_segmentation`):

- Output voxel k along an axis of n_in -> n_out samples the input at
  `x = (k + 0.5) * n_in / n_out - 0.5`.
- Order 0: the input voxel `floor(clamp(x, 0, n_in - 1) + 0.5)`.
- Order 1: `x` clamped to [0, n_in - 1], `i = floor(x)`, weights `w0 = 1 - (x - i)`, `w1 = 1 - w0`
  on voxels i and i + 1; tensor product over the three axes (done here in one pass: the four
  input rows around an output row are blended, then two taps along the row).
- Order 3: scipy pads every axis with 12 edge samples, runs the cubic B-spline prefilter (gain 6,
  pole sqrt(3) - 2, causal then anti-causal recursion) and evaluates the 4-tap cubic B-spline at
  `x + 12` (no clamping). Both the prefilter and the evaluation are separable, so this module
  does them one axis at a time: pad, prefilter and evaluate each line, then the next axis. That is
  4 taps per axis instead of 64 per voxel.
- Images are clipped to the input's [min, max] (per 2-D slice on the separate-z path), then
  stored in the input's dtype (numpy casting: integers truncate toward zero).
- Separate axis (`separate_axis`, nnU-Net's "separate z" for anisotropic spacing): the other
  two axes as above per slice, then the low-resolution axis with `map_coordinates(order=order_z, mode='nearest')`.
- Segmentations (`is_seg`: order 0, and order 1 per label with batchgenerators' tie rule) are
  computed in kernels/resample_seg.py, whose docstring states their maths; the per-axis tables
  both paths read are in kernels/_resample_tables.py.

Images are computed in float32 (the reference uses float64): differences are about 1e-6 of the
value range. Integer-typed images can therefore differ by 1 where the exact value is within
rounding of an integer, because both truncate. Orders: images 0, 1, 3; segmentations 0, 1;
order_z 0, 1 (`supports`); others raise ValueError.

Threads: `threads` sets Numba's thread count for the call (capped by NUMBA_NUM_THREADS); None
keeps Numba's current setting. Kernels are compiled with `cache=True`: a fresh worker process
loads them from `__pycache__`.
"""
import math
from typing import Optional, Sequence

import numba
import numpy as np
from numba import njit, prange

from nnunet_heart_ext.kernels._resample_tables import (identity_linear_table, linear_table, nearest_table,
                                                       source_coordinates)
from nnunet_heart_ext.kernels.resample_seg import resample_seg_channel

_PAD = 12  # scipy's zoom pads each axis by 12 edge samples before the spline prefilter
_POLE = math.sqrt(3.0) - 2.0  # cubic B-spline prefilter pole
_GAIN = (1.0 - _POLE) * (1.0 - 1.0 / _POLE)
_INIT_TAPS = 28  # causal init: pole**28 < 1e-15, the rest of scipy's mirror sum is below float32
_TILE = 256  # columns per tile when resampling along a non-contiguous axis


# ----------------------------------------------------------------------------- axis tables (images)
def _cubic_table(n_in: int, n_out: int):
    """Tap indices into the 12-padded line (n_out, 4) and cubic B-spline weights (n_out, 4)."""
    x = source_coordinates(n_in, n_out) + _PAD
    f = np.floor(x)
    y = x - f
    z = 1.0 - y
    w = np.empty((n_out, 4))
    w[:, 1] = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
    w[:, 2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
    w[:, 0] = z * z * z / 6.0
    w[:, 3] = 1.0 - w[:, 0] - w[:, 1] - w[:, 2]
    idx = f.astype(np.int64)[:, None] - 1 + np.arange(4)[None]
    return idx, w


def _axis_table(n_in: int, n_out: int, order: int):
    """(idx, weights float32, pad) for one separable image pass of `order`."""
    if order == 0:
        return nearest_table(n_in, n_out)[:, None], np.ones((n_out, 1), np.float32), 0
    if order == 1:
        idx, w, _ = linear_table(n_in, n_out)
        return idx, w.astype(np.float32), 0
    idx, w = _cubic_table(n_in, n_out)
    return idx, w.astype(np.float32), _PAD


# ----------------------------------------------------------------------------- image kernels
@njit(cache=True)
def _prefilter_columns(buf):
    """Cubic B-spline prefilter along axis 0 of buf (length, width), in place (scipy's
    apply_filter with mirror initialisation, truncated where the pole's powers vanish)."""
    n, m = buf.shape
    z = np.float32(_POLE)
    gain = np.float32(_GAIN)
    for i in range(n):
        for j in range(m):
            buf[i, j] *= gain
    first = np.zeros(m, dtype=np.float32)
    zi = np.float32(1.0)
    for i in range(min(n - 1, _INIT_TAPS)):
        for j in range(m):
            first[j] += zi * buf[i, j]
        zi *= z
    for j in range(m):
        buf[0, j] = first[j]
    for i in range(1, n):
        for j in range(m):
            buf[i, j] += z * buf[i - 1, j]
    scale = z / (z * z - np.float32(1.0))
    for j in range(m):
        buf[n - 1, j] = (z * buf[n - 2, j] + buf[n - 1, j]) * scale
    for i in range(n - 2, -1, -1):
        for j in range(m):
            buf[i, j] = z * (buf[i + 1, j] - buf[i, j])


@njit(cache=True, parallel=True)
def _resample_last_axis(src, dst, idx, w, pad, lo, hi):
    """src (rows, n_in) -> dst (rows, n_out) along axis 1; pad > 0: cubic (pad, prefilter).
    Groups of rows are transposed into a small buffer so that the recursion and the taps run
    across rows (vectorised) instead of along one line (a serial dependency chain)."""
    rows, n_in = src.shape
    n_out, taps = idx.shape
    group = 16
    for g in prange((rows + group - 1) // group):
        r0 = g * group
        m = min(group, rows - r0)
        buf = np.empty((n_in + 2 * pad, m), dtype=np.float32)
        for j in range(m):
            for i in range(n_in + 2 * pad):
                buf[i, j] = src[r0 + j, min(max(i - pad, 0), n_in - 1)]
        if pad > 0:
            _prefilter_columns(buf)
        out = np.zeros((n_out, m), dtype=np.float32)
        for k in range(n_out):
            for t in range(taps):
                wt = w[k, t]
                row = idx[k, t]
                for j in range(m):
                    out[k, j] += wt * buf[row, j]
        for j in range(m):
            for k in range(n_out):
                dst[r0 + j, k] = min(max(out[k, j], lo), hi)


@njit(cache=True, parallel=True)
def _resample_middle_axis(src, dst, idx, w, pad, lo, hi):
    """src (outer, n_in, inner) -> dst (outer, n_out, inner) along axis 1, in tiles of the
    contiguous inner axis so that every inner loop runs over contiguous memory."""
    outer, n_in, inner = src.shape
    n_out, taps = idx.shape
    tiles_per_row = (inner + _TILE - 1) // _TILE
    for tile in prange(outer * tiles_per_row):
        o = tile // tiles_per_row
        j0 = (tile % tiles_per_row) * _TILE
        m = min(_TILE, inner - j0)
        buf = np.empty((n_in + 2 * pad, m), dtype=np.float32)
        for i in range(n_in + 2 * pad):
            s = min(max(i - pad, 0), n_in - 1)
            for j in range(m):
                buf[i, j] = src[o, s, j0 + j]
        if pad > 0:
            _prefilter_columns(buf)
        acc = np.empty(m, dtype=np.float32)
        for k in range(n_out):
            acc[:] = 0.0
            for t in range(taps):
                wt = w[k, t]
                row = idx[k, t]
                for j in range(m):
                    acc[j] += wt * buf[row, j]
            for j in range(m):
                dst[o, k, j0 + j] = min(max(acc[j], lo), hi)


@njit(cache=True, parallel=True)
def _resample_linear_3d(src, dst, i0, w0, i1, w1, i2, w2, lo, hi):
    """Order 1 over all three axes in one pass: for each output row, the 4 input rows around it
    are blended (contiguous, vectorised), then 2 taps along the row."""
    n0, n1, n2 = dst.shape
    n_in = src.shape[2]
    chunk = 16
    for c in prange((n0 * n1 + chunk - 1) // chunk):
        row = np.empty(n_in, dtype=np.float32)
        for ab in range(c * chunk, min(n0 * n1, (c + 1) * chunk)):
            a = ab // n1
            b = ab % n1
            za, zb, ya, yb = i0[a, 0], i0[a, 1], i1[b, 0], i1[b, 1]
            c00, c01 = w0[a, 0] * w1[b, 0], w0[a, 0] * w1[b, 1]
            c10, c11 = w0[a, 1] * w1[b, 0], w0[a, 1] * w1[b, 1]
            for x in range(n_in):
                row[x] = c00 * src[za, ya, x] + c01 * src[za, yb, x] + c10 * src[zb, ya, x] + c11 * src[zb, yb, x]
            for k in range(n2):
                v = w2[k, 0] * row[i2[k, 0]] + w2[k, 1] * row[i2[k, 1]]
                dst[a, b, k] = min(max(v, lo), hi)


def _resample_axis(src: np.ndarray, axis: int, n_out: int, order: int, dst: np.ndarray = None,
                   lo=-np.inf, hi=np.inf):
    """One separable pass of a C-contiguous float32 3-D array along `axis`, clipped to [lo, hi],
    into `dst` (C-contiguous float32) or a new array."""
    n0, n1, n2 = src.shape
    idx, w, pad = _axis_table(src.shape[axis], n_out, order)
    if dst is None:
        shape = list(src.shape)
        shape[axis] = n_out
        dst = np.empty(shape, dtype=np.float32)
    lo, hi = np.float32(lo), np.float32(hi)
    if axis == 2:
        _resample_last_axis(src.reshape(n0 * n1, n2), dst.reshape(n0 * n1, n_out), idx, w, pad, lo, hi)
    elif axis == 1:
        _resample_middle_axis(src, dst, idx, w, pad, lo, hi)
    else:
        _resample_middle_axis(src.reshape(1, n0, n1 * n2), dst.reshape(1, n_out, n1 * n2), idx, w, pad, lo, hi)
    return dst


def _resample_image(img: np.ndarray, dst: np.ndarray, order: int, lo=-np.inf, hi=np.inf, axes=(0, 1, 2)):
    """Resample the given axes of a 3-D image to dst.shape, clipped to [lo, hi]. Order 1: one
    fused pass. Orders 0 and 3: one pass per axis, those that shrink most first (later passes
    then touch less data); the last pass writes dst."""
    todo = [a for a in axes if img.shape[a] != dst.shape[a]]
    todo.sort(key=lambda a: dst.shape[a] / img.shape[a])
    if not todo:
        np.copyto(dst, np.clip(img, lo, hi), casting="unsafe")
        return dst
    # the kernels take and give float32 only (one compiled version each); other dtypes are
    # converted by numpy, whose float -> int cast truncates like the reference's
    cur = np.ascontiguousarray(img, dtype=np.float32)
    if order == 1:  # one fused pass; axes left alone get the identity (weights 1, 0)
        tables = []
        for a in range(3):
            idx, w, _ = linear_table(cur.shape[a], dst.shape[a]) if a in todo else identity_linear_table(cur.shape[a])
            tables += [idx, w.astype(np.float32)]
        out = dst if dst.dtype == np.float32 else np.empty(dst.shape, np.float32)
        _resample_linear_3d(cur, out, *tables, np.float32(lo), np.float32(hi))
        if out is not dst:
            np.copyto(dst, out, casting="unsafe")
        return dst
    for n, a in enumerate(todo):
        if n < len(todo) - 1:
            cur = _resample_axis(cur, a, dst.shape[a], order)
        elif dst.dtype == np.float32:
            _resample_axis(cur, a, dst.shape[a], order, dst, lo, hi)
        else:
            np.copyto(dst, _resample_axis(cur, a, dst.shape[a], order, None, lo, hi), casting="unsafe")
    return dst

# ----------------------------------------------------------------------------- public function
def supports(is_seg: bool, order: int, order_z: int) -> bool:
    """Whether `resample` computes these orders (images 0, 1, 3; segmentations 0, 1; order_z 0, 1)."""
    return order in ((0, 1) if is_seg else (0, 1, 3)) and order_z in (0, 1)


def _channel(data_c: np.ndarray, dst: np.ndarray, is_seg: bool, order: int, order_z: int,
             separate_axis: Optional[int]) -> None:
    """Resample one channel (3-D) into dst, a C-contiguous (Z, Y, X) array of the output dtype."""
    axis = separate_axis
    if is_seg:
        resample_seg_channel(data_c, dst, order, order_z, separate_axis)
        return
    if axis is None:
        _resample_image(data_c, dst, order, data_c.min(), data_c.max())
        return
    # separate axis: in-plane resampling clipped per slice (skimage resizes each slice on its own)
    in_plane = tuple(a for a in range(3) if a != axis)
    bounds = [None, None, None]
    bounds[axis] = slice(None)
    lo = data_c.min(axis=in_plane).astype(np.float32)[tuple(bounds)]
    hi = data_c.max(axis=in_plane).astype(np.float32)[tuple(bounds)]
    plane_shape = list(dst.shape)
    plane_shape[axis] = data_c.shape[axis]
    plane = _resample_image(data_c, np.empty(plane_shape, np.float32), order, axes=in_plane)
    np.clip(plane, lo, hi, out=plane)
    if plane.shape[axis] == dst.shape[axis]:
        np.copyto(dst, plane, casting="unsafe")
    else:
        _resample_image(plane, dst, order_z, axes=(axis,))


def resample(data: np.ndarray, new_shape: Sequence[int], is_seg: bool = False, order: int = 3, order_z: int = 0,
             separate_axis: Optional[int] = None, threads: Optional[int] = None) -> np.ndarray:
    """`data` (C, Z, Y, X) -> a new array (C, *new_shape) in data's dtype.

    is_seg: label maps (order 0 nearest, order 1 per-label linear with nnU-Net's tie rule) rather
    than images (order 0, 1 or cubic B-spline 3, clipped to the input's range).
    separate_axis: None resamples the three axes together; 0, 1 or 2 resamples the other two
    per slice with `order`, then that axis alone with `order_z`.
    threads: Numba threads for this call (None: Numba's current setting).
    The maths are in the module docstring (segmentations: kernels/resample_seg.py's)."""
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"resample: data must be (C, Z, Y, X), got {data.ndim} dimensions")
    new_shape = tuple(int(i) for i in new_shape)
    if len(new_shape) != 3:
        raise ValueError(f"resample: new_shape must have 3 entries, got {new_shape}")
    if not supports(is_seg, order, order_z):
        raise ValueError(f"resample: order {order}, order_z {order_z} for {'segmentations' if is_seg else 'images'} "
                         "is not computed here (supports(is_seg, order, order_z))")
    if separate_axis not in (None, 0, 1, 2):
        raise ValueError(f"resample: separate_axis must be None, 0, 1 or 2, got {separate_axis!r}")
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    out = np.empty((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        _channel(data[c], out[c], is_seg, order, order_z, separate_axis)
    return out
