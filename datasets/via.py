"""VGG Image Annotator (VIA 1.x / 2.x) JSON, the foraminifera format: one polygon region per object,
its class in `region_attributes.category`:

    {"<filename><size>": {"filename": "a.png", "size": 1234, "file_attributes": {},
        "regions": [{"shape_attributes": {"name": "polygon", "all_points_x": [...], "all_points_y": [...]},
                     "region_attributes": {"category": "2"}}]}}

Read: that dict-keyed export, a list of such entries, or a VIA project file (`_via_img_metadata`, whose
`_via_attributes` dropdown options name and order the classes); `regions` as a list (VIA 2) or a dict
keyed by index (VIA 1); polygon and rect shapes. Images are looked up beside the JSON file or in its
`images/` folder (VIA stores no image size, so it comes from the image header).
Written as `<dst>/via_region_data.json` with the images beside it. VIA has one polygon per region and no
crowd flag: a mask is written as the outline of its largest connected part (pixel edges, exact for a
mask without holes), a crowd region as an ordinary one.
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from datasets.coco import field, find_file, load_json
from datasets.errors import UserError
from datasets.records import (
    ImageRecord,
    Instance,
    check_polygon,
    dataset_categories,
    image_size,
    make_categories,
    record_rles,
    resolve_image,
    rle_box_mask,
)

ANNOTATIONS = "via_region_data.json"
ATTRIBUTE = "category"


def read_via(path: str | Path, classes: list[str] | None = None) -> list[ImageRecord]:
    """One record per VIA file entry, in the file's order; polygons are checked but not rasterised."""
    file = find_file(Path(path), ANNOTATIONS, "*.json", "a VIA annotation JSON file")
    data = load_json(file)
    options = {}
    if isinstance(data, dict) and "_via_img_metadata" in data:
        options = _class_options(data, file)
        data = field(data, "_via_img_metadata", str(file), dict)
    if isinstance(data, dict):
        entries = list(data.values())
    elif isinstance(data, list):
        entries = data
    else:
        raise UserError(f"{file}: expected a VIA JSON object or list of image entries")

    parsed = []  # (entry where, filename, [(region where, polygon, class name)])
    for i, entry in enumerate(entries):
        where = f"{file}: entry {i}"
        filename = field(entry, "filename", where, str)
        where = f"{file}: '{filename}'"
        regions = field(entry, "regions", where, (list, dict))
        if isinstance(regions, dict):  # VIA 1.x: {"0": region, "1": region, ...}
            regions = [regions[k] for k in sorted(regions, key=_region_order)]
        shapes = []
        for k, region in enumerate(regions):
            rwhere = f"{where}, region {k}"
            shape = field(region, "shape_attributes", rwhere, dict)
            attrs = field(region, "region_attributes", rwhere, dict)
            if ATTRIBUTE not in attrs:
                raise UserError(f"{rwhere}: lacks region_attributes.{ATTRIBUTE} (the object's class)")
            value = attrs[ATTRIBUTE]
            if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
                raise UserError(
                    f"{rwhere}: region_attributes.{ATTRIBUTE} must be a class name, got {str(value)[:40]!r}"
                )
            name = options.get(str(value), str(value))
            shapes.append((rwhere, _points(shape, rwhere), name))
        parsed.append((where, filename, shapes))

    names = {name for _, _, shapes in parsed for _, _, name in shapes}
    if options and not classes:
        classes = list(dict.fromkeys(options.values()))
    categories = make_categories(names, classes, str(file))
    ids = {c["name"]: c["id"] for c in categories}
    records, seen = [], set()
    for where, filename, shapes in parsed:
        image_path = resolve_image(file.parent, filename, where)
        height, width = image_size(image_path)
        instances = tuple(
            Instance(ids[name], [check_polygon(points, height, width, rwhere)], where=rwhere)
            for rwhere, points, name in shapes
        )
        image_id = Path(filename).stem
        if image_id in seen:
            raise UserError(f"{where}: image listed twice (or two files with the stem '{image_id}')")
        seen.add(image_id)
        records.append(
            ImageRecord(image_id, image_path, instances=instances, categories=categories, source=file)
        )
    if not records:
        raise UserError(f"{file}: empty dataset, no image entries")
    return records


