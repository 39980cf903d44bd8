"""Connected-component labelling and keep-largest-component: cc3d on the CPU, Triton on CUDA tensors.

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
                     Triton kernels (kernels/connected_components_triton.py, imported only then)
                     and stay on the GPU (under TRITON_INTERPRET=1, as in the tests, CPU tensors
                     run them too, interpreted). Results come back as the input's type (numpy ->
                     numpy, tensor -> tensor on the same device). Numpy inputs never import
                     Triton, nor torch.

CPU keep-largest: label only what could be the largest
    `label` runs cc3d on the whole array. Keep-largest does not need every component's label,
    only the largest size and which voxels are outside it. The volume is cut into blocks of
    BLOCK = 4 x 8 x 8 voxels; the occupied blocks (those holding foreground) are grouped by cc3d
    at 26-connectivity over blocks. Two voxels of one component are at most one step apart along
    each axis, so their blocks are the same or neighbours: every component lies inside one
    group, and no component crosses groups. Groups are visited from the most blocks down; a
    group is labelled (cc3d on its bounding box, restricted to its blocks) while its block
    count x 256 voxels, an upper bound of any component in it, is not below the largest
    component found so far. Every foreground voxel of the groups left is cleared without
    labelling: a false positive far from the organ costs one block, not a pass over the volume.
    Occupancy is read off the array's bytes, eight at a time (a nonzero 64-bit word marks its
    voxels as possible foreground; an OR-reduction per block), so a segmentation whose kept
    labels are nonzero values is never turned into a full-size mask: the exact mask is computed
    inside the labelled boxes and the cleared blocks only.
    On a 300 x 512 x 512 heart prediction (1 % foreground) the labelled boxes hold about 3 % of
    the volume, with or without a thousand scattered false positives (benchmarks/bench_cc.py).
    cc3d's own `dust` and `largest_k` label the whole volume (and `largest_k(k=1)` keeps one
    component of a tie), so they are not used here.
"""
import itertools
import sys

import cc3d
import numpy as np

from nnunet_heart_ext.kernels._triton import INTERPRET as _TRITON_ON_CPU

FULL_CONNECTIVITY = {2: 8, 3: 26}
VALID_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}
BLOCK = (4, 8, 8)  # voxels (z, y, x) of one occupancy block on the CPU path


# ----------------------------------------------------------------------------- public API
def label(mask, connectivity: int = None):
    """Connected components of `mask != 0`: (labels, n), labels int32 with 0 on background and
    1..n numbered in raster order. `connectivity`: 6, 18 or 26 in 3D, 4 or 8 in 2D, None = full.
    CUDA tensors run on the GPU (Triton); numpy arrays and CPU tensors on the CPU (cc3d)."""
    if _is_tensor(mask):
        if _runs_triton(mask):
            return label_triton(mask, connectivity)
        import torch

        labels, n = label(mask.cpu().numpy(), connectivity)
        return torch.from_numpy(labels).to(mask.device), n
    mask = _as_bool_mask(mask)
    return _label_cc3d(mask, _neighbours_3d(mask.ndim, connectivity))


