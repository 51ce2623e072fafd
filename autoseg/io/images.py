"""Reading and writing images together with their geometry.

Everything is read through SimpleITK, so one convention holds for NIfTI, NRRD, MHA and
2D PNG/TIFF alike. Arrays come back channels-first and always 3D: ``(C, Z, Y, X)``;
a 2D image becomes ``(C, 1, Y, X)`` with a placeholder spacing of 999 along the added
axis, so every later stage handles 2D and 3D data with the same code.

The header is read before the pixels, so an impossible header (an enormous size, zero
spacing, a non-orthonormal direction) is refused before any memory is allocated.
NIfTI predictions are written with nibabel from the input's own header, so qform and
sform (codes included) are exactly the input's.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import ImageReadError
from autoseg.records import (atomic_write_bytes, give_usual_permissions, read_json, save_json, temporary_folder_name,
                             temporary_sibling)

# ITK prints header quirks (e.g. "unexpected scales in sform") to stderr for every read;
# they are not errors, and autoseg reports real problems itself.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

# Refuse headers that claim more voxels than this (times channels) before reading pixels.
MAX_VOXELS = int(os.environ.get("AUTOSEG_MAX_VOXELS", 2_000_000_000))
PLACEHOLDER_SPACING_2D = 999.0
SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".jpg")
# Formats whose header names a second file that holds the pixels.
TWO_FILE_ENDINGS = (".mhd", ".nhdr")


def label_file_ending(image_ending: str) -> str:
    """The ending of the label map written for an image of ``image_ending``: the same, except for JPEG,
    whose lossy compression would change label values at every boundary (PNG instead)."""
    return ".png" if image_ending.lower() in (".jpg", ".jpeg") else image_ending


@dataclass
class Geometry:
    """Where an image lies in space, in SimpleITK's (x, y, z) order, exactly as read."""

    shape: list[int]  # array order, spatial only: (Z, Y, X) or (Y, X) for 2D files
    spacing: list[float]  # ITK order
    origin: list[float]
    direction: list[float]  # row-major, dimension x dimension

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    @property
    def array_spacing(self) -> list[float]:
        """Spacing in array order, 3 entries (2D images get the placeholder first)."""
        spacing = list(reversed(self.spacing))
        return [PLACEHOLDER_SPACING_2D] + spacing if self.dimension == 2 else spacing

    @property
    def array_shape(self) -> list[int]:
        return [1] + list(self.shape) if self.dimension == 2 else list(self.shape)

    def matches(self, other: "Geometry", spacing_tol: float = 1e-3, origin_tol: float = 1e-3,
                direction_tol: float = 1e-3) -> list[str]:
        """Differences to ``other`` beyond tolerance, in words (empty when they match)."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {self.shape} differs from {other.shape}")
            return problems
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_tol, atol=0):
            problems.append(f"spacing {_fmt(self.spacing)} differs from {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, atol=max(origin_tol, origin_tol * max(self.spacing))):
            problems.append(f"origin {_fmt(self.origin)} differs from {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, atol=direction_tol):
            problems.append(f"direction {_fmt(self.direction)} differs from {_fmt(other.direction)}")
        return problems


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def has_supported_ending(path: str | Path) -> bool:
    return str(path).lower().endswith(SUPPORTED_ENDINGS)


def read_header(path: str | Path) -> tuple[Geometry, int]:
    """Geometry and number of components (channels) of an image file, pixels unread."""
    path = Path(path)
    _check_file(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_spacing(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot be read as an image ({_sitk_reason(exc)})", path) from None
    size = list(reader.GetSize())
    dimension = reader.GetDimension()
    components = reader.GetNumberOfComponents()
    if dimension == 3 and size[2] == 1 and path.name.lower().endswith((".png", ".tif", ".tiff", ".bmp", ".jpg")):
        dimension, size = 2, size[:2]
    if dimension not in (2, 3):
        raise ImageReadError(f"has {dimension} dimensions; autoseg reads 2D and 3D images "
                             "(split 4D images into channels, e.g. with `autoseg convert-msd`)", path)
    voxels = int(np.prod(size, dtype=np.int64)) * components
    if any(s < 1 for s in size) or voxels > MAX_VOXELS:
        raise ImageReadError(f"header claims size {size} x {components} component(s), refused "
                             f"(limit {MAX_VOXELS} voxels, set AUTOSEG_MAX_VOXELS to change)", path)
    if path.name.lower().endswith(".nii.gz"):
        _check_gzip_complete(path)
    spacing = list(reader.GetSpacing())[:dimension]
    origin = list(reader.GetOrigin())[:dimension]
    full_direction = np.array(reader.GetDirection()).reshape(reader.GetDimension(), reader.GetDimension())
    direction = full_direction[:dimension, :dimension]
    sidecar = tiff_spacing_file(path) if dimension == 3 else None
    if sidecar is not None:  # nnU-Net's Tiff3DIO: a TIFF holds no usable spacing (ITK would say z = 1 mm)
        if not sidecar.is_file():
            raise ImageReadError(f"is a 3D TIFF without its spacing file {sidecar.name} (as nnU-Net's Tiff3DIO "
                                 'reads it: {"spacing": [z, y, x]} in mm)', path)
        spacing, origin, direction = _sidecar_spacing(sidecar), [0.0] * 3, np.eye(3)
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ImageReadError(f"spacing {spacing} must be positive and finite", path)
    if not np.all(np.isfinite(origin)):
        raise ImageReadError(f"origin {origin} is not finite", path)
    if not np.allclose(direction @ direction.T, np.eye(dimension), atol=1e-3):
        raise ImageReadError("direction matrix is not orthonormal", path)
    geometry = Geometry(shape=list(reversed(size)), spacing=[float(s) for s in spacing],
                        origin=[float(o) for o in origin], direction=[float(d) for d in direction.ravel()])
    return geometry, components


def read_image(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Pixels as ``(C, Z, Y, X)`` of ``dtype`` (None: as stored) and the geometry; header checked first."""
    path = Path(path)
    geometry, components = read_header(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        array = _read_nifti_pixels(path, len(geometry.shape))
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ImageReadError(f"pixels cannot be read ({_sitk_reason(exc)})", path) from None
        # A copy, not a view: a view's buffer dies with ``image`` when this function returns.
        array = sitk.GetArrayFromImage(image)
        if components == 1:  # by count, not by ndim: a 2D file ITK calls 3D with one slice has an extra axis
            array = array.reshape(1, *geometry.array_shape)
        else:  # vector pixels (RGB PNG): components are the last axis
            array = np.moveaxis(array, -1, 0)
    array = array.reshape((array.shape[0], *geometry.array_shape))
    return np.ascontiguousarray(array, dtype=dtype), geometry  # dtype None keeps the stored type


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """A label map as ``(Z, Y, X)``; refuses non-integer values and multi-component files."""
    path = Path(path)
    # As stored: an integer label map is checked without a float copy (a 512x512x1000 CT label in
    # float64, with its rounded twin, took about 4 GB).
    array, geometry = read_image(path, dtype=None)
    if array.shape[0] != 1:
        raise ImageReadError(f"label map has {array.shape[0]} components; expected one", path)
    array = array[0]
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)):
            raise ImageReadError("label map contains NaN or Inf", path)
        if not np.array_equal(np.rint(array), array):
            raise ImageReadError("label map contains non-integer values", path)
    low, high = array.min(), array.max()
    if low < 0 or high > 32767:
        raise ImageReadError(f"label values must lie in 0..32767, found {low:g}..{high:g}", path)
    return array.astype(np.int16, copy=False), geometry


