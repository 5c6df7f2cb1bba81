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
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import sparse

from datasets.errors import UserError
from datasets.normalize import normalize
from datasets.tiles import Tile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# What PIL and tifffile raise on a damaged file (a cut stream, a bad header, a codec they lack): each means
# "not a readable image", never a bug of ours, because only the decoding call is inside the try.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    NotImplementedError,
    ZeroDivisionError,
    OverflowError,
    RuntimeError,
    zlib.error,
    struct.error,
)
# Bounds on what one polygon may make pycocotools allocate: it walks the outline at 5 steps per pixel and
# keeps ~24 bytes per step, so the outline (sum over edges of the longer of |dx|, |dy|) is capped at about
# 120 MB of work; an outline tracing every pixel edge of a 500x500-pixel object is 2000 pixels long.
MAX_POLYGON_POINTS = 100_000
MAX_OUTLINE_PIXELS = 1_000_000


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
    """The decoded pixels of an image file; a missing, truncated, oversized (PIL's decompression-bomb
    limit) or non-image file, or a float image without one finite pixel, is a UserError."""
    with _opened(path) as im:
        try:
            im.load()
            pixels = np.asarray(im)
        except DECODE_ERRORS as e:
            raise UserError(f"{path}: not a readable image, expected a PNG, JPEG or TIFF file ({e})") from e
    return finite_pixels(pixels, path)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only; the pixels are decoded later, when they are used."""
    with _opened(path) as im:
        width, height = im.size
    if width < 1 or height < 1:
        raise UserError(f"{path}: image is {width}x{height} pixels; expected at least 1x1")
    return height, width


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """PIL's lazy image (header read, pixels not yet) with every way the file can be wrong a UserError."""
    if not Path(path).is_file():
        raise UserError(f"{path}: image not found")
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: image too large to decode ({e})") from e
    except DECODE_ERRORS as e:
        raise UserError(f"{path}: not a readable image, expected a PNG, JPEG or TIFF file ({e})") from e
    with im:
        yield im


def finite_pixels(pixels: np.ndarray, path: Path) -> np.ndarray:
    """`pixels`, unless they are floats without one finite value (nothing to show). NaN and inf pixels
    are kept: the normalisation leaves them out of its statistics, as ImageJ does (datasets/normalize.py)."""
    if pixels.dtype.kind == "f" and pixels.size and not np.isfinite(pixels).any():
        raise UserError(f"{path}: every pixel is NaN or infinite; expected an image with finite values")
    return pixels


def load_image(path: Path, mode: str = "range") -> np.ndarray:
    """HxWx3 uint8 RGB as a model with this `normalize` mode sees it (datasets/normalize.py); "range":
    alpha dropped, grey replicated, 16-bit grey scaled by its own range."""
    return normalize(open_image(path), mode)


