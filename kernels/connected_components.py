"""Connected-component labelling and keep-largest-component: Triton on CUDA tensors, cc3d on the CPU.

Semantics (every path)
    foreground       mask != 0; arrays are 2D (H, W) or 3D (D, H, W).
    connectivity     3D: 6 (faces), 18 (faces and edges), 26 (faces, edges and corners);
                     2D: 4 or 8. None means full connectivity (26 in 3D, 8 in 2D), which is what
                     nnU-Net uses (skimage's `label` with connectivity=None).
    label            int32 array, 0 on background, components numbered 1..n in C raster order
                     of their first voxel, on both paths (equal arrays; skimage's order too).
                     A 2D image runs as a volume of one slice (4 -> 6, 8 -> 18 neighbours).
    keep largest     every component whose voxel count equals the largest one is kept (ties
                     keep all of them, as acvl_utils' `remove_all_but_largest_component` does);
                     an empty mask gives an all-False mask.
    device           numpy arrays and CPU tensors run on the CPU with cc3d; CUDA tensors run the
                     Triton kernels below and stay on the GPU (under TRITON_INTERPRET=1, as in
                     the tests, CPU tensors run them too, interpreted). Results come back as the
                     input's type (numpy -> numpy, tensor -> tensor on the same device).

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

CPU path
    `label` is cc3d on the whole array. Keep-largest first cuts the mask into boxes at
    all-background planes (no component crosses one; the planes are read off the three 2D
    projections), labels each box with cc3d and counts sizes box by box: on a CT heart mask the
    boxes hold about 3 % of the volume. See benchmarks/bench_cc.py for the timings.
"""
import cc3d
import numpy as np
import torch

from nnunet_heart_ext.kernels._triton import AVAILABLE as _TRITON_AVAILABLE
from nnunet_heart_ext.kernels._triton import INTERPRET as _TRITON_ON_CPU
from nnunet_heart_ext.kernels._triton import REASON as _TRITON_REASON
from nnunet_heart_ext.kernels._triton import tl, triton

