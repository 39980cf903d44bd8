"""Class logits -> a label map at another shape: order-1 resampling fused with the argmax.

`resample_argmax(logits, out, separate_axis, order_z, threads)` (Numba, CPU), its variant
`resample_softmax_argmax(logits, probabilities, out, ...)` that also writes the class
probabilities (softmax of the resampled logits, nnU-Net's `--save_probabilities`), and
`resample_logits_torch(logits, new_shape, separate_axis, order_z)` (torch, any device) take and
give arrays/tensors and know nothing of nnU-Net; what picks the separate axis from the spacings
and which plans may take this path lives on nnU-Net's side (nnunet_heart_ext/nnunet/prediction_export.py).

The maths: nnU-Net's export resamples the (C, Z, Y, X) logits with order 1 (skimage
`resize(order=1, mode='edge')`, i.e. scipy `zoom(grid_mode=True, mode='nearest')`), then takes
the argmax over C (first index on ties). Along an axis of n_in -> n_out samples, output k reads the
input at `x = (k + 0.5) * n_in / n_out - 0.5`, clamped to [0, n_in - 1], with weights
`1 - (x - floor(x))` and `x - floor(x)` on voxels floor(x) and floor(x) + 1 (the tables of
kernels/_resample_tables.py; past the last voxel the second tap has weight 0). Order 1 is a
convex combination, so the input's clipping to [min, max] never bites. With a separate (low-resolution) axis, nnU-Net resamples the other two axes per slice
(order 1) and that axis with `map_coordinates(order=order_z)`: order_z 0 takes the input slice
`floor(clamp(x, 0, n_in - 1) + 0.5)` (weights 1, 0), order_z 1 the linear table above. Every case
is thus one trilinear form with per-axis (index pair, weight pair) tables, evaluated per output
row: the 4 input rows around it are blended per class (contiguous, vectorised), then 2 taps along
the row per class, and the class with the largest value is written. The resampled logits (C x the
output's voxels in float32: 1.4 GB for 4 classes at 340 x 512 x 512) never exist.

Precision: nnU-Net computes in float64 and rounds to the logits' dtype (float16 from its
predictor) before the argmax; here the sums are float32 and, for float16 logits, each value is
rounded to float16's precision (round to nearest even on the bits) before the comparison, so the
same ties arise. Labels can still differ where a value lies within float32 rounding of a float16
rounding boundary: measured in tests/test_predictor.py and benchmarks/bench_predict.py.

`resample_logits_torch` is the same form with torch's `interpolate` (trilinear/bilinear,
align_corners=False, which computes the same source coordinate and clamping) and a gather along the
separate axis, for the GPU: its output is float32 logits at the new shape.

Non-finite logits: `resample_argmax` returns how many NaN values it met (the caller refuses the
case: an argmax over NaN is meaningless).
"""
from typing import Optional, Sequence

import numba
import numpy as np
from numba import njit, prange

from nnunet_heart_ext.kernels import _resample_tables


# ----------------------------------------------------------------------------- axis tables
def axis_table(n_in: int, n_out: int, order: int):
    """(idx (n_out, 2) int64, weights (n_out, 2) float32) of one axis; order 0 or 1: the tables of
    the resampling kernels (kernels/_resample_tables.py), as pairs (order 0: the nearest voxel,
    weights 1, 0)."""
    if order == 0 or n_in == n_out:
        i = _resample_tables.nearest_table(n_in, n_out)
        return np.stack([i, i], 1), np.tile(np.array([1.0, 0.0], np.float32), (n_out, 1))
    idx, weights, _ = _resample_tables.linear_table(n_in, n_out)
    return idx, weights.astype(np.float32)


def tables(in_shape: Sequence[int], out_shape: Sequence[int], separate_axis: Optional[int] = None,
           order_z: int = 0):
    """The three axis tables for resampling in_shape -> out_shape as nnU-Net's order-1 export does."""
    return [axis_table(int(i), int(o), order_z if a == separate_axis else 1)
            for a, (i, o) in enumerate(zip(in_shape, out_shape))]


