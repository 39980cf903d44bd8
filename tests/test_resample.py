"""resample_data_or_seg_to_shape_numba (nnunet_heart_ext.nnunet.resampling, over the Numba kernel in
nnunet_heart_ext.kernels.resample) against nnunetv2's own resample_data_or_seg_to_shape.

Tolerances (issue 5): images and probabilities max |difference| <= 1e-4 x (max - min) of the
input; segmentations identical voxel for voxel. Integer-typed images: both sides truncate a
float result toward zero, so ours must be the truncation of a value within that tolerance of
nnU-Net's exact (float64) result, which allows a difference of 1 where that result is within
rounding of an integer.
"""
import multiprocessing
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba

ISO = (1.0, 1.0, 1.0)

# (input shape (C, Z, Y, X), new shape, current spacing, new spacing, force_separate_z)
CASES = {
    "upsample": ((1, 9, 12, 11), (13, 17, 15), ISO, ISO, None),
    "downsample": ((1, 14, 16, 15), (9, 11, 10), ISO, ISO, None),
    "mixed": ((1, 12, 14, 13), (16, 9, 13), ISO, ISO, None),
    "even_factor": ((1, 6, 7, 5), (12, 14, 10), ISO, ISO, None),
    "axis_length_1": ((1, 1, 12, 10), (3, 16, 7), ISO, ISO, None),
    "to_length_1": ((1, 5, 12, 10), (1, 8, 13), ISO, ISO, None),
    "multichannel": ((3, 8, 11, 10), (11, 8, 13), ISO, ISO, None),
    "separate_z_axis0": ((1, 5, 12, 11), (11, 15, 9), (4.0, 1.0, 1.0), (1.8, 0.8, 1.2), None),
    "separate_z_axis2": ((1, 12, 11, 5), (9, 14, 12), (1.0, 1.0, 4.0), (1.2, 0.8, 1.7), None),
    "separate_z_inplane_unchanged": ((1, 5, 12, 11), (9, 12, 11), (4.0, 1.0, 1.0), (2.2, 1.0, 1.0), None),
    "force_separate_z_true": ((1, 10, 6, 11), (13, 11, 9), (1.0, 2.0, 1.0), ISO, True),
    "force_separate_z_false": ((1, 5, 12, 11), (11, 15, 9), (4.0, 1.0, 1.0), (1.8, 0.8, 1.2), False),
}


def ct_like(shape, seed):
    """int16 CT-like channels: air, a soft-tissue ellipse with noise, a bright blob, specks."""
    rng = np.random.default_rng(seed)
    c, *spatial = shape
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))
    img = np.where(r < 0.9, 40, -1024).astype(np.int16)
    img[r < 0.45] = 300
    img += (rng.normal(0, 25, size=spatial) * (r < 0.9)).astype(np.int16)
    img[rng.random(spatial) < 0.01] = 900
    return np.stack([img + 10 * i for i in range(c)]).astype(np.int16)


