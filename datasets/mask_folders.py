"""Instance-mask folders, the 2018 Data Science Bowl layout (one class, "nucleus").

<root>/<ImageId>/images/<ImageId>.png   the image (RGBA with a constant alpha, grey or RGB)
<root>/<ImageId>/masks/<k>.png          one binary mask per instance; masks may overlap
"""

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.records import (
    ImageRecord,
    image_size,
    load_image,
    load_mask_file,
    open_image,
    record_rles,
    single_class,
)

__all__ = ["CATEGORIES", "LAYOUT", "ImageRecord", "load_image", "load_masks", "read_mask_folders"]

LAYOUT = "mask-folders layout: <id>/images/<id>.png and <id>/masks/*.png"
CATEGORIES = ({"id": 1, "name": "nucleus"},)


def read_mask_folders(root: str | Path) -> list[ImageRecord]:
    """One record per `<id>` folder, sorted by id; raises UserError for a missing or empty layout."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found (expected the {LAYOUT})")
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image_path = folder / "images" / f"{folder.name}.png"
        if not image_path.is_file():
            raise UserError(f"{image_path}: image not found (expected the {LAYOUT})")
        mask_dir = folder / "masks"
        masks = tuple(sorted(mask_dir.glob("*.png"))) if mask_dir.is_dir() else ()
        records.append(ImageRecord(folder.name, image_path, masks, categories=CATEGORIES, source=root))
    if not records:
        raise UserError(f"{root}: empty dataset, no image folders found (expected the {LAYOUT})")
    return records


def load_masks(record: ImageRecord, shape: tuple[int, int]) -> np.ndarray:
    """NxHxW bool, one plane per non-empty mask file (empty masks carry no instance)."""
    planes = [m for m in (load_mask_file(p, shape) for p in record.mask_paths) if m.any()]
    return np.stack(planes) if planes else np.zeros((0, *shape), dtype=bool)


def write_mask_folders(records: list[ImageRecord], dst: Path) -> None:
    """Write the layout under `dst`. It holds one class and no crowd flag: several classes are an error,
    crowd regions become ordinary masks, empty masks are left out."""
    single_class(records, "mask-folders", "convert to coco, via or rle-csv instead")
    for record in records:
        folder = dst / record.image_id
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        image_path = folder / "images" / f"{record.image_id}.png"
        if record.image_path.suffix.lower() == ".png":
            shutil.copyfile(record.image_path, image_path)
        else:
            Image.fromarray(open_image(record.image_path)).save(image_path)
        height, width = image_size(record.image_path)
        for k, (rle, _) in enumerate(record_rles(record, height, width)):
            mask = mask_utils.decode(rle)
            if mask.any():
                Image.fromarray(mask * np.uint8(255)).save(folder / "masks" / f"{k:04d}.png")
