"""Connected components (nnunet_heart_ext.kernels.connected_components) against skimage, cc3d,
acvl_utils and nnU-Net's keep-largest postprocessing.

Two paths run every test: "cpu" (numpy in, cc3d) and "triton" (the Triton kernels: through the
interpreter on tiny CPU tensors when TRITON_INTERPRET=1, the default in tests/conftest.py; or
compiled on CUDA tensors when TRITON_INTERPRET=0 and a GPU is there). The compiled path also
runs larger volumes repeatedly (races show only on a real GPU): `TRITON_INTERPRET=0 pytest
tests/test_connected_components.py` on a GPU machine (benchmarks/gpu_check.sh). This module
needs no SimpleITK; nnU-Net's own function is imported inside the tests that compare with it.
"""
import os

import numpy as np
import pytest
import torch
from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component as acvl_keep_largest
from skimage.measure import label as skimage_label

from nnunet_heart_ext.kernels.connected_components import (
    label,
    label_triton,
    remove_all_but_largest_component,
    remove_all_but_largest_component_from_segmentation,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
COMPILED_GPU = torch.cuda.is_available() and not INTERPRETED
SKIMAGE_CONNECTIVITY = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}
# The interpreter runs a kernel lane by lane in numpy: about 1 s for 12^3 voxels.
SHAPE = {"cpu": (23, 29, 31), "triton": (12, 12, 12) if INTERPRETED else (48, 96, 112)}
BACKENDS = ["cpu", "triton"]


def _to_backend(backend, array):
    if backend == "cpu":
        return array
    if COMPILED_GPU:
        return torch.from_numpy(array).cuda()
    if INTERPRETED:  # CPU tensors run the Triton kernels in the interpreter
        return torch.from_numpy(array)
    pytest.skip("the Triton path needs TRITON_INTERPRET=1 or a CUDA device")


def _to_numpy(result):
    return result.cpu().numpy() if isinstance(result, torch.Tensor) else result


def run_label(backend, mask, connectivity=None):
    labels, n = label(_to_backend(backend, mask), connectivity)
    if backend == "triton":
        assert isinstance(labels, torch.Tensor)
    labels = _to_numpy(labels)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    return labels, n


def run_keep_largest(backend, mask, connectivity=None):
    keep = _to_numpy(remove_all_but_largest_component(_to_backend(backend, mask), connectivity))
    assert keep.dtype == bool and keep.shape == mask.shape
    return keep


def assert_same_partition(labels, reference):
    """Equal up to renumbering: the same background and a one-to-one map between ids."""
    np.testing.assert_array_equal(labels == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([labels[fg], reference[fg]]), axis=1)
    assert pairs.shape[1] == len(np.unique(labels[fg])) == len(np.unique(reference[fg]))


def synthetic_heart(shape, rng, n_blobs=6):
    """Myocardium shell (1) around a valve (2) with calcifications (3) on the wall, plus
    spurious blobs of random labels, some touching the heart, some isolated."""
    axes = np.ogrid[tuple(slice(-1, 1, complex(0, s)) for s in shape)]
    centre = rng.uniform(-0.15, 0.15, size=3)
    radius = np.sqrt(sum(((a.astype(np.float32) - c) / r) ** 2 for a, c, r in zip(axes, centre, (0.75, 0.65, 0.6))))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(radius < 1) & (radius > 0.6)] = 1
    seg[radius < 0.35] = 2
    seg[((radius - 0.8) ** 2 < 0.004) & (rng.random(shape) < 0.08)] = 3
    for _ in range(n_blobs):
        corner = [rng.integers(0, s) for s in shape]
        size = rng.integers(1, 4, size=3)
        seg[tuple(slice(c, c + s) for c, s in zip(corner, size))] = rng.integers(1, 4)
    return seg


