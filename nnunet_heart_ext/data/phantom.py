"""Synthetic contrast cardiac CT in the AICUP 2025 organizer's layout (`nnunet-heart phantom`).

Each case is drawn from its own generator, `numpy.random.default_rng([seed, case_number])`, so a
seed always gives the same files, byte for byte. Anatomy is built in millimetres and then sampled
on the case's voxel grid, so structures keep their physical size whatever the spacing:

    air -1000 HU | body: soft tissue ~40 HU under a fat layer ~-100 HU | lungs ~-850 HU
    spine (bright bone rim, not labelled) and descending aorta (contrast blood)
    heart: tissue ~40 HU, right ventricle and left atrium blood ~0.7-0.9 x contrast
    left ventricle: blood pool (contrast 300-450 HU) inside a myocardium shell (100-150 HU,  label 1)
    LV outflow tract -> aortic root: blood; aortic valve where they meet: annulus ring and three
        cusps bulging toward the ventricle, leaflets 1-2 mm thick, 60-120 HU          (label 2)
    calcifications: 1-4 blobs of 1-2.5 mm radius (4-65 mm^3), 800-1300 HU, at the cusps' bases,
        in about a third of the cases                                                   (label 3)
    Every size is in millimetres and independent of the spacing: nothing is drawn larger to be
    easier to learn, so at a coarse spacing a thin leaflet or a small blob covers few voxels (a
    blob that covers no voxel centre marks the one voxel nearest its centre, so a case drawn as
    calcified always holds label 3).
    + Gaussian noise (15-30 HU); small random shift, rotation and size of the heart per case.

Default cases are small for CPU training: ~112-128 x 112-128 in-plane at 1.2-1.6 mm, ~50-75 slices.
Every fifth case (patient0002, 0007, 0012, ...) is anisotropic: slice spacing 3.3-3.8 x in-plane.
`full_size=True` gives 512 x 512 x 250-400 at 0.3-0.45 mm in-plane, 0.4 or 0.5 mm slices, like
the organizer's data. Images are int16 HU, labels uint8; identity direction.

Layout written (train ids first, test ids continue after them, like 0001-0050 / 0051-0100), with
the organizer's names as the dataset contract (`nnunet_heart_ext.data.dataset`) states them:
    out/training_image1..3/patientNNNN.nii.gz    out/training_label/patientNNNN_gt.nii.gz
    out/testing_image/patientNNNN.nii.gz         out/testing_label/patientNNNN_gt.nii.gz
"""
import json
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.files import write_text
from nnunet_heart_ext.data.io import DatasetError, write_image