FULL_CONNECTIVITY = {2: 8, 3: 26}
VALID_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}
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
def label_triton(mask: torch.Tensor, connectivity: int = None):
    """`label` with the Triton kernels on the tensor's device (CUDA, or the CPU when
    TRITON_INTERPRET=1, as in the tests). Returns (int32 labels tensor, n)."""
    if not _TRITON_AVAILABLE:
        raise ValueError(f"label_triton: {_TRITON_REASON}")
    if not _runs_triton(mask):
        raise ValueError("label_triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    neighbours = _neighbours_3d(mask.ndim, connectivity)
    numel = mask.numel()
    if numel >= 2**31 - BLOCK:
        raise ValueError(f"label_triton: {numel} voxels exceed the int32 index range")
    shape = mask.shape
    volume = (mask != 0).view(torch.uint8).reshape(_as_3d(shape))
    _, H, W = volume.shape
    labels = torch.zeros(shape, dtype=torch.int32, device=mask.device)
    if numel == 0:
        return labels, 0
    parent = torch.arange(numel, dtype=torch.int32, device=mask.device)
    grid = (triton.cdiv(numel, BLOCK),)
    _merge_kernel[grid](volume, parent, numel, H, W, CONNECTIVITY=neighbours, BLOCK=BLOCK)
    _compress_kernel[grid](volume, parent, labels, numel, BLOCK=BLOCK)
    flat = labels.view(-1)
    flat.cumsum_(0)
    n = int(flat[-1].item())
    _relabel_kernel[grid](volume, parent, labels, numel, BLOCK=BLOCK)
    return labels, n


def _keep_largest_torch(labels: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    sizes = torch.bincount(labels.view(-1), minlength=n + 1)
    sizes[0] = 0
    keep = sizes == sizes.max()
    return keep[labels]


# ----------------------------------------------------------------------------- CPU (cc3d)
def _cc3d(mask: np.ndarray, neighbours: int, **kwargs):
    """cc3d on `mask` seen as a volume (cc3d numbers 2D 8-connected components out of raster
    order, but a one-slice volume in raster order)."""
    volume = mask.reshape(_as_3d(mask.shape))
    # On a line (at most one axis longer than 1) every connectivity is face connectivity, and
    # cc3d 4.1 fails ("maximum length exception") on such volumes with 26-connectivity.
    if sum(s > 1 for s in volume.shape) <= 1:
        neighbours = 6
    labels, n = cc3d.connected_components(volume, connectivity=neighbours, return_N=True, **kwargs)
    return labels.reshape(mask.shape), int(n)


def _label_cc3d(mask: np.ndarray, neighbours: int):
    labels, n = _cc3d(mask, neighbours, out_dtype=np.uint32)
    return labels.view(np.int32), n


def _foreground_boxes(volume: np.ndarray) -> list:
    """Disjoint boxes (tuples of slices) holding every foreground voxel of a 3D mask, split at
    all-background planes until none is found inside a box. No component crosses such a plane
    (neighbours are at most one step away along each axis, for every connectivity), so each box
    is labelled on its own and cc3d skips the empty rest of a CT (about 97 %).
    Planes are found on the three 2D projections (three passes over the volume in all): a plane
    they call empty is empty; one they miss only leaves a box larger than it could be."""
    zy, zx, yx = volume.any(axis=2), volume.any(axis=1), volume.any(axis=0)
    boxes, todo = [], [tuple(slice(0, s) for s in volume.shape)]
    while todo:
        box = z, y, x = todo.pop()
        runs = [_true_runs(zy[z, y].any(axis=1) & zx[z, x].any(axis=1)),
                _true_runs(zy[z, y].any(axis=0) & yx[y, x].any(axis=1)),
                _true_runs(zx[z, x].any(axis=0) & yx[y, x].any(axis=0))]
        if not all(runs):
            continue
        tight = tuple(slice(b.start + r[0][0], b.start + r[-1][1]) for b, r in zip(box, runs))
        axis = next((a for a in range(3) if len(runs[a]) > 1), None)
        if axis is None:
            boxes.append(tight)
            continue
        for start, stop in runs[axis]:
            todo.append(tight[:axis] + (slice(box[axis].start + start, box[axis].start + stop),) + tight[axis + 1:])
    return boxes


def _true_runs(profile: np.ndarray) -> list:
    """(start, stop) of every run of True in a 1D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], profile, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _largest_components_cc3d(volume: np.ndarray, neighbours: int) -> list:
    """[(box, labels, loser)] for every box of the 3D mask: cc3d's labels inside the box, and
    per label id whether that component is NOT one of the largest of the whole mask."""
    labelled = []
    for box in _foreground_boxes(volume):
        labels, n = _cc3d(np.ascontiguousarray(volume[box]), neighbours)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        labelled.append((box, labels, sizes))
    largest = max((sizes.max() for _, _, sizes in labelled), default=0)
    return [(box, labels, (sizes != largest) & (sizes > 0)) for box, labels, sizes in labelled]


def _keep_largest_cc3d(mask: np.ndarray, neighbours: int) -> np.ndarray:
    volume = mask.reshape(_as_3d(mask.shape))
    keep = np.zeros(volume.shape, dtype=bool)
    for box, labels, loser in _largest_components_cc3d(volume, neighbours):
        keep[box] = volume[box] & ~loser[labels]
    return keep.reshape(mask.shape)


# ----------------------------------------------------------------------------- public API
def label(mask, connectivity: int = None):
    """Connected components of `mask != 0`: (labels, n), labels int32 with 0 on background and
    1..n numbered in raster order. `connectivity`: 6, 18 or 26 in 3D, 4 or 8 in 2D, None = full.
    CUDA tensors run on the GPU (Triton); numpy arrays and CPU tensors on the CPU (cc3d)."""
    if isinstance(mask, torch.Tensor):
        if _runs_triton(mask):
            return label_triton(mask, connectivity)
        labels, n = label(mask.cpu().numpy(), connectivity)
        return torch.from_numpy(labels).to(mask.device), n
    mask = _as_bool_mask(mask)
    return _label_cc3d(mask, _neighbours_3d(mask.ndim, connectivity))


def remove_all_but_largest_component(binary_image, connectivity: int = None):
    """Boolean mask of the largest connected component(s) of `binary_image != 0`; on a tie
    every component of the largest size is kept. Same devices and connectivity as `label`."""
    if isinstance(binary_image, torch.Tensor):
        if _runs_triton(binary_image):
            return _keep_largest_torch(*label_triton(binary_image, connectivity))
        keep = remove_all_but_largest_component(binary_image.cpu().numpy(), connectivity)
        return torch.from_numpy(keep).to(binary_image.device)
    mask = _as_bool_mask(binary_image)
    return _keep_largest_cc3d(mask, _neighbours_3d(mask.ndim, connectivity))


def remove_all_but_largest_component_from_segmentation(segmentation, labels_or_regions,
                                                       background_label=0):
    """nnunetv2.postprocessing.remove_connected_components' function of this name, output for
    output: the union of the given labels (int) and regions (tuples of labels) is one mask; its
    voxels outside the largest component(s), full connectivity (26 in 3D, 8 in 2D), are set to
    `background_label`.
    The input is not modified. numpy arrays (any dtype) and torch tensors (CUDA: on the GPU)."""
    if not isinstance(labels_or_regions, list):
        labels_or_regions = [labels_or_regions]
    values = []
    for label_or_region in labels_or_regions:
        values.extend([label_or_region] if np.isscalar(label_or_region) else label_or_region)
    if isinstance(segmentation, torch.Tensor) and _runs_triton(segmentation):
        mask = torch.zeros_like(segmentation, dtype=torch.bool)
        for value in values:
            mask |= segmentation == value
        remove = mask ^ _keep_largest_torch(*label_triton(mask))  # keep is a subset of mask
        ret = segmentation.clone()
        ret[remove] = background_label
        return ret
    if isinstance(segmentation, torch.Tensor):
        return torch.from_numpy(remove_all_but_largest_component_from_segmentation(
            segmentation.cpu().numpy(), labels_or_regions, background_label)).to(segmentation.device)
    mask = _mask_of_values(segmentation, values)
    neighbours = _neighbours_3d(mask.ndim, None)
    ret = np.copy(segmentation)
    ret_volume = ret if ret.ndim == 3 else ret[np.newaxis]  # a view: writes go to ret
    for box, labels, loser in _largest_components_cc3d(mask.reshape(ret_volume.shape), neighbours):
        ret_volume[box][loser[labels]] = background_label
    return ret


def _mask_of_values(segmentation: np.ndarray, values: list) -> np.ndarray:
    """segmentation == any of `values`. A run of consecutive integers (labels 1, 2, 3) on an
    integer image takes two passes, not two a value: v - lo, wrapping around in unsigned
    arithmetic, is <= hi - lo exactly for lo <= v <= hi."""
    dtype = segmentation.dtype
    unique = sorted(set(values))
    if (dtype.kind in "iu" and len(unique) > 1 and all(isinstance(v, (int, np.integer)) for v in unique)
            and unique == list(range(unique[0], unique[-1] + 1))
            and np.iinfo(dtype).min <= unique[0] and unique[-1] <= np.iinfo(dtype).max):
        unsigned = segmentation.view(f"u{dtype.itemsize}")
        low = np.array(unique[0], dtype=dtype).view(unsigned.dtype)
        return np.less_equal(np.subtract(unsigned, low), len(unique) - 1)
    mask = np.zeros(segmentation.shape, dtype=bool)
    equal = np.empty_like(mask)  # one buffer for every value: fresh 78 MB arrays cost page faults
    for value in values:
        np.equal(segmentation, value, out=equal)
        mask |= equal
    return mask


def _runs_triton(tensor: torch.Tensor) -> bool:
    """CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) take the Triton kernels where
    Triton imports; elsewhere everything runs on the CPU with cc3d."""
    return _TRITON_AVAILABLE and (tensor.is_cuda or _TRITON_ON_CPU)


def _as_bool_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    return np.ascontiguousarray(mask)  # C order: cc3d numbers components in memory order


def _neighbours_3d(ndim: int, connectivity) -> int:
    """The validated connectivity as 3D neighbours: a 2D image is a volume of one slice, where
    4 is 6 and 8 is 18."""
    if ndim not in VALID_CONNECTIVITY:
        raise ValueError(f"connected components need a 2D or 3D array, got {ndim} dimensions")
    if connectivity is None:
        connectivity = FULL_CONNECTIVITY[ndim]
    if connectivity not in VALID_CONNECTIVITY[ndim]:
        raise ValueError(f"connectivity {connectivity!r} is not valid in {ndim}D; "
                         f"use one of {VALID_CONNECTIVITY[ndim]} (or None for full connectivity)")
    return {4: 6, 8: 18}.get(int(connectivity), int(connectivity))


def _as_3d(shape) -> tuple:
    return (1,) * (3 - len(shape)) + tuple(shape)