def label_dtype(largest_label: int) -> type:
    """The dtype label maps are written with: uint8 where every label fits (as nnU-Net writes them), else
    uint16 (labels lie in 0..32767, see ``read_label``, and PNG, unlike int16, can store it)."""
    return np.uint8 if largest_label < 256 else np.uint16


def write_label(array: np.ndarray, path: str | Path, geometry: Geometry, reference_file: str | Path | None = None,
                largest_label: int | None = None) -> None:
    """Write a ``(Z, Y, X)`` label map with ``geometry``, atomically.

    When ``reference_file`` is a NIfTI file the output reuses its header (qform, sform,
    codes, units) so that the label map lies exactly where the input did. ``largest_label`` (the
    largest value the model can write) sets the dtype, so that every case of a folder has the same
    one; without it, the array's own largest value does.
    """
    path = Path(path)
    array = np.asarray(array)
    array = array.reshape(geometry.shape) if geometry.dimension == 2 else array
    if list(array.shape) != list(geometry.shape):
        raise ValueError(f"label array shape {array.shape} does not match geometry {geometry.shape}")
    out_dtype = label_dtype(max(int(array.max(initial=0)), largest_label or 0))
    name = path.name.lower()
    if reference_file is not None and name.endswith((".nii", ".nii.gz")) and str(reference_file).lower().endswith((".nii", ".nii.gz")):
        _write_nifti_like(array.astype(out_dtype), path, Path(reference_file))
        return
    image = sitk.GetImageFromArray(array.astype(out_dtype))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    if geometry.dimension == 3 and tiff_spacing_file(path) is not None:
        # As nnU-Net's Tiff3DIO writes it (CASE.json beside CASE.tif), and first: a run killed between the
        # two writes leaves no TIFF, so the case is not taken for done without its spacing.
        save_json({"spacing": geometry.array_spacing}, path.parent / f"{path.name.rsplit('.', 1)[0]}.json")
    _write_sitk_atomic(image, path)


