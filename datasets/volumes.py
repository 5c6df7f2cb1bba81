"""Micro-CT volumes: where they are (`read_volumes`) and their voxels as uint8 (`load_volume`); the first
step of the ForamDeepSlice workflow (RECIPES.md section 2), which datasets/slicing.py cuts into slices and
datasets/slice_index.py writes out as PNGs and an index CSV.

Inputs, picked by `read_volumes(source)`:
- a labels CSV: one row per volume; columns are matched case-insensitively (other columns are ignored):
    file      (or filename, path, volume, image)             the .nii / .nii.gz file, relative paths
                                                              resolve against the CSV's folder, then its
                                                              `volumes/` subfolder
    label     (or class, species, category)                  the class name
    specimen  (or specimen_id, subject, subject_id, scan_id)  optional; default: the file name without
                                                              its extension (one specimen per volume)
  adrenal3d's `file,label,source_split` is read as file + label; source_split is ignored.
- a folder per class: <root>/<class>/*.nii.gz (or *.nii); the specimen is the file name.
- a folder of NIfTI files, or one NIfTI file: unlabelled volumes (label "").
"""

import csv
import gzip
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError, ImageDataError
from nibabel.wrapstruct import WrapStructError

from datasets.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What nibabel, gzip and numpy raise on a damaged or hostile file (only the reading is inside the try).
NIFTI_ERRORS = (
    ImageFileError,
    HeaderDataError,
    HeaderTypeError,
    ImageDataError,
    WrapStructError,
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)
# One volume's voxels as stored; load_volume's peak is about 2.5x this for 16-bit data (to_uint8).
MAX_VOLUME_BYTES = 4 << 30
CHUNK_VOXELS = 1 << 22  # to_uint8 scales this many voxels at a time (16 MiB of float32)
FILE_COLUMNS = ("file", "filename", "path", "volume", "image")
LABEL_COLUMNS = ("label", "class", "species", "category")
SPECIMEN_COLUMNS = ("specimen", "specimen_id", "subject", "subject_id", "scan_id")


@dataclass(frozen=True)
class VolumeRecord:
    path: Path  # absolute path of the .nii / .nii.gz file
    specimen: str  # specimen id; all volumes of one specimen always land in the same split
    label: str  # class name, "" when unlabelled
    where: str  # where the record came from ("labels.csv row 5"), for error messages


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _pick_column(header: Sequence[str], accepted: Sequence[str]) -> str | None:
    normalised = {h.strip().lower().replace(" ", "_"): h for h in header}
    for name in accepted:
        if name in normalised:
            return normalised[name]
    return None