def load_mask_file(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """HxW bool from one binary mask image (a record's `mask_paths`); a mask whose size is not the
    image's is an error naming both sizes, found from the header before any pixel is decoded."""
    size = image_size(path)
    if size != tuple(shape):
        raise UserError(f"{path}: mask is {size[1]}x{size[0]} pixels but its image is {shape[1]}x{shape[0]}")
    mask = open_image(path)
    return (mask[..., 0] if mask.ndim == 3 else mask) > 0


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


def is_number(value) -> bool:
    """An int or float as JSON gives it (a bool is not a number here, though Python says it is an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_polygon(points: list, height: int, width: int, where: str) -> list[float]:
    """A flat [x1, y1, x2, y2, ...] list of 3 to MAX_POLYGON_POINTS finite points inside the image
    (pixel-edge coordinates, so x = width is the right edge; up to one pixel beyond is tolerated as a click
    on the border), whose outline is at most MAX_OUTLINE_PIXELS long."""
    if not isinstance(points, list):
        raise UserError(f"{where}: polygon must be a list [x1, y1, x2, y2, ...], got {type(points).__name__}")
    bad = next((i for i, v in enumerate(points) if not is_number(v)), None)
    if bad is not None:
        raise UserError(f"{where}: polygon value {bad} is a {type(points[bad]).__name__}; expected a number")
    if len(points) % 2 or not 6 <= len(points) <= 2 * MAX_POLYGON_POINTS:
        raise UserError(
            f"{where}: polygon has {len(points) / 2:g} point(s); expected at least 3 and at most "
            f"{MAX_POLYGON_POINTS} (x, y) points"
        )
    try:
        xy = np.array(points, dtype=np.float64).reshape(-1, 2)
    except OverflowError:  # an integer beyond float range
        xy = np.full((len(points) // 2, 2), np.inf)
    if not np.isfinite(xy).all():
        i = int(np.argmin(np.isfinite(xy).ravel()))
        raise UserError(f"{where}: polygon value {i} is {str(points[i])[:40]}; expected a finite number")
    outside = (xy[:, 0] < -1) | (xy[:, 0] > width + 1) | (xy[:, 1] < -1) | (xy[:, 1] > height + 1)
    if outside.any():
        x, y = xy[int(outside.argmax())]
        raise UserError(f"{where}: polygon point ({x:g}, {y:g}) is outside the {width}x{height} image")
    outline = float(np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1).sum())
    if outline > MAX_OUTLINE_PIXELS:
        raise UserError(
            f"{where}: polygon outline is {outline:.0f} pixels long, over the {MAX_OUTLINE_PIXELS} a polygon "
            "may have (its edges cross the image back and forth)"
        )
    return xy.ravel().tolist()


def check_rle(rle: dict, height: int, width: int, where: str, row_major: bool = False) -> dict:
    """An RLE's size must be the image's [height, width], and its counts (a list, or pycocotools'
    compressed string, decoded here) must cover exactly its pixels: pycocotools trusts both, and decodes a
    short RLE into uninitialised memory."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise UserError(f"{where}: segmentation must be a polygon list or an RLE with 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(is_integer(v) for v in size):
        raise UserError(f"{where}: RLE 'size' must be [height, width] (two integers), got {str(size)[:40]}")
    expected = [width, height] if row_major else [height, width]
    if size != expected:
        h, w = size[::-1] if row_major else size
        raise UserError(f"{where}: mask is {w}x{h} pixels but its image is {width}x{height}")
    covering_counts(rle["counts"], height, width, where)
    return rle


def covering_counts(counts, height: int, width: int, where: str) -> np.ndarray:
    """rle_counts(counts), which must cover exactly the height x width image's pixels (UserError naming
    `where` otherwise): pycocotools decodes a short RLE into uninitialised memory."""
    runs = rle_counts(counts, where)
    total = int(runs.sum())
    if total != height * width:
        raise UserError(
            f"{where}: RLE counts cover {total} pixels but the {width}x{height} image has "
            f"{height * width} (runs past the image, or the wrong size)"
        )
    return runs


def rle_counts(counts, where: str) -> np.ndarray:
    """The run lengths (int64) of an RLE's counts: a list of non-negative integers, or pycocotools'
    compressed string (rleFrString in maskApi.c: each count in 5-bit groups, low first, as characters from
    '0', 0x20 = another group follows, 0x10 in the last = negative; from the third count on, the value is
    a difference to the count two before). Malformed counts are a UserError naming `where`."""
    if isinstance(counts, list):
        if not all(is_integer(c) and 0 <= c < 1 << 62 for c in counts):
            raise UserError(f"{where}: RLE counts must be non-negative integers")
        return np.array(counts, dtype=np.int64)
    if isinstance(counts, str):
        if not counts.isascii():
            raise UserError(f"{where}: compressed RLE counts must be ASCII characters '0' to 'o'")
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise UserError(f"{where}: RLE counts must be a list of integers or a compressed string")
    if not counts:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    more = (chars & 0x20) != 0
    if ((chars < 0) | (chars > 63)).any() or (more.size and more[-1]):
        raise UserError(
            f"{where}: compressed RLE counts are not pycocotools' encoding (a cut or garbled string)"
        )
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > 7:  # 35 bits: past any count of a 32-bit pycocotools RLE
        raise UserError(f"{where}: compressed RLE holds a count of more than 7 characters")
    shifts = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shifts, starts)
    values -= np.where(chars[ends] & 0x10, np.int64(1) << (5 * lengths), 0)  # sign-extend negatives
    values[1::2] = np.cumsum(values[1::2])  # counts 3, 5, ... are differences to the one two before
    values[2::2] = np.cumsum(values[2::2])  # counts 4, 6, ... too (count 2 is not)
    if (values < 0).any():
        raise UserError(f"{where}: compressed RLE decodes to a negative run length")
    return values


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
        if instance.row_major:  # the RLE of the transposed mask: transposed on the object's box only
            x, y, box = rle_box_mask(rle)
            transposed = patch_rle(box.T, y, x, height, width)
            return {"size": transposed["size"], "counts": transposed["counts"].encode("ascii")}
        return rle
    except (ValueError, TypeError) as e:
        raise UserError(
            f"{instance.where}: invalid mask ({e}); expected an RLE of the {width}x{height} image"
        ) from e