def write_image(array: np.ndarray, path: str | Path, geometry: Geometry) -> None:
    """Write a single-channel image ``(Z, Y, X)`` (or ``(Y, X)``) with ``geometry``, atomically."""
    array = np.asarray(array)
    if geometry.dimension == 2:
        array = array.reshape(geometry.shape)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    _write_sitk_atomic(image, path)


def _write_sitk_atomic(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(TWO_FILE_ENDINGS):
        _write_two_files_atomic(image, path)
        return
    fd, tmp = temporary_sibling(path)  # keeps the real ending: SimpleITK picks the writer from it
    os.close(fd)
    try:
        give_usual_permissions(tmp)
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError):
            raise OSError(f"{path}: cannot be written ({_sitk_reason(exc)})") from None
        raise


def _write_two_files_atomic(image: sitk.Image, path: Path) -> None:
    """A header and its pixel file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``): the header names the
    pixel file, so both are written under their final names in a temporary folder, then the pixel file
    is moved in first and the header, which makes the pair readable, last."""
    folder = temporary_folder_name(path)
    folder.mkdir()
    try:
        sitk.WriteImage(image, str(folder / path.name), useCompression=True)
        for written in sorted(folder.iterdir(), key=lambda f: f.name == path.name):  # the header last
            give_usual_permissions(written)
            os.replace(written, path.parent / written.name)
    except RuntimeError as exc:
        raise OSError(f"{path}: cannot be written ({_sitk_reason(exc)})") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_nifti_like(array_zyx: np.ndarray, path: Path, reference: Path) -> None:
    import gzip

    import nibabel as nib

    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(array_zyx.dtype)
    # nibabel indexes (x, y, z): the reverse of SimpleITK's array order.
    data = np.ascontiguousarray(array_zyx.transpose(tuple(reversed(range(array_zyx.ndim)))))
    if data.shape != ref.shape[: data.ndim]:
        raise ValueError(f"label shape {data.shape} does not match {reference} shape {ref.shape}")
    image = nib.Nifti1Image(data, ref.affine, header)
    image.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    image.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    image.header["scl_slope"], image.header["scl_inter"] = 1, 0
    image.header["cal_min"], image.header["cal_max"] = 0, 0  # the image's display window would show labels black
    # A vector or other intent of the image is not the label map's: ITK would read it back as a vector image.
    image.header.set_intent("none", (), name="")
    raw = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=1, mtime=0)
    atomic_write_bytes(path, raw)


