"""nnunet_heart_ext.kernels.augment against batchgeneratorsv2's own transforms (imported from the
installed package) given the same parameters, and its sampling against nnU-Net's configuration
(read off the transforms nnUNetTrainer.get_training_transforms builds).

Intensity transforms: relative error <= 1e-5 (max |ours - theirs| / max |theirs|). Spatial, on the
CPU from the whole enlarged patch: the image to 1e-6 and every label the same (the grid is
batchgeneratorsv2's arithmetic, so even exact ties, settled by the nearest voxel, agree). From
boxes, and on CUDA against the CPU: within interpolation tolerance (ties at exactly half a voxel
may then go the other way).
"""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunet_heart_ext.kernels.augment import DeviceAugmentation

PATCH = (20, 24, 28)
ROTATION = (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi)  # nnU-Net's 3D rotation_for_DA
DS_SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
INTENSITY = ("noise", "blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_aug(patch=PATCH, ds=DS_SCALES):
    return DeviceAugmentation(patch, ROTATION, ds, (0, 1, 2), False)


def rel_err(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def ct_like(shape, seed):
    """A smooth CT-like image (not symmetric) and a segmentation with labels 0..3 and -1 padding."""
    g = torch.Generator().manual_seed(seed)
    B, C, *S = shape
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in S], indexing="ij")
    r = torch.sqrt((axes[0] - 0.1) ** 2 + ((axes[1] + 0.2) / 0.8) ** 2 + ((axes[2] - 0.05) / 0.6) ** 2)
    base = torch.cos(3 * r) + 0.5 * axes[0] - 0.3 * axes[2] ** 2
    data = base.expand(B, C, *S) * (1 + 0.3 * torch.arange(C).view(1, C, 1, 1, 1)) \
        + 0.2 * torch.randn((B, C, *S), generator=g)
    one = torch.zeros(S, dtype=torch.int16)
    one[(r > 0.35) & (r < 0.6)] = 1
    one[r <= 0.2] = 2
    one[(r > 0.6) & (r < 0.66) & (axes[1] > 0.3)] = 3
    one[:2] = -1  # the loader's padding beyond the image
    seg = one.expand(B, 1, *S).clone()
    return data.contiguous(), seg


def only(aug, name, batch, channels, seed=0, **values):
    """Parameters with `name` firing for every sample and nothing else (no spatial change)."""
    params = aug.sample_parameters(batch, torch.Generator().manual_seed(seed), num_channels=channels)
    for key in ("spatial", "mirror") + INTENSITY:
        params[key][:] = False
    if name is not None:
        params[name][:] = True
    params.update(values)
    return params


def per_sample(data):
    return [d.clone() for d in data]


