"""The common in-memory form of an instance-segmentation dataset, shared by every format reader and writer.

A dataset is a list of `ImageRecord`s. Each record names its image file and holds its instances as read
from disk (`Instance.segmentation`: COCO polygons or a COCO RLE), or, for the mask-folders layout, the
mask files to read. Nothing is rasterised or decoded when a dataset is read: `record_rles` turns one
image's instances into COCO RLEs (pycocotools does the rasterising), so a training epoch decodes each
image once, in the data loader. Categories are `({"id": 1, "name": ...}, ...)` with contiguous ids 1..K,
the labels a torchvision detection model predicts (0 is the background).
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.normalize import normalize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Instance:
    category_id: int  # 1..K, an id of the record's categories
    # As on disk: COCO polygons [[x1, y1, x2, y2, ...], ...] in pixel-edge coordinates, or a COCO RLE
    # {"size": [h, w], "counts": str (compressed) or list of ints (uncompressed)}.
    segmentation: list | dict
    iscrowd: int = 0  # COCO crowd region: evaluation ignores matches to it; training skips it
    # The RLE numbers pixels row by row (Sartorius CSVs), so it is the RLE of the transposed mask.
    row_major: bool = False
    where: str = ""  # file and row/region it came from, for error messages


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # unique within the dataset; also the output file stem when the dataset is written
    image_path: Path
    mask_paths: tuple[Path, ...] = ()  # mask-folders: one binary PNG per instance, read on demand
    # every other format (hash=False: records stay usable as dict keys though segmentations are lists)
    instances: tuple[Instance, ...] = field(default=(), hash=False)
    # the same tuple for the whole dataset
    categories: tuple[dict, ...] = field(default=({"id": 1, "name": "nucleus"},), hash=False)
    source: Path | None = None  # the annotation file or data folder, for error messages


def open_image(path: Path) -> np.ndarray:
    """The decoded pixels of an image file; a missing, truncated or non-image file is a UserError."""
    if not Path(path).is_file():
        raise UserError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image, expected a PNG, JPEG or TIFF file ({e})") from e


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only; the pixels are decoded later, when they are used."""
    if not Path(path).is_file():
        raise UserError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image, expected a PNG, JPEG or TIFF file ({e})") from e
    return height, width


def load_image(path: Path, mode: str = "range") -> np.ndarray:
    """HxWx3 uint8 RGB as a model with this `normalize` mode sees it (datasets/normalize.py); "range":
    alpha dropped, grey replicated, 16-bit grey scaled by its own range."""
    return normalize(open_image(path), mode)


def load_mask_file(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """HxW bool from one binary mask image (a record's `mask_paths`); a mask whose size is not the
    image's is an error naming both sizes."""
    mask = open_image(path)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise UserError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image is {shape[1]}x{shape[0]}"
        )
    return mask > 0


def to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Decoded pixels (HxW or HxWxC, C 1-4, any dtype) as HxWx3 uint8 RGB: alpha dropped, grey replicated,
    other dtypes (16-bit grey, float) scaled by the image's own range (normalize="range")."""
    return normalize(arr, "range")


def make_categories(names, classes: list[str] | None, where: str) -> tuple[dict, ...]:
    """Categories with ids 1..K: `classes` in the order given (a name outside it is an error), else the
    names seen, sorted (numerically when they are all integers, so "10" follows "9")."""
    names = set(names)
    if classes:
        unknown = sorted(names - set(classes), key=_natural)
        if unknown:
            raise UserError(
                f"{where}: unknown class name(s) {', '.join(map(repr, unknown))}; "
                f"expected one of: {', '.join(classes)}"
            )
        ordered = list(classes)
    else:
        ordered = sorted(names, key=_natural)
    return tuple({"id": i + 1, "name": name} for i, name in enumerate(ordered))


