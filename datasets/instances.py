"""The common in-memory form of an instance-segmentation dataset, for torchvision detection models and
for COCO evaluation (pycocotools)."""

import contextlib
import random
from pathlib import Path

import albumentations as A
import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets.errors import UserError
from datasets.mask_folders import CATEGORIES, ImageRecord, load_image, load_masks, read_mask_folders

SAMPLE_DATA = Path(__file__).parent / "sample" / "dsb2018"

# Named so that a format can be picked by name; the datasets issue adds coco, via and rle-csv.
FORMATS = {"mask-folders": read_mask_folders}


def read_records(path: str | Path, fmt: str = "mask-folders") -> list[ImageRecord]:
    if fmt not in FORMATS:
        raise UserError(f"data_format: unknown format '{fmt}'; valid: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt](path)


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random train/validation split by image, at least one image on each side."""
    if len(records) < 2:
        raise UserError(f"{records[0].image_path.parents[2]}: need at least 2 images to split, found 1")
    order = list(records)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return sorted(order[n_val:], key=_key), sorted(order[:n_val], key=_key)


def _key(record: ImageRecord) -> str:
    return record.image_id


def augmentation(preset: str, seed: int) -> A.Compose | None:
    """Augmentation presets by name; geometric ones move image and masks together."""
    presets = {
        "none": [],
        "flips": [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
    }
    if preset not in presets:
        raise UserError(f"augment: unknown preset '{preset}'; valid: {', '.join(presets)}")
    return A.Compose(presets[preset], seed=seed) if presets[preset] else None


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Nx4 float32 boxes (x1, y1, x2, y2) in pixel-edge coordinates: a one-pixel mask is 1x1, as in COCO."""
    if len(masks) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    x2 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


class InstanceDataset(torch.utils.data.Dataset):
    """(image CxHxW float in [0, 1], target {boxes, labels, masks, image_id}) as torchvision detection
    models expect. `image_id` is the record's position + 1, the id used by `coco_ground_truth`."""

    def __init__(self, records: list[ImageRecord], transform: A.Compose | None = None):
        self.records = records
        self.transform = transform
        self.categories = CATEGORIES

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = load_image(record.image_path)
        masks = load_masks(record, image.shape[:2])
        if self.transform is not None and len(masks):
            out = self.transform(image=image, masks=list(masks))
            image, masks = out["image"], np.stack(out["masks"])
            masks = masks[masks.any(axis=(1, 2))]
        elif self.transform is not None:
            image = self.transform(image=image)["image"]
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.ones(len(masks), dtype=torch.int64),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "image_id": index + 1,
        }
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255), target


def collate(batch):
    """Detection models take lists: images differ in size and instance counts differ."""
    return tuple(zip(*batch, strict=True))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """NxHxW bool -> COCO RLEs with str counts (JSON-ready)."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_ground_truth(dataset: InstanceDataset) -> COCO:
    """A pycocotools COCO object for the dataset's records (no augmentation), image ids as in __getitem__."""
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        image = load_image(record.image_path)
        height, width = image.shape[:2]
        images.append(
            {"id": index + 1, "file_name": str(record.image_path), "height": height, "width": width}
        )
        masks = load_masks(record, (height, width))
        if not len(masks):
            continue
        rles = encode_masks(masks)
        for rle, area, box in zip(rles, mask_utils.area(rles), mask_utils.toBbox(rles), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
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
