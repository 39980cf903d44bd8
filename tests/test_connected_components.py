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
def nnunet_keep_largest_from_segmentation(monkeypatch):
    """nnU-Net's function as plain nnU-Net runs it (the extension's hook, when installed,
    rebinds the acvl_utils name it calls: put acvl_utils' function back for the reference)."""
    module = pytest.importorskip("nnunetv2.postprocessing.remove_connected_components")
    monkeypatch.setattr(module, "remove_all_but_largest_component", acvl_keep_largest)
    return module.remove_all_but_largest_component_from_segmentation


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


def test_nnunet_hook_function_equals_acvl(monkeypatch):
    """What nnU-Net calls once the extension is installed: acvl_utils' arguments (skimage-style
    connectivity) and output, including inputs it hands back to acvl_utils."""
    from nnunet_heart_ext.postprocessing import remove_all_but_largest_component_like_acvl as hooked

    rng = np.random.default_rng(6)
    volume = rng.random((14, 15, 16)) < 0.12
    for connectivity in (None, 1, 2, 3):
        np.testing.assert_array_equal(hooked(volume, connectivity), acvl_keep_largest(volume, connectivity))
    for connectivity in (None, 1, 2):
        np.testing.assert_array_equal(hooked(volume[3], connectivity), acvl_keep_largest(volume[3], connectivity))
    # non-boolean images: skimage's components are runs of equal value (1 next to 2 is two)
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1:3, 1:3, 1:3], labels[3:5, 1:3, 1:3], labels[5, 5, 5] = 1, 2, 1
    np.testing.assert_array_equal(hooked(labels), acvl_keep_largest(labels))
    monkeypatch.setenv("NNUNET_HEART_EXT_CC_DEVICE", "gpu")
    with pytest.raises(ValueError, match="use auto, cpu or cuda"):
        hooked(volume)
    if not torch.cuda.is_available():
        monkeypatch.setenv("NNUNET_HEART_EXT_CC_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            hooked(volume)


# ----------------------------------------------------------------------------- compiled GPU path
COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunet_heart_ext.kernels import connected_components as cc
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