TRAIN_LABEL_DIR, TEST_IMAGE_DIR, TEST_LABEL_DIR = ds.TRAIN_LABEL_DIRS[0], ds.TEST_IMAGE_DIRS[0], ds.TEST_LABEL_DIRS[0]
FOLDERS = ds.ORGANIZER_TRAIN_IMAGE_DIRS + (TRAIN_LABEL_DIR, TEST_IMAGE_DIR, TEST_LABEL_DIR)
MARKER = ".nnunet-heart-phantom.json"  # says the folder is ours to overwrite


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotation(rng, max_degrees: float) -> np.ndarray:
    """Small random rotation (z, y, x axes)."""
    a, b, c = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _frame(axis) -> np.ndarray:
    """Rows: `axis` and two unit vectors perpendicular to it and to each other."""
    axis = _unit(axis)
    helper = np.array([0.0, 0.0, 1.0]) if abs(axis[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(axis, helper))
    return np.stack([axis, e1, np.cross(axis, e1)])


class _Box:
    """Millimetre coordinates of the voxels in a sub-block of the volume (broadcastable 1D arrays),
    so each structure is evaluated only where it can be."""

    def __init__(self, shape, spacing, center_mm, half_mm):
        lo = [max(0, int(np.floor((c - h) / s))) for c, h, s in zip(center_mm, half_mm, spacing)]
        hi = [min(n, int(np.ceil((c + h) / s)) + 1) for c, h, s, n in zip(center_mm, half_mm, spacing, shape)]
        hi = [max(h, l) for l, h in zip(lo, hi)]
        self.slices = tuple(slice(l, h) for l, h in zip(lo, hi))
        z, y, x = (np.arange(l, h, dtype=np.float32) * np.float32(s) for l, h, s in zip(lo, hi, spacing))
        self.z, self.y, self.x = z[:, None, None], y[None, :, None], x[None, None, :]

    def local(self, point, frame) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates of every voxel relative to `point`, along the three rows of `frame`."""
        dz, dy, dx = self.z - np.float32(point[0]), self.y - np.float32(point[1]), self.x - np.float32(point[2])
        return tuple(np.float32(f[0]) * dz + np.float32(f[1]) * dy + np.float32(f[2]) * dx for f in frame)

    def ellipsoid(self, center, frame, semi_axes) -> np.ndarray:
        a, b, c = self.local(center, np.asarray(frame) / np.asarray(semi_axes, dtype=np.float64)[:, None])
        a *= a  # in place: full-size boxes hold tens of millions of voxels
        b *= b
        c *= c
        a += b
        a += c
        return a <= 1

    def tube(self, start, axis, radius, length) -> np.ndarray:
        w, p, q = self.local(start, _frame(axis))
        return (w >= 0) & (w <= length) & (p * p + q * q <= radius * radius)


def _blur(img: np.ndarray, weight: float = 0.18) -> np.ndarray:
    """Scanner resolution and partial volume: a [w, 1-2w, w] kernel along each axis (a Gaussian of
    sigma sqrt(2w) ~ 0.6 voxel), edges repeated, in place. Blends label borders with their
    neighbours, so foreground intensities spread the way they do in real scans."""
    w = np.float32(weight)
    for axis in range(img.ndim):
        a = np.moveaxis(img, axis, 0)  # a view: the updates below land in img
        if a.shape[0] < 2:
            continue
        neighbours = np.empty_like(a)
        np.add(a[:-2], a[2:], out=neighbours[1:-1])
        np.add(a[0], a[1], out=neighbours[0])
        np.add(a[-1], a[-2], out=neighbours[-1])
        neighbours *= w
        a *= 1 - 2 * w
        a += neighbours
    return img


def _case_grid(rng, anisotropic: bool, full_size: bool):
    """(shape z,y,x), (spacing z,y,x) in mm."""
    if full_size:
        n_xy = 512
        in_plane = rng.uniform(0.30, 0.45)
        fov_z = rng.uniform(125.0, 160.0)
        slice_mm = in_plane * rng.uniform(3.3, 3.8) if anisotropic else float(rng.choice([0.4, 0.5]))
    elif anisotropic:
        n_xy = int(rng.choice([144, 160]))
        in_plane = rng.uniform(1.0, 1.1)
        fov_z = rng.uniform(85.0, 100.0)
        slice_mm = in_plane * rng.uniform(3.3, 3.8)
    else:
        n_xy = int(rng.choice([112, 120, 128]))
        in_plane = rng.uniform(150.0, 180.0) / n_xy
        fov_z = rng.uniform(80.0, 96.0)
        slice_mm = rng.uniform(1.25, 1.6)
    n_z = int(round(fov_z / slice_mm))
    return (n_z, n_xy, n_xy), (slice_mm, in_plane, in_plane)


def synth_case(rng: np.random.Generator, anisotropic: bool = False, calcified: bool = False,
               full_size: bool = False) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """One case: (image int16 HU, label uint8, spacing z,y,x mm); arrays in numpy (z, y, x) order."""
    shape, spacing = _case_grid(rng, anisotropic, full_size)
    extent = np.array(shape) * np.array(spacing)
    img = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    whole = _Box(shape, spacing, extent / 2, extent)
    y2, x2 = whole.y[0], whole.x[0]  # (ny, 1), (1, nx) for in-plane shapes

    # body: elliptic cylinder with a subcutaneous fat layer; lungs either side; spine and aorta behind
    cy, cx = extent[1] / 2 + rng.uniform(-4, 4), extent[2] / 2 + rng.uniform(-4, 4)
    ay, ax = extent[1] * rng.uniform(0.40, 0.44), extent[2] * rng.uniform(0.46, 0.49)
    body = ((y2 - cy) / ay) ** 2 + ((x2 - cx) / ax) ** 2
    fat = rng.uniform(6.0, 12.0)
    img[:, body <= 1] = -100.0 + rng.normal(0, 5)
    img[:, ((y2 - cy) / (ay - fat)) ** 2 + ((x2 - cx) / (ax - fat)) ** 2 <= 1] = 40.0 + rng.normal(0, 5)
    z_mid = whole.z - extent[0] / 2
    for side in (-1, 1):
        ly, lx = cy + 0.05 * ay, cx + side * 0.52 * ax
        sy, sx = 0.72 * ay, 0.36 * ax
        lung_xy = ((y2 - ly) / sy) ** 2 + ((x2 - lx) / sx) ** 2
        lungs = lung_xy <= 1 - (z_mid / (1.6 * extent[0])) ** 2  # tapers toward the ends
        img[lungs] = -850.0 + rng.normal(0, 15)
    spine_y, spine_r = cy + 0.78 * ay, 0.16 * ay
    spine = (y2 - spine_y) ** 2 + (x2 - cx) ** 2
    img[:, spine <= spine_r ** 2] = 700.0
    img[:, spine <= (0.8 * spine_r) ** 2] = 250.0
    contrast = rng.uniform(300.0, 450.0)
    d_ao_r = 0.11 * ay
    img[:, (y2 - (spine_y - 1.4 * spine_r)) ** 2 + (x2 - (cx + 1.3 * spine_r)) ** 2 <= d_ao_r ** 2] = contrast

    # heart: pose and size vary per case; directions are (z up, y posterior, x patient's left)
    scale = rng.uniform(0.9, 1.1)
    turn = _rotation(rng, 10.0)
    heart = np.array([extent[0] / 2, cy - 0.12 * ay, cx + 0.05 * ax]) + rng.uniform(-6, 6, 3)
    def paint_ellipsoid(center, semi_axes, value):
        own = _Box(shape, spacing, center, np.full(3, max(semi_axes)))
        img[own.slices][own.ellipsoid(center, turn, semi_axes)] = value

    paint_ellipsoid(heart, scale * np.array([48, 52, 60]), -80.0)  # epicardial fat
    paint_ellipsoid(heart, scale * np.array([44, 48, 56]), 40.0)
    rv, la = heart + turn @ np.array([-4.0, -20.0, -16.0]) * scale, heart + turn @ np.array([14.0, 22.0, 6.0]) * scale
    paint_ellipsoid(rv, scale * np.array([28, 18, 26]), contrast * rng.uniform(0.6, 0.8))
    paint_ellipsoid(la, scale * np.array([16, 16, 22]), contrast * rng.uniform(0.8, 0.95))

    # left ventricle: long axis from base toward the apex (down, forward, left)
    lv_axis = turn @ _unit([-0.45, -0.55, 0.70])
    lv_frame = _frame(lv_axis)
    lv = heart + turn @ np.array([-6.0, -4.0, 12.0]) * scale
    box = _Box(shape, spacing, heart, np.array([75.0, 75.0, 75.0]))
    long_in, short_in = 32.0 * scale, 17.0 * scale
    wall = rng.uniform(8.0, 11.0) * scale
    inner = box.ellipsoid(lv, lv_frame, (long_in, short_in, short_in))
    outer = box.ellipsoid(lv, lv_frame, (long_in + 0.8 * wall, short_in + wall, short_in + wall))

    # outflow tract and aortic root; the valve sits where they meet
    ao_axis = turn @ _unit([1.0, 0.25, -0.35])
    ao_r = rng.uniform(10.0, 13.0) * scale
    valve_at = lv - lv_axis * (0.85 * long_in) + ao_axis * 6.0
    outflow_start = lv - lv_axis * (0.3 * long_in)
    outflow = box.tube(outflow_start, valve_at - outflow_start, 0.85 * ao_r,
                       float(np.linalg.norm(valve_at - outflow_start)))
    root = box.tube(valve_at, ao_axis, ao_r, 200.0) | box.ellipsoid(
        valve_at + ao_axis * 0.7 * ao_r, np.eye(3), (1.25 * ao_r,) * 3)
    base_cut = box.local(lv, lv_frame)[0] < -0.8 * long_in  # the shell is open at the base
    blood = inner | outflow | root
    myocardium = outer & ~blood & ~base_cut
    img[box.slices][myocardium] = rng.uniform(100.0, 150.0)
    img[box.slices][blood] = contrast
    lab[box.slices][myocardium] = 1

    # aortic valve: annulus ring plus three cusps bulging toward the ventricle; leaflet tissue 1-2 mm
    # thick, labelled as drawn (sizes in mm, whatever the spacing)
    thickness = rng.uniform(1.0, 2.0)
    depth = 0.45 * ao_r
    vbox = _Box(shape, spacing, valve_at, np.full(3, ao_r + 3 * thickness + 4))
    valve_frame = _frame(ao_axis)
    w, p, q = vbox.local(valve_at, valve_frame)
    r = np.sqrt(p * p + q * q)
    cusp_surface = -depth * (1 - np.minimum(r / ao_r, 1) ** 2)
    from_cusp = np.abs(w - cusp_surface)
    leaflets = (from_cusp <= thickness / 2) & (r <= ao_r)
    angle = np.arctan2(q, p) - rng.uniform(0, 2 * np.pi / 3)
    commissures = (np.abs(r * np.sin(3 * angle / 2)) <= thickness / 2) & (r <= ao_r) \
        & (w >= cusp_surface) & (w <= cusp_surface + 1.5 * thickness)  # where the cusps meet (Y shape)
    ring = (r - ao_r) ** 2 + w ** 2 <= (0.9 * thickness) ** 2  # the annulus, 1.8-3.6 mm across
    valve = leaflets | commissures | ring
    img[vbox.slices][valve] = rng.uniform(60.0, 120.0)
    lab[vbox.slices][valve] = 2

    # calcifications: bright blobs of 1-2.5 mm radius (4-65 mm^3, like the AICUP 2025 cases' 59-1023
    # voxels of ~0.06 mm^3) at the cusps' bases; at a coarse spacing a blob may cover few voxels, and
    # at least the one nearest its centre
    if calcified:
        for _ in range(int(rng.integers(1, 5))):
            theta, rr = rng.uniform(0, 2 * np.pi), ao_r * rng.uniform(0.7, 1.0)
            surf = -depth * (1 - (rr / ao_r) ** 2)
            at = valve_at + valve_frame.T @ np.array([surf, rr * np.cos(theta), rr * np.sin(theta)])
            radius = rng.uniform(1.0, 2.5)
            cbox = _Box(shape, spacing, at, np.full(3, radius + 1))
            blob = cbox.ellipsoid(at, np.eye(3), (radius,) * 3)
            if not blob.any():  # smaller than the voxel grid (1 mm radius, ~4 mm slices): it still
                # occupies the voxel it sits in, so a case drawn as calcified always holds calcium
                dz, dy, dx = cbox.local(at, np.eye(3))
                squared = dz * dz + dy * dy + dx * dx
                blob = squared == squared.min() if squared.size else blob
            img[cbox.slices][blob] = rng.uniform(800.0, 1300.0)
            lab[cbox.slices][blob] = 3

    img = _blur(img)
    img += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(15.0, 30.0))
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), lab, tuple(float(s) for s in spacing)


def _to_sitk(array: np.ndarray, spacing_zyx, origin_xyz) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    image.SetOrigin(origin_xyz)
    return image


def _plan(n_train: int, n_test: int, seed: int) -> Dict[int, dict]:
    """Case number -> where it goes and what it contains. About a third of each split is calcified
    (at least one case per split), chosen by the seed."""
    choose = np.random.default_rng([seed, 1_000_000])
    plan = {}
    train_ids = np.arange(1, n_train + 1)
    test_ids = np.arange(n_train + 1, n_train + n_test + 1)
    calcified = set()
    for ids in (train_ids, test_ids):
        if len(ids):
            calcified |= set(choose.choice(ids, size=max(1, round(len(ids) / 3)), replace=False).tolist())
    image_dirs = ds.ORGANIZER_TRAIN_IMAGE_DIRS
    for folder_index, chunk in enumerate(np.array_split(train_ids, len(image_dirs))):  # contiguous, like the organizer
        for case in chunk.tolist():
            plan[case] = dict(image_dir=image_dirs[folder_index], label_dir=TRAIN_LABEL_DIR)
    for case in test_ids.tolist():
        plan[case] = dict(image_dir=TEST_IMAGE_DIR, label_dir=TEST_LABEL_DIR)
    for case, entry in plan.items():
        entry.update(anisotropic=case % 5 == 2, calcified=case in calcified)
    return plan


def _calcified_cases(n_train: int, n_test: int, seed: int, test: bool) -> list:
    return sorted(ds.case_id(case) for case, entry in _plan(n_train, n_test, seed).items()
                  if entry["calcified"] and (case > n_train) == test)


def calcified_training_cases(n_train: int = 8, n_test: int = 4, seed: int = 0) -> list:
    """Case ids (`patientNNNN`) of the training cases that `make_phantom(..., n_train, n_test, seed)`
    draws with calcifications. Reads nothing."""
    return _calcified_cases(n_train, n_test, seed, test=False)


def calcified_test_cases(n_train: int = 8, n_test: int = 4, seed: int = 0) -> list:
    """The same for the test cases."""
    return _calcified_cases(n_train, n_test, seed, test=True)


def _case_rng(seed: int, case: int) -> np.random.Generator:
    return np.random.default_rng([seed, case])


def draw_case(case_id: str, n_train: int = 8, n_test: int = 4, seed: int = 0,
              full_size: bool = False) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """One case of `make_phantom(..., n_train, n_test, seed, full_size)` drawn again in memory, as
    `synth_case` returns it (the arrays make_phantom writes), without writing a file."""
    plan = _plan(n_train, n_test, seed)
    case = next((c for c in plan if ds.case_id(c) == case_id), None)
    if case is None:
        raise KeyError(f"{case_id}: not a case of the phantom with {n_train} training and {n_test} test cases")
    return synth_case(_case_rng(seed, case), plan[case]["anisotropic"], plan[case]["calcified"], full_size)


def _files(out: Path, n_train: int, n_test: int, seed: int) -> Dict[int, dict]:
    """_plan with each case's image and label path under `out`."""
    plan = _plan(n_train, n_test, seed)
    for case, entry in plan.items():
        entry["image"] = out / entry["image_dir"] / ds.ORGANIZER_IMAGE.name(ds.case_id(case))
        entry["label"] = out / entry["label_dir"] / ds.ORGANIZER_LABEL.name(ds.case_id(case))
    return plan


def phantom_differs(out_dir, n_train: int = 8, n_test: int = 4, seed: int = 0, full_size: bool = False) -> Optional[str]:
    """Why `make_phantom(out_dir, ...)` would write something, or None when `out_dir` already
    holds that phantom (same arguments in its marker, every case file there; files are written
    atomically, so a file that exists is whole). Reads no image."""
    out = Path(out_dir).expanduser()
    if not (out / MARKER).is_file():
        return f"{out} holds no phantom"
    made = json.loads((out / MARKER).read_text())
    wanted = dict(seed=seed, n_train=n_train, n_test=n_test, full_size=full_size)
    if made != wanted:
        return f"{out} holds the phantom of {made}, not {wanted}"
    missing = [p for entry in _files(out, n_train, n_test, seed).values() for p in (entry["image"], entry["label"])
               if not p.is_file()]
    if missing:
        return f"{len(missing)} file(s) of the phantom are missing (e.g. {missing[0]})"
    return None


def make_phantom(out_dir, n_train: int = 8, n_test: int = 4, seed: int = 0, full_size: bool = False) -> Path:
    """Write a synthetic dataset in the organizer's layout into `out_dir` and return it.

    `out_dir` must be new, empty, or a folder this function made before (its case files are then
    replaced); anything else raises DatasetError, so real data is never overwritten.
    """
    from tqdm import tqdm

    out = Path(out_dir).expanduser()
    if n_train < 1 or n_test < 0 or n_train + n_test > 9999:
        raise DatasetError([f"{out}: need 1 <= train and 0 <= test with train + test <= 9999 "
                            f"(got train={n_train}, test={n_test})"], "arguments")
    if out.exists() and not out.is_dir():
        raise DatasetError([f"{out}: exists and is not a folder"], "output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DatasetError([f"{out}: not empty and not made by `nnunet-heart phantom`; choose a new "
                            f"or empty folder (existing files are never overwritten)"], "output folder")
    plan = _files(out, n_train, n_test, seed)
    ours = {entry[key] for entry in plan.values() for key in ("image", "label")}
    for folder in FOLDERS:  # drop cases of an earlier phantom in this folder that this one does not make
        for pattern in (ds.ORGANIZER_IMAGE, ds.ORGANIZER_LABEL):
            for old in ds.cases_in(out / folder, pattern).values():
                if old not in ours:
                    old.unlink()
    write_text(json.dumps(dict(seed=seed, n_train=n_train, n_test=n_test, full_size=full_size)), out / MARKER)

    started = time.perf_counter()
    for case, entry in tqdm(plan.items(), desc="phantom", unit="case"):
        rng = _case_rng(seed, case)
        image, label, spacing = synth_case(rng, entry["anisotropic"], entry["calcified"], full_size)
        extent = np.array(image.shape) * np.array(spacing)
        origin = (-extent[2] / 2 + rng.uniform(-10, 10), -extent[1] / 2 + rng.uniform(-10, 10),
                  -extent[0] - rng.uniform(100, 200))
        origin = tuple(float(np.round(o, 3)) for o in origin)
        write_image(_to_sitk(image, spacing, origin), entry["image"])
        write_image(_to_sitk(label, spacing, origin), entry["label"])
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    print(f"phantom: {n_train} training + {n_test} test cases (seed {seed}"
          f"{', full size' if full_size else ''}) in {out} [{time.perf_counter() - started:.1f} s]")
    return out