# ----------------------------------------------------------------------------- Numba kernels
@njit(cache=True, inline="always")
def _blend_rows(src, rows, za, zb, ya, yb, c00, c01, c10, c11):
    """rows[c] = the 4 input rows around one output row, blended (the z and y taps), per class."""
    for c in range(src.shape[0]):
        r = rows[c]
        s00, s01, s10, s11 = src[c, za, ya], src[c, za, yb], src[c, zb, ya], src[c, zb, yb]
        for x in range(r.shape[0]):
            r[x] = c00 * s00[x] + c01 * s01[x] + c10 * s10[x] + c11 * s11[x]


@njit(cache=True, inline="always")
def _tap_values(rows, vals, bits, xa, xb, wa, wb, half):
    """vals[c] = the x taps of rows[c]; with `half`, rounded to float16's 10 mantissa bits, to
    nearest even (normal range; `bits` is vals viewed as uint32)."""
    for c in range(vals.shape[0]):
        vals[c] = wa * rows[c, xa] + wb * rows[c, xb]
    if half:
        for c in range(vals.shape[0]):
            u = bits[c]
            bits[c] = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)


@njit(cache=True, parallel=True)
def _resample_argmax(src, probs, dst, i0, w0, i1, w1, i2, w2, half):
    """dst = argmax over C of the resampled (float16-rounded with `half`) logits; returns the NaN
    count. With `probs` (C, *dst.shape) instead of None, also writes the softmax of those values
    there and takes the argmax of the probabilities (nnU-Net's order). Numba compiles the two
    cases apart (`probs is None` is decided at compile time), so the argmax alone pays nothing."""
    n_cls = src.shape[0]
    n0, n1, n2 = dst.shape
    nan = 0
    for a in prange(n0):
        rows = np.empty((n_cls, src.shape[3]), dtype=np.float32)
        vals = np.empty(n_cls, dtype=np.float32)
        bits = vals.view(np.uint32)
        for b in range(n1):
            _blend_rows(src, rows, i0[a, 0], i0[a, 1], i1[b, 0], i1[b, 1], w0[a, 0] * w1[b, 0],
                        w0[a, 0] * w1[b, 1], w0[a, 1] * w1[b, 0], w0[a, 1] * w1[b, 1])
            for k in range(n2):
                _tap_values(rows, vals, bits, i2[k, 0], i2[k, 1], w2[k, 0], w2[k, 1], half)
                if probs is None:
                    best = vals[0]
                    arg = 0
                    for c in range(n_cls):
                        v = vals[c]
                        if v > best:
                            best = v
                            arg = c
                        elif v != v:
                            nan += 1
                else:
                    top = vals[0]
                    for c in range(1, n_cls):
                        top = max(top, vals[c])
                    total = np.float32(0.0)
                    for c in range(n_cls):
                        e = np.exp(vals[c] - top)
                        vals[c] = e
                        total += e
                    if total != total:
                        nan += 1
                    best = np.float32(-1.0)
                    arg = 0
                    for c in range(n_cls):
                        p = vals[c] / total
                        probs[c, a, b, k] = p
                        if p > best:
                            best = p
                            arg = c
                dst[a, b, k] = arg
    return nan


def _run(logits, probabilities, out, separate_axis, order_z, threads) -> int:
    """Check the arguments, build the axis tables, run the kernel (the NaN count)."""
    _check(logits, out, separate_axis, order_z)
    if 0 in out.shape:
        return 0
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    src = _as_float32(logits)
    flat = []
    for idx, w in tables(src.shape[1:], out.shape, separate_axis, order_z):
        flat += [idx, w]
    return int(_resample_argmax(src, probabilities, out, *flat, logits.dtype == np.float16))


def resample_softmax_argmax(logits: np.ndarray, probabilities: np.ndarray, out: np.ndarray,
                            separate_axis: Optional[int] = None, order_z: int = 0,
                            threads: Optional[int] = None) -> int:
    """`resample_argmax` that also writes the class probabilities (softmax over C of the resampled
    logits, float32) into `probabilities` (C, *out.shape; any strides, e.g. the crop of the
    uncropped volume) and takes the argmax of those. Returns the count of voxels whose softmax
    was NaN."""
    if probabilities.shape != (logits.shape[0], *out.shape) or probabilities.dtype != np.float32:
        raise ValueError(f"resample_softmax_argmax: probabilities must be float32 {(logits.shape[0], *out.shape)}, "
                         f"got {probabilities.dtype} {probabilities.shape}")
    return _run(logits, probabilities, out, separate_axis, order_z, threads)