def _read_nifti_pixels(path: Path, spatial_dims: int) -> np.ndarray:
    """NIfTI voxels through nibabel as ``(components, *spatial)`` in SimpleITK's array order.

    Not SimpleITK: its NIfTI reader turns NaN voxels into numbers, which would hide exactly
    the corrupt data the check must find. nibabel also decodes a little faster. nibabel keeps
    the axes SimpleITK folds away: a time axis of one point (x, y, z, 1), written by many
    exporters, and the vector axis after it (x, y, z, 1, c); they become the components.
    """
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise ImageReadError(f"pixels cannot be read ({exc})", path) from None
    if data.dtype.names:  # RGB24/RGBA32: one structured value per voxel, no number to compute with
        raise ImageReadError("holds colour voxels (NIfTI RGB); give each colour as a channel of its own "
                             "(CASE_0000, CASE_0001, ...)", path)
    data = data.reshape(*data.shape[:spatial_dims], -1)
    return data.transpose(spatial_dims, *reversed(range(spatial_dims)))


def companion_files(path: Path) -> list[Path]:
    """Files an image is read from besides ``path``: a 3D TIFF's spacing sidecar, the pixel file that an
    .mhd or .nhdr header names. Only those that exist."""
    sidecar = tiff_spacing_file(path)
    if sidecar is not None:
        return [sidecar] if sidecar.is_file() else []
    if not path.name.lower().endswith(TWO_FILE_ENDINGS):
        return []
    try:
        header = path.read_text(errors="replace")[:65536]
    except OSError:
        return []
    for line in header.splitlines():
        key, _, value = line.partition("=" if path.name.lower().endswith(".mhd") else ":")
        if key.strip().lower() in ("elementdatafile", "data file", "datafile") and value.strip():
            pixel_file = path.parent / value.strip()
            return [pixel_file] if pixel_file.is_file() else []
    return []


def tiff_spacing_file(path: Path) -> Path | None:
    """Where nnU-Net's Tiff3DIO keeps a 3D TIFF's spacing: ``CASE.json`` beside ``CASE_0000.tif`` (an image)
    or ``CASE.tif`` (a label map). None for other formats."""
    name = path.name
    ending = next((e for e in (".tiff", ".tif") if name.lower().endswith(e)), None)
    if ending is None:
        return None
    stem = name[: -len(ending)]
    exact = path.parent / f"{stem}.json"  # a label map's, and what write_label writes
    if not exact.is_file() and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return path.parent / f"{stem[:-5]}.json"  # an image channel's: the case's
    return exact


def _sidecar_spacing(sidecar: Path) -> list[float]:
    """The ``spacing`` of a Tiff3DIO sidecar (array order z, y, x) in SimpleITK's order (x, y, z)."""
    data = read_json(sidecar, ImageReadError)
    spacing = data.get("spacing") if isinstance(data, dict) else None
    if (not isinstance(spacing, list) or len(spacing) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spacing)):
        raise ImageReadError(f"'spacing' must be a list of 3 numbers (z, y, x in mm), got {spacing!r}", sidecar)
    return [float(v) for v in reversed(spacing)]


def _check_nifti_spacing(path: Path) -> None:
    """Refuse zero, negative or non-finite voxel sizes in a NIfTI header.

    ITK's NIfTI reader silently replaces a zero ``pixdim`` by 1 and takes the absolute value
    of a negative one, and nibabel "fixes" them on load, so the image would be read with a
    spacing nobody wrote. The raw header is parsed here instead: one small read.
    """
    header = _nifti_header(path)
    if header is None:
        return  # not NIfTI-1: ITK's reader will say what it is
    endian, raw = header
    if len(raw) == 540:  # NIfTI-2, which ITK's reader does not take
        raise ImageReadError("is NIfTI-2, which SimpleITK's reader (autoseg's, as nnU-Net's) does not read; "
                             "save it as NIfTI-1 (nibabel: nib.Nifti1Image)", path)
    dims = struct.unpack(endian + "8h", raw[40:56])
    pixdim = list(struct.unpack(endian + "8f", raw[76:108]))[1 : 1 + max(1, min(3, dims[0]))]
    if not all(np.isfinite(pixdim)) or min(pixdim) <= 0:
        raise ImageReadError(f"spacing (pixdim) {[float(f'{v:.6g}') for v in pixdim]} in the header must be "
                             "positive and finite", path)