def read_labels_csv(
    csv_path: str | Path, volumes_dir: str | Path | None = None, classes: Sequence[str] | None = None
) -> list[VolumeRecord]:
    """One record per CSV row, in file order; raises UserError naming the row for any problem.

    `classes`, when given, is the closed set of valid labels (a label outside it is an error).
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: labels CSV not found")
    bases = [Path(volumes_dir).resolve()] if volumes_dir else [csv_path.parent, csv_path.parent / "volumes"]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            # the line each row ends on, so messages point at the right line even after blank lines
            rows = [(reader.line_num, row) for row in reader]
            header = [h for h in reader.fieldnames or [] if h]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_path}: not a readable CSV ({e})") from e
    if not rows:
        raise UserError(f"{csv_path}: empty labels CSV (expected a header and one row per volume)")
    file_col = _pick_column(header, FILE_COLUMNS)
    label_col = _pick_column(header, LABEL_COLUMNS)
    specimen_col = _pick_column(header, SPECIMEN_COLUMNS)
    for col, accepted, what in ((file_col, FILE_COLUMNS, "file"), (label_col, LABEL_COLUMNS, "label")):
        if col is None:
            raise UserError(
                f"{csv_path}: no {what} column (found {', '.join(header)}; "
                f"expected one of {', '.join(accepted)})"
            )
    records, seen = [], {}
    for row_no, row in rows:  # row 1 is the header, as a spreadsheet numbers it
        where = f"{csv_path} row {row_no}"
        name = (row.get(file_col) or "").strip()
        label = (row.get(label_col) or "").strip()
        if not name:
            raise UserError(f"{where}: empty {file_col!r} (expected a .nii or .nii.gz file name)")
        if not label:
            raise UserError(f"{where}: empty {label_col!r} for {name} (expected a class name)")
        if classes is not None and label not in classes:
            raise UserError(f"{where}: unknown label {label!r} (expected one of {', '.join(classes)})")
        if not _is_nifti(Path(name)):
            raise UserError(f"{where}: {name} is not a NIfTI file (expected .nii or .nii.gz)")
        candidates = [Path(name)] if Path(name).is_absolute() else [b / name for b in bases]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            looked = "" if Path(name).is_absolute() else f" (looked in {', '.join(map(str, bases))})"
            raise UserError(f"{where}: volume {name} not found{looked}")
        if path in seen:
            raise UserError(f"{where}: {name} is listed twice (first at row {seen[path]})")
        seen[path] = row_no
        specimen = (row.get(specimen_col) or "").strip() if specimen_col else ""
        records.append(VolumeRecord(path.resolve(), specimen or _stem(path), label, where))
    specimen_labels(records)  # a specimen with two labels is an error in the CSV: report it here
    return records


def read_class_folders(root: str | Path, classes: Sequence[str] | None = None) -> list[VolumeRecord]:
    """<root>/<class>/*.nii(.gz): one record per file, sorted by class then file name."""
    root = Path(root).resolve()
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p))
        if not files:
            continue
        if classes is not None and folder.name not in classes:
            raise UserError(f"{folder}: unknown class folder (expected one of {', '.join(classes)})")
        records += [VolumeRecord(p, _stem(p), folder.name, str(p)) for p in files]
    if not records:
        raise UserError(f"{root}: no NIfTI volumes found (expected <root>/<class>/*.nii.gz)")
    specimen_labels(records)
    return records


def read_volumes(source: str | Path, classes: Sequence[str] | None = None) -> list[VolumeRecord]:
    """Any supported input: a labels CSV, a folder holding labels.csv, a folder per class, a folder of
    unlabelled NIfTI files, or a single NIfTI file (see the module docstring)."""
    source = Path(source).resolve()
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return read_labels_csv(source, classes=classes)
        if _is_nifti(source):
            return [VolumeRecord(source, _stem(source), "", str(source))]
        raise UserError(f"{source}: expected a labels .csv, a .nii/.nii.gz volume or a folder")
    if not source.is_dir():
        raise UserError(f"{source}: not found (expected a labels .csv, a .nii/.nii.gz volume or a folder)")
    if (source / "labels.csv").is_file():
        return read_labels_csv(source / "labels.csv", classes=classes)
    files = sorted(p for p in source.iterdir() if p.is_file() and _is_nifti(p))
    if files:
        return [VolumeRecord(p, _stem(p), "", str(p)) for p in files]
    return read_class_folders(source, classes=classes)


def specimen_labels(records: Iterable[VolumeRecord]) -> dict[str, str]:
    """specimen -> label; a specimen whose volumes carry different labels is an error."""
    out: dict[str, tuple[str, str]] = {}
    for r in records:
        if r.specimen in out and out[r.specimen][0] != r.label:
            label, where = out[r.specimen]
            raise UserError(
                f"{r.where}: specimen {r.specimen!r} is labelled {r.label!r} here "
                f"but {label!r} at {where} (expected one label per specimen)"
            )
        out.setdefault(r.specimen, (r.label, r.where))
    return {s: label for s, (label, _) in out.items()}


def _check_header(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """What the header promises, checked before any voxel is read: positive dimensions (numpy's memory map
    fails with an OverflowError on a negative one), one number per voxel (not RGB24), and at most
    MAX_VOLUME_BYTES once read (a 100-kB .nii.gz of zeros can declare gigabytes)."""
    if any(n < 1 for n in shape):
        raise UserError(f"{path}: volume header has dimension(s) {shape}; expected positive sizes")
    if dtype.kind not in "buif" or dtype.fields:
        raise UserError(f"{path}: voxels of type {dtype} (e.g. RGB); expected one integer or float per voxel")
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_VOLUME_BYTES:
        raise UserError(
            f"{path}: volume {'x'.join(map(str, shape))} of {dtype} is {size / 2**30:.1f} GiB once read, "
            f"over the {MAX_VOLUME_BYTES / 2**30:.0f} GiB a volume may have"
        )


def load_volume(path: str | Path) -> np.ndarray:
    """3D uint8 volume in voxel order (no reorientation: axis k of the result is axis k of the file).

    Integer and float data are mapped linearly from the minimum to the 99.9th percentile onto 0..255,
    so one bright artefact voxel does not flatten the contrast of the whole scan.
    """
    path = Path(path)
    try:
        img = nib.load(path)
        _check_header(path, img.shape, img.get_data_dtype())
        data = np.asarray(img.dataobj)
    except FileNotFoundError as e:
        raise UserError(f"{path}: volume not found") from e
    except NIFTI_ERRORS as e:
        raise UserError(f"{path}: not a readable NIfTI volume ({str(e).splitlines()[0][:200]})") from e
    if data.ndim == 4 and data.shape[3] == 1:  # (x, y, z, 1) is how some tools write a scalar volume
        data = data[..., 0]
    if data.ndim != 3:
        shape = "x".join(map(str, data.shape))
        raise UserError(f"{path}: volume has {data.ndim} dimensions ({shape}); expected a 3D volume")
    if min(data.shape) == 0:
        raise UserError(f"{path}: empty volume (shape {data.shape})")
    return to_uint8(data)


def to_uint8(data: np.ndarray) -> np.ndarray:
    """`data` mapped linearly from its minimum to its 99.9th percentile onto 0..255 (NaN and inf as 0, set
    in place in a writeable `data`: no copy of a whole volume), in float32 arithmetic; uint8 data as it is.

    Scaled CHUNK_VOXELS at a time: beside `data`, the peak is one copy of it in its own type (the
    percentile's partition) and the uint8 result. The whole volume as float32 at once, with its clipped
    and rounded copies, took 8x a uint16 volume's size, 32 GiB for the largest allowed (MAX_VOLUME_BYTES).
    """
    if data.dtype == np.uint8:
        return data
    if data.dtype.kind == "b" or data.dtype == np.float16:  # neither has a percentile of its own
        data = data.astype(np.float32)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0, copy=not data.flags.writeable)
    if not (data.flags.c_contiguous or data.flags.f_contiguous):  # so that ravel below is a view
        data = np.ascontiguousarray(data)
    lo = float(data.min())
    hi = float(np.percentile(data, 99.9))
    if hi <= lo:  # sparse objects: the percentile can sit on the background
        hi = float(data.max())
    factor = 255.0 / max(hi - lo, 1e-12)
    out = np.empty_like(data, dtype=np.uint8)  # in data's memory order (NIfTI volumes are Fortran-ordered)
    source, target = data.ravel(order="K"), out.ravel(order="K")
    for start in range(0, source.size, CHUNK_VOXELS):
        chunk = source[start : start + CHUNK_VOXELS].astype(np.float32)
        chunk -= lo
        chunk *= factor
        np.clip(chunk, 0, 255, out=chunk)
        target[start : start + CHUNK_VOXELS] = np.rint(chunk, out=chunk)
    return out
