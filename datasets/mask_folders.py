"""Instance-mask folders, the 2018 Data Science Bowl layout.

<root>/<ImageId>/images/<ImageId>.png   the image (RGBA with a constant alpha, grey or RGB)
<root>/<ImageId>/masks/<k>.png          one binary mask per instance; masks may overlap
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.errors import UserError

LAYOUT = "mask-folders layout: <id>/images/<id>.png and <id>/masks/*.png"
CATEGORIES = ({"id": 1, "name": "nucleus"},)


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    image_path: Path
    mask_paths: tuple[Path, ...]


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
        records.append(ImageRecord(folder.name, image_path, masks))
    if not records:
        raise UserError(f"{root}: empty dataset, no image folders found (expected the {LAYOUT})")
    return records


def _open(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from e


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB: alpha dropped, grey replicated, 16-bit grey scaled by its own range."""
    arr = _open(path)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] in (2, 4):  # LA or RGBA: the alpha channel carries no signal
        arr = arr[..., :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def load_masks(record: ImageRecord, shape: tuple[int, int]) -> np.ndarray:
    """NxHxW bool, one plane per non-empty mask file (empty masks carry no instance)."""
    planes = []
    for path in record.mask_paths:
        mask = _open(path)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != shape:
            raise UserError(
                f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels "
                f"but its image is {shape[1]}x{shape[0]}"
            )
        if mask.any():
            planes.append(mask > 0)
    return np.stack(planes) if planes else np.zeros((0, *shape), dtype=bool)