def label_blobs(shape, seed, labels=(-1, 0, 1, 2, 3)):
    """Label maps with regions a few voxels wide (the realistic case) and single voxels."""
    rng = np.random.default_rng(seed)
    c, *spatial = shape
    coarse = rng.choice(labels, size=(c, *[max(1, s // 3) for s in spatial]))
    for axis, s in enumerate(spatial):
        coarse = np.repeat(coarse, 3, axis=axis + 1).take(range(s), axis=axis + 1, mode="clip")
    specks = rng.random(coarse.shape) < 0.05
    coarse[specks] = rng.choice(labels, size=specks.sum())
    return coarse


def assert_close_to_reference(ours, ref_float, ref_native, data):
    scale = float(data.max()) - float(data.min())
    tol = 1e-4 * scale
    assert ours.shape == ref_native.shape and ours.dtype == ref_native.dtype
    if np.issubdtype(ours.dtype, np.integer):
        low, high = np.trunc(ref_float - tol), np.trunc(ref_float + tol)
        assert np.all((ours >= low) & (ours <= high)), "not the truncation of a value within tolerance"
        assert np.abs(ours.astype(np.int64) - ref_native).max() <= 1
    else:
        diff = np.abs(ours.astype(np.float64) - ref_float).max()
        assert diff <= tol, f"max abs difference {diff} > {tol}"


def reference(data, new_shape, spacing, new_spacing, force, **kw):
    return resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, force_separate_z=force, **kw)


# order_z matters on the separate-z path only
CASES_AND_ORDER_Z = [(case, 0) for case in sorted(CASES)] + \
    [(case, 1) for case in sorted(CASES) if "separate_z" in case and not case.endswith("false")]


@pytest.mark.parametrize("case,order_z", CASES_AND_ORDER_Z)
@pytest.mark.parametrize("order", [3, 1])
def test_images_match_nnunet(case, order, order_z):
    shape, new_shape, spacing, new_spacing, force = CASES[case]
    kw = dict(is_seg=False, order=order, order_z=order_z)
    seed = zlib.crc32(f"{case}{order}{order_z}".encode())
    for data in (np.random.default_rng(seed).normal(0, 3, size=shape).astype(np.float32),
                 ct_like(shape, seed)):
        ours = resample_data_or_seg_to_shape_numba(data, new_shape, spacing, new_spacing, force_separate_z=force, **kw)
        ref_float = reference(data.astype(np.float64), new_shape, spacing, new_spacing, force, **kw)
        ref_native = reference(data, new_shape, spacing, new_spacing, force, **kw)
        assert_close_to_reference(ours, ref_float, ref_native, data)


@pytest.mark.parametrize("case,order_z", CASES_AND_ORDER_Z)
def test_segmentations_identical(case, order_z):
    shape, new_shape, spacing, new_spacing, force = CASES[case]
    seed = zlib.crc32(f"{case}{order_z}seg".encode())
    rng = np.random.default_rng(seed)
    for order in (1, 0):
        for seg in (label_blobs(shape, seed).astype(np.float32),  # what nnU-Net's reader gives
                    rng.integers(-1, 4, size=shape).astype(np.int8)):  # every voxel its own region
            kw = dict(is_seg=True, order=order, order_z=order_z)
            ours = resample_data_or_seg_to_shape_numba(seg, new_shape, spacing, new_spacing, force_separate_z=force,
                                                       **kw)
            ref = reference(seg, new_shape, spacing, new_spacing, force, **kw)
            assert ours.dtype == ref.dtype
            np.testing.assert_array_equal(ours, ref)


def test_segmentation_ties_decided_like_nnunet():
    # an even upsampling puts sample points exactly between two labels at every boundary; where
    # several labels meet, the nearest-neighbour label need not be among the tied ones
    rng = np.random.default_rng(7)
    seg = rng.integers(0, 4, size=(1, 6, 6, 6)).astype(np.float32)
    ours = resample_data_or_seg_to_shape_numba(seg, (12, 12, 12), ISO, ISO, is_seg=True, order=1)
    ref = resample_data_or_seg_to_shape(seg, (12, 12, 12), ISO, ISO, is_seg=True, order=1)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("case", ["upsample", "downsample", "mixed", "separate_z_axis0"])
def test_probabilities_match_nnunet(case):
    # export: softmax probabilities (or logits) of 4 classes, order 1, back to the original shape
    shape, new_shape, spacing, new_spacing, force = CASES[case]
    logits = np.random.default_rng(3).normal(size=(4, *shape[1:])).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits), 0)
    kw = dict(is_seg=False, order=1, order_z=0, force_separate_z=force)
    ours = resample_data_or_seg_to_shape_numba(probs, new_shape, spacing, new_spacing, **kw)
    ref = resample_data_or_seg_to_shape(probs.numpy().astype(np.float64), new_shape, spacing, new_spacing, **kw)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert_close_to_reference(ours, ref, ref.astype(np.float32), probs.numpy())


def test_unchanged_shape_returns_input_like_nnunet():
    data = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    ours = resample_data_or_seg_to_shape_numba(data, (5, 6, 7), ISO, ISO)
    ref = resample_data_or_seg_to_shape(data, (5, 6, 7), ISO, ISO)
    assert ours is data and ref is data


def test_bad_input_is_refused():
    with pytest.raises(AssertionError, match="c x y z"):
        resample_data_or_seg_to_shape_numba(np.zeros((5, 6, 7), np.float32), (5, 6, 8), ISO, ISO)


def test_unsupported_orders_fall_back_to_nnunet():
    data = np.random.default_rng(1).normal(size=(1, 5, 6, 7))
    ours = resample_data_or_seg_to_shape_numba(data, (7, 6, 5), ISO, ISO, order=2)
    np.testing.assert_array_equal(ours, resample_data_or_seg_to_shape(data, (7, 6, 5), ISO, ISO, order=2))


def test_adapter_has_nnunets_signature_and_defaults():
    """A drop-in: the parameters of nnU-Net's function, in its order, with its defaults
    (force_separate_z=False, not None)."""
    import inspect

    def parameters(fn):
        return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

    assert parameters(resample_data_or_seg_to_shape_numba) == parameters(resample_data_or_seg_to_shape)


@pytest.mark.parametrize("is_seg,order", [(False, 3), (False, 1), (True, 1)])
def test_defaults_match_nnunet_on_anisotropic_data(is_seg, order):
    """Called with nnU-Net's defaults only: on anisotropic spacing nnU-Net does not resample the
    low-resolution axis separately (force_separate_z=False), and neither does the adapter."""
    shape, new_shape, spacing, new_spacing = (1, 5, 12, 11), (11, 15, 9), (4.0, 1.0, 1.0), (1.8, 0.8, 1.2)
    rng = np.random.default_rng(order)
    data = label_blobs(shape, 5).astype(np.float32) if is_seg else rng.normal(0, 3, size=shape).astype(np.float32)
    ours = resample_data_or_seg_to_shape_numba(data, new_shape, spacing, new_spacing, is_seg=is_seg, order=order)
    ref = resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=is_seg, order=order)
    if is_seg:
        np.testing.assert_array_equal(ours, ref)
    else:
        ref_float = resample_data_or_seg_to_shape(data.astype(np.float64), new_shape, spacing, new_spacing,
                                                  is_seg=is_seg, order=order)
        assert_close_to_reference(ours, ref_float, ref, data)
    separate = resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=is_seg, order=order,
                                             force_separate_z=None)
    assert not np.array_equal(separate, ref)  # the case tells the two rules apart