def _class_options(project: dict, file: Path) -> dict[str, str]:
    """A VIA project's dropdown options of the region class attribute, {stored value: class name}."""
    node, path = project, []
    for key in ("_via_attributes", "region", ATTRIBUTE, "options"):
        node, path = node.get(key) or {}, [*path, key]
        if not isinstance(node, dict):
            raise UserError(f"{file}: {'.'.join(path)} must be a JSON object, got {type(node).__name__}")
    bad = next((k for k, v in node.items() if isinstance(v, bool) or not isinstance(v, str | int)), None)
    if bad is not None:
        raise UserError(f"{file}: {'.'.join(path)}['{bad[:40]}'] must be a class name")
    return {k: str(v) for k, v in node.items()}


def _region_order(key: str):
    """VIA 1.x region keys in numeric order ("2" before "10"), any other keys after them by name."""
    return (0, int(key), "") if key.isdecimal() else (1, 0, key)


def _points(shape: dict, where: str) -> list:
    """A flat [x1, y1, ...] list from a polygon or rect region."""
    kind = shape.get("name")
    if kind in ("polygon", "polyline"):
        xs = field(shape, "all_points_x", where + ", shape_attributes", list)
        ys = field(shape, "all_points_y", where + ", shape_attributes", list)
        if len(xs) != len(ys):
            raise UserError(f"{where}: all_points_x has {len(xs)} values but all_points_y has {len(ys)}")
        return [v for xy in zip(xs, ys, strict=True) for v in xy]
    if kind == "rect":
        x, y, w, h = (
            field(shape, k, where + ", shape_attributes", (int, float)) for k in ("x", "y", "width", "height")
        )
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    raise UserError(f"{where}: shape '{kind}' is not supported; expected a polygon or rect region")


def mask_outline(rle: dict) -> list[float]:
    """The largest connected part of a mask as a polygon along pixel edges [x1, y1, ...]; pycocotools
    rasterises it back to exactly that part. Traced on a lattice of pixel corners and centres (2x+1)."""
    x, y, crop = rle_box_mask(rle)  # the object's box only: a mosaic's masks are each the mosaic's size
    h, w = crop.shape
    lattice = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)  # 1-cell margin: findContours skips the border
    lattice[2:-1:2, 2:-1:2] = crop
    lattice = cv2.dilate(lattice, np.ones((3, 3), np.uint8))  # each pixel covers its corners and edges
    contours, _ = cv2.findContours(lattice, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    largest = max(contours, key=cv2.contourArea).reshape(-1, 2)
    points = (largest - 1) / 2 + (x, y)
    return [int(v) if float(v).is_integer() else float(v) for v in points.ravel()]


def write_via(records: list[ImageRecord], dst: Path) -> None:
    categories = dataset_categories(records)
    names = {c["id"]: c["name"] for c in categories}
    dst.mkdir(parents=True)
    out = {}
    for record in records:
        height, width = image_size(record.image_path)
        filename = f"{record.image_id}{record.image_path.suffix}"
        shutil.copyfile(record.image_path, dst / filename)
        regions = []
        for rle, instance in record_rles(record, height, width):
            if not mask_utils.area(rle):
                continue
            seg = instance.segmentation
            single = isinstance(seg, list) and len(seg) == 1 and not instance.row_major
            points = seg[0] if single else mask_outline(rle)  # a single polygon goes through as read
            regions.append(
                {
                    "shape_attributes": {
                        "name": "polygon",
                        "all_points_x": list(points[0::2]),
                        "all_points_y": list(points[1::2]),
                    },
                    "region_attributes": {ATTRIBUTE: names[instance.category_id]},
                }
            )
        size = (dst / filename).stat().st_size
        out[f"{filename}{size}"] = {
            "filename": filename,
            "size": size,
            "regions": regions,
            "file_attributes": {},
        }
    (dst / ANNOTATIONS).write_text(json.dumps(out) + "\n")