# ------------------------------------------------------------------ intensity transforms
@pytest.mark.parametrize("seed", [0, 1])
def test_noise_equals_batchgenerators(seed):
    aug = make_aug()
    data, seg = ct_like((3, 2, *PATCH), seed)
    params = only(aug, "noise", 3, 2, seed)
    torch.manual_seed(100)
    ours, _ = aug.apply(data.clone(), seg, params)  # the noise comes from torch's default generator
    theirs = GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True)
    torch.manual_seed(100)
    for b, x in enumerate(per_sample(data)):
        expected = theirs._apply_to_image(x, apply_idx=torch.arange(2), num_apply=2,
                                          sigmas=float(params["noise_std"][b]))
        assert rel_err(ours[b], expected) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blur_equals_batchgenerators(seed):
    aug = make_aug()
    data, seg = ct_like((3, 2, *PATCH), seed)
    params = only(aug, "blur", 3, 2, seed)
    params["blur_channel"][0] = torch.tensor([True, False])
    params["blur_channel"][1] = torch.tensor([True, True])
    params["blur_sigma"][2, 1] = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)  # kernels 3, 5 and 7 taps
    ours, _ = aug.apply(data.clone(), seg, params)
    theirs = GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False,
                                   p_per_channel=0.5, benchmark=True)
    for b, x in enumerate(per_sample(data)):
        channels = params["blur_channel"][b]
        sigmas = [params["blur_sigma"][b, c].tolist() for c in range(2) if channels[c]]
        expected = theirs._apply_to_image(x, apply_to_channel=channels, sigmas=sigmas)
        assert rel_err(ours[b], expected) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_brightness_and_contrast_equal_batchgenerators(seed):
    aug = make_aug()
    data, seg = ct_like((3, 2, *PATCH), seed)
    for name, theirs in [
            ("brightness", MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), False, 1)),
            ("contrast", ContrastTransform(BGContrast((0.75, 1.25)), preserve_range=True, synchronize_channels=False,
                                           p_per_channel=1))]:
        params = only(aug, name, 3, 2, seed)
        ours, _ = aug.apply(data.clone(), seg, params)
        for b, x in enumerate(per_sample(data)):
            factors = params[f"{name}_factor"][b].to(torch.float32)
            expected = theirs._apply_to_image(x, apply_to_channel=torch.arange(2), multipliers=factors)
            assert rel_err(ours[b], expected) <= 1e-5, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_resolution_equals_batchgenerators(seed):
    aug = make_aug()
    data, seg = ct_like((3, 2, *PATCH), seed)
    params = only(aug, "lowres", 3, 2, seed)
    params["lowres_channel"][0] = torch.tensor([False, True])
    params["lowres_channel"][1:] = True
    ours, _ = aug.apply(data.clone(), seg, params)
    theirs = SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                            ignore_axes=None, allowed_channels=None, p_per_channel=0.5)
    for b, x in enumerate(per_sample(data)):
        idx = torch.nonzero(params["lowres_channel"][b]).flatten()
        scales = params["lowres_scale"][b][idx].to(torch.float32)[:, None].expand(-1, 3)
        expected = theirs._apply_to_image(x, apply_to_channel=idx, scales=scales)
        assert rel_err(ours[b], expected) <= 1e-5


@pytest.mark.parametrize("inverted", [True, False], ids=["inverted", "plain"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gamma_equals_batchgenerators(inverted, seed):
    aug = make_aug()
    data, seg = ct_like((3, 2, *PATCH), seed)
    name = "gamma_inverted" if inverted else "gamma"
    params = only(aug, name, 3, 2, seed)
    ours, _ = aug.apply(data.clone(), seg, params)
    theirs = GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=float(inverted), synchronize_channels=False,
                            p_per_channel=1, p_retain_stats=1)
    for b, x in enumerate(per_sample(data)):
        expected = theirs._apply_to_image(x, apply_to_channel=torch.arange(2), retain_stats=torch.ones(2, dtype=bool),
                                          invert_image=torch.full((2,), inverted),
                                          gamma=params[f"{name}_value"][b].to(torch.float32))
        assert rel_err(ours[b], expected) <= 1e-5


def test_mirror_and_deep_supervision_equal_batchgenerators():
    aug = make_aug()
    data, seg = ct_like((4, 1, *PATCH), 3)
    params = only(aug, None, 4, 1)
    params["mirror"] = torch.tensor([[False, False, False], [True, False, False], [False, True, True],
                                     [True, True, True]])
    ours, targets = aug.apply(data.clone(), seg, params)
    downsample = DownsampleSegForDSTransform(DS_SCALES)
    for b in range(4):
        axes = [k for k in range(3) if params["mirror"][b, k]]
        mirror = MirrorTransform((0, 1, 2))
        assert torch.equal(ours[b], mirror._apply_to_image(data[b], axes=axes))
        expected_seg = mirror._apply_to_segmentation(seg[b].clone(), axes=axes)
        expected_seg[expected_seg == -1] = 0  # nnU-Net's RemoveLabelTransform(-1, 0)
        for t, expected in zip(targets, downsample._apply_to_segmentation(expected_seg)):
            assert t.dtype == torch.int16 and torch.equal(t[b], expected)


# ------------------------------------------------------------------ spatial transform
def batchgenerators_spatial(patch, angles, scale, force_grid=False):
    """nnU-Net's SpatialTransform with the rotation and scale fixed (its own get_parameters and
    grid code run; the draws are replaced by callables returning the given values)."""
    do_rotation = any(a != 0 for a in angles) or force_grid
    return SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                            p_rotation=1 if do_rotation else 0, rotation=lambda image, dim: angles[dim],
                            p_scaling=1 if scale != 1 else 0, scaling=lambda image, dim: scale,
                            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                            border_mode_seg="constant", padding_value_seg=-1)


