"""Micro-CT volumes to 2D classifier slices (the ForamDeepSlice workflow, RECIPES.md section 2).

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

Per volume: one Otsu threshold on the whole volume separates object from background; a slice is kept
when at least `min_foreground` of its pixels are object; it is cropped to a square around the object's
bounding box plus `margin`, resized to `size` (224, or 384 for the larger-input models) and written as
an 8-bit grey PNG (classifier loaders convert to RGB). An index CSV lists every written slice:

    path,specimen,label,split,axis,slice_index,foreground,crop_row0,crop_col0,crop_row1,crop_col1,source

`path` is relative to the output folder (<label>/<specimen>_axis<a>_<index>.png); the split lives only
in the CSV, so a split can be (re)assigned after extraction with `set_index_splits`, for example once the
slice counts per specimen are known (see datasets/specimen_split.py).

The intended CLI (wired in platform/data.py):

    python -m platform.data slices ../shared/data/adrenal3d out/adrenal_slices --axis all --size 224 \\
        --split train=0.7,val=0.15,test=0.15 --seed 0

and from Python:

    records = read_volumes("../shared/data/adrenal3d")
    summary = extract_slices(records, "out/adrenal_slices", axes=parse_axes("all"))
    print(summary.slices_per_s)
"""

import csv
import gzip
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from PIL import Image

from datasets.errors import UserError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FILE_COLUMNS = ("file", "filename", "path", "volume", "image")
LABEL_COLUMNS = ("label", "class", "species", "category")
SPECIMEN_COLUMNS = ("specimen", "specimen_id", "subject", "subject_id", "scan_id")
INDEX_COLUMNS = (
    "path",
    "specimen",
    "label",
    "split",
    "axis",
    "slice_index",
    "foreground",
    "crop_row0",
    "crop_col0",
    "crop_row1",
    "crop_col1",
    "source",
)
UNLABELLED = "unlabelled"  # folder name for slices of volumes without a label


@dataclass(frozen=True)
class VolumeRecord:
    path: Path  # absolute path of the .nii / .nii.gz file
    specimen: str  # specimen id; all volumes of one specimen always land in the same split
    label: str  # class name, "" when unlabelled
    where: str  # where the record came from ("labels.csv row 5"), for error messages


@dataclass(frozen=True)
class SliceResult:
    record: VolumeRecord
    axis: int  # array axis the slice is taken across (0, 1 or 2)
    index: int  # position along that axis
    foreground: float  # fraction of the slice's pixels above the volume's Otsu threshold
    kept: bool  # False: low-content slice, dropped
    crop: tuple[int, int, int, int] | None  # (row0, col0, row1, col1), end exclusive, may pass the edge
    image: np.ndarray | None  # size x size uint8, None when dropped


@dataclass(frozen=True)
class ExtractSummary:
    out_dir: Path
    index_csv: Path
    volumes: int
    slices_written: int
    slices_dropped: int
    seconds: float
    slices_per_s: float  # slices examined (written + dropped) per second, the pipeline's throughput
    written_per_s: float  # PNGs written per second


# ---------------------------------------------------------------------------------------------- reading
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


