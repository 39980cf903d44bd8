"""Numba kernels of HeartPreprocessor (nnunet_heart_ext/nnunet/preprocessing.py, the nnU-Net side).

- `background_reaching_faces`: the background of a boolean mask that a 6-connected path of
  background voxels joins to a face of the array (a flood fill from the faces). Inside the
  bounding box of the nonzero voxels this is the complement of scipy's `binary_fill_holes`, what
  nnU-Net's `crop_to_nonzero` marks.
- `coordinates_grouped_by_label`: the coordinates of the voxels holding one of the given labels,
  grouped by label in ascending order and in C order within a label (what nnU-Net's np.isin +
  np.argwhere + stable argsort give), in two passes without sorting.

Plain arrays in and out; the module imports numpy and numba only.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def _push(stack, top, value):
    if top == stack.shape[0]:
        bigger = np.empty(2 * stack.shape[0], dtype=stack.dtype)
        bigger[:top] = stack
        stack = bigger
    stack[top] = value
    return stack, top + 1


@njit(cache=True)
def background_reaching_faces(mask):
    """True where mask is False and a 6-connected path of False voxels leads to a face of the
    array. A flood fill from the faces: it touches only that background, which in CT (air is
    -1024, not 0) is a few scattered voxels, where a labelling of all background would not be."""
    nz, ny, nx = mask.shape
    reach = np.zeros((nz, ny, nx), dtype=np.bool_)
    stack = np.empty(4096, dtype=np.int64)
    top = 0
    for z in range(nz):
        for y in range(ny):
            on_face = z == 0 or z == nz - 1 or y == 0 or y == ny - 1
            step = 1 if on_face else max(nx - 1, 1)
            for x in range(0, nx, step):
                if not mask[z, y, x] and not reach[z, y, x]:
                    reach[z, y, x] = True
                    stack, top = _push(stack, top, (z * ny + y) * nx + x)
            if not on_face and not mask[z, y, nx - 1] and not reach[z, y, nx - 1]:
                reach[z, y, nx - 1] = True
                stack, top = _push(stack, top, (z * ny + y) * nx + nx - 1)
    while top > 0:
        top -= 1
        i = stack[top]
        x = i % nx
        y = (i // nx) % ny
        z = i // (nx * ny)
        for dz, dy, dx in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
            zz, yy, xx = z + dz, y + dy, x + dx
            if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx and not mask[zz, yy, xx] and not reach[zz, yy, xx]:
                reach[zz, yy, xx] = True
                stack, top = _push(stack, top, (zz * ny + yy) * nx + xx)
    return reach


@njit(cache=True)
def _label_index(value, labels):
    """The index s of the first labels[s] equal to value, -1 where none is."""
    for s in range(labels.shape[0]):
        if value == labels[s]:
            return s
    return -1


@njit(cache=True)
def coordinates_grouped_by_label(seg, labels):
    """Coordinates of the voxels of 4-D `seg` whose value is one of `labels` (sorted), grouped by
    label in ascending order and in C order within a label, and the count of each label: what
    nnU-Net's np.isin + np.argwhere + stable argsort give, in two passes without sorting (the
    first counts each label, the second writes each voxel at its label's next place)."""
    flat = seg.ravel()  # a view of a C-contiguous seg: voxel i is (a, b, c, d) in C order
    n1, n2, n3 = seg.shape[1], seg.shape[2], seg.shape[3]
    counts = np.zeros(labels.shape[0], dtype=np.int64)
    for i in range(flat.shape[0]):
        s = _label_index(flat[i], labels)
        if s >= 0:
            counts[s] += 1
    position = np.zeros(labels.shape[0], dtype=np.int64)
    for s in range(1, labels.shape[0]):
        position[s] = position[s - 1] + counts[s - 1]
    coords = np.empty((counts.sum(), 4), dtype=np.int64)
    for i in range(flat.shape[0]):
        s = _label_index(flat[i], labels)
        if s >= 0:
            j = position[s]
            position[s] += 1
            rest, coords[j, 3] = divmod(i, n3)
            rest, coords[j, 2] = divmod(rest, n2)
            coords[j, 0], coords[j, 1] = divmod(rest, n1)
    return coords, counts
