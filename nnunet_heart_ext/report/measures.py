"""What the report measures in one label map, with its CT image when there is one.

Per class: voxels, volume (ml), connected components, mean HU. For the myocardium its mass, for
the calcification its volume in mm3 and its voxels at or above the calcium threshold, and for each
calcification component how far it lies from the aortic valve. And where the heart is (the
myocardium's centre of mass), which the pictures cut through.

Arrays are in SimpleITK's numpy order (z, y, x) with the spacing in the same order, in mm. Work is
done inside bounding boxes: one pass over the whole label map finds the box of the foreground;
every class is then looked at in its own box (a full-size case is 80-130 million voxels, the heart
a few percent of them), so measuring costs far less than reading the file.

The constants below are the report's rules, stated once; the page shows them.
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import cc3d
import numpy as np

from nnunet_heart_ext.data import dataset as ds

CALCIUM_HU = 130                     # Agatston's threshold: a calcification voxel counts at or above it
MYOCARDIUM_DENSITY_G_PER_ML = 1.05   # myocardial tissue: mass (g) = volume (ml) x this
CONNECTIVITY = 26                    # voxels that share a face, an edge or a corner are connected (3D, usual for CT)
MYOCARDIUM, VALVE, CALCIUM = ds.LABELS["myocardium"], ds.LABELS["aortic_valve"], ds.LABELS["calcification"]

Box = Tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray) -> Optional[Box]:
    """The smallest box holding every nonzero voxel of `mask` (None if there is none): three
    reductions of the array, one per axis."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _inner(outer: Box, inner: Box) -> Box:
    """`inner` (a box of the array cut by `outer`) in the coordinates of the whole array."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))


class LabelMap:
    """A label map and the box of each class in it (found once, shared by the measures and the
    pictures)."""

    def __init__(self, label: np.ndarray, spacing):
        self.label = label
        self.spacing = tuple(float(s) for s in spacing)
        self.voxel_mm3 = math.prod(self.spacing)
        self.boxes: Dict[int, Optional[Box]] = {}
        foreground = bounding_box(label)
        self._masks: Dict[int, np.ndarray] = {}
        for value in ds.CLASSES:
            if foreground is None:
                self.boxes[value] = None
                continue
            in_foreground = label[foreground] == value
            box = bounding_box(in_foreground)
            self.boxes[value] = None if box is None else _inner(foreground, box)
            if box is not None:
                self._masks[value] = in_foreground[box]

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.label.shape

    def mask(self, value: int) -> Optional[np.ndarray]:
        """The class's voxels inside its box (None when the class is absent)."""
        return self._masks.get(value)

    def region_mask(self, value: int, region: Box) -> np.ndarray:
        """The class's voxels inside `region` (any box of the whole array)."""
        return self.label[region] == value


@dataclass(frozen=True)
class ClassMeasures:
    label: int
    voxels: int
    volume_ml: float
    components: int                   # connected components (CONNECTIVITY)
    mean_hu: Optional[float] = None   # mean of the CT over the class (None: absent, or no image)

    @property
    def present(self) -> bool:
        return self.voxels > 0


@dataclass(frozen=True)
class CaseMeasures:
    """Everything the report states about one label map (a test prediction, a training label)."""
    case: str
    shape: Tuple[int, int, int]          # z, y, x
    spacing: Tuple[float, float, float]  # z, y, x, mm
    classes: Tuple[ClassMeasures, ...]   # one per foreground class, in label order
    myocardium_mass_g: float
    calcium_mm3: float
    calcium_voxels_at_threshold: Optional[int]  # calcification voxels >= CALCIUM_HU (None: no image)
    calcium_valve_mm: Tuple[float, ...]  # per calcification component: its nearest voxel's distance to the
    #                                      valve, farthest first (empty: no calcification, or no valve)
    centre: Tuple[float, float, float]   # voxel (z, y, x) of the myocardium's centre of mass, else the image centre

    def of(self, label: int) -> ClassMeasures:
        return next(c for c in self.classes if c.label == label)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CaseMeasures":
        d = dict(d)
        d["classes"] = tuple(ClassMeasures(**c) for c in d["classes"])
        for key in ("shape", "spacing", "calcium_valve_mm", "centre"):
            d[key] = tuple(d[key])
        return cls(**d)