def load_volume(path: str | Path) -> np.ndarray:
    """3D uint8 volume in voxel order (no reorientation: axis k of the result is axis k of the file).

    Integer and float data are mapped linearly from the minimum to the 99.9th percentile onto 0..255,
    so one bright artefact voxel does not flatten the contrast of the whole scan.
    """
    path = Path(path)
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except FileNotFoundError as e:
        raise UserError(f"{path}: volume not found") from e
    except (ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise UserError(f"{path}: not a readable NIfTI volume ({e})") from e
    if data.ndim == 4 and data.shape[3] == 1:  # (x, y, z, 1) is how some tools write a scalar volume
        data = data[..., 0]
    if data.ndim != 3:
        shape = "x".join(map(str, data.shape))
        raise UserError(f"{path}: volume has {data.ndim} dimensions ({shape}); expected a 3D volume")
    if min(data.shape) == 0:
        raise UserError(f"{path}: empty volume (shape {data.shape})")
    if data.dtype == np.uint8:
        return data
    data = np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(data.min())
    hi = float(np.percentile(data, 99.9))
    if hi <= lo:  # sparse objects: the percentile can sit on the background
        hi = float(data.max())
    scaled = (data - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- slicing
def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 data: object = values > threshold (scikit-image's convention).

    Maximises the between-class variance w0 * w1 * (mu0 - mu1)^2 over the 256-bin histogram; ties go to
    the lowest threshold, so a 0/255 mask gives 0. Constant data gives its value (nothing is object).
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    return otsu_threshold_from_histogram(hist)


def otsu_threshold_from_histogram(hist: np.ndarray) -> int:
    p = hist / hist.sum()
    levels = np.arange(len(p), dtype=np.float64)
    w0 = np.cumsum(p)[:-1]  # weight of the class <= t, for t = 0 .. 254
    m0 = np.cumsum(p * levels)[:-1]
    mt = float((p * levels).sum())
    w1 = 1.0 - w0
    valid = (w0 > 1e-12) & (w1 > 1e-12)
    if not valid.any():
        return int(np.flatnonzero(hist)[0])
    between = np.zeros_like(w0)
    between[valid] = (mt * w0[valid] - m0[valid]) ** 2 / (w0[valid] * w1[valid])
    return int(np.argmax(between))


def parse_axes(axis: int | str | Sequence[int]) -> tuple[int, ...]:
    """0, 1, 2, "all" (= 0, 1, 2), "0,2" or a sequence of ints."""
    if isinstance(axis, str):
        if axis.strip().lower() == "all":
            return (0, 1, 2)
        try:
            axis = [int(a) for a in axis.split(",")]
        except ValueError:
            raise UserError(f"axis {axis!r}: expected 0, 1, 2, a list such as 0,2, or all") from None
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise UserError(f"axis {axis!r}: expected 0, 1, 2, a list such as 0,2, or all")
    return axes


def square_crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Square box around the mask's bounding box, grown by `margin` of its longer side on every edge.

    Square so that resizing keeps the object's aspect ratio; the box may pass the slice's edge (the crop
    pads there), which is what keeps an object at the border centred.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(r1 - r0, c1 - c0)
    side = int(np.ceil(side * (1 + 2 * margin)))
    # centre on the box's centre (in doubled units to stay in integers)
    top = (int(r0 + r1) - side) // 2
    left = (int(c0 + c1) - side) // 2
    return top, left, top + side, left + side


def whole_slice_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The whole slice, padded to a square (centred) so that resizing keeps the aspect ratio."""
    rows, cols = mask.shape
    side = max(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return top, left, top + side, left + side


def crop_padded(image: np.ndarray, box: tuple[int, int, int, int], fill: int) -> np.ndarray:
    r0, c0, r1, c1 = box
    out = np.full((r1 - r0, c1 - c0), fill, dtype=image.dtype)
    sr0, sc0 = max(r0, 0), max(c0, 0)
    sr1, sc1 = min(r1, image.shape[0]), min(c1, image.shape[1])
    out[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = image[sr0:sr1, sc0:sc1]
    return out


def volume_slices(
    record: VolumeRecord,
    volume: np.ndarray,
    *,
    axes: Sequence[int] = (0,),
    size: int = 224,
    margin: float = 0.1,
    min_foreground: float = 0.01,
    crop: str = "object",
    context: int = 0,
    distance_scale: float = 0.0,
) -> Iterator[SliceResult]:
    """Every slice of one loaded volume along `axes`, kept or dropped, in axis then index order.

    crop="object" cuts a square around the object (`square_crop_box`); crop="none" keeps the whole slice
    (padded to a square), so that the object's size in voxels stays visible to the classifier.
    context=1 makes each image RGB: the slices before, at and after the index (clamped at the volume's
    ends) as red, green and blue, cropped with the centre slice's box - "2.5D" input that shows a 2D
    model the object's shape across the slice.
    distance_scale > 0 replaces every voxel by its Euclidean distance to the background (the Otsu mask) in
    voxels, times distance_scale, capped at 255: each slice then shows the object's local 3D thickness
    (walls, limbs), which one slice of a binary mask cannot."""
    hist = np.bincount(volume.ravel(), minlength=256)
    threshold = otsu_threshold_from_histogram(hist.astype(np.float64))
    # pad crops with the background's typical grey, not black: CT air is rarely 0
    background = hist[: threshold + 1].cumsum()
    fill = int(np.searchsorted(background, background[-1] / 2)) if background[-1] else 0
    mask = volume > threshold
    if distance_scale > 0:
        from scipy.ndimage import distance_transform_edt

        volume = np.minimum(distance_transform_edt(mask) * distance_scale, 255).round().astype(np.uint8)
        fill = 0
    for axis in axes:
        areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        plane = np.prod([n for a, n in enumerate(volume.shape) if a != axis])
        for index in range(volume.shape[axis]):
            foreground = float(areas[index]) / plane
            if foreground < min_foreground or areas[index] == 0:
                yield SliceResult(record, axis, index, foreground, False, None, None)
                continue
            # basic indexing gives a view; ndarray.take copies and is ~50x slower on F-ordered NIfTI data
            where = (slice(None),) * axis + (index,)
            box = square_crop_box(mask[where], margin) if crop == "object" else whole_slice_box(mask[where])
            if context:
                last = volume.shape[axis] - 1
                near = [min(max(index + d, 0), last) for d in (-1, 0, 1)]
                cut = np.dstack([crop_padded(volume[(slice(None),) * axis + (i,)], box, fill) for i in near])
            else:
                cut = crop_padded(volume[where], box, fill)
            resized = Image.fromarray(cut).resize((size, size), Image.Resampling.BILINEAR)
            yield SliceResult(record, axis, index, foreground, True, box, np.asarray(resized))


def iter_slices(records: Iterable[VolumeRecord], **settings) -> Iterator[SliceResult]:
    """Streams slices of many volumes; only one volume is loaded at a time (memory bounded by one).
    `settings` are volume_slices' keyword arguments."""
    for record in records:
        volume = load_volume(record.path)
        yield from volume_slices(record, volume, **settings)
        del volume  # drop the reference before the next load, so two volumes never coexist


# ------------------------------------------------------------------------------------------------ output
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "_"


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _check_settings(
    size: int, margin: float, min_foreground: float, crop: str, context: int, distance_scale: float
) -> None:
    if not 0 <= distance_scale <= 255:
        raise UserError(f"distance_scale {distance_scale!r}: expected 0 (raw grey) or grey levels per voxel")
    if context not in (0, 1):
        raise UserError(f"context {context!r}: expected 0 (one grey slice) or 1 (neighbours as RGB channels)")
    if crop not in ("object", "none"):
        raise UserError(f"crop {crop!r}: expected object (square around the object) or none (whole slice)")
    if not isinstance(size, int) or size < 8:
        raise UserError(f"size {size!r}: expected an image side in pixels >= 8 (224 or 384)")
    if not 0 <= margin <= 2:
        raise UserError(f"margin {margin!r}: expected a fraction of the object's size between 0 and 2")
    if not 0 <= min_foreground < 1:
        raise UserError(f"min_foreground {min_foreground!r}: expected a fraction of the slice in [0, 1)")


def extract_slices(
    records: Sequence[VolumeRecord],
    out_dir: str | Path,
    *,
    axes: Sequence[int] | str = (0,),
    size: int = 224,
    margin: float = 0.1,
    min_foreground: float = 0.01,
    crop: str = "object",
    context: int = 0,
    distance_scale: float = 0.0,
    split_of: Mapping[str, str] | None = None,
    overwrite: bool = False,
    log_every_s: float = 10.0,
) -> ExtractSummary:
    """Writes `out_dir/<label>/<specimen>_axis<a>_<index>.png` and `out_dir/index.csv`.

    Everything goes to a temporary folder next to `out_dir` that is renamed at the end, so a failure
    leaves no partial output. `split_of` (specimen -> split name) fills the CSV's split column; without
    it the column is empty. Logs a progress line with slices/s and ETA every `log_every_s` seconds.
    """
    out_dir = Path(out_dir).resolve()
    settings = dict(
        axes=parse_axes(axes if isinstance(axes, str | int) else list(axes)),
        size=size,
        margin=margin,
        min_foreground=min_foreground,
        crop=crop,
        context=context,
        distance_scale=distance_scale,
    )
    _check_settings(size, margin, min_foreground, crop, context, distance_scale)
    if not records:
        raise UserError("no volumes to slice (empty dataset)")
    if split_of is not None:
        missing = sorted({r.specimen for r in records} - set(split_of))
        if missing:
            raise UserError(f"split assignment has no split for specimen(s) {', '.join(missing[:5])}")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists (choose a new output folder or overwrite it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    start = last_log = time.perf_counter()
    written = dropped = volumes_done = 0
    current: VolumeRecord | None = None
    paths: set[str] = set()
    try:
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(INDEX_COLUMNS)
            for s in iter_slices(records, **settings):
                if s.record is not current:
                    volumes_done += current is not None
                    current = s.record
                now = time.perf_counter()
                if now - last_log >= log_every_s:
                    last_log = now
                    rate = (written + dropped) / (now - start)
                    eta = (now - start) / max(volumes_done, 1) * (len(records) - volumes_done)
                    log.info(
                        "slices: %d/%d volumes, %d written, %d dropped, %.0f slices/s, ETA %s",
                        volumes_done,
                        len(records),
                        written,
                        dropped,
                        rate,
                        _format_eta(eta),
                    )
                if not s.kept:
                    dropped += 1
                    continue
                label = s.record.label
                rel = (
                    f"{_safe(label or UNLABELLED)}/{_safe(s.record.specimen)}_axis{s.axis}_{s.index:04d}.png"
                )
                if rel in paths:
                    raise UserError(
                        f"{s.record.where}: specimen {s.record.specimen!r} gives slice file {rel} twice "
                        "(two volumes of one specimen, or specimen names equal after removing symbols)"
                    )
                paths.add(rel)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                # compress_level 1: PNGs of slices are small anyway and level 6 halves the throughput
                Image.fromarray(s.image).save(tmp / rel, compress_level=1)
                split = split_of[s.record.specimen] if split_of is not None else ""
                writer.writerow(
                    [rel, s.record.specimen, label, split, s.axis, s.index, f"{s.foreground:.5f}", *s.crop]
                    + [str(s.record.path)]
                )
                written += 1
        if out_dir.exists():  # overwrite: swap the old output out first, so a crash here keeps one copy
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    rate = (written + dropped) / seconds if seconds > 0 else 0.0
    log.info(
        "slices: %d volumes, %d written, %d dropped in %.1f s (%.0f slices/s) -> %s",
        len(records),
        written,
        dropped,
        seconds,
        rate,
        out_dir,
    )
    return ExtractSummary(
        out_dir, out_dir / "index.csv", len(records), written, dropped, seconds, rate, written / seconds
    )


def read_index(index_csv: str | Path) -> list[dict[str, str]]:
    index_csv = Path(index_csv)
    with open(index_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{index_csv}: not a slice index (missing columns {', '.join(missing)})")
        return list(reader)


def slices_per_specimen(index_csv: str | Path) -> dict[str, int]:
    """Written slices per specimen: the weights for a split balanced in slices rather than specimens."""
    counts: dict[str, int] = {}
    for row in read_index(index_csv):
        counts[row["specimen"]] = counts.get(row["specimen"], 0) + 1
    return counts


def set_index_splits(index_csv: str | Path, split_of: Mapping[str, str]) -> None:
    """Rewrites the split column of an index CSV in place (atomically: temp file then rename)."""
    index_csv = Path(index_csv)
    rows = read_index(index_csv)
    missing = sorted({r["specimen"] for r in rows} - set(split_of))
    if missing:
        raise UserError(
            f"{index_csv}: split assignment has no split for specimen(s) {', '.join(missing[:5])}"
        )
    tmp = index_csv.with_name(f".{index_csv.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "split": split_of[row["specimen"]]})
        os.replace(tmp, index_csv)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def measure_slices_per_s(
    records: Sequence[VolumeRecord],
    *,
    axes: Sequence[int] = (0, 1, 2),
    size: int = 224,
    max_volumes: int = 20,
    workdir: str | Path | None = None,
) -> float:
    """Benchmark: slices examined per second by `extract_slices` (reading, thresholding, cropping,
    resizing, writing PNGs) on the first `max_volumes` volumes, in a throw-away folder."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        summary = extract_slices(records[:max_volumes], Path(tmp) / "slices", axes=axes, size=size)
    return summary.slices_per_s