def rle_areas(rles: list[dict]) -> np.ndarray:
    """The pixel counts of COCO RLEs (int64). pycocotools' area() of a list of more than 255 raises
    OverflowError under numpy 2 (it builds its result from the count as a uint8), hence 255 at a time."""
    parts = [mask_utils.area(rles[i : i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)


def rle_ious(a: list[dict], b: list[dict]) -> sparse.csr_matrix:
    """IoU of every COCO RLE of `a` with every one of `b` (pycocotools' iou), len(a) x len(b), sparse: only
    pairs whose boxes overlap are compared and only IoUs > 0 are stored. The dense matrix of a mosaic grows
    with the square of its objects (7,836 nuclei against as many: 490 MB), its nonzero part with their
    number."""
    if not a or not b:
        return sparse.csr_matrix((len(a), len(b)))
    ax, ay, aw, ah = mask_utils.toBbox(a).reshape(-1, 4).T
    bx, by, bw, bh = mask_utils.toBbox(b).reshape(-1, 4).T
    order = np.argsort(bx, kind="stable")
    # candidates of box i: the boxes of b starting left of its right edge, and late enough to reach it
    first = np.searchsorted(bx[order], ax - bw.max(), side="right")
    stop = np.searchsorted(bx[order], ax + aw, side="left")
    rows, cols, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for i in range(len(a)):
        near = order[first[i] : stop[i]]
        near = near[
            (bx[near] + bw[near] > ax[i]) & (by[near] < ay[i] + ah[i]) & (by[near] + bh[near] > ay[i])
        ]
        if near.size:
            iou = np.asarray(mask_utils.iou([a[i]], [b[j] for j in near], [0] * len(near))).ravel()
            rows.append(np.full(int((iou > 0).sum()), i))
            cols.append(near[iou > 0])
            values.append(iou[iou > 0])
    ious = (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols)))
    return sparse.csr_matrix(ious, shape=(len(a), len(b)))


def patch_rle(patch: np.ndarray, x: int, y: int, height: int, width: int) -> dict:
    """COCO RLE (compressed, JSON-ready) of a bool patch placed at column x, row y of a height x width
    image, without a full-image mask: RLE runs go down the columns, so the columns the patch spans are one
    contiguous stretch of the image's runs, and everything before and after it is a single zero run."""
    block = np.zeros((height, patch.shape[1]), dtype=bool)  # the patch's columns, full height
    block[y : y + patch.shape[0]] = patch
    flat = block.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)  # RLE counts start with a run of zeros, possibly empty
    runs[0] += x * height
    after = (width - x - patch.shape[1]) * height
    if len(runs) % 2:  # odd number of runs: the last one is zeros
        runs[-1] += after
    elif after:  # pycocotools writes no empty run at the end
        runs.append(after)
    return rle_to_json(mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width))