def count_components(mask: np.ndarray) -> int:
    """Connected components of a boolean mask (cc3d, CONNECTIVITY)."""
    return int(cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True)[1])


def centre_of_mass(mask: np.ndarray, box: Box) -> Tuple[float, float, float]:
    """Centre of mass (voxel coordinates of the whole array) of a mask cut out at `box`, from its
    per-axis voxel counts."""
    total = np.count_nonzero(mask)
    centre = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(mask, axis=others)
        centre.append(float(box[axis].start + (np.arange(counts.size) * counts).sum() / total))
    return tuple(centre)


def calcium_valve_distances(labels: LabelMap) -> Tuple[float, ...]:
    """For each calcification component, the distance (mm, voxel centre to voxel centre) from its
    voxel nearest the valve to the nearest valve voxel, farthest first. Computed with SimpleITK's
    Maurer distance map in the box holding both classes (the nearest valve voxel of a calcification
    always lies in it)."""
    import SimpleITK as sitk

    calcium_box, valve_box = labels.boxes[CALCIUM], labels.boxes[VALVE]
    if calcium_box is None or valve_box is None:
        return ()
    region = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(calcium_box, valve_box))
    valve = sitk.GetImageFromArray(labels.region_mask(VALVE, region).astype(np.uint8))
    valve.SetSpacing(tuple(reversed(labels.spacing)))
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(  # a copy: a view dies with its image
        valve, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    calcium = labels.region_mask(CALCIUM, region)
    components = cc3d.connected_components(calcium, connectivity=CONNECTIVITY)
    ids, at = components[calcium], np.maximum(distance[calcium], 0.0)
    nearest = np.full(int(ids.max()) + 1, np.inf)
    np.minimum.at(nearest, ids, at)
    return tuple(sorted((round(float(d), 3) for d in nearest[1:]), reverse=True))


def measure(case: str, labels: LabelMap, image: Optional[np.ndarray] = None) -> CaseMeasures:
    """The measures of one label map (and its CT image, same grid, for the HU figures)."""
    classes = []
    for value in ds.CLASSES:
        mask, box = labels.mask(value), labels.boxes[value]
        if mask is None:
            classes.append(ClassMeasures(value, 0, 0.0, 0, None))
            continue
        voxels = int(np.count_nonzero(mask))
        mean_hu = None if image is None else round(float(image[box][mask].mean(dtype=np.float64)), 2)
        classes.append(ClassMeasures(value, voxels, round(voxels * labels.voxel_mm3 / 1000.0, 6),
                                     count_components(mask), mean_hu))
    by_label = {c.label: c for c in classes}
    calcium = labels.mask(CALCIUM)
    at_threshold = None
    if image is not None:
        at_threshold = 0 if calcium is None else int(np.count_nonzero(image[labels.boxes[CALCIUM]][calcium]
                                                                      >= CALCIUM_HU))
    myocardium = labels.mask(MYOCARDIUM)
    centre = centre_of_mass(myocardium, labels.boxes[MYOCARDIUM]) if myocardium is not None else \
        tuple((n - 1) / 2.0 for n in labels.shape)
    return CaseMeasures(
        case=case, shape=tuple(int(n) for n in labels.shape), spacing=labels.spacing, classes=tuple(classes),
        myocardium_mass_g=round(by_label[MYOCARDIUM].volume_ml * MYOCARDIUM_DENSITY_G_PER_ML, 6),
        calcium_mm3=round(by_label[CALCIUM].voxels * labels.voxel_mm3, 6),
        calcium_voxels_at_threshold=at_threshold, calcium_valve_mm=calcium_valve_distances(labels),
        centre=tuple(round(c, 3) for c in centre))
