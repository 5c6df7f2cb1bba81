"""COCO instances JSON: {"images": [{id, file_name, width, height}], "annotations": [{id, image_id,
category_id, segmentation, iscrowd}], "categories": [{id, name}]}; segmentation is polygons or an RLE.

Read from a JSON file, or a folder holding `annotations.json` (or one *.json); images are looked up beside
the JSON file or in its `images/` folder. Written as `<dst>/annotations.json` + `<dst>/images/`.
Category ids are renumbered 1..K in the order of the file's ids; names are kept.
"""

import json
import shutil
from pathlib import Path

from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.records import (
    ImageRecord,
    Instance,
    check_polygon,
    check_rle,
    dataset_categories,
    image_size,
    is_integer,
    make_categories,
    record_rles,
    resolve_image,
    rle_to_json,
)

ANNOTATIONS = "annotations.json"


def find_file(path: Path, default: str, pattern: str, what: str) -> Path:
    """The annotation file: `path` itself, or `default` in the folder, or the folder's only `pattern` file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: not found (expected {what} or a folder holding one)")
    if (path / default).is_file():
        return path / default
    found = sorted(path.glob(pattern))
    if len(found) != 1:
        raise UserError(
            f"{path}: expected {what} ({default}, or a single {pattern} file) but found "
            f"{len(found) or 'no'} {pattern} file(s)"
        )
    return found[0]


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a JSON text file ({e})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def field(obj, key: str, where: str, kind=None):
    """obj[key], a UserError naming `where` and `key` when obj is not a dict holding it or the value is
    not of `kind` (a type or tuple of types; a JSON true/false is never an int here)."""
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{where}: lacks the '{key}' field")
    value = obj[key]
    if kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _annotation_where(file: Path, ann, index: int) -> str:
    """How a message names an annotation: by its id when that is a short number or name, else by index."""
    ident = ann.get("id") if isinstance(ann, dict) else None
    if isinstance(ident, bool) or not isinstance(ident, int | str) or len(str(ident)) > 40:
        return f"{file}: annotations[{index}]"
    return f"{file}: annotation {ident}"


def _image_sizes(file: Path, images: list) -> dict[int, tuple[int, int]]:
    """image id -> (height, width) as the file states them, each entry's fields checked."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(images):
        where = f"{file}: images[{i}]"
        image_id = field(image, "id", where, int)
        if image_id in sizes:
            raise UserError(f"{where}: image id {image_id} is used twice; expected one entry per image")
        sizes[image_id] = (field(image, "height", where, int), field(image, "width", where, int))
        if min(sizes[image_id]) < 1:
            raise UserError(f"{where}: height and width must be positive, got {sizes[image_id]}")
        field(image, "file_name", where, str)
    return sizes


def read_coco(path: str | Path, classes: list[str] | None = None) -> list[ImageRecord]:
    """One record per image, in the file's order; annotations are checked but not rasterised."""
    file = find_file(Path(path), ANNOTATIONS, "*.json", "a COCO instances JSON file")
    data = load_json(file)
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a COCO JSON object with images, annotations and categories")
    images = field(data, "images", str(file), list)
    annotations = field(data, "annotations", str(file), list)
    coco_categories = field(data, "categories", str(file), list)
    names = {}
    for i, cat in enumerate(coco_categories):
        where = f"{file}: categories[{i}]"
        names[field(cat, "id", where, int)] = str(field(cat, "name", where))
    if len(set(names.values())) != len(names):
        raise UserError(f"{file}: category names are not unique: {sorted(names.values())}")
    if classes:
        categories = make_categories(names.values(), classes, str(file))
    else:  # the file's order of ids, renumbered 1..K
        categories = tuple({"id": i + 1, "name": names[old]} for i, old in enumerate(sorted(names)))
    by_name = {c["name"]: c["id"] for c in categories}
    new_id = {old: by_name[name] for old, name in names.items()}

    sizes = _image_sizes(file, images)
    per_image: dict[int, list[Instance]] = {image_id: [] for image_id in sizes}
    for i, ann in enumerate(annotations):
        where = _annotation_where(file, ann, i)
        image_id = field(ann, "image_id", where, int)
        if image_id not in sizes:
            raise UserError(f"{where}: image_id {image_id} is not in 'images'")
        category = field(ann, "category_id", where, int)
        if category not in new_id:
            valid = ", ".join(f"{k} ({v})" for k, v in sorted(names.items()))
            raise UserError(f"{where}: unknown category_id {category}; expected one of: {valid}")
        seg = field(ann, "segmentation", where, (list, dict))
        height, width = sizes[image_id]
        if isinstance(seg, list):
            if not seg:
                raise UserError(f"{where}: segmentation is empty; expected polygons or an RLE")
            if not all(isinstance(p, list) for p in seg):
                raise UserError(f"{where}: segmentation must be a list of polygons [[x1, y1, x2, y2, ...]]")
            seg = [check_polygon(p, height, width, f"{where}, polygon {k}") for k, p in enumerate(seg)]
        else:
            check_rle(seg, height, width, where)
        iscrowd = ann.get("iscrowd", 0)
        if not is_integer(iscrowd) or iscrowd not in (0, 1):
            raise UserError(f"{where}: field 'iscrowd' must be 0 or 1, got {str(iscrowd)[:40]}")
        per_image[image_id].append(Instance(new_id[category], seg, iscrowd, where=where))

    records, seen = [], set()
    for image in images:
        where = f"{file}: image {image['id']} ('{image['file_name'][:200]}')"
        image_path = resolve_image(file.parent, image["file_name"], where)
        actual = image_size(image_path)
        if actual != sizes[image["id"]]:
            h, w = sizes[image["id"]]
            raise UserError(
                f"{where}: annotations say {w}x{h} pixels but {image_path} is {actual[1]}x{actual[0]}"
            )
        image_id = Path(image["file_name"]).stem
        if image_id in seen:
            image_id = f"{image_id}-{image['id']}"
        seen.add(image_id)
        records.append(
            ImageRecord(
                image_id,
                image_path,
                instances=tuple(per_image[image["id"]]),
                categories=categories,
                source=file,
            )
        )
    if not records:
        raise UserError(f"{file}: empty dataset, 'images' is empty")
    return records


def write_coco(records: list[ImageRecord], dst: Path) -> None:
    """Polygons are written as read (no loss); every other mask as a compressed RLE. Empty masks are left
    out; area and bbox come from pycocotools."""
    categories = dataset_categories(records)
    (dst / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, record in enumerate(records):
        height, width = image_size(record.image_path)
        file_name = f"{record.image_id}{record.image_path.suffix}"
        shutil.copyfile(record.image_path, dst / "images" / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        for rle, instance in record_rles(record, height, width):
            area = float(mask_utils.area(rle))
            if not area:
                continue
            polygons = isinstance(instance.segmentation, list) and not instance.row_major
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": instance.category_id,
                    "segmentation": instance.segmentation if polygons else rle_to_json(rle),
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": instance.iscrowd,
                }
            )
    data = {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
    (dst / ANNOTATIONS).write_text(json.dumps(data) + "\n")