def _natural(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def check_polygon(points: list, height: int, width: int, where: str) -> list[float]:
    """A flat [x1, y1, x2, y2, ...] list of at least 3 points inside the image (pixel-edge coordinates,
    so x = width is the right edge; up to one pixel beyond is tolerated as a click on the border)."""
    try:
        coords = [float(v) for v in points]
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: polygon coordinates must be numbers ({e})") from e
    if len(coords) % 2 or len(coords) < 6:
        raise UserError(
            f"{where}: polygon has {len(coords) / 2:g} point(s); expected at least 3 (x, y) points"
        )
    xs, ys = np.array(coords[0::2]), np.array(coords[1::2])
    outside = (xs < -1) | (xs > width + 1) | (ys < -1) | (ys > height + 1)
    if outside.any():
        i = int(outside.argmax())
        raise UserError(
            f"{where}: polygon point ({xs[i]:g}, {ys[i]:g}) is outside the {width}x{height} image"
        )
    return coords


def check_rle(rle: dict, height: int, width: int, where: str, row_major: bool = False) -> dict:
    """An RLE's size must be the image's, and uncompressed counts must cover exactly its pixels."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise UserError(f"{where}: segmentation must be a polygon list or an RLE with 'size' and 'counts'")
    expected = [width, height] if row_major else [height, width]
    if list(rle["size"]) != expected:
        h, w = rle["size"][::-1] if row_major else rle["size"]
        raise UserError(f"{where}: mask is {w}x{h} pixels but its image is {width}x{height}")
    if isinstance(rle["counts"], list):
        total = sum(int(c) for c in rle["counts"])
        if total != height * width or min(rle["counts"], default=0) < 0:
            raise UserError(
                f"{where}: RLE counts cover {total} pixels but the {width}x{height} image has "
                f"{height * width} (runs past the image, or the wrong size)"
            )
    elif isinstance(rle["counts"], str | bytes):
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": counts})
        if x + w > (height if row_major else width):  # foreground past the last column: runs too long
            raise UserError(f"{where}: compressed RLE runs past the end of the {width}x{height} image")
    else:
        raise UserError(f"{where}: RLE counts must be a list of ints or a compressed string")
    return rle


def instance_rle(instance: Instance, height: int, width: int) -> dict:
    """The instance as a compressed COCO RLE of the HxW image (bytes counts, as pycocotools takes them)."""
    seg = instance.segmentation
    try:
        if isinstance(seg, list):
            return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        h, w = seg["size"]
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            counts = seg["counts"]
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        if instance.row_major:
            return mask_utils.encode(np.asfortranarray(mask_utils.decode(rle).T))
        return rle
    except (ValueError, TypeError) as e:
        raise UserError(
            f"{instance.where}: invalid mask ({e}); expected an RLE of the {width}x{height} image"
        ) from e


def record_rles(record: ImageRecord, height: int, width: int) -> list[tuple[dict, Instance]]:
    """(compressed RLE, instance) for every instance of the record, including empty masks."""
    if record.mask_paths:
        out = []
        for path in record.mask_paths:
            mask = load_mask_file(path, (height, width))
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            out.append((rle, Instance(1, rle_to_json(rle), where=str(path))))
        return out
    return [(instance_rle(inst, height, width), inst) for inst in record.instances]


def rle_to_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def dataset_categories(records: list[ImageRecord]) -> tuple[dict, ...]:
    if not records:
        raise UserError("empty dataset: no images to write")
    return records[0].categories


def single_class(records: list[ImageRecord], layout: str, instead: str) -> None:
    """A UserError naming the classes when a one-class layout (mask folders, label images) is asked to hold
    several; `instead` says what to do."""
    categories = dataset_categories(records)
    if len(categories) > 1:
        names = ", ".join(c["name"] for c in categories)
        raise UserError(
            f"{records[0].source}: {layout} holds one class but the dataset has {len(categories)} "
            f"({names}); {instead}"
        )


def resolve_image(folder: Path, name: str, where: str) -> Path:
    """An image named in an annotation file: beside the file, or in its images/ folder."""
    for candidate in (folder / name, folder / "images" / name, folder / "images" / Path(name).name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{where}: image '{name}' not found beside the annotation file or in {folder / 'images'}")


def instance_labels(record: ImageRecord) -> list[int]:
    """The category id of each instance, without reading any mask (for class-stratified splits); crowd
    regions are left out. A mask-folders file counts even if its mask turns out to be empty."""
    if record.mask_paths:
        return [1] * len(record.mask_paths)
    return [inst.category_id for inst in record.instances if not inst.iscrowd]


def write_json_atomic(path: str | Path, data, indent: int | None = None) -> Path:
    """Write JSON atomically (see write_text_atomic)."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (see write_bytes_atomic)."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write a file atomically: a temporary file in the same folder, renamed over `path` at the end, so a
    reader (or a crashed run) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def folder_written_atomically(folder: str | Path) -> Iterator[Path]:
    """A path beside `folder` for the block to write a folder at (not yet created: writers that make their
    own folder make it), renamed to `folder` when the block ends (an existing `folder` is swapped out
    first, so a crash in between keeps one whole copy) and removed when it raises: a reader, or a crashed
    run, never sees a half-written folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        work = holder / folder.name
        yield work
        if folder.exists():
            os.replace(folder, holder / "old")
        os.replace(work, folder)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