def label_triton(mask, connectivity: int = None):
    """`label` with the Triton kernels on the tensor's device (CUDA, or the CPU when
    TRITON_INTERPRET=1, as in the tests). Returns (int32 labels tensor, n)."""
    from nnunet_heart_ext.kernels import _triton

    if not _triton.AVAILABLE:
        raise ValueError(f"label_triton: {_triton.REASON}")
    if not _runs_triton(mask):
        raise ValueError("label_triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    import torch

    from nnunet_heart_ext.kernels import connected_components_triton as gpu

    neighbours = _neighbours_3d(mask.ndim, connectivity)
    volume = (mask != 0).view(torch.uint8).reshape(_as_3d(mask.shape))
    labels, n = gpu.label_volume(volume, neighbours)
    return labels.reshape(mask.shape), n


def remove_all_but_largest_component(binary_image, connectivity: int = None):
    """Boolean mask of the largest connected component(s) of `binary_image != 0`; on a tie
    every component of the largest size is kept. Same devices and connectivity as `label`."""
    if _is_tensor(binary_image):
        if _runs_triton(binary_image):
            from nnunet_heart_ext.kernels import connected_components_triton as gpu

            return gpu.keep_largest(*label_triton(binary_image, connectivity))
        import torch

        keep = remove_all_but_largest_component(binary_image.cpu().numpy(), connectivity)
        return torch.from_numpy(keep).to(binary_image.device)
    mask = _as_bool_mask(binary_image)
    neighbours = _neighbours_3d(mask.ndim, connectivity)
    keep = mask.copy()
    volume = mask.reshape(_as_3d(mask.shape))
    _clear_all_but_largest(volume, np.copy, keep.reshape(volume.shape), False, neighbours)
    return keep


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
    if _is_tensor(segmentation):
        if _runs_triton(segmentation):
            import torch

            from nnunet_heart_ext.kernels import connected_components_triton as gpu

            mask = torch.zeros_like(segmentation, dtype=torch.bool)
            for value in values:
                mask |= segmentation == value
            remove = mask ^ gpu.keep_largest(*label_triton(mask))  # keep is a subset of mask
            ret = segmentation.clone()
            ret[remove] = background_label
            return ret
        import torch

        return torch.from_numpy(remove_all_but_largest_component_from_segmentation(
            segmentation.cpu().numpy(), labels_or_regions, background_label)).to(segmentation.device)
    neighbours = _neighbours_3d(segmentation.ndim, None)
    ret = np.copy(segmentation)
    if not values or segmentation.size == 0:
        return ret
    volume = segmentation if segmentation.ndim == 3 else segmentation[np.newaxis]  # views
    ret_volume = ret if ret.ndim == 3 else ret[np.newaxis]
    if _nonzero_bytes_cover(volume, values):
        # occupancy straight from the segmentation's bytes; exact masks only where needed
        _clear_all_but_largest(volume, _values_mask(volume.dtype, values), ret_volume, background_label, neighbours)
    else:
        mask = np.ascontiguousarray(_mask_of_values(volume, values))
        _clear_all_but_largest(mask, np.copy, ret_volume, background_label, neighbours)
    return ret


# ----------------------------------------------------------------------------- CPU keep-largest
def _clear_all_but_largest(source: np.ndarray, is_foreground, out: np.ndarray, background, neighbours: int) -> None:
    """out[v] = background for every foreground voxel v outside the largest component(s).

    source: C-contiguous 3D array whose nonzero bytes cover the foreground (the mask itself, or
    a segmentation whose kept values are all nonzero). is_foreground: elementwise, an array cut
    from source -> its exact foreground as a new bool array. out: 3D, source's shape."""
    if source.size == 0:
        return
    words, voxels_per_word = _words(source)
    words_per_block = max(1, BLOCK[2] // voxels_per_word)
    block = (BLOCK[0], BLOCK[1], words_per_block * voxels_per_word)  # in voxels
    occupied = _or_blocks(words, (BLOCK[0], BLOCK[1], words_per_block)) != 0
    groups, n = _cc3d(occupied, 26)
    if n == 0:
        return
    stats = cc3d.statistics(groups)
    blocks, boxes = stats["voxel_counts"].astype(np.int64), stats["bounding_boxes"]
    bound = blocks * (block[0] * block[1] * block[2])  # no component of a group has more voxels
    order = np.argsort(-bound[1:], kind="stable") + 1

    largest, labelled = 0, []
    for group in order:
        if bound[group] < largest:
            break
        box, mask = _group_mask(source, is_foreground, groups, group, blocks[group], boxes[group], block)
        labels, count = _cc3d(np.ascontiguousarray(mask), neighbours)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        largest = max(largest, int(sizes.max()))
        labelled.append((box, labels, sizes))
    for box, labels, sizes in labelled:
        loser = (sizes < largest) & (sizes > 0)
        if loser.any():
            out[box][loser[labels]] = background
    rest = order[len(labelled):]  # every component in these groups is smaller than the largest
    if len(rest):
        _clear_blocks(source, is_foreground, out, background, np.argwhere(np.isin(groups, rest)), block)


def _group_mask(source, is_foreground, groups, group: int, blocks: int, group_box: tuple, block: tuple):
    """(box in voxels, foreground of the group's blocks inside it) for one group of `blocks` blocks."""
    (z, y, x), (bz, by, bx) = group_box, block
    box = (slice(z.start * bz, min(z.stop * bz, source.shape[0])),
           slice(y.start * by, min(y.stop * by, source.shape[1])),
           slice(x.start * bx, min(x.stop * bx, source.shape[2])))
    mask = is_foreground(source[box])
    if blocks < (z.stop - z.start) * (y.stop - y.start) * (x.stop - x.start):  # other groups' blocks share the box
        mask &= _upsample(groups[group_box] == group, block, mask.shape)
    return box, mask


def _clear_blocks(source, is_foreground, out, background, cells: np.ndarray, block: tuple) -> None:
    """out = background on the foreground of the blocks at grid `cells` (k, 3), all blocks at once:
    source and out are seen as (blocks, block) 6D views, once for the whole blocks and once per
    partial last block along an axis (at most 8 such regions)."""
    shape = source.shape
    whole = [n // b for n, b in zip(shape, block)]  # whole blocks per axis
    for region in itertools.product((False, True), repeat=3):  # per axis: whole blocks, or the partial one
        spans, dims, chosen = [], [], np.ones(len(cells), dtype=bool)
        for axis, partial in enumerate(region):
            start = whole[axis] * block[axis]
            if partial and start == shape[axis]:
                break  # no partial block along this axis
            chosen &= (cells[:, axis] == whole[axis]) if partial else (cells[:, axis] < whole[axis])
            spans.append(slice(start, shape[axis]) if partial else slice(0, start))
            dims += [1, shape[axis] - start] if partial else [whole[axis], block[axis]]
        else:
            if not chosen.any():
                continue
            index = cells[chosen] if not any(region) else np.where(region, 0, cells[chosen])
            i, j, k = index.T
            source_blocks = _view_as(source[tuple(spans)], dims)[i, :, j, :, k, :]
            out_blocks = _view_as(out[tuple(spans)], dims)
            cleared = out_blocks[i, :, j, :, k, :]
            cleared[is_foreground(source_blocks)] = background
            out_blocks[i, :, j, :, k, :] = cleared


def _view_as(array: np.ndarray, shape: list) -> np.ndarray:
    """A view of `array` with its axes split into `shape` (splitting axes never needs a copy;
    checked, since writes must reach `array`)."""
    view = array.reshape(shape)
    assert view.size == 0 or np.may_share_memory(view, array), "reshape copied"
    return view


def _upsample(grid: np.ndarray, block: tuple, shape: tuple) -> np.ndarray:
    """Blocks -> voxels: each grid cell repeated `block` times, cut to `shape`."""
    for axis, b in enumerate(block):
        grid = np.repeat(grid, b, axis=axis)
    return grid[tuple(slice(0, s) for s in shape)]


def _words(source: np.ndarray):
    """The C-contiguous 3D array as unsigned words along its last axis, as wide as its row
    allows (8 bytes when the row's byte length is a multiple of 8), and voxels per word."""
    row_bytes = source.shape[2] * source.itemsize
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and w >= source.itemsize)
    return source.view(f"u{word}"), word // source.itemsize


def _or_blocks(words: np.ndarray, block: tuple) -> np.ndarray:
    """Bitwise OR of the words of each block (a last, partial block where a length is not a
    multiple of the block's)."""
    for axis, b in enumerate(block):
        n = words.shape[axis]
        if b == 1 or n == 0:
            continue
        full = n - n % b
        before = (slice(None),) * axis
        parts = []
        if full:
            head = words[before + (slice(0, full),)]
            split = words.shape[:axis] + (full // b, b) + words.shape[axis + 1:]
            parts.append(np.bitwise_or.reduce(head.reshape(split), axis=axis + 1))
        if full < n:
            parts.append(np.bitwise_or.reduce(words[before + (slice(full, n),)], axis=axis, keepdims=True))
        words = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
    return words


def _nonzero_bytes_cover(volume: np.ndarray, values: list) -> bool:
    """Whether the segmentation's nonzero bytes mark every voxel of one of `values` (so its
    bytes can stand for the mask in the occupancy pass): a C-contiguous array of plain numbers
    and no value equal to 0."""
    return (volume.flags.c_contiguous and volume.dtype.kind in "biuf" and volume.itemsize in (1, 2, 4, 8)
            and all(isinstance(v, (bool, int, float, np.number, np.bool_)) and v != 0 for v in values))


# ----------------------------------------------------------------------------- cc3d
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


# ----------------------------------------------------------------------------- helpers
def _mask_of_values(segmentation: np.ndarray, values: list) -> np.ndarray:
    """segmentation == any of `values`."""
    return _values_mask(segmentation.dtype, values)(segmentation)


def _values_mask(dtype: np.dtype, values: list):
    """A function: array of `dtype` -> bool array, True where it equals one of `values` (set up
    once, called for many small boxes). A run of consecutive integers (labels 1, 2, 3) on an
    integer image takes two passes, not two a value: v - lo, wrapping around in unsigned
    arithmetic, is <= hi - lo exactly for lo <= v <= hi."""
    unique = sorted(set(values))
    if (dtype.kind in "iu" and len(unique) > 1 and all(isinstance(v, (int, np.integer)) for v in unique)
            and unique == list(range(unique[0], unique[-1] + 1))
            and np.iinfo(dtype).min <= unique[0] and unique[-1] <= np.iinfo(dtype).max):
        unsigned = np.dtype(f"u{dtype.itemsize}")
        low = np.array(unique[0], dtype=dtype).view(unsigned)
        span = unsigned.type(len(unique) - 1)
        return lambda array: np.less_equal(np.subtract(array.view(unsigned), low), span)
    if len(values) == 1:
        value = values[0]
        return lambda array: np.equal(array, value)

    def any_of(array):
        mask = np.zeros(array.shape, dtype=bool)
        equal = np.empty_like(mask)  # one buffer for every value: fresh 78 MB arrays cost page faults
        for value in values:
            np.equal(array, value, out=equal)
            mask |= equal
        return mask

    return any_of


def _is_tensor(x) -> bool:
    """A torch tensor (torch is not imported for numpy inputs: without it, x is no tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _runs_triton(tensor) -> bool:
    """CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) take the Triton kernels where
    Triton imports; elsewhere everything runs on the CPU with cc3d."""
    if not (tensor.is_cuda or _TRITON_ON_CPU):
        return False
    from nnunet_heart_ext.kernels import _triton

    return _triton.AVAILABLE


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