def spatial_params(aug, angles_list, scales):
    params = only(aug, None, len(scales), 1)
    params["angles"] = torch.tensor(angles_list, dtype=torch.float64)
    params["scale"] = torch.tensor(scales, dtype=torch.float64)
    params["spatial"] = (params["angles"] != 0).any(1) | (params["scale"] != 1)
    return params


def assert_spatial_matches(ours_data, ours_seg, data, seg, angles, scale):
    transform = batchgenerators_spatial(ours_data.shape[1:], angles, scale)
    expected = transform(image=data.clone(), segmentation=seg.clone())
    image_err = rel_err(ours_data, expected["image"])
    assert image_err <= 1e-6, f"image differs by {image_err:.2g}"
    expected_seg = expected["segmentation"].clone()
    expected_seg[expected_seg == -1] = 0
    differ = (ours_seg != expected_seg).sum().item()
    assert differ == 0, f"{differ} voxels of the segmentation differ"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spatial_random_rotation_and_scale_equal_batchgenerators(seed):
    aug = make_aug(ds=None)
    S = (34, 40, 44)
    data, seg = ct_like((2, 1, *S), seed)
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand((2, 3), generator=g, dtype=torch.float64) - 0.5) * 2 * ROTATION[1]
    scales = (0.7 + 0.7 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
    params = spatial_params(aug, angles.tolist(), scales)
    ours, target = aug.apply(data, seg, params)
    for b in range(2):
        assert_spatial_matches(ours[b], target[b], data[b], seg[b], angles[b].tolist(), scales[b])


def asymmetric_volume(S):
    """Zeros with an L-shaped marker off the centre in every axis, and its segmentation."""
    data = torch.zeros((1, 1, *S))
    c = [s // 2 for s in S]
    data[0, 0, c[0] + 3: c[0] + 6, c[1] - 8: c[1] - 2, c[2] + 5: c[2] + 7] = 1.0
    data[0, 0, c[0] + 3: c[0] + 4, c[1] - 8: c[1] - 7, c[2] + 7: c[2] + 11] = 1.0
    return data, (data > 0).to(torch.int16)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_spatial_90_degrees_about_each_axis(axis):
    """Rotation axes and directions are nnU-Net's: against batchgeneratorsv2, and the marker's
    centre of mass moves where A = R(90 deg) sends it (output voxel v reads input A v)."""
    P, S = (24, 24, 24), (36, 36, 36)
    aug = make_aug(patch=P, ds=None)
    data, seg = asymmetric_volume(S)
    angles = [0.0, 0.0, 0.0]
    angles[axis] = math.pi / 2
    ours, target = aug.apply(data, seg, spatial_params(aug, [angles], [1.0]))
    assert_spatial_matches(ours[0], target[0], data[0], seg[0], angles, 1.0)

    def centre_of_mass(volume, shape):
        idx = torch.nonzero(volume[0, 0] > 0.5).double()
        return idx.mean(0) - (torch.tensor(shape, dtype=torch.float64) - 1) / 2

    A = DeviceAugmentation.affine(torch.tensor([angles], dtype=torch.float64), torch.ones(1, dtype=torch.float64))[0]
    moved = A.T @ centre_of_mass(data, S)  # output v with A v = input position
    np.testing.assert_allclose(centre_of_mass(ours, P).numpy(), moved.numpy(), atol=0.6)
    assert target.sum() == (ours > 0.5).sum()


def test_spatial_scale_only():
    P, S = (20, 20, 20), (40, 40, 40)
    aug = make_aug(patch=P, ds=None)
    data, seg = asymmetric_volume(S)
    ours, target = aug.apply(data, seg, spatial_params(aug, [[0.0, 0.0, 0.0]], [1.4]))
    assert_spatial_matches(ours[0], target[0], data[0], seg[0], [0.0, 0.0, 0.0], 1.4)
    assert 0 < (ours > 0.5).sum() < (data > 0.5).sum()  # larger scale = the structure looks smaller


def test_spatial_ties_go_to_the_nearest_label():
    """A grid at half-voxel positions on every axis (identity affine, enlarged patch one voxel
    larger): every boundary voxel is a tie between labels, settled by the nearest neighbour in
    batchgeneratorsv2. The labels must be the same everywhere."""
    aug = make_aug(ds=None)
    S = tuple(p + 1 for p in PATCH)
    data, seg = ct_like((1, 1, *S), 9)
    params = spatial_params(aug, [[0.0, 0.0, 0.0]], [1.0])
    params["spatial"][:] = True
    ours, target = aug.apply(data, seg, params)
    expected = batchgenerators_spatial(PATCH, [0.0, 0.0, 0.0], 1.0, force_grid=True)(
        image=data[0].clone(), segmentation=seg[0].clone())
    expected_seg = expected["segmentation"]
    expected_seg[expected_seg == -1] = 0
    assert rel_err(ours[0], expected["image"]) <= 1e-5
    assert torch.equal(target[0], expected_seg)


def test_no_spatial_change_is_nnunets_centre_crop():
    aug = make_aug(ds=None)
    S = (33, 40, 45)  # odd and even differences to the patch
    data, seg = ct_like((1, 2, *S), 5)
    ours, target = aug.apply(data, seg, only(aug, None, 1, 2))
    transform = batchgenerators_spatial(PATCH, [0.0, 0.0, 0.0], 1.0)
    expected = transform(image=data[0].clone(), segmentation=seg[0].clone())
    expected_seg = expected["segmentation"]
    expected_seg[expected_seg == -1] = 0
    assert torch.equal(ours[0], expected["image"]) and torch.equal(target[0], expected_seg)


def test_patch_reaching_outside_pads_like_nnunet():
    """A strong rotation and the largest scale sample beyond the enlarged patch: zeros in the
    image and background (-1, then 0) in the segmentation, as nnU-Net."""
    aug = make_aug(ds=None)
    S = PATCH  # no margin at all
    data, seg = ct_like((1, 1, *S), 7)
    seg[:] = 1
    angles = [0.5, -0.4, 0.3]
    ours, target = aug.apply(data, seg, spatial_params(aug, [angles], [1.4]))
    assert_spatial_matches(ours[0], target[0], data[0], seg[0], angles, 1.4)
    assert (target == 0).any() and (ours == 0).any()


def test_boxes_give_the_same_result_as_the_enlarged_patch():
    """What HeartTrainer's loader hands over: only the box each sample's transform reads."""
    aug = make_aug()
    S = (36, 42, 50)
    data, seg = ct_like((6, 2, *S), 11)
    params = aug.sample_parameters(6, torch.Generator().manual_seed(3), num_channels=2)
    params["spatial"][:4] = True
    params["spatial"][4:] = False
    params["angles"][:4] = torch.tensor([[0.5, 0, 0], [0, -0.5, 0.2], [0.1, 0.2, 0.3], [0, 0, 0]],
                                        dtype=torch.float64)
    params["scale"][:4] = torch.tensor([1.0, 0.7, 1.4, 1.2], dtype=torch.float64)
    boxes = [aug.sample_box(params, b, S) for b in range(6)]
    assert all(tuple(hi - lo for lo, hi in box) == PATCH for box in boxes[4:])
    cut = [tuple(slice(lo, hi) for lo, hi in box) for box in boxes]
    torch.manual_seed(0)
    full = aug.apply(data.clone(), seg, params)
    torch.manual_seed(0)
    from_boxes = aug.apply_boxes([data[b][(slice(None),) + cut[b]].clone() for b in range(6)],
                                 [seg[b][(slice(None),) + cut[b]] for b in range(6)],
                                 [[lo for lo, _ in box] for box in boxes], S, params)
    assert rel_err(from_boxes[0], full[0]) <= 1e-4  # the grid normalised to the box: float rounding apart
    for a, b in zip(from_boxes[1], full[1]):
        assert (a != b).float().mean() <= 1e-3


# ------------------------------------------------------------------ the whole pipeline
@pytest.mark.parametrize("labels", [None, [0, 1, 2, 3]], ids=["read", "given"])
def test_labels_stay_a_subset_and_no_padding_is_left(labels):
    aug = DeviceAugmentation(PATCH, ROTATION, DS_SCALES, (0, 1, 2), False, labels=labels)
    S = (34, 40, 44)
    data, seg = ct_like((8, 1, *S), 13)
    seg[seg == 3] = 2  # label 3 absent
    for seed in range(4):
        _, targets = aug(data.clone(), seg, generator=torch.Generator().manual_seed(seed))
        for t in targets:
            assert set(t.unique().tolist()) <= {0, 1, 2}


def test_given_labels_give_the_same_result():
    S = (34, 40, 44)
    data, seg = ct_like((4, 1, *S), 17)
    params = make_aug().sample_parameters(4, torch.Generator().manual_seed(2))
    params["spatial"][:] = True
    params["angles"][:] = 0.25
    results = [DeviceAugmentation(PATCH, ROTATION, DS_SCALES, (0, 1, 2), False, labels=labels).apply(
        data.clone(), seg, params, generator=torch.Generator().manual_seed(0)) for labels in (None, [0, 1, 2, 3, 7])]
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_shapes_dtypes_and_no_deep_supervision():
    aug = make_aug()
    data, seg = ct_like((2, 3, 30, 34, 40), 1)
    out, targets = aug(data, seg)
    assert out.shape == (2, 3, *PATCH) and out.dtype == torch.float32
    assert [tuple(t.shape) for t in targets] == [(2, 1, 20, 24, 28), (2, 1, 10, 12, 14), (2, 1, 5, 6, 7)]
    out, target = make_aug(ds=None)(data, seg)
    assert isinstance(target, torch.Tensor) and target.shape == (2, 1, *PATCH)
    with pytest.raises(NotImplementedError, match="3D"):
        DeviceAugmentation((20, 20), ROTATION, None, (0, 1), False)
    with pytest.raises(NotImplementedError, match="dummy-2D"):
        DeviceAugmentation(PATCH, ROTATION, None, (0, 1, 2), True)
    with pytest.raises(ValueError, match="seg"):
        aug.apply(data, seg[:, :, :5], aug.sample_parameters(2))


def nnunet_transforms():
    """nnU-Net's own training transforms for a 3D plan, as nnUNetTrainer builds them."""
    pytest.importorskip("SimpleITK")  # importing nnUNetTrainer needs it
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.get_training_transforms(list(PATCH), ROTATION, DS_SCALES, (0, 1, 2), False).transforms


def binomial_ok(count, n, p, sigmas=5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_sampling_matches_nnunets_configuration():
    """Over 4000 draws: how often each transform fires and the range of each parameter, against
    the probabilities and ranges in nnU-Net's own transform objects."""
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    transforms = nnunet_transforms()
    spatial = next(t for t in transforms if isinstance(t, SpatialTransform))
    wrapped = {type(t.transform).__name__ + ("_inverted" if getattr(t.transform, "p_invert_image", 0) else ""): t
               for t in transforms if isinstance(t, RandomTransform)}
    n, C = 4000, 2
    params = make_aug().sample_parameters(n, torch.Generator().manual_seed(0), num_channels=C)
    rotated = (params["angles"] != 0).any(1)
    scaled = params["scale"] != 1
    assert binomial_ok(rotated.sum().item(), n, spatial.p_rotation)
    assert binomial_ok(scaled.sum().item(), n, spatial.p_scaling)
    assert torch.equal(params["spatial"], rotated | scaled)
    angles = params["angles"][rotated]
    assert spatial.rotation[0] <= angles.min() and angles.max() <= spatial.rotation[1]
    assert (angles.abs() > 0.9 * spatial.rotation[1]).any(), "the range is used"
    assert spatial.scaling[0] <= params["scale"][scaled].min() and params["scale"][scaled].max() <= spatial.scaling[1]
    for name, key in [("GaussianNoiseTransform", "noise"), ("GaussianBlurTransform", "blur"),
                      ("MultiplicativeBrightnessTransform", "brightness"), ("ContrastTransform", "contrast"),
                      ("SimulateLowResolutionTransform", "lowres"), ("GammaTransform_inverted", "gamma_inverted"),
                      ("GammaTransform", "gamma")]:
        assert binomial_ok(params[key].sum().item(), n, wrapped[name].apply_probability), key
    noise = wrapped["GaussianNoiseTransform"].transform
    assert noise.synchronize_channels and tuple(noise.noise_variance) == (0, 0.1)
    assert 0 <= params["noise_std"].min() and params["noise_std"].max() <= 0.1
    blur = wrapped["GaussianBlurTransform"].transform
    assert binomial_ok(params["blur_channel"].sum().item(), n * C, blur.p_per_channel)
    assert blur.blur_sigma[0] <= params["blur_sigma"].min() and params["blur_sigma"].max() <= blur.blur_sigma[1]
    lowres = wrapped["SimulateLowResolutionTransform"].transform
    assert binomial_ok(params["lowres_channel"].sum().item(), n * C, lowres.p_per_channel)
    assert lowres.scale[0] <= params["lowres_scale"].min() and params["lowres_scale"].max() <= lowres.scale[1]
    for name, key in [("MultiplicativeBrightnessTransform", "brightness_factor"),
                      ("ContrastTransform", "contrast_factor"), ("GammaTransform", "gamma_value"),
                      ("GammaTransform_inverted", "gamma_inverted_value")]:
        transform = wrapped[name].transform
        configured = getattr(transform, "multiplier_range", None) or getattr(transform, "contrast_range", None) \
            or transform.gamma
        assert isinstance(configured, BGContrast), (name, configured)
        lo, hi = configured.contrast_range
        values = params[key]
        assert lo <= values.min() and values.max() <= hi, key
        # BGContrast: half the draws below 1
        assert binomial_ok((values < 1).sum().item(), values.numel(), 0.5), key
    mirror = next(t for t in transforms if isinstance(t, MirrorTransform))
    for axis in range(3):
        assert binomial_ok(params["mirror"][:, axis].sum().item(), n, 0.5 if axis in mirror.allowed_axes else 0)


def test_sampling_draws_per_sample_and_per_channel():
    params = make_aug().sample_parameters(500, torch.Generator().manual_seed(1), num_channels=3)
    for key in ("brightness_factor", "contrast_factor", "gamma_value", "lowres_scale"):
        assert (params[key][:, 0] != params[key][:, 1]).all(), key
    assert (params["blur_sigma"][..., 0] != params["blur_sigma"][..., 1]).all()
    assert params["noise_std"].unique().numel() == 500


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    aug = make_aug()
    S = (34, 40, 44)
    data, seg = ct_like((4, 2, *S), 21)
    params = aug.sample_parameters(4, torch.Generator().manual_seed(5), num_channels=2)
    for key in ("spatial", "blur", "contrast", "lowres", "gamma", "brightness"):
        params[key][:] = True
    params["angles"][:] = 0.3
    params["scale"][:] = 0.9
    cpu = aug.apply(data.clone(), seg, params)
    gpu = aug.apply(data.cuda(), seg.cuda(), params)
    assert rel_err(gpu[0].cpu(), cpu[0]) <= 1e-4
    for a, b in zip(gpu[1], cpu[1]):
        assert (a.cpu() != b).float().mean() <= 2e-3
