"""NIfTI files: reading and checking them (`prepare`, `export`, the pipeline's "is it finished"
checks) and writing them atomically (`write_image`, on `files.replace_atomically`).

Everything here takes and returns plain paths, SimpleITK images and numpy arrays.
"""
import errno
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_heart_ext.data.dataset import LABEL_VALUES
from nnunet_heart_ext.data.files import replace_atomically


class DatasetError(Exception):
    """Invalid input. `problems` holds one line per problem, each naming its file."""

    def __init__(self, problems: Sequence[str], what: str = "input"):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the {what}; nothing was written:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


class Geometry(NamedTuple):
    """Voxel grid of a file, in SimpleITK's (x, y, z) order."""
    dimension: int
    components: int
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple


def _sitk_message(error: Exception) -> str:
    """SimpleITK errors carry a C++ trace; the last 'sitk::ERROR' line is the useful part."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ERROR" in line:
            return line.split("ERROR:", 1)[-1].strip()
    return lines[-1] if lines else type(error).__name__


def read_geometry(path: Path) -> Geometry:
    """Header only (fast): raises ValueError with a readable message if the file is not an image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"not a readable NIfTI file ({_sitk_message(e)})") from None
    return Geometry(reader.GetDimension(), reader.GetNumberOfComponents(), tuple(reader.GetSize()),
                    tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))


