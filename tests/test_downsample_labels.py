"""kernels/downsample_labels.py: deep supervision's coarse targets that keep small classes.

Without `keep` it must be batchgeneratorsv2's DownsampleSegForDSTransform (nnU-Net's targets);
with `keep`, each output voxel must be the first kept label its block holds, else nearest-exact,
checked against a plain loop over adaptive pooling's blocks on fresh random label maps.
"""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunet_heart_ext.kernels.augment import DeviceAugmentation
from nnunet_heart_ext.kernels.downsample_labels import downsample_labels

SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [1.0, 0.5, 0.5]]


def sparse_labels(rng, shape, dtype=torch.int16):
    """Mostly 0/1, with a few 2s and very few 3s (and some -1 padding): the demo's class balance."""
    a = (rng.random(shape) < 0.3).astype(np.int16)
    a[rng.random(shape) < 0.02] = 2
    a[rng.random(shape) < 0.002] = 3
    a[..., :2] = -1
    return torch.from_numpy(a).to(dtype)


def reference(labels: np.ndarray, shape, keep):
    """A loop over output voxels: the block [floor(i n/m), ceil((i+1) n/m)) per axis."""
    B, C = labels.shape[:2]
    n = labels.shape[2:]
    out = np.empty((B, C, *shape), labels.dtype)
    for b in range(B):
        for c in range(C):
            for idx in np.ndindex(*shape):
                near = tuple(min(int(math.floor((i + 0.5) * nn / m)), nn - 1) for i, nn, m in zip(idx, n, shape))
                block = labels[(b, c) + tuple(slice(int(math.floor(i * nn / m)), int(math.ceil((i + 1) * nn / m)))
                                              for i, nn, m in zip(idx, n, shape))]
                value = labels[(b, c) + near]
                for k in keep:
                    if (block == k).any():
                        value = k
                        break
                out[(b, c) + idx] = value
    return out


@pytest.mark.parametrize("shape_in,shape_out", [((8, 12, 12), (4, 6, 6)), ((8, 12, 12), (2, 3, 3)),
                                                ((7, 10, 9), (3, 4, 5)), ((6, 6, 6), (6, 3, 3))])
@pytest.mark.parametrize("keep", [(), (3,), (3, 2), (2, 3)])
def test_equals_block_loop(shape_in, shape_out, keep):
    rng = np.random.default_rng(hash((shape_in, shape_out, keep)) % 2**32)
    labels = sparse_labels(rng, (2, 1, *shape_in))
    got = downsample_labels(labels, shape_out, keep)
    assert got.dtype == labels.dtype and tuple(got.shape) == (2, 1, *shape_out)
    np.testing.assert_array_equal(got.numpy(), reference(labels.numpy(), shape_out, keep))


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int64])
def test_without_keep_is_nnunets_transform(dtype):
    rng = np.random.default_rng(0)
    labels = sparse_labels(rng, (2, 1, 20, 24, 24))
    if dtype == torch.uint8:
        labels = labels.clamp_min(0)
    labels = labels.to(dtype)
    expected = [DownsampleSegForDSTransform(SCALES)(segmentation=labels[b])["segmentation"] for b in range(2)]
    for k, scale in enumerate(SCALES):
        shape = [round(p * s) for p, s in zip(labels.shape[2:], scale)]
        got = downsample_labels(labels, shape)
        assert torch.equal(got, torch.stack([e[k] for e in expected]))


def test_a_single_kept_voxel_survives_every_scale():
    """A one-voxel calcification where nearest-exact reads no voxel (index 8: it reads 2i+1, 4i+2,
    8i+4) is gone from nnU-Net's coarse targets and kept in every one here."""
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int16)
    labels[0, 0, 8, 8, 8] = 3
    labels[0, 0, 8, 8, 9] = 2
    for shape in ((8, 8, 8), (4, 4, 4), (2, 2, 2)):
        assert (downsample_labels(labels, shape) == 3).sum() == 0
        kept = downsample_labels(labels, shape, keep=(3, 2))
        assert (kept == 3).sum() == 1  # shares its block with the 2: the first of keep wins
        assert (downsample_labels(labels, shape, keep=(2, 3)) == 2).sum() == 1


def test_device_augmentation_targets_keep_labels():
    """DeviceAugmentation's deep-supervision targets use keep_labels; without them nnU-Net's."""
    rng = np.random.default_rng(1)
    patch = (16, 24, 24)
    seg = sparse_labels(rng, (2, 1, *patch))
    scales = SCALES[:3]
    plain = DeviceAugmentation(patch, 0.0, scales, (0, 1, 2), False)._deep_supervision(seg)
    kept = DeviceAugmentation(patch, 0.0, scales, (0, 1, 2), False, keep_labels=(3, 2))._deep_supervision(seg)
    assert plain[0] is seg and kept[0] is seg
    for k in (1, 2):
        shape = [round(p * s) for p, s in zip(patch, scales[k])]
        assert torch.equal(plain[k], downsample_labels(seg, shape))
        assert torch.equal(kept[k], downsample_labels(seg, shape, (3, 2)))
        assert (kept[k] == 3).sum() >= (plain[k] == 3).sum()


def test_rejects_other_ranks():
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        downsample_labels(torch.zeros(4, 4, 4, dtype=torch.int16), (2, 2, 2))
