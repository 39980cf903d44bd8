"""The report's pictures (numpy + Pillow): a case at a glance, as one small PNG.

A case's strip: three orthogonal slices through the heart (axial, coronal, sagittal, cut through
the myocardium's centre of mass, or the image centre when there is none; a square of
`HEART_FOV_MM` around it), the labels overlaid in colour, and a coronal projection of the whole
field of view: the CT's maximum-intensity projection with the projection of each class over it,
calcifications opaque, so that a calcification anywhere in the volume, or a second myocardium
blob far from the heart, shows even when no slice cuts it. Each panel keeps the voxels' physical
aspect (the slice spacing is often larger than the in-plane one) and its longer side is
`PANEL_PX`. A validation case gets two strips, the reference above the prediction, cut at the same
place.

The slices are shown as the arrays lie (rows y, columns x in the axial view: radiological
orientation for an identity direction), with the head up in the coronal and sagittal views (the
z axis flipped when it points to the head, as in LPS).
"""
import io
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.report.measures import LabelMap

PANEL_PX = 160                 # the longer side of each panel
HEART_FOV_MM = 160.0           # the slices show this square (mm) around the heart's centre
WINDOW_HU = (-300.0, 800.0)    # slices: myocardium, contrast blood and calcium apart
MIP_WINDOW_HU = (-200.0, 1400.0)  # projection: calcium above contrast blood
COLOURS = {1: (213, 94, 0), 2: (86, 180, 233), 3: (240, 228, 66)}  # Okabe-Ito vermillion, sky blue, yellow
SLICE_ALPHA = {1: 0.45, 2: 0.75, 3: 1.0}
PROJECTION_ALPHA = {1: 0.2, 2: 0.55, 3: 1.0}
GAP, BACKGROUND = 4, (24, 24, 24)
PANEL_NAMES = ("axial", "coronal", "sagittal", "coronal projection")
assert set(COLOURS) == set(ds.CLASSES)


def _size(shape: Tuple[int, int], row_mm: float, col_mm: float) -> Tuple[int, int]:
    """(width, height) in pixels of a panel of `shape` voxels of row_mm x col_mm, longer side PANEL_PX."""
    h_mm, w_mm = shape[0] * row_mm, shape[1] * col_mm
    scale = PANEL_PX / max(h_mm, w_mm)
    return max(1, round(w_mm * scale)), max(1, round(h_mm * scale))


def _gray(values: Optional[np.ndarray], shape, window) -> np.ndarray:
    if values is None:
        return np.zeros(shape, np.uint8)
    lo, hi = window
    scaled = (values.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def panel(values: Optional[np.ndarray], masks: Dict[int, np.ndarray], row_mm: float, col_mm: float,
          window=WINDOW_HU, alpha=SLICE_ALPHA) -> Image.Image:
    """One panel: a 2D CT plane (None: black) in `window`, each class's 2D mask over it in its
    colour. Resized to the physical aspect; a class covering any part of a pixel colours it, so a
    calcification of one voxel still shows at a fraction of the resolution."""
    shape = next(iter(masks.values())).shape if values is None else values.shape
    size = _size(shape, row_mm, col_mm)
    gray = Image.fromarray(_gray(values, shape, window)).resize(size, Image.BILINEAR)
    rgb = np.repeat(np.asarray(gray, np.float32)[..., None], 3, axis=2)
    for label, mask in sorted(masks.items()):
        if not mask.any():
            continue
        cover = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
        a = np.float32(alpha[label])
        rgb[cover] = rgb[cover] * (1 - a) + np.asarray(COLOURS[label], np.float32) * a
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def _window(centre: float, half: float, n: int) -> slice:
    lo = max(0, int(round(centre - half)))
    return slice(lo, min(n, max(lo + 1, int(round(centre + half)) + 1)))


def _planes(labels: LabelMap, image: Optional[np.ndarray], centre: Sequence[float], head_up: bool):
    """(CT plane, label plane, row mm, column mm) of the three slices through `centre`, cropped to
    HEART_FOV_MM around it."""
    sz, sy, sx = labels.spacing
    nz, ny, nx = labels.shape
    cz, cy, cx = (int(min(max(round(c), 0), n - 1)) for c, n in zip(centre, labels.shape))
    z = _window(centre[0], HEART_FOV_MM / 2 / sz, nz)
    y = _window(centre[1], HEART_FOV_MM / 2 / sy, ny)
    x = _window(centre[2], HEART_FOV_MM / 2 / sx, nx)
    flip = slice(None, None, -1) if head_up else slice(None)
    cuts = [((cz, y, x), sy, sx, False), ((z, cy, x), sz, sx, True), ((z, y, cx), sz, sy, True)]
    out = []
    for index, row_mm, col_mm, vertical in cuts:
        ct = None if image is None else image[index]
        lab = labels.label[index]
        if vertical:
            ct = None if ct is None else ct[flip]
            lab = lab[flip]
        out.append((ct, lab, row_mm, col_mm))
    return out


def projection(labels: LabelMap, image: Optional[np.ndarray], head_up: bool) -> Image.Image:
    """The coronal projection of the whole volume: the CT's maximum over y, each class's
    projection over it (from its box only)."""
    sz, _, sx = labels.spacing
    nz, _, nx = labels.shape
    ct = None if image is None else image.max(axis=1)
    masks = {}
    for label, box in labels.boxes.items():
        canvas = np.zeros((nz, nx), bool)
        if box is not None:
            canvas[box[0], box[2]] = labels.mask(label).any(axis=1)
        masks[label] = canvas
    if head_up:
        ct = None if ct is None else ct[::-1]
        masks = {k: v[::-1] for k, v in masks.items()}
    return panel(ct, masks, sz, sx, MIP_WINDOW_HU, PROJECTION_ALPHA)


def strip(labels: LabelMap, image: Optional[np.ndarray], centre: Sequence[float], head_up: bool) -> Image.Image:
    """The four panels of a case side by side."""
    panels = [panel(ct, {k: lab == k for k in ds.CLASSES}, row_mm, col_mm)
              for ct, lab, row_mm, col_mm in _planes(labels, image, centre, head_up)]
    panels.append(projection(labels, image, head_up))
    return _join(panels, horizontal=True)


def _join(pictures, horizontal: bool) -> Image.Image:
    if horizontal:
        size = (sum(p.width for p in pictures) + GAP * (len(pictures) - 1), max(p.height for p in pictures))
    else:
        size = (max(p.width for p in pictures), sum(p.height for p in pictures) + GAP * (len(pictures) - 1))
    out = Image.new("RGB", size, BACKGROUND)
    at = 0
    for p in pictures:
        out.paste(p, (at, (size[1] - p.height) // 2) if horizontal else (0, at))
        at += (p.width if horizontal else p.height) + GAP
    return out


def pair(reference: LabelMap, prediction: LabelMap, image: Optional[np.ndarray], centre: Sequence[float],
         head_up: bool) -> Image.Image:
    """A validation case: the reference's strip above the prediction's, cut at the same place."""
    return _join([strip(reference, image, centre, head_up), strip(prediction, image, centre, head_up)],
                 horizontal=False)


def png(picture: Image.Image) -> bytes:
    """PNG bytes of a picture, in a palette of 256 colours (a third of the RGB file's size)."""
    buffer = io.BytesIO()
    picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buffer, "PNG",
                                                                                           optimize=False)
    return buffer.getvalue()