def _check(logits, out, separate_axis, order_z):
    if logits.ndim != 4 or out.ndim != 3:
        raise ValueError(f"logits must be (C, Z, Y, X) and out 3-D, got {logits.shape}, {out.shape}")
    if out.dtype.kind not in "iu" or logits.shape[0] > np.iinfo(out.dtype).max + 1:
        raise ValueError(f"out must be an integer array holding {logits.shape[0]} labels, got {out.dtype}")
    if separate_axis not in (None, 0, 1, 2) or order_z not in (0, 1):
        raise ValueError(f"separate_axis {separate_axis!r}, order_z {order_z!r}")


@njit(cache=True, parallel=True)
def _half_to_float(src, dst, lut):
    n = src.shape[0]
    step = 1 << 16
    for blk in prange((n + step - 1) // step):
        for i in range(blk * step, min(n, (blk + 1) * step)):
            dst[i] = lut[src[i]]


_HALF_LUT = None


def _as_float32(logits: np.ndarray) -> np.ndarray:
    """C-contiguous float32; float16 through a 65,536-entry table on every thread (numpy's cast
    is single-threaded and ~3x slower)."""
    global _HALF_LUT
    if logits.dtype != np.float16:
        return np.ascontiguousarray(logits, dtype=np.float32)
    if _HALF_LUT is None:
        _HALF_LUT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    src = np.ascontiguousarray(logits).view(np.uint16)
    out = np.empty(logits.shape, dtype=np.float32)
    _half_to_float(src.reshape(-1), out.reshape(-1), _HALF_LUT)
    return out


def resample_argmax(logits: np.ndarray, out: np.ndarray, separate_axis: Optional[int] = None, order_z: int = 0,
                    threads: Optional[int] = None) -> int:
    """Write argmax_c(order-1 resampled logits[c]) into `out`; return the count of NaNs met.

    logits: (C, Z, Y, X) float32 (other float dtypes are converted; C < 256 for uint8 `out`).
    out: a 3-D integer array (any strides, e.g. the crop of a larger volume) of the target shape.
    separate_axis / order_z: nnU-Net's separate-z path (see the module docstring).
    threads: Numba threads for this call (None: Numba's current setting)."""
    return _run(logits, None, out, separate_axis, order_z, threads)


# ----------------------------------------------------------------------------- torch (GPU)
def resample_logits_torch(logits, new_shape: Sequence[int], separate_axis: Optional[int] = None, order_z: int = 0):
    """(C, Z, Y, X) tensor -> (C, *new_shape) on the same device, nnU-Net's order-1 export
    resampling (the same tables as `resample_argmax`), computed in float32 and returned in the
    logits' dtype like nnU-Net's (float16 logits give float16, hence nnU-Net's ties)."""
    import torch
    import torch.nn.functional as F

    new_shape = tuple(int(i) for i in new_shape)
    x = logits.float()
    if tuple(x.shape[1:]) == new_shape:
        return logits
    if separate_axis is None:
        return F.interpolate(x[None], size=new_shape, mode="trilinear", align_corners=False)[0].to(logits.dtype)
    ax = separate_axis + 1
    planes = [d for d in (1, 2, 3) if d != ax]
    # the separate axis becomes the batch: (S, C, P, Q) -> bilinear in-plane per slice
    moved = x.permute(ax, 0, *planes)
    plane_shape = tuple(new_shape[d - 1] for d in planes)
    if tuple(moved.shape[2:]) != plane_shape:
        moved = F.interpolate(moved, size=plane_shape, mode="bilinear", align_corners=False)
    idx, w = axis_table(moved.shape[0], new_shape[separate_axis], order_z)
    idx = torch.from_numpy(idx).to(x.device)
    w = torch.from_numpy(w).to(x.device)
    if order_z == 1:
        moved = (moved.index_select(0, idx[:, 0]) * w[:, 0].view(-1, 1, 1, 1)
                 + moved.index_select(0, idx[:, 1]) * w[:, 1].view(-1, 1, 1, 1))
    else:
        moved = moved.index_select(0, idx[:, 0])
    # back to (C, Z, Y, X): `moved` holds (separate axis, C, planes[0], planes[1])
    position = {ax: 0, 0: 1, planes[0]: 2, planes[1]: 3}
    return moved.permute(*[position[d] for d in range(4)]).to(logits.dtype).contiguous()