def _nifti_header(path: Path) -> tuple[str, bytes] | None:
    """(byte order, the header: 348 bytes of NIfTI-1 or 540 of NIfTI-2) of a .nii or .nii.gz file, or None."""
    import gzip

    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as handle:
            raw = handle.read(540)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size in (348, 540) and len(raw) >= size:
            return endian, raw[:size]
    return None


def intensity_problem(image: np.ndarray) -> str | None:
    """Why these voxel values cannot be a real scan, or None: NaN/Inf, or nothing but zeros."""
    if not np.all(np.isfinite(image)):
        return "image contains NaN or Inf values"
    if not image.any():
        return "image is all zeros (an empty or failed export?)"
    return None


def _check_gzip_complete(path: Path) -> None:
    """Refuse a truncated ``.nii.gz``: SimpleITK would silently fill the missing voxels with zeros.

    The gzip trailer stores the uncompressed size (mod 2^32); a complete file holds at least the
    NIfTI header's vox_offset plus the voxel bytes. Checking it costs two small reads.
    """
    import gzip

    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(352)
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            stored = struct.unpack("<I", handle.read(4))[0]
    except (OSError, EOFError) as exc:
        raise ImageReadError(f"is not a valid gzip file ({exc})", path) from None
    if len(header) < 348:
        raise ImageReadError("is truncated (shorter than a NIfTI header)", path)
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", header[:4])[0] != 348:
        return  # not NIfTI-1 (read_header has refused NIfTI-2): ITK's reader says what the file is
    dims = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    if not np.isfinite(vox_offset) or vox_offset < 0 or bitpix <= 0 or not 1 <= dims[0] <= 7:
        raise ImageReadError(f"has an invalid NIfTI header (dim[0] {dims[0]}, bitpix {bitpix}, "
                             f"vox_offset {vox_offset})", path)
    voxels = int(np.prod([max(1, d) for d in dims[1 : 1 + dims[0]]], dtype=np.int64))
    expected = int(vox_offset) + voxels * bitpix // 8
    # The trailer covers only the last gzip member, and a cut file's last four bytes are no trailer at all:
    # any other size is measured whole, which costs a full decompression, only in those cases (several
    # members, as bgzip writes; bytes after the voxels, which readers ignore and are allowed; a cut file).
    if stored != expected % 2**32 and _decompressed_bytes(path) < expected:
        raise ImageReadError("is truncated or corrupt: the compressed stream does not hold all voxels "
                             "the header announces", path)


def _decompressed_bytes(path: Path) -> int:
    """Bytes in all gzip members of ``path``; -1 where the stream ends early or is corrupt."""
    import gzip

    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError):
        return -1
    return total


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError("file does not exist", path)
    if path.is_dir():
        raise ImageReadError("is a directory, expected an image file", path)
    try:  # opened, not os.access(): that asks with the real uid and ignores ACLs and dropped capabilities
        with open(path, "rb") as handle:
            empty = not handle.read(1)
    except PermissionError:
        raise ImageReadError("cannot be read (permission denied)", path) from None
    except OSError as exc:
        raise ImageReadError(f"cannot be read ({exc.strerror or exc})", path) from None
    if empty:
        raise ImageReadError("file is empty", path)


def _sitk_reason(exc: RuntimeError) -> str:
    """The useful last line of a SimpleITK exception, without its C++ source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ITK ERROR" not in line and not line.startswith(("Exception", "/")):
            return line[:200]
    return (lines[-1] if lines else "unknown error")[:200]