def read_image(path: Path) -> sitk.Image:
    """Whole file; ValueError if it is not readable or its compressed data is cut short (ITK
    silently fills a truncated .nii.gz with zeros, so the gzip stream is checked here)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"not a readable NIfTI file ({_sitk_message(e)})") from None
    if str(path).endswith(".gz"):
        voxel_bytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * \
            sitk.GetArrayViewFromImage(image).itemsize
        total = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"compressed data is incomplete or corrupt ({e})") from None
        if total < 348 + voxel_bytes:  # NIfTI header + voxels
            raise ValueError(f"file is shorter than its header says ({total} of at least "
                             f"{348 + voxel_bytes} bytes)")
    return image


def read_image_once(path: Path) -> sitk.Image:
    """Whole file, its bytes read once (the report reads every image of 50 full-size cases in
    under a minute): a .nii.gz cut short is recognised by `nifti_incomplete` (its gzip trailer
    against its header: a few hundred bytes read) instead of `read_image`'s second pass over the
    stream. ValueError, with a readable message, if it is not a whole readable image."""
    if str(path).endswith(".nii.gz"):
        problem = nifti_incomplete(Path(path))
        if problem:
            raise ValueError(problem)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"not a readable NIfTI file ({_sitk_message(e)})") from None


# NIfTI-1 datatype codes of the scalar types numpy reads as they are
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                 1280: "u8"}


def read_voxels_once(path: Path) -> tuple:
    """(Geometry, voxels as a (z, y, x) array) of a whole 3D file, its bytes read once, for reading
    many full-size images fast (the report): the header as SimpleITK reads it (size, spacing,
    origin, direction), the voxels of a .nii.gz inflated by ISA-L (`kernels.gunzip`, two to five
    times zlib's speed) straight into the array SimpleITK would give. What this fast path does not cover
    (scaled or unusual voxel types, not .nii.gz, not 3D) is read by SimpleITK. ValueError, naming
    the problem, if the file is unreadable or cut short."""
    geometry = read_geometry(path)
    if str(path).endswith(".nii.gz") and geometry.dimension == 3 and geometry.components == 1:
        array = _nifti_gz_voxels(Path(path), geometry)
        if array is not None:
            return geometry, array
    image = read_image_once(path)
    return geometry_of(image), sitk.GetArrayFromImage(image)  # a copy: a view would die with its image


def _nifti_gz_voxels(path: Path, geometry: Geometry) -> Optional[np.ndarray]:
    """The voxels of a plain NIfTI-1 .nii.gz (None: leave it to SimpleITK)."""
    from nnunet_heart_ext.kernels.gunzip import gunzip

    try:
        data = gunzip(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"compressed data is incomplete or corrupt ({e})") from None
    if len(data) < 348:
        raise ValueError("shorter than a NIfTI header")
    endian = next((e for e in "<>" if struct.unpack(e + "i", data[:4])[0] == 348), None)
    if endian is None:
        return None  # NIfTI-2, or not NIfTI: SimpleITK knows
    dims = struct.unpack(endian + "8h", data[40:56])
    datatype = struct.unpack(endian + "h", data[70:72])[0]
    vox_offset, slope, inter = struct.unpack(endian + "3f", data[108:120])
    code = _NIFTI_DTYPES.get(datatype)
    shape = tuple(reversed(geometry.size))
    scaled = slope == slope and slope not in (0.0, 1.0) or (slope == slope and slope != 0.0 and inter != 0.0)
    if code is None or scaled or dims[0] < 3 or tuple(reversed(dims[1:4])) != shape or any(d > 1 for d in
                                                                                           dims[4:dims[0] + 1]):
        return None
    dtype = np.dtype(code).newbyteorder(endian)
    count = shape[0] * shape[1] * shape[2]
    offset = int(vox_offset)
    if len(data) < offset + count * dtype.itemsize:
        raise ValueError(f"file is shorter than its header says ({len(data)} of at least "
                         f"{offset + count * dtype.itemsize} bytes)")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), tuple(image.GetSize()),
                    tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def volume_problem(geometry: Geometry) -> Optional[str]:
    """nnU-Net's CT channel must be a 3D scalar volume."""
    if geometry.dimension != 3:
        return f"is {geometry.dimension}D (size {geometry.size}), expected a 3D volume"
    if geometry.components != 1:
        return f"has {geometry.components} channels per voxel, expected 1"
    return None


def geometry_mismatches(a: Geometry, b: Geometry) -> List[str]:
    """Differences in size, spacing, origin, direction. Spacing uses the tolerance of nnU-Net's
    own check (np.allclose's defaults, which `--verify_dataset_integrity` refuses beyond); origin and
    direction, which nnU-Net only warns about, a small absolute floor too (headers store float32)."""
    out = []
    if a.size != b.size:
        out.append(f"size {b.size} != {a.size}")
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        atol = 1e-8 if name == "spacing" else 1e-5
        if va.shape != vb.shape or not np.allclose(np.abs(va) if name == "spacing" else va,
                                                   np.abs(vb) if name == "spacing" else vb, rtol=1e-5, atol=atol):
            out.append(f"{name} {tuple(round(float(v), 7) for v in vb)} != "
                       f"{tuple(round(float(v), 7) for v in va)}")
    return out


def nonfinite_problem(array: np.ndarray) -> Optional[str]:
    """None unless some voxels are NaN or infinite (nnU-Net's CT normalisation would then turn the
    whole case into NaN; `--verify_dataset_integrity` refuses NaN)."""
    if not np.issubdtype(array.dtype, np.floating):
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    return _nonfinite_message(array, finite)


def stored_nonfinite_problem(path: Path, image: sitk.Image) -> Optional[str]:
    """nonfinite_problem of the values stored in a floating-point NIfTI file. SimpleITK's NIfTI
    reader (2.5, ITK 5.4) turns NaN and infinite voxels into 0, so neither the array it returns nor
    nnU-Net's own check (which reads through it) can see them: the file is read again with nibabel,
    only for floating-point images (integer voxels cannot be NaN)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) or not str(path).endswith((".nii", ".nii.gz")):
        return nonfinite_problem(sitk.GetArrayViewFromImage(image))
    import nibabel

    return nonfinite_problem(np.asanyarray(nibabel.load(str(path)).dataobj))


def _nonfinite_message(array: np.ndarray, finite: np.ndarray) -> str:
    n_nan = int(np.isnan(array).sum())
    n_inf = int(array.size - finite.sum()) - n_nan
    what = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else "") if s)
    return f"has {what} voxel value(s); replace them before training"


def label_values_problem(array: np.ndarray) -> Optional[str]:
    """None if every voxel holds one of the dataset's label values, else which values are wrong."""
    allowed = list(LABEL_VALUES)
    if array.size == 0:
        return "is empty"
    if np.issubdtype(array.dtype, np.integer) and allowed[0] <= array.min() and array.max() <= allowed[-1]:
        return None  # fast path; the label values are contiguous
    bad = array[~np.isin(array, allowed)]
    if bad.size == 0:
        return None
    values = np.unique(bad)
    shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
    return f"has label values outside {allowed}: {shown} ({bad.size} voxels)"


def nifti_incomplete(path: Path) -> Optional[str]:
    """Cheap completeness check of a finished .nii.gz (what "is it done" asks of a file that a
    killed command may have cut short): the gzip trailer's length field must match the length the
    NIfTI header implies. Reads the first few hundred bytes and the last four; None if complete."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with gzip.open(path, "rb") as f:
            header = f.read(352)
        with open(path, "rb") as f:
            f.seek(size - 4)
            isize = struct.unpack("<I", f.read(4))[0]
    except (OSError, EOFError, zlib.error, struct.error) as e:
        return f"not a readable .nii.gz ({e})"
    if len(header) < 348:
        return "shorter than a NIfTI header"
    for endian in "<>":
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return "not a NIfTI-1 file"
    dims = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    n = 1
    for d in dims[1:1 + max(0, min(dims[0], 7))]:
        n *= max(int(d), 1)
    expected = int(vox_offset) + n * bitpix // 8
    if isize != expected % (1 << 32):
        return f"cut short (its data should be {expected} bytes uncompressed)"
    return None


def write_image(image: sitk.Image, path: Path) -> Path:
    """Atomic sitk.WriteImage (gzip-compressed for .nii.gz). SimpleITK does not raise when the disk
    fills up (its NIfTI writer prints an error and leaves a cut-short file), so the written file is
    checked before it is moved into place."""
    def write(tmp: Path):
        sitk.WriteImage(image, str(tmp), True)
        problem = nifti_incomplete(tmp) if str(tmp).endswith(".nii.gz") else None
        if problem:
            raise OSError(errno.EIO, f"SimpleITK wrote an incomplete file ({problem})")

    return replace_atomically(write, Path(path))