@pytest.fixture
def nnunet_keep_largest_from_segmentation():
    """nnU-Net's own function, as plain nnU-Net runs it (the extension's hook, when installed,
    binds a replacement under its name; nnU-Net's function is then its __wrapped__)."""
    module = pytest.importorskip("nnunetv2.postprocessing.remove_connected_components")
    function = module.remove_all_but_largest_component_from_segmentation
    return getattr(function, "__wrapped__", function)


# ----------------------------------------------------------------------------- random masks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.4, 0.6])
def test_label_random_masks_equal_skimage(backend, connectivity, density):
    rng = np.random.default_rng(int(density * 100) + connectivity)
    mask = rng.random(SHAPE[backend]) < density
    labels, n = run_label(backend, mask, connectivity)
    reference = skimage_label(mask, connectivity=SKIMAGE_CONNECTIVITY[connectivity])
    assert_same_partition(labels, reference)
    assert n == reference.max()
    np.testing.assert_array_equal(labels, reference)  # documented: raster-order numbering


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.05, 0.2, 0.4, 0.6])
def test_keep_largest_random_masks_equal_acvl(backend, density):
    rng = np.random.default_rng(7 + int(density * 100))
    mask = rng.random(SHAPE[backend]) < density
    np.testing.assert_array_equal(run_keep_largest(backend, mask), acvl_keep_largest(mask))
    if density <= 0.2:  # many components under 6-connectivity
        np.testing.assert_array_equal(run_keep_largest(backend, mask, 6), acvl_keep_largest(mask, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_largest_scattered_blobs_equal_acvl(backend):
    """Many small boxes of few sizes: ties between far-apart components, and (CPU path) many
    separately labelled boxes with a U-shaped component around a blob in one of them."""
    shape = (12, 12, 12) if backend == "triton" and INTERPRETED else (40, 44, 48)
    rng = np.random.default_rng(9)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(max(shape) // 2):
        corner = [rng.integers(0, s - 2) for s in shape]
        side = rng.integers(1, 3)
        mask[tuple(slice(c, c + side) for c in corner)] = True
    mask[1:6, 1, 1:6] = mask[1:6, 1:5, 1] = mask[1:6, 1:5, 5] = True  # a U ...
    mask[3, 3, 3] = True  # ... around a single voxel
    for connectivity, skimage_connectivity in ((26, 3), (6, 1)):
        np.testing.assert_array_equal(run_keep_largest(backend, mask, connectivity),
                                      acvl_keep_largest(mask, skimage_connectivity))
    tie = mask.copy()
    tie[-2:, -2:, -2:] = False
    tie[-7:-2, -2, -6:-1] = tie[-7:-2, -5:-1, -6] = tie[-7:-2, -5:-1, -2] = True  # a second U of the same size
    keep = run_keep_largest(backend, tie)
    np.testing.assert_array_equal(keep, acvl_keep_largest(tie))


# ----------------------------------------------------------------------------- heart segmentations
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_heart_segmentation_equals_nnunet(backend, seed, nnunet_keep_largest_from_segmentation):
    rng = np.random.default_rng(seed)
    seg = synthetic_heart(SHAPE[backend], rng)
    cases = [([1, 2, 3], 0, np.uint8), (1, 0, np.float32), (3, 0, np.uint8), ((1, 2), 0, np.float32),
             ([(1, 2, 3), 3], 4, np.int16)]
    if backend == "triton" and INTERPRETED:
        cases = cases[:3]  # each case is a ~1 s interpreted kernel run
    changed = 0
    for labels_or_regions, background, dtype in cases:
        segmentation = seg.astype(dtype)
        expected = nnunet_keep_largest_from_segmentation(segmentation, labels_or_regions, background)
        before = segmentation.copy()
        result = _to_numpy(remove_all_but_largest_component_from_segmentation(
            _to_backend(backend, segmentation), labels_or_regions, background))
        np.testing.assert_array_equal(segmentation, before)  # input untouched
        assert result.dtype == expected.dtype
        np.testing.assert_array_equal(result, expected)
        changed += int((expected != segmentation).any())
    assert changed >= 2  # the blobs made keep-largest remove something


def test_segmentation_dtypes_and_layouts_equal_nnunet(nnunet_keep_largest_from_segmentation):
    """Label runs on integer images take a wrap-around shortcut: check it at the dtype edges."""
    rng = np.random.default_rng(4)
    seg = synthetic_heart((9, 14, 15), rng, n_blobs=8).astype(np.int16)
    cases = [(np.int8, -1, [-1, 0, 1]), (np.uint8, 254, [(254, 255)]), (np.uint16, 1, (1, 2)),
             (np.int64, 1, [1, 2, 3]), (np.int32, 1, [1, 3]), (np.float64, 1, [1, 2])]
    for dtype, offset, labels_or_regions in cases:
        shifted = (seg + offset - 1).astype(dtype)
        shifted[seg == 0] = 7  # background becomes another value, out of the labels
        for layout in (shifted, np.asfortranarray(shifted), shifted[:, ::-1]):
            expected = nnunet_keep_largest_from_segmentation(layout, labels_or_regions, 7)
            np.testing.assert_array_equal(
                remove_all_but_largest_component_from_segmentation(layout, labels_or_regions, 7), expected)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_full(backend):
    empty = np.zeros((4, 5, 6), dtype=bool)
    labels, n = run_label(backend, empty)
    assert n == 0 and not labels.any()
    assert not run_keep_largest(backend, empty).any()
    np.testing.assert_array_equal(run_keep_largest(backend, empty), acvl_keep_largest(empty))
    full = np.ones((4, 5, 6), dtype=bool)
    for connectivity in (6, 18, 26):
        labels, n = run_label(backend, full, connectivity)
        assert n == 1 and (labels == 1).all()
    assert run_keep_largest(backend, full).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_voxel(backend):
    for position in [(0, 0, 0), (3, 4, 5), (2, 0, 5)]:
        mask = np.zeros((4, 5, 6), dtype=bool)
        mask[position] = True
        labels, n = run_label(backend, mask)
        assert n == 1 and labels[position] == 1 and labels.sum() == 1
        np.testing.assert_array_equal(run_keep_largest(backend, mask), mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_chains(backend):
    corners = np.zeros((6, 6, 6), dtype=bool)  # voxels touching only at corners
    corners[np.arange(6), np.arange(6), 5 - np.arange(6)] = True
    assert run_label(backend, corners, 26)[1] == 1
    assert run_label(backend, corners, 18)[1] == 6
    assert run_label(backend, corners, 6)[1] == 6
    edges = np.zeros((3, 6, 6), dtype=bool)  # voxels touching only at edges
    edges[1, np.arange(6), np.arange(6)] = True
    assert run_label(backend, edges, 26)[1] == 1
    assert run_label(backend, edges, 18)[1] == 1
    assert run_label(backend, edges, 6)[1] == 6
    # a longer corner chain plus a compact 8-voxel cube: the chain wins only under 26
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[np.arange(10), np.arange(10), np.arange(10)] = True
    mask[0:2, 7:9, 0:2] = True
    np.testing.assert_array_equal(run_keep_largest(backend, mask, 26), acvl_keep_largest(mask, 3))
    np.testing.assert_array_equal(run_keep_largest(backend, mask, 6), acvl_keep_largest(mask, 1))
    assert run_keep_largest(backend, mask, 26).sum() == 10 and run_keep_largest(backend, mask, 6).sum() == 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 11), (7, 1, 8), (10, 1, 1), (1, 1, 12)])
def test_axes_of_length_one(backend, shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < 0.5
    mask.flat[0] = True
    for connectivity in (6, 18, 26):
        labels, n = run_label(backend, mask, connectivity)
        np.testing.assert_array_equal(labels, skimage_label(mask, connectivity=SKIMAGE_CONNECTIVITY[connectivity]))
    np.testing.assert_array_equal(run_keep_largest(backend, mask), acvl_keep_largest(mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_keep_every_largest_component(backend):
    mask = np.zeros((8, 9, 10), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[5:7, 6:8, 7:9] = True  # 8 voxels
    mask[0, 8, 9] = True        # 1 voxel
    mask[4, 0:3, 5] = True      # 3 voxels
    keep = run_keep_largest(backend, mask)
    np.testing.assert_array_equal(keep, acvl_keep_largest(mask))
    assert keep.sum() == 16 and not keep[0, 8, 9] and not keep[4, 1, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_four_and_eight_connectivity(backend):
    checkerboard = (np.add.outer(np.arange(7), np.arange(9)) % 2 == 0)
    assert run_label(backend, checkerboard, 8)[1] == 1
    assert run_label(backend, checkerboard, 4)[1] == checkerboard.sum()
    assert run_label(backend, checkerboard)[1] == 1  # None: full (8) connectivity
    rng = np.random.default_rng(3)
    mask = rng.random((11, 12)) < 0.45
    for connectivity in (4, 8):
        labels, _ = run_label(backend, mask, connectivity)
        np.testing.assert_array_equal(labels, skimage_label(mask, connectivity=SKIMAGE_CONNECTIVITY[connectivity]))
    np.testing.assert_array_equal(run_keep_largest(backend, mask), acvl_keep_largest(mask))
    np.testing.assert_array_equal(run_keep_largest(backend, mask, 4), acvl_keep_largest(mask, 1))


# ----------------------------------------------------------------------------- API contract
def test_nonzero_is_foreground_and_types_follow_the_input():
    rng = np.random.default_rng(5)
    seg = synthetic_heart((10, 12, 14), rng)
    labels_seg, n_seg = label(seg)
    labels_mask, n_mask = label(seg != 0)
    assert n_seg == n_mask
    np.testing.assert_array_equal(labels_seg, labels_mask)
    fortran = np.asfortranarray(seg != 0)
    np.testing.assert_array_equal(label(fortran)[0], labels_mask)  # numbering by C raster order
    labels_tensor, n_tensor = label(torch.from_numpy(seg))  # Triton when interpreted, else cc3d
    assert isinstance(labels_tensor, torch.Tensor) and labels_tensor.dtype == torch.int32
    np.testing.assert_array_equal(labels_tensor.numpy(), labels_mask)
    keep_tensor = remove_all_but_largest_component(torch.from_numpy(seg != 0))
    assert isinstance(keep_tensor, torch.Tensor)
    np.testing.assert_array_equal(keep_tensor.numpy(), acvl_keep_largest(seg != 0))


def test_bad_arguments_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="connectivity 8 is not valid in 3D"):
        label(np.ones((2, 2, 2), dtype=bool), 8)
    with pytest.raises(ValueError, match="connectivity 26 is not valid in 2D"):
        remove_all_but_largest_component(np.ones((2, 2), dtype=bool), 26)
    with pytest.raises(ValueError, match="2D or 3D array, got 4 dimensions"):
        label(np.ones((2, 2, 2, 2), dtype=bool))
    from nnunet_heart_ext.kernels import connected_components
    monkeypatch.setattr(connected_components, "_TRITON_ON_CPU", False)  # as without TRITON_INTERPRET
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            label_triton(torch.ones((2, 2, 2), dtype=torch.bool))


# ----------------------------------------------------------------------------- CPU path: blocks
def scattered(shape, rng, n_blobs, max_side=3, single_voxels=0):
    """Boxes of random sizes anywhere (touching or not) and isolated single voxels."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_blobs):
        corner = [rng.integers(0, s) for s in shape]
        side = rng.integers(1, max_side + 1, size=3)
        mask[tuple(slice(c, c + d) for c, d in zip(corner, side))] = True
    for _ in range(single_voxels):
        mask[tuple(rng.integers(0, s) for s in shape)] = True
    return mask


@pytest.mark.parametrize("shape", [(23, 29, 31), (9, 17, 40), (1, 13, 37), (5, 1, 19), (33, 8, 8), (4, 8, 16)])
def test_keep_largest_by_blocks_equals_acvl(shape):
    """The CPU path groups 4 x 8 x 8 blocks: sizes that are not multiples of the block (partial
    blocks on every axis), one block, a single plane or row; every connectivity."""
    for seed in range(3):
        rng = np.random.default_rng(seed + sum(shape))
        mask = scattered(shape, rng, n_blobs=rng.integers(2, 12), single_voxels=rng.integers(0, 20))
        for connectivity in (6, 18, 26):
            np.testing.assert_array_equal(remove_all_but_largest_component(mask, connectivity),
                                          acvl_keep_largest(mask, SKIMAGE_CONNECTIVITY[connectivity]))


def test_keep_largest_when_many_small_components_outnumber_the_largest():
    """A wide group of blocks full of isolated voxels (a large upper bound, components of one
    voxel) visited before the compact group that holds the largest component, and a tie of
    two such compact components far apart."""
    mask = np.zeros((20, 40, 44), dtype=bool)
    mask[0:12:2, 0:30:2, 0:30:2] = True  # 6 x 15 x 15 singletons at 26-connectivity
    mask[15:18, 34:37, 38:41] = True  # 27 voxels
    for connectivity in (6, 18, 26):
        keep = remove_all_but_largest_component(mask, connectivity)
        np.testing.assert_array_equal(keep, acvl_keep_largest(mask, SKIMAGE_CONNECTIVITY[connectivity]))
        assert keep.sum() == 27
    mask[15:18, 0:3, 38:41] = True  # a second component of 27 voxels
    np.testing.assert_array_equal(remove_all_but_largest_component(mask), acvl_keep_largest(mask))
    assert remove_all_but_largest_component(mask).sum() == 54


def test_keep_largest_when_a_labelled_box_holds_part_of_another_group():
    """A wide group of isolated voxels (visited first: the larger bound) whose bounding box holds
    part of the largest component, which belongs to another group: that part must not be
    judged on its own (it is smaller than the whole)."""
    mask = np.zeros((40, 64, 64), dtype=bool)
    ring = np.zeros((20, 64, 64), dtype=bool)
    ring[0::2, 0::2, 0::2] = True
    ring[:, 8:56, 8:56] = False  # blocks 1..6 along y and x stay empty: a separate group
    mask[:20] = ring
    mask[8:40, 16:48, 16:48] = True  # the largest component, its top part inside the ring's box
    keep = remove_all_but_largest_component(mask)
    np.testing.assert_array_equal(keep, acvl_keep_largest(mask))
    assert keep.sum() == 32 ** 3


def test_ties_between_components_filling_whole_blocks():
    """Two components of exactly one 4 x 8 x 8 block each: the second group's upper bound equals
    the largest size found, and must still be labelled (a tie keeps both)."""
    mask = np.zeros((12, 24, 32), dtype=bool)
    mask[0:4, 0:8, 0:8] = True
    mask[8:12, 16:24, 24:32] = True
    mask[6, 12, 16] = True
    keep = remove_all_but_largest_component(mask)
    np.testing.assert_array_equal(keep, acvl_keep_largest(mask))
    assert keep.sum() == 512


def test_noisy_prediction_equals_nnunet(monkeypatch, nnunet_keep_largest_from_segmentation):
    """A heart with scattered one-voxel and larger false positives of every label, as a prediction
    that postprocessing exists for: the groups of blocks that cannot hold the largest component
    are cleared without labelling (checked to happen), with nnU-Net's result."""
    from nnunet_heart_ext.kernels import connected_components

    calls = []
    clear_blocks = connected_components._clear_blocks
    monkeypatch.setattr(connected_components, "_clear_blocks",
                        lambda *args: calls.append(len(args[4])) or clear_blocks(*args))
    rng = np.random.default_rng(12)
    seg = np.zeros((42, 99, 101), dtype=np.uint8)
    seg[8:32, 30:70, 28:64] = synthetic_heart((24, 40, 36), rng, n_blobs=4)
    noise = scattered(seg.shape, rng, n_blobs=12, single_voxels=120) & (seg == 0)
    seg[noise] = rng.integers(1, 4, size=noise.sum())
    for dtype in (np.uint8, np.int16, np.float32):
        for labels_or_regions in ([1, 2, 3], 1, 2, (1, 2), [(2, 3), 1]):
            segmentation = seg.astype(dtype)
            expected = nnunet_keep_largest_from_segmentation(segmentation, labels_or_regions)
            result = remove_all_but_largest_component_from_segmentation(segmentation, labels_or_regions)
            np.testing.assert_array_equal(result, expected)
            assert result.dtype == expected.dtype and (result != segmentation).any()
    assert calls and min(calls) > 10, calls


def test_nnunet_function_is_replaced_under_its_own_name(monkeypatch, nnunet_keep_largest_from_segmentation):
    """What nnU-Net calls once the extension is installed: nnU-Net's signature, defaults and
    names (so postprocessing.pkl names nnU-Net's function), nnU-Net's output, input untouched;
    inputs the kernel does not take go to nnU-Net's own function. (Where the project is not
    installed with its hook, as in benchmarks/gpu_check.sh, the patch is applied here.)"""
    import inspect
    import pickle

    from nnunet_heart_ext.nnunet.postprocessing import patch_remove_connected_components

    module = pytest.importorskip("nnunetv2.postprocessing.remove_connected_components")
    original = nnunet_keep_largest_from_segmentation
    if module.remove_all_but_largest_component_from_segmentation is original:  # no hook in this process
        monkeypatch.setattr(module, "remove_all_but_largest_component_from_segmentation", original)
        patch_remove_connected_components(module)
    replaced = module.remove_all_but_largest_component_from_segmentation
    assert getattr(replaced, "_nnunet_heart_ext", False) and replaced is not original
    def parameters(function):
        signature = inspect.signature(function, follow_wrapped=False)
        return [(p.name, p.default, p.kind) for p in signature.parameters.values()]

    assert parameters(replaced) == parameters(original)
    assert (replaced.__module__, replaced.__qualname__) == (original.__module__, original.__qualname__)
    assert pickle.loads(pickle.dumps(replaced)) is replaced
    assert b"nnunet_heart_ext" not in pickle.dumps(replaced)

    rng = np.random.default_rng(8)
    seg = synthetic_heart((13, 22, 19), rng, n_blobs=8)
    cases = [(seg, [1, 2, 3], 0), (seg, 2, 0), (seg.astype(np.float32), (1, 3), 5), (seg[6], [1, 2], 0),
             (np.asfortranarray(seg), [1], 0), (seg.astype(np.int16)[:, ::2], [0, 1], 9),
             (seg[None], 1, 0), (seg.astype(np.uint64), [1, 2], 0)]
    for segmentation, labels_or_regions, background in cases:
        before = segmentation.copy()
        result = replaced(segmentation, labels_or_regions, background)
        np.testing.assert_array_equal(segmentation, before)
        expected = original(segmentation, labels_or_regions, background)
        assert result.dtype == expected.dtype and result.shape == expected.shape
        np.testing.assert_array_equal(result, expected)
    tie = np.zeros((6, 7, 8), dtype=np.uint8)
    tie[0:2, 0:2, 0:2] = 1
    tie[4:6, 5:7, 6:8] = 2
    tie[3, 3, 3] = 1
    np.testing.assert_array_equal(replaced(tie, [1, 2]), original(tie, [1, 2]))
    assert replaced(tie, [1, 2]).astype(bool).sum() == 16


def test_device_choice_errors_are_clear(monkeypatch):
    from nnunet_heart_ext.nnunet.postprocessing import _use_cuda

    monkeypatch.setenv("NNUNET_HEART_EXT_CC_DEVICE", "gpu")
    with pytest.raises(ValueError, match="use auto, cpu or cuda"):
        _use_cuda()
    monkeypatch.setenv("NNUNET_HEART_EXT_CC_DEVICE", "cpu")
    assert _use_cuda() is False
    if not torch.cuda.is_available():
        monkeypatch.setenv("NNUNET_HEART_EXT_CC_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            _use_cuda()


# ----------------------------------------------------------------------------- compiled GPU path
COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunet_heart_ext.kernels import connected_components_triton as cc
flat = {"mask_ptr": "*u8", "parent_ptr": "*i32", "labels_ptr": "*i32", "numel": "i32", "BLOCK": "constexpr"}
kernels = [(cc._merge_kernel, {"mask_ptr": "*u8", "parent_ptr": "*i32", "numel": "i32", "H": "i32", "W": "i32",
                               "CONNECTIVITY": "constexpr", "BLOCK": "constexpr"},
            {"CONNECTIVITY": 26, "BLOCK": cc.BLOCK}),
           (cc._compress_kernel, flat, {"BLOCK": cc.BLOCK}), (cc._relabel_kernel, flat, {"BLOCK": cc.BLOCK})]
for fn, signature, constexprs in kernels:
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn
    print("compiled", fn.__name__)
"""


@pytest.mark.skipif(COMPILED_GPU, reason="the compiled tests below run the kernels themselves")
def test_kernels_compile_for_a_gpu_without_one():
    """CI has no GPU, and the interpreter accepts code the compiler rejects: compile the kernels
    for an H100 (sm_90, Triton's own ptxas) in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 3
def needs_compiled_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not COMPILED_GPU, reason="needs CUDA and TRITON_INTERPRET=0")(test))


@needs_compiled_gpu
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_compiled_gpu_random_volumes_repeatedly(connectivity):
    """Densities around the percolation thresholds build long, branching components: many
    threads race to merge the same trees. Every repeat must give cc3d's exact labelling."""
    rng = np.random.default_rng(connectivity)
    for density in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6):
        mask = rng.random((96, 160, 192)) < density
        expected, expected_n = label(mask, connectivity)
        device_mask = torch.from_numpy(mask).cuda()
        for _ in range(8):
            labels, n = label(device_mask, connectivity)
            assert n == expected_n
            assert torch.equal(labels.cpu(), torch.from_numpy(expected))


@needs_compiled_gpu
def test_compiled_gpu_full_size_heart_repeatedly():
    """A CT-sized segmentation; the references are the CPU path (checked against nnU-Net above)
    and acvl_utils' keep-largest, which nnU-Net calls."""
    rng = np.random.default_rng(11)
    seg = synthetic_heart((300, 512, 512), rng, n_blobs=60)
    expected_labels, expected_n = label(seg)
    expected = [(lr, remove_all_but_largest_component_from_segmentation(seg, lr)) for lr in ([1, 2, 3], 1, 2)]
    myocardium = seg == 1
    np.testing.assert_array_equal(expected[1][1] == 1, acvl_keep_largest(myocardium))
    assert torch.equal(remove_all_but_largest_component(torch.from_numpy(myocardium).cuda()).cpu(),
                       torch.from_numpy(acvl_keep_largest(myocardium)))
    device_seg = torch.from_numpy(seg).cuda()
    for _ in range(5):
        labels, n = label(device_seg)
        assert n == expected_n and torch.equal(labels.cpu(), torch.from_numpy(expected_labels))
        for labels_or_regions, result in expected:
            on_gpu = remove_all_but_largest_component_from_segmentation(device_seg, labels_or_regions)
            assert torch.equal(on_gpu.cpu(), torch.from_numpy(result))
