"""Label images, the exchange format of Cellpose, StarDist, napari and QuPath: one integer per object in a
2-D image of the same size as its image, 0 = background (uint8, uint16 or uint32 TIFF or PNG). One class.

Two layouts are read, told apart by what the folder holds:
- pairs in one folder (Cellpose, StarDist): <name>.<ext> + <name>_masks.tif|.tiff|.png; files ending in
  `_masks` (and Cellpose's own outputs: _flows, _cellprob, _cp_output) are never images
- folders: <root>/images/<name>.<ext> + <root>/labels/<name>.tif|.tiff|.png (found by stem)
Every image needs its label image (training data must be annotated); each distinct non-zero value is one
instance, numbered in increasing value. Unlike mask-folders, label images are decoded when the dataset is
read (a record has no field for a label file), into compressed RLEs that are small beside the image, so a
wrong shape, type or truncated file is reported before any work starts.

Written as the folder layout: images/ copied as they are, labels/<name>.tif (uint16 deflate-compressed,
uint32 beyond 65535 instances). Label images cannot hold overlaps: where instances overlap, the SMALLER
one keeps the pixel (a small object inside a large one stays visible); the pixels the larger one loses
are dropped. Crowd regions are skipped, empty masks too; label k is the dataset's k-th kept instance.
"""

import io
import math
import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.records import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    ImageRecord,
    Instance,
    covering_counts,
    image_size,
    open_image,
    rle_to_json,
    single_class,
    trainable_rles,
    write_bytes_atomic,
)

LABEL_SUFFIXES = (".tif", ".tiff", ".png")
TIFF_SUFFIXES = (".tif", ".tiff")
MASKS = "_masks"
# File stems that Cellpose writes beside its training images (as its own image filter skips them).
NOT_IMAGES = (MASKS, "_flows", "_flows_0", "_flows_1", "_flows_2", "_cellprob", "_cp_output")
LAYOUT = (
    "label-images layout: <name>.<ext> + <name>_masks.tif|.tiff|.png in one folder (Cellpose, StarDist), "
    "or images/<name>.<ext> + labels/<name>.tif|.tiff|.png"
)
EXPECTED = "a 2-D integer label image (uint8, uint16 or uint32; one value per object, 0 = background)"


def read_label_images(path: str | Path, category: str = "object") -> list[ImageRecord]:
    """One record per image, sorted by name; `category` names the one class (e.g. "nucleus"). Raises
    UserError for a missing folder, an image without its label image, or a bad label image."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found (expected the {LAYOUT})")
    if not isinstance(category, str) or not category.strip():
        raise UserError(f"category: expected a non-empty class name, got {category!r}")
    categories = ({"id": 1, "name": category.strip()},)
    pairs = _folder_pairs(root) if _has_folders(root) else _cellpose_pairs(root)
    if not pairs:
        raise UserError(f"{root}: empty dataset, no images found (expected the {LAYOUT})")
    return [_record(name, image, label, root, categories) for name, image, label in pairs]


def looks_like_label_images(path: Path) -> bool:
    """Whether the folder holds one of the two layouts (for guess_format): images/ beside a labels/ folder
    holding label files (a labels/ folder of .txt files is YOLO, not this), or `<name>_masks.*` files."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _has_folders(path):
        return any(p.suffix.lower() in LABEL_SUFFIXES for p in (path / "labels").iterdir())
    return any(_is_mask_file(p) for p in path.iterdir())


def _has_folders(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "labels").is_dir()


def _is_mask_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in LABEL_SUFFIXES and path.stem.endswith(MASKS)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _by_stem(paths: list[Path], what: str) -> dict[str, Path]:
    """stem -> file; two files with one stem (a.png and a.tif) would be one image id twice."""
    found: dict[str, Path] = {}
    for p in paths:
        if p.stem in found:
            raise UserError(f"{p}: two {what} named '{p.stem}' ({found[p.stem].name}, {p.name}); keep one")
        found[p.stem] = p
    return found


def _cellpose_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    files = _files(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(NOT_IMAGES)]
    labels = _by_stem([p for p in files if _is_mask_file(p)], "label images")
    pairs = []
    for name, image in sorted(_by_stem(images, "images").items()):
        label = labels.get(f"{name}{MASKS}")
        if label is None:
            raise UserError(
                f"{image}: no label image {name}{MASKS}.tif (or .tiff, .png) beside it; every training "
                f"image needs its instance labels (expected the {LAYOUT})"
            )
        pairs.append((name, image, label))
    return pairs