def rle_crop(rle: dict, tile: Tile, where: str = "mask") -> np.ndarray:
    """The tile.height x tile.width bool part of a COCO RLE's mask under `tile`, decoded from the runs that
    reach the tile's columns only (patch_rle's inverse): memory and time grow with the object's columns
    inside the tile, not with the image."""
    height, width = (int(v) for v in rle["size"])
    runs = covering_counts(rle["counts"], height, width, where)
    ends = np.cumsum(runs)[1::2]  # the runs of ones, as [start, end) positions down the columns
    starts = ends - runs[1::2]
    low, high = tile.x * height, (tile.x + tile.width) * height  # the tile's columns, full height
    reach = (ends > low) & (starts < high) & (ends > starts)
    out = np.zeros((tile.height, tile.width), dtype=bool)
    if not reach.any():
        return out
    starts, ends = np.maximum(starts[reach], low), np.minimum(ends[reach], high)
    first, stop = starts[0] // height, (ends[-1] - 1) // height + 1  # the columns these runs touch
    edges = np.zeros((stop - first) * height + 1, dtype=np.int8)
    np.add.at(edges, starts - first * height, 1)
    np.add.at(edges, ends - first * height, -1)
    columns = np.cumsum(edges[:-1], dtype=np.int8).astype(bool).reshape(stop - first, height).T
    out[:, first - tile.x : stop - tile.x] = columns[tile.y : tile.y + tile.height]
    return out


def rle_box_mask(rle: dict) -> tuple[int, int, np.ndarray]:
    """(x, y, mask) of a COCO RLE cut to its own box (h x w bool at column x, row y; 0 x 0 when empty):
    what drawing, tracing or re-encoding one object needs, at the object's size instead of the image's."""
    x, y, width, height = (int(v) for v in mask_utils.toBbox(rle))
    return x, y, rle_crop(rle, Tile(x, y, width, height))


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


def trainable_rles(record: ImageRecord, shape: tuple[int, int]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(compressed RLEs, labels N int64, areas N int64) of the record's instances that are neither crowd
    regions nor empty: what training learns from and label images hold."""
    kept = [(rle, inst.category_id) for rle, inst in record_rles(record, *shape) if not inst.iscrowd]
    areas = rle_areas([rle for rle, _ in kept])
    filled = areas > 0
    kept = [pair for pair, keep in zip(kept, filled, strict=True) if keep]
    return [rle for rle, _ in kept], np.array([label for _, label in kept], dtype=np.int64), areas[filled]


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
    """An image named in an annotation file: beside the file, or in its images/ folder. The name must be
    a relative path inside that folder (no absolute path, no '..'): an annotation file must not make a
    conversion read, or copy out, a file from elsewhere on the machine."""
    parts = Path(name).parts
    if not name or "\0" in name or Path(name).is_absolute() or ".." in parts:
        raise UserError(
            f"{where}: image name '{name[:200]}' must be a relative path inside the dataset folder "
            "(no absolute path, no '..')"
        )
    for candidate in (folder / name, folder / "images" / name, folder / "images" / Path(name).name):
        try:
            if candidate.is_file():
                return candidate
        except OSError as e:  # a name too long for the file system
            raise UserError(
                f"{where}: image name '{name[:200]}' is not a usable file name ({e.strerror})"
            ) from e
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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set back at once
    os.umask(mask)
    return mask


UMASK = _umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write a file atomically: a temporary file in the same folder, renamed over `path` at the end, so a
    reader (or a crashed run) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; results are meant to be shared as any file the user writes is
        os.fchmod(handle, 0o666 & ~UMASK)
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