def test_kernel_refuses_what_it_does_not_compute():
    from nnunet_heart_ext.kernels.resample import resample, supports

    data = np.zeros((1, 4, 5, 6), np.float32)
    assert supports(False, 3, 0) and supports(True, 1, 1) and not supports(True, 3, 0) and not supports(False, 2, 0)
    with pytest.raises(ValueError, match="order 2"):
        resample(data, (5, 6, 7), order=2)
    with pytest.raises(ValueError, match="separate_axis"):
        resample(data, (5, 6, 7), separate_axis=3)
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        resample(data[0], (5, 6, 7))


_WORKER_CALLS = """
import numpy as np
from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba as f
x = np.random.default_rng(0).normal(size=(1, 6, 7, 8)).astype(np.float32)
f(x, (8, 9, 7), [1, 1, 1], [1, 1, 1], False, 3)
f(np.round(x), (8, 9, 7), [1, 1, 1], [1, 1, 1], True, 1)
"""


def _worker_report(_):
    """In a spawned pool worker, like nnU-Net's: compilations that missed the cache, and threads."""
    import numba
    exec(_WORKER_CALLS, {})
    from nnunet_heart_ext.kernels import resample, resample_seg
    misses = sum(sum(d.stats.cache_misses.values()) for r in (resample, resample_seg) for d in vars(r).values()
                 if isinstance(d, numba.core.registry.CPUDispatcher))
    return misses, numba.get_num_threads()


def test_fresh_worker_loads_kernels_from_cache_and_shares_cores(monkeypatch):
    exec(_WORKER_CALLS, {})  # compiles here if needed, which writes the cache
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        misses, threads = pool.map(_worker_report, [0])[0]
    assert misses == 0, "a fresh worker process compiled instead of loading the cache"
    import numba
    cores = len(os.sched_getaffinity(0))
    assert threads == max(1, min(cores // 2, numba.config.NUMBA_NUM_THREADS))
    # and a plain process (not a pool worker) uses all of Numba's threads
    out = subprocess.run([sys.executable, "-c", _WORKER_CALLS + "import numba; print(numba.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == min(cores, numba.config.NUMBA_NUM_THREADS)
