"""Connected-component labelling on the GPU: Triton union-find kernels (CUDA tensors, or CPU
tensors through Triton's interpreter when TRITON_INTERPRET=1, as in the tests).

Imported only when a tensor takes this path (`kernels/connected_components.py` dispatches), so
that labelling numpy arrays never imports Triton. The semantics (connectivity, raster-order
numbering, ties) are stated once, in `kernels/connected_components.py`; this module computes them.

Reference maths of the GPU path (union-find over linear voxel indices, lock-free)
    parent[i] = i
    for every foreground voxel i and every foreground neighbour j before it in raster order
    (13 of 26, 9 of 18, 3 of 6 neighbours):  union(i, j)
        union(a, b): loop { a, b = find(a), find(b); if a == b: stop
                            lo, hi = min(a, b), max(a, b); old = atomic_min(parent[hi], lo)
                            if old == hi: stop                 # hi was a root: linked
                            a, b = lo, old }                   # hi had been linked meanwhile
        find(x): follow parent to the root, halving the path on the way
                 (atomic_min(parent[x], parent[parent[x]])).
    parent[i] <= i always holds and only ever decreases, so each component's root is its
    smallest index, i.e. its first voxel in raster order, and each union loop ends (max(a, b)
    strictly decreases). Then parent[i] = find(i) (compress), and
    label[i] = #roots at indices <= parent[i] (inclusive scan over the root flags).
    All passes are a fixed number of launches over the volume: no diameter-long iteration.
    Labels are not differentiable, so there is no autograd.Function/nn.Module here.
"""
import torch

from nnunet_heart_ext.kernels._triton import AVAILABLE as _TRITON_AVAILABLE
from nnunet_heart_ext.kernels._triton import REASON as _TRITON_REASON
from nnunet_heart_ext.kernels._triton import tl, triton

BLOCK = 512  # voxels per Triton program


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _find_root(parent_ptr, x, active):
    """Root of x in the lanes where `active` (x unchanged elsewhere), halving the path."""
    # .cg: read parents from L2, not from a possibly stale L1 line of another SM's writes.
    p = tl.load(parent_ptr + x, mask=active, other=0, cache_modifier=".cg")
    pending = active & (p != x)
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        grandparent = tl.load(parent_ptr + p, mask=pending, other=0, cache_modifier=".cg")
        # atomic_min, not a store: a concurrent union may have lowered parent[x] already.
        tl.atomic_min(parent_ptr + x, grandparent, mask=pending & (grandparent != p))
        x = tl.where(pending, grandparent, x)
        p = tl.load(parent_ptr + x, mask=pending, other=0, cache_modifier=".cg")
        pending = pending & (p != x)
    return x


@triton.jit
def _union(parent_ptr, a, b, active):
    """Merge the trees of a and b in the lanes where `active`."""
    a = _find_root(parent_ptr, a, active)
    b = _find_root(parent_ptr, b, active)
    pending = active & (a != b)
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        lo = tl.minimum(a, b)
        hi = tl.maximum(a, b)
        old = tl.atomic_min(parent_ptr + hi, lo, mask=pending)
        pending = pending & (old != hi)
        # hi was linked to `old` by another lane first; parent[hi] is now min(old, lo):
        # join lo's and old's trees to keep every link.
        a = _find_root(parent_ptr, lo, pending)
        b = _find_root(parent_ptr, old, pending)
        pending = pending & (a != b)


@triton.jit
def _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W,
                          DZ: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr):
    ok = fg & (z + DZ >= 0) & (y + DY >= 0) & (y + DY < H) & (x + DX >= 0) & (x + DX < W)
    neighbour = offs + (DZ * H + DY) * W + DX
    ok = ok & (tl.load(mask_ptr + neighbour, mask=ok, other=0) != 0)
    _union(parent_ptr, offs, neighbour, ok)


@triton.jit
def _merge_kernel(mask_ptr, parent_ptr, numel, H, W, CONNECTIVITY: tl.constexpr, BLOCK: tl.constexpr):
    """Union every foreground voxel with its foreground neighbours that come before it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    fg = tl.load(mask_ptr + offs, mask=offs < numel, other=0) != 0
    if tl.max(fg.to(tl.int32), axis=0) > 0:  # most blocks of a CT hold background only
        x = offs % W
        y = (offs // W) % H
        z = offs // (H * W)
        # faces (6-connectivity)
        _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, 0, 0, -1)
        _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, 0, -1, 0)
        _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 0, 0)
        if CONNECTIVITY >= 18:  # edges
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, 0, -1, -1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, 0, -1, 1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 0, -1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 0, 1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, -1, 0)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 1, 0)
        if CONNECTIVITY == 26:  # corners
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, -1, -1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, -1, 1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 1, -1)
            _union_with_neighbour(mask_ptr, parent_ptr, offs, fg, z, y, x, H, W, -1, 1, 1)


@triton.jit
def _compress_kernel(mask_ptr, parent_ptr, labels_ptr, numel, BLOCK: tl.constexpr):
    """parent[i] = root(i) on the foreground; labels[i] = 1 where i is a root (labels holds 0s)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    fg = tl.load(mask_ptr + offs, mask=offs < numel, other=0) != 0
    root = _find_root(parent_ptr, offs, fg)
    tl.store(parent_ptr + offs, root, mask=fg)
    tl.store(labels_ptr + offs, tl.full([BLOCK], 1, tl.int32), mask=fg & (root == offs))


@triton.jit
def _relabel_kernel(mask_ptr, parent_ptr, labels_ptr, numel, BLOCK: tl.constexpr):
    """labels[i] = rank of root(i) on the foreground, 0 elsewhere. In place: labels holds the
    inclusive scan of the root flags, and a root's entry is already its final value."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    fg = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    root = tl.load(parent_ptr + offs, mask=fg, other=0)
    rank = tl.load(labels_ptr + root, mask=fg, other=0)
    tl.store(labels_ptr + offs, tl.where(fg, rank, 0), mask=inside)


# ----------------------------------------------------------------------------- launch wrappers
def label_volume(volume: torch.Tensor, neighbours: int):
    """Labels of a C-contiguous 3D uint8 tensor (nonzero = foreground) with 6, 18 or 26
    neighbours, on its device: (int32 labels of the same shape, n). Callers validate the
    arguments (kernels/connected_components.py)."""
    if not _TRITON_AVAILABLE:
        raise ValueError(f"label_triton: {_TRITON_REASON}")
    numel = volume.numel()
    if numel >= 2**31 - BLOCK:
        raise ValueError(f"label_triton: {numel} voxels exceed the int32 index range")
    _, H, W = volume.shape
    labels = torch.zeros(volume.shape, dtype=torch.int32, device=volume.device)
    if numel == 0:
        return labels, 0
    parent = torch.arange(numel, dtype=torch.int32, device=volume.device)
    grid = (triton.cdiv(numel, BLOCK),)
    _merge_kernel[grid](volume, parent, numel, H, W, CONNECTIVITY=neighbours, BLOCK=BLOCK)
    _compress_kernel[grid](volume, parent, labels, numel, BLOCK=BLOCK)
    flat = labels.view(-1)
    flat.cumsum_(0)
    n = int(flat[-1].item())
    _relabel_kernel[grid](volume, parent, labels, numel, BLOCK=BLOCK)
    return labels, n


def keep_largest(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the components of maximal size (every one of them on a tie)."""
    if n == 0:
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    sizes = torch.bincount(labels.view(-1), minlength=n + 1)
    sizes[0] = 0
    keep = sizes == sizes.max()
    return keep[labels]
