"""Label maps down to a coarser grid (deep supervision's targets) without losing small classes.

nnU-Net (batchgeneratorsv2's `DownsampleSegForDSTransform`) takes each coarser target by
nearest-exact interpolation: output voxel i holds the input voxel at floor((i + 0.5) * n_in / n_out).
At scale 1/2 that reads one voxel of every 2 x 2 x 2 block, at 1/4 one of 64: a structure of a few
voxels (a calcification, a 1-voxel leaflet) is mostly absent from the coarse targets, and those
heads are trained to call it background where the full-resolution head is trained to find it.

`downsample_labels(labels, shape, keep)` is nearest-exact, except that an output voxel whose block
holds one of the `keep` labels takes that label; where a block holds several, the earlier in
`keep` wins. The blocks are adaptive max pooling's (`torch.nn.functional.adaptive_max_pool3d`):
output voxel i covers input voxels floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1 along
each axis, the exact 2 x 2 x 2 blocks when n_in = 2 n_out. With `keep` empty it is nearest-exact.
"""
from typing import Sequence

import torch
import torch.nn.functional as F


def downsample_labels(labels: torch.Tensor, shape: Sequence[int], keep: Sequence[int] = ()) -> torch.Tensor:
    """labels (B, C, D, H, W) integer -> (B, C, *shape), same dtype and device."""
    if labels.dim() != 5:
        raise ValueError(f"downsample_labels takes (B, C, D, H, W) labels, got shape {tuple(labels.shape)}")
    shape = [int(s) for s in shape]
    as_float = labels.float()
    out = F.interpolate(as_float, shape, mode="nearest-exact").to(labels.dtype)
    for label in reversed(list(keep)):  # the first of `keep` is written last: it wins
        present = F.adaptive_max_pool3d((as_float == float(label)).float(), shape) > 0
        out = torch.where(present, torch.as_tensor(label, dtype=labels.dtype, device=labels.device), out)
    return out
