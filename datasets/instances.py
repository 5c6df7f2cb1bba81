"""The common in-memory form of an instance-segmentation dataset, for torchvision detection models and
for COCO evaluation (pycocotools)."""

import contextlib
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets.augment import apply_transform
from datasets.coco import load_json, read_coco, write_coco
from datasets.errors import UserError
from datasets.label_images import looks_like_label_images, read_label_images, write_label_images
from datasets.mask_folders import CATEGORIES, load_masks, read_mask_folders, write_mask_folders
from datasets.records import (
    ImageRecord,
    folder_written_atomically,
    image_size,
    load_image,
    load_mask_file,
    open_image,
    record_rles,
    rle_crop,
    rle_to_json,
    trainable_rles,
)
from datasets.rle_csv import read_rle_csv, write_rle_csv
from datasets.tiles import Tile, keep_clipped, tile_grid
from datasets.via import read_via, write_via

SAMPLE_DATA = Path(__file__).parent / "sample" / "dsb2018"


@dataclass(frozen=True)
class Format:
    read: Callable[..., list[ImageRecord]]  # (path, **options) -> records
    write: Callable[..., None]  # (records, dst folder that does not exist yet, **options)
    description: str


# Annotation formats by name (RECIPES.md says where each comes from); options are the functions' keywords.
FORMATS: dict[str, Format] = {
    "coco": Format(read_coco, write_coco, "COCO instances JSON, polygons or RLE (LIVECell)"),
    "via": Format(read_via, write_via, "VGG Image Annotator JSON, polygon regions (foraminifera)"),
    "mask-folders": Format(
        read_mask_folders, write_mask_folders, "<id>/images/<id>.png + <id>/masks/*.png (DSB2018)"
    ),
    "rle-csv": Format(read_rle_csv, write_rle_csv, "Kaggle run-length CSV (DSB2018, Sartorius)"),
    "label-images": Format(
        read_label_images,
        write_label_images,
        "<name>_masks.tif label images beside the images (Cellpose, StarDist), or images/ + labels/",
    ),
}


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise UserError(f"data_format: unknown format '{fmt}'; valid: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt]


def _check_options(function: Callable, options: dict, fmt: str, what: str) -> None:
    valid = [p for p in inspect.signature(function).parameters if p not in ("path", "records", "dst")]
    for key in options:
        if key not in valid:
            raise UserError(f"{fmt}: unknown {what} option '{key}'; valid: {', '.join(valid) or '(none)'}")


def guess_format(path: str | Path) -> str:
    """The format of `path` from what it holds: a folder with images/ and labels/ of label files, or with
    <name>_masks.* files, is label-images; a CSV is rle-csv; a COCO JSON has "images"; another JSON is
    via; a folder of <id>/images/ folders is mask-folders."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if looks_like_label_images(path):  # first: a Cellpose folder may hold other JSON or CSV files
        return "label-images"
    files = [path] if path.is_file() else sorted(path.glob("*.csv")) + sorted(path.glob("*.json"))
    if not files:
        if path.is_dir() and any((p / "images").is_dir() for p in path.iterdir()):
            return "mask-folders"
        raise UserError(
            f"{path}: cannot tell the format (no .csv or .json file, no <id>/images/ folders, no "
            "images/ + labels/ folders, no <name>_masks.tif files); "
            f"give it with --format ({', '.join(sorted(FORMATS))})"
        )
    if files[0].suffix.lower() == ".csv":
        return "rle-csv"
    return "coco" if isinstance(data := load_json(files[0]), dict) and "images" in data else "via"


def read_records(path: str | Path, fmt: str = "mask-folders", **options) -> list[ImageRecord]:
    """The dataset at `path` in format `fmt` (see FORMATS); nothing is decoded until it is used."""
    reader = get_format(fmt).read
    _check_options(reader, options, fmt, "read")
    return reader(path, **options)


def write_records(records: list[ImageRecord], dst: str | Path, fmt: str, **options) -> Path:
    """Write `records` to the new folder `dst` in format `fmt`. Written to a temporary folder beside it
    and renamed at the end, so a failed run leaves no partial output."""
    writer = get_format(fmt).write
    _check_options(writer, options, fmt, "write")
    dst = Path(dst)
    if dst.exists():
        raise UserError(f"{dst}: already exists; choose a new output folder (nothing is overwritten)")
    if not records:
        raise UserError(f"{dst}: empty dataset, nothing to write")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise UserError(f"{records[0].source}: image ids are not unique ({', '.join(twice[:5])})")
    for record in records:  # writers copy image files as they are: a truncated one must not get through
        open_image(record.image_path)
    with folder_written_atomically(dst) as work:
        writer(records, work, **options)
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    src_fmt: str,
    dst_fmt: str,
    read_options: dict | None = None,
    write_options: dict | None = None,
) -> list[ImageRecord]:
    """Read `src` as `src_fmt` and write it to the new folder `dst` as `dst_fmt`; returns the records."""
    if Path(dst).exists():  # before reading: a long read should not end in this
        raise UserError(f"{dst}: already exists; choose a new output folder (nothing is overwritten)")
    records = read_records(src, src_fmt, **(read_options or {}))
    write_records(records, dst, dst_fmt, **(write_options or {}))
    return records


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random train/validation split by image, at least one image on each side."""
    if len(records) < 2:
        where = f"{records[0].source}: " if records and records[0].source else ""
        raise UserError(f"{where}need at least 2 images to split, found {len(records)}")
    order = list(records)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return sorted(order[n_val:], key=_key), sorted(order[:n_val], key=_key)


def _key(record: ImageRecord) -> str:
    return record.image_id


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Nx4 float32 boxes (x1, y1, x2, y2) in pixel-edge coordinates: a one-pixel mask is 1x1, as in COCO."""
    if len(masks) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    x2 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def instance_masks(record: ImageRecord, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(masks NxHxW bool, labels N int64) of the record's trainable instances: crowd regions and empty
    masks are left out, as torchvision's COCO reference does."""
    if record.mask_paths:  # one class; read the PNGs directly rather than through RLE
        masks = load_masks(record, shape)
        return masks, np.ones(len(masks), dtype=np.int64)
    rles, labels, _ = trainable_rles(record, shape)
    if not rles:
        return np.zeros((0, *shape), dtype=bool), labels
    try:
        masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
    except ValueError as e:  # a compressed RLE whose runs do not add up to the image
        raise UserError(f"{record.source}: image '{record.image_id}': invalid RLE mask ({e})") from e
    return masks, labels


def tile_instance_masks(
    record: ImageRecord, shape: tuple[int, int], tile: Tile, min_visible: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(masks N x tile.height x tile.width bool, labels N int64): instance_masks(record, shape) clipped to
    `tile` as clip_instances clips them, without holding whole-image masks of every instance at once (a
    mosaic of thousands of objects would need N x its size). Measured: `python -m platform.bench data`."""
    crops, areas, labels = (_mask_file_crops if record.mask_paths else _rle_crops)(record, shape, tile)
    keep = keep_clipped(crops.sum(axis=(1, 2)), areas, min_visible=min_visible)
    return crops[keep], labels[keep]


def _mask_file_crops(record: ImageRecord, shape: tuple[int, int], tile: Tile):
    """(crops, full areas, labels) of a mask-folders record: one mask file decoded at a time."""
    crops, areas = [np.zeros((0, tile.height, tile.width), dtype=bool)], []
    for path in record.mask_paths:
        mask = load_mask_file(path, shape)
        crop = mask[tile.slices]
        if crop.any():
            crops.append(crop[None].copy())
            areas.append(mask.sum())
    return np.concatenate(crops), np.array(areas, dtype=np.int64), np.ones(len(areas), dtype=np.int64)


def _rle_crops(record: ImageRecord, shape: tuple[int, int], tile: Tile):
    """(crops, full areas, labels) of the instances whose box reaches the tile, decoded inside it only."""
    rles, labels, areas = trainable_rles(record, shape)
    boxes = mask_utils.toBbox(rles).reshape(-1, 4)
    x, y, width, height = boxes.T
    near = np.flatnonzero(
        (x < tile.x + tile.width) & (x + width > tile.x) & (y < tile.y + tile.height) & (y + height > tile.y)
    )
    where = f"{record.source}: image '{record.image_id}'"
    crops = np.zeros((len(near), tile.height, tile.width), dtype=bool)
    for k, i in enumerate(near):
        crops[k] = rle_crop(rles[i], tile, where)
    return crops, areas[near], labels[near]


class InstanceDataset(torch.utils.data.Dataset):
    """(image CxHxW float in [0, 1], target {boxes, labels, masks, image_id}) as torchvision detection
    models expect; labels are the instances' category ids (1..K, `.categories`). `image_id` is the
    record's position + 1, the id used by `coco_ground_truth`."""

    def __init__(
        self, records: list[ImageRecord], transform: A.Compose | None = None, normalize: str = "range"
    ):
        self.records = records
        self.transform = transform
        self.normalize = normalize  # the model's input normalisation (datasets/normalize.py)
        self.categories = records[0].categories if records else CATEGORIES

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = load_image(record.image_path, self.normalize)
        masks, labels = instance_masks(record, image.shape[:2])
        return to_sample(self.transform, image, masks, labels, index + 1)


class TiledInstanceDataset(InstanceDataset):
    """Full-resolution training: one item per overlapping tile of every image (datasets/tiles.py), so an
    epoch covers every pixel of every image at native resolution instead of resizing mosaics down.
    Objects a tile cuts are clipped to it, and dropped when less than `min_visible` of them is inside.
    The augmentation runs on each tile; `image_id` is the source image's (record position + 1)."""

    def __init__(
        self,
        records: list[ImageRecord],
        tile_size: int,
        overlap: int,
        min_visible: float = 0.1,
        transform: A.Compose | None = None,
        normalize: str = "range",
    ):
        super().__init__(records, transform, normalize)
        self.min_visible = min_visible
        # Only the image headers are read here; pixels are read per item.
        self.tiles = [
            (index, tile)
            for index, record in enumerate(records)
            for tile in tile_grid(*image_size(record.image_path), tile_size, overlap)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int):
        source, tile = self.tiles[index]
        record = self.records[source]
        image = load_image(record.image_path, self.normalize)  # the whole image's statistics, as inference
        masks, labels = tile_instance_masks(record, image.shape[:2], tile, self.min_visible)
        return to_sample(self.transform, image[tile.slices], masks, labels, source + 1)


def to_sample(transform, image: np.ndarray, masks: np.ndarray, labels: np.ndarray, image_id: int):
    """Augment an image with its instances and convert them to a torchvision detection sample."""
    image, masks, kept = apply_transform(transform, image, masks)
    labels = labels[kept]  # instances moved out of the image by a crop or rotation are gone
    target = {
        "boxes": torch.from_numpy(masks_to_boxes(masks)),
        "labels": torch.from_numpy(labels),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
        "image_id": image_id,
    }
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255), target


def collate(batch):
    """Detection models take lists: images differ in size and instance counts differ."""
    return tuple(zip(*batch, strict=True))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """NxHxW bool -> COCO RLEs with str counts (JSON-ready)."""
    return [
        rle_to_json(rle)
        for rle in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ]


def coco_ground_truth(dataset: InstanceDataset) -> COCO:
    """A pycocotools COCO object for the dataset's records (no augmentation), image ids as in __getitem__.
    Crowd regions stay in, flagged, so that COCOeval ignores detections matching them."""
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        height, width = image_size(record.image_path)
        images.append(
            {"id": index + 1, "file_name": str(record.image_path), "height": height, "width": width}
        )
        for rle, instance in record_rles(record, height, width):
            area = float(mask_utils.area(rle))
            if not area:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": instance.category_id,
                    "segmentation": rle_to_json(rle),
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": instance.iscrowd,
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": list(dataset.categories)}
    with quiet_pycocotools():
        coco.createIndex()
    return coco


@contextlib.contextmanager
def quiet_pycocotools():
    """Silence pycocotools' progress lines and tables.

    Redirecting sys.stdout is not enough: Ray Train workers replace builtins.print. A module-level `print`
    shadows the builtin inside pycocotools only, for the duration of the block.
    """
    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for module in modules:
            del module.print
