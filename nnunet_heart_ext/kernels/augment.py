"""nnU-Net's default 3D training augmentation as batched torch operations on any device.

Reproduces `nnUNetTrainer.get_training_transforms` (nnunetv2 2.8.1, batchgeneratorsv2 0.3.6) for
3D patches without dummy-2D augmentation, cascade, regions or masked normalisation, in the same
order, with the same probabilities, ranges and per-sample / per-channel draws:

    transform            fires (per sample)   draws
    spatial              rotation p 0.2,      3 angles U(rotation_for_DA), one scale U(0.7, 1.4)
                         scaling p 0.2        for all axes; affine Rz Ry Rx S about the patch centre
    Gaussian noise       p 0.1                one std U(0, 0.1) for all channels
    Gaussian blur        p 0.2                each channel with p 0.5, sigma U(0.5, 1) per axis
    brightness (mult.)   p 0.15               per channel m ~ BGContrast(0.75, 1.25)
    contrast             p 0.15               per channel m ~ BGContrast(0.75, 1.25), range kept
    low resolution       p 0.25               each channel with p 0.5, scale U(0.5, 1) all axes
    gamma, inverted      p 0.1                per channel g ~ BGContrast(0.7, 1.5), stats kept
    gamma                p 0.3                per channel g ~ BGContrast(0.7, 1.5), stats kept
    mirror               -                    each allowed axis with p 0.5
    remove label -1 -> 0, then the deep-supervision downsampling of the target

BGContrast(lo, hi): with p 0.5 U(lo, 1), else U(1, hi).

Maths of each step on a sample x (C, *S), S the enlarged patch as nnU-Net's loader cuts it, P
the patch, voxel index vectors i:
    spatial: output voxel i samples the input at p = A (i - (P - 1) / 2) + (S - 1) / 2
        (A = Rz(a2) Ry(a1) Rx(a0) diag(s); Rx rotates the last two axes), trilinear for the image
        with zeros outside; the segmentation takes, per voxel, the label whose indicator (times
        1000, trilinear, rounded to fp16) scores highest, ties going to the nearest-neighbour
        label, and -1 outside (batchgeneratorsv2's rule for bg_style_seg_sampling=False and
        padding_value_seg=-1). Without rotation and scaling: a crop of P starting at
        floor(S / 2) - floor(P / 2) (no interpolation).
    noise, blur, brightness, contrast, low resolution, gamma: kernels/augment_intensity.py, whose
        docstring states their maths.
    mirror: flip the drawn axes of image and segmentation.
    deep supervision: the target at round(P * scale) per scale, nearest-exact (downsample_labels:
        with `keep_labels`, a block holding one of them keeps it).

Interface:
    aug = DeviceAugmentation(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                             do_dummy_2d_data_aug, ignore_label=None, labels=None)
    params = aug.sample_parameters(batch_size, generator=None, num_channels=1)
    data, target = aug.apply(data, seg, params)      # (B, C, *S), (B, 1, *S) -> (B, C, *P), [targets]
    data, target = aug(data, seg)                    # sample, then apply

`labels` (optional): the label values of the segmentations; without it each transformed sample's
label range is read from the device (a synchronisation). `params` is a dict of CPU tensors, leading dimension the batch (documented in
`sample_parameters`): the choices are drawn where the data is cut (a loader worker), and the
apply step reads which transforms fire without waiting on the device. A loader may hand over,
instead of the enlarged patch, only the box of it that a sample's transform reads
(`sample_box`, then `apply_boxes`): the result is the same.

Everything runs where the tensors are (CUDA or CPU): one grid_sample per transformed sample
(image and all labels of it at once), the intensity transforms as batched tensor operations on
the samples they fire for. Python loops run over samples or channels only where the work truly
differs per sample (their own grid, low-resolution shape or flip axes).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_heart_ext.kernels.augment_intensity import apply_intensity
from nnunet_heart_ext.kernels.downsample_labels import downsample_labels

RandomRange = Union[float, Tuple[float, float]]

P_ROTATION, P_SCALING, SCALING = 0.2, 0.2, (0.7, 1.4)
P_NOISE, NOISE_STD = 0.1, (0.0, 0.1)
P_BLUR, P_BLUR_CHANNEL, BLUR_SIGMA = 0.2, 0.5, (0.5, 1.0)
P_BRIGHTNESS, BRIGHTNESS = 0.15, (0.75, 1.25)
P_CONTRAST, CONTRAST = 0.15, (0.75, 1.25)
P_LOWRES, P_LOWRES_CHANNEL, LOWRES_SCALE = 0.25, 0.5, (0.5, 1.0)
P_GAMMA_INVERTED, P_GAMMA, GAMMA = 0.1, 0.3, (0.7, 1.5)
P_MIRROR = 0.5
SEG_PAD = -1  # nnU-Net pads segmentations with -1 (loader and spatial transform), then sets it to 0
SCORE_SCALE = 1000.0  # batchgeneratorsv2's indicator scale; scores are compared in fp16


def as_tensors(params: dict) -> dict:
    """`sample_parameters`' dict with numpy arrays (how loader workers send it: pickled inline,
    where each tensor would cost a shared-memory segment and a file descriptor) back as tensors
    (no copy); tensors pass through."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}