def _folder_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    images = _by_stem([p for p in _files(root / "images") if p.suffix.lower() in IMAGE_SUFFIXES], "images")
    labels = [p for p in _files(root / "labels") if p.suffix.lower() in LABEL_SUFFIXES]
    labels_by_stem = _by_stem(labels, "label images")
    pairs = []
    for name, image in sorted(images.items()):
        if name not in labels_by_stem:
            raise UserError(
                f"{image}: no label image {root / 'labels' / name}.tif (or .tiff, .png); every training "
                f"image needs its instance labels (expected the {LAYOUT})"
            )
        pairs.append((name, image, labels_by_stem[name]))
    return pairs


def _record(name: str, image: Path, label: Path, root: Path, categories: tuple[dict, ...]) -> ImageRecord:
    labels = read_label_image(label)
    height, width = image_size(image)
    if labels.shape != (height, width):
        raise UserError(
            f"{label}: label image is {labels.shape[1]}x{labels.shape[0]} pixels but its image {image} "
            f"is {width}x{height}"
        )
    instances = tuple(
        Instance(1, rle, where=f"{label}: label {value}") for value, rle in rles_from_labels(labels)
    )
    return ImageRecord(name, image, instances=instances, categories=categories, source=root)


def read_label_image(path: Path) -> np.ndarray:
    """The HxW integer labels of a TIFF (tifffile) or PNG (PIL) label image. A missing, truncated or
    corrupt file, a float or RGB image, a stack or negative values are UserErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: label image not found")
    if path.suffix.lower() in TIFF_SUFFIXES:
        labels = _read_tiff(path)
    else:
        labels = open_image(path)  # PIL, with its decompression-bomb limit, as every image
    return _checked(labels, path)


def _read_tiff(path: Path) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            # PIL's decompression-bomb limit, which PNGs get from open_image, checked before decoding
            limit = Image.MAX_IMAGE_PIXELS
            if limit and math.prod(series.shape) > 2 * limit:
                raise UserError(
                    f"{path}: label image holds {math.prod(series.shape)} values, more than the "
                    f"{2 * limit} an image may have (PIL.Image.MAX_IMAGE_PIXELS x 2)"
                )
            return series.asarray()
    except DECODE_ERRORS as e:
        raise UserError(f"{path}: not a readable TIFF label image, truncated or corrupt ({e})") from e


def _checked(labels: np.ndarray, path: Path) -> np.ndarray:
    """The labels as HxW integers; a leading or trailing axis of length 1 (ImageJ stacks) is dropped."""
    while labels.ndim > 2 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2:
        what = f"{labels.shape[-1]} channels (RGB?)" if labels.ndim == 3 else f"{labels.ndim} dimensions"
        raise UserError(f"{path}: label image has shape {labels.shape}, {what}; expected {EXPECTED}")
    if labels.dtype == bool:  # a 1-bit PNG: one object
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "ui":
        raise UserError(f"{path}: label image has {labels.dtype} pixels; expected {EXPECTED}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise UserError(f"{path}: label image has negative values ({labels.min()}); expected {EXPECTED}")
    return labels


def rles_from_labels(labels: np.ndarray) -> list[tuple[int, dict]]:
    """(value, compressed COCO RLE with str counts) for each distinct non-zero value of an HxW label image,
    in increasing value. One pass finds the runs of every value down the columns (COCO's pixel order), so
    thousands of labels never need thousands of full-size masks."""
    height, width = labels.shape
    flat = labels.ravel(order="F")
    if not flat.size:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes, [flat.size]])
    values = flat[starts]
    keep = values != 0
    order = np.argsort(values[keep], kind="stable")  # runs grouped by value, in pixel order within each
    starts, ends, values = starts[keep][order], ends[keep][order], values[keep][order]
    present, first = np.unique(values, return_index=True)
    bounds = np.append(first, len(values))
    out = []
    for value, lo, hi in zip(present.tolist(), bounds[:-1], bounds[1:], strict=True):
        s, e = starts[lo:hi], ends[lo:hi]
        counts = np.empty(2 * len(s) + 1, dtype=np.int64)
        counts[0], counts[1::2], counts[2:-1:2], counts[-1] = s[0], e - s, s[1:] - e[:-1], flat.size - e[-1]
        # runs of one value never touch (they would be one run), so only the last zero run can be empty;
        # pycocotools writes none, and equal masks should give equal strings
        runs = counts[:-1] if counts[-1] == 0 else counts
        rle = mask_utils.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width)
        out.append((value, rle_to_json(rle)))
    return out


def label_dtype(count: int) -> np.dtype:
    """The label image type for `count` instances: uint16, uint32 beyond 65535 (what the tools read)."""
    if count > np.iinfo(np.uint32).max:
        raise ValueError(f"{count} instances do not fit a uint32 label image")
    return np.dtype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)


def labels_from_rles(rles: list[dict], height: int, width: int) -> np.ndarray:
    """COCO RLEs (compressed, str or bytes counts, or uncompressed lists) -> an HxW label image, rles[k]
    labelled k + 1, uint16 (uint32 beyond 65535). Where masks overlap the EARLIER one keeps the pixel (a
    predictor passes them best score first); a mask wholly covered by earlier ones leaves no pixel."""
    return _paint(rles, height, width, range(len(rles)))


def _paint(rles: list[dict], height: int, width: int, priority) -> np.ndarray:
    """rles[k] labelled k + 1, painted in `priority` order onto pixels still 0. Only each mask's runs are
    touched, never a full-size mask per instance: a mosaic with thousands of objects stays fast."""
    transposed = np.zeros((width, height), dtype=label_dtype(len(rles)))  # RLE runs go down columns
    flat = transposed.reshape(-1)  # a view
    for k in priority:
        ends = np.cumsum(_rle_counts(rles[k], height, width, k))
        for start, end in zip(ends[0::2].tolist(), ends[1::2].tolist(), strict=False):
            run = flat[start:end]
            run[run == 0] = k + 1
    return np.ascontiguousarray(transposed.T)


def _rle_counts(rle: dict, height: int, width: int, index: int) -> list[int]:
    """The uncompressed run lengths of a COCO RLE (pycocotools decodes only to a full-size mask)."""
    where = f"RLE {index}"
    if list(rle.get("size", ())) != [height, width]:
        raise UserError(f"{where}: mask size {rle.get('size')} is not the label image's [{height}, {width}]")
    return covering_counts(rle["counts"], height, width, where).tolist()


def write_label_image(path: Path, labels: np.ndarray) -> None:
    """Write an HxW integer label image as a deflate-compressed TIFF, atomically (a temporary file in the
    same folder, renamed over `path`), so a reader never sees half a file."""
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(f"{path}: expected an HxW integer label image, got {labels.dtype} {labels.shape}")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels, compression="zlib", predictor=True, photometric="minisblack")
    write_bytes_atomic(path, buffer.getvalue())


def write_label_images(records: list[ImageRecord], dst: Path) -> None:
    """Write the folder layout under `dst`: images/ copied as they are, labels/<id>.tif. One class only (a
    dataset of several is an error naming them); crowd regions and empty masks are skipped; where
    instances overlap the smaller one keeps the pixel. Label k is the record's k-th kept instance."""
    single_class(records, "label-images", "keep one class, or convert to coco, via or rle-csv instead")
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    for record in records:
        _copy_image(record, dst / "images")
        height, width = image_size(record.image_path)
        kept, _, areas = trainable_rles(record, (height, width))
        smallest_first = sorted(range(len(kept)), key=lambda k: areas[k])  # stable: ties keep file order
        labels = _paint(kept, height, width, smallest_first)
        write_label_image(dst / "labels" / f"{record.image_id}.tif", labels)


def _copy_image(record: ImageRecord, folder: Path) -> None:
    """The image file as it is; one the readers would not find by its suffix is re-encoded as PNG."""
    suffix = record.image_path.suffix
    if suffix.lower() in IMAGE_SUFFIXES:
        shutil.copyfile(record.image_path, folder / f"{record.image_id}{suffix}")
    else:
        Image.fromarray(open_image(record.image_path)).save(folder / f"{record.image_id}.png")