class DeviceAugmentation:
    """nnU-Net's default 3D training transforms, batched, on the tensors' device."""

    def __init__(self, patch_size: Sequence[int], rotation_for_DA: RandomRange,
                 deep_supervision_scales: Optional[Sequence[Sequence[float]]], mirror_axes: Optional[Sequence[int]],
                 do_dummy_2d_data_aug: bool, ignore_label: Optional[int] = None,
                 labels: Optional[Sequence[int]] = None, keep_labels: Sequence[int] = ()):
        if len(patch_size) != 3:
            raise NotImplementedError(f"DeviceAugmentation covers 3D patches, got patch_size {tuple(patch_size)}")
        if do_dummy_2d_data_aug:
            raise NotImplementedError("DeviceAugmentation does not cover dummy-2D augmentation (anisotropic plans)")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation = rotation_for_DA
        self.deep_supervision_scales = None if deep_supervision_scales is None else \
            [tuple(float(f) for f in s) if isinstance(s, (list, tuple)) else (float(s),) * 3
             for s in deep_supervision_scales]
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else ()
        self.ignore_label = ignore_label  # kept as nnU-Net passes it: the default transforms ignore it
        # the label values segmentations hold (besides -1): known, they spare a device -> host read
        self.max_label = None if labels is None else int(max(labels))
        # labels that survive in every deep-supervision target (downsample_labels); () = nnU-Net's nearest
        self.keep_labels = tuple(int(k) for k in keep_labels)
        self._grids = {}

    # ------------------------------------------------------------------ sampling
    def sample_parameters(self, batch_size: int, generator: torch.Generator = None, num_channels: int = 1) -> dict:
        """Every random choice for one batch, as CPU tensors (B: batch, C: channels):
            spatial (B,) bool: rotation or scaling fires;  angles (B, 3) float64 radians (0 where
            no rotation);  scale (B,) float64 (1 where no scaling)
            noise (B,) bool;  noise_std (B,)
            blur (B,) bool;  blur_channel (B, C) bool;  blur_sigma (B, C, 3)
            brightness (B,) bool;  brightness_factor (B, C)
            contrast (B,) bool;  contrast_factor (B, C)
            lowres (B,) bool;  lowres_channel (B, C) bool;  lowres_scale (B, C)
            gamma_inverted (B,) bool;  gamma_inverted_value (B, C)
            gamma (B,) bool;  gamma_value (B, C)
            mirror (B, 3) bool: flip spatial axis k (only allowed axes can be True)
        A transform's values are drawn whether or not it fires (fixed shapes); they are used only
        where it fires."""
        g = generator
        B, C = int(batch_size), int(num_channels)

        def uniform(shape, lo, hi):
            return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

        def fires(p, shape=(B,)):
            return torch.rand(shape, generator=g, dtype=torch.float64) < p

        def bg_contrast(shape, lo, hi):  # batchgeneratorsv2's BGContrast
            low = torch.rand(shape, generator=g, dtype=torch.float64) < 0.5
            return torch.where(low & (lo < 1), uniform(shape, lo, 1.0), uniform(shape, max(lo, 1.0), hi))

        rotation = self.rotation if isinstance(self.rotation, (tuple, list)) else (self.rotation, self.rotation)
        do_rotation, do_scaling = fires(P_ROTATION), fires(P_SCALING)
        angles = torch.where(do_rotation[:, None], uniform((B, 3), *rotation), 0.0)
        scale = torch.where(do_scaling, uniform((B,), *SCALING), 1.0)
        mirror = torch.zeros((B, 3), dtype=torch.bool)
        for axis in self.mirror_axes:
            mirror[:, axis] = fires(P_MIRROR)
        return {
            "spatial": do_rotation | do_scaling, "angles": angles, "scale": scale,
            "noise": fires(P_NOISE), "noise_std": uniform((B,), *NOISE_STD),
            "blur": fires(P_BLUR), "blur_channel": fires(P_BLUR_CHANNEL, (B, C)),
            "blur_sigma": uniform((B, C, 3), *BLUR_SIGMA),
            "brightness": fires(P_BRIGHTNESS), "brightness_factor": bg_contrast((B, C), *BRIGHTNESS),
            "contrast": fires(P_CONTRAST), "contrast_factor": bg_contrast((B, C), *CONTRAST),
            "lowres": fires(P_LOWRES), "lowres_channel": fires(P_LOWRES_CHANNEL, (B, C)),
            "lowres_scale": uniform((B, C), *LOWRES_SCALE),
            "gamma_inverted": fires(P_GAMMA_INVERTED), "gamma_inverted_value": bg_contrast((B, C), *GAMMA),
            "gamma": fires(P_GAMMA), "gamma_value": bg_contrast((B, C), *GAMMA),
            "mirror": mirror,
        }

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def affine(angles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) float64: Rz(a2) Ry(a1) Rx(a0) diag(s, s, s), batchgeneratorsv2's
        create_affine_matrix_3d, acting on (axis 0, axis 1, axis 2) column vectors."""
        c, s = torch.cos(angles), torch.sin(angles)
        one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
        return rz @ ry @ rx * scale.to(angles.dtype)[:, None, None]

    def sample_box(self, params: dict, b: int, enlarged_shape: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
        """The part of sample b's enlarged patch (start, stop per axis, within the patch) that
        its transform reads: the patch itself without rotation and scaling, else the voxels
        around every sample point (trilinear reads the two neighbours per axis), clipped."""
        S, P = [int(s) for s in enlarged_shape], self.patch_size
        params = as_tensors(params)
        if not bool(params["spatial"][b]):
            return tuple((s // 2 - p // 2, s // 2 - p // 2 + p) for s, p in zip(S, P))
        A = self.affine(params["angles"][b:b + 1], params["scale"][b:b + 1])[0]
        corners = torch.cartesian_prod(*[torch.tensor([-(p - 1) / 2, (p - 1) / 2], dtype=torch.float64)
                                         for p in P])
        points = corners @ A.T + torch.tensor([(s - 1) / 2 for s in S], dtype=torch.float64)
        lo, hi = points.amin(0), points.amax(0)
        # one voxel of margin beyond the trilinear neighbours absorbs float rounding of the grid
        return tuple((min(max(int(math.floor(l)) - 1, 0), s), max(min(int(math.floor(h)) + 3, s), 0))
                     for l, h, s in zip(lo.tolist(), hi.tolist(), S))

    def _base_grid(self, device) -> torch.Tensor:
        """(P0, P1, P2, 3) voxel offsets from the patch centre, float32 (batchgeneratorsv2's
        _create_centered_identity_grid2)."""
        key = str(device)
        if key not in self._grids:
            axes = [torch.linspace((1 - p) / 2, (p - 1) / 2, p, device=device) for p in self.patch_size]
            self._grids[key] = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        return self._grids[key]

    # ------------------------------------------------------------------ apply
    def __call__(self, data: torch.Tensor, seg: torch.Tensor, generator: torch.Generator = None):
        params = self.sample_parameters(data.shape[0], generator, num_channels=data.shape[1])
        return self.apply(data, seg, params, generator=generator)

    def apply(self, data: torch.Tensor, seg: torch.Tensor, params: dict, generator: torch.Generator = None):
        """data (B, C, *S) float, seg (B, 1, *S) integer (the enlarged patches nnU-Net's loader
        cuts) -> data (B, C, *P) float32 and the target: a list with one (B, 1, *scale) int16
        tensor per deep-supervision scale, or one tensor without deep supervision. `generator`
        (on the data's device) draws the Gaussian noise."""
        if data.ndim != 5 or seg.ndim != 5 or seg.shape[1] != 1 or data.shape[0] != seg.shape[0] \
                or data.shape[2:] != seg.shape[2:]:
            raise ValueError(f"DeviceAugmentation.apply: data (B, C, D, H, W) and seg (B, 1, D, H, W) of one "
                             f"shape expected, got {tuple(data.shape)} and {tuple(seg.shape)}")
        S = tuple(data.shape[2:])
        return self.apply_boxes(list(data), list(seg), [(0, 0, 0)] * data.shape[0], S, params, generator)

    def apply_boxes(self, data: List[torch.Tensor], seg: List[torch.Tensor], offsets: Sequence[Sequence[int]],
                    enlarged_shape: Sequence[int], params: dict, generator: torch.Generator = None):
        """As `apply`, for samples given as boxes of their enlarged patch: data[b] (C, *box_b)
        and seg[b] (1, *box_b) start at offsets[b] within a patch of `enlarged_shape` and hold at
        least what `sample_box` asks for."""
        params = as_tensors(params)
        B = len(data)
        device = data[0].device
        C = data[0].shape[0]
        out = torch.empty((B, C, *self.patch_size), dtype=torch.float32, device=device)
        target = torch.empty((B, 1, *self.patch_size), dtype=torch.int16, device=device)
        for b in range(B):
            self._spatial(data[b], seg[b], offsets[b], enlarged_shape, params, b, out[b], target[b])
        target.masked_fill_(target == SEG_PAD, 0)
        apply_intensity(out, params, generator)
        for b in range(B):  # the flip axes differ per sample
            axes = [k + 1 for k in range(3) if bool(params["mirror"][b, k])]
            if axes:
                out[b] = out[b].flip(axes)
                target[b] = target[b].flip(axes)
        return out, self._deep_supervision(target)

    def _spatial(self, data, seg, offset, enlarged_shape, params, b, out, target):
        """Sample b: (C, *box) and (1, *box) at `offset` in the enlarged patch -> out (C, *P)
        float32, target (1, *P) int16, labels -1 included."""
        P = self.patch_size
        if not bool(params["spatial"][b]):
            start = [s // 2 - p // 2 - o for s, p, o in zip(enlarged_shape, P, offset)]
            window = (slice(None),) + tuple(slice(st, st + p) for st, p in zip(start, P))
            out.copy_(data[window])
            target.copy_(seg[window])
            return
        device = data.device
        A = self.affine(params["angles"][b:b + 1], params["scale"][b:b + 1])[0].to(torch.float32).to(device)
        # Input position of output voxel i, in the box: A v + (S - 1) / 2 - offset, v = i - (P - 1) / 2.
        # grid_sample (align_corners=False) reads position q at (2 q + 1) / box - 1 = (A v + shift) / (box / 2)
        # with shift = (S - 1) / 2 - offset + 1 / 2 - box / 2 (exact in floats; 0 for the whole enlarged
        # patch, where this is batchgeneratorsv2's own arithmetic, float for float).
        box = data.shape[1:]
        shift = [(s - 1) / 2 - o + 0.5 - n / 2 for s, o, n in zip(enlarged_shape, offset, box)]
        grid = torch.matmul(self._base_grid(device), A.T)
        if any(shift):
            grid += torch.tensor(shift, dtype=torch.float32, device=device)
        grid /= torch.tensor([n / 2 for n in box], dtype=torch.float32, device=device)
        grid = grid.flip(-1)[None]  # grid_sample's (x, y, z)
        out.copy_(F.grid_sample(data[None].float(), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)[0])
        # Segmentation: every label's indicator (x 1000) in one grid_sample; the padding label -1
        # counts as present outside the box (its channel is sampled as indicator - 1, plus 1).
        seg = seg[0]
        if self.max_label is None:
            lo, hi = (int(v) for v in torch.aminmax(seg))
            if lo < SEG_PAD:
                raise ValueError(f"DeviceAugmentation: segmentation labels must be >= {SEG_PAD}, found {lo}")
        else:
            hi = self.max_label
        labels = list(range(SEG_PAD, hi + 1))  # channel k holds label k + SEG_PAD
        values = torch.tensor(labels, dtype=seg.dtype, device=device).view(-1, 1, 1, 1)
        onehot = (seg[None] == values).float()
        onehot[0] -= 1  # channel 0, the padding label, is sampled as (indicator - 1) + 1
        scores = F.grid_sample(onehot.mul_(SCORE_SCALE)[None], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0]
        del onehot
        scores[0] += SCORE_SCALE
        scores = scores.half()
        best, winner = scores.max(0)  # the first maximum: the lower label keeps a tie...
        nearest = F.grid_sample((seg - SEG_PAD).float()[None, None], grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[0, 0].long()  # ...unless the nearest label has it
        winner = torch.where(scores.gather(0, nearest[None])[0] == best, nearest, winner)
        target.copy_((winner + SEG_PAD)[None])

    def _deep_supervision(self, target: torch.Tensor):
        if self.deep_supervision_scales is None:
            return target
        results = []
        for scale in self.deep_supervision_scales:
            if all(s == 1 for s in scale):
                results.append(target)
                continue
            shape = [round(p * s) for p, s in zip(target.shape[2:], scale)]
            results.append(downsample_labels(target, shape, self.keep_labels))
        return results
