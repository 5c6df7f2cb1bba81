"""Kaggle run-length CSVs, one row per instance, "start length start length ..." with 1-based starts.

Two layouts, told apart by the header:
- dsb2018:   ImageId,EncodedPixels[,Height,Width]         one class ("nucleus"), pixels numbered
             top-to-bottom then left-to-right (column-major, the default for this layout)
- sartorius: id,annotation,width,height,cell_type[,...]   class = cell_type, pixels numbered
             left-to-right then top-to-bottom (row-major, the default for this layout)
`pixel_order` overrides the default. A run must end inside the image and inside its own column (row for
row-major): a file read in the wrong order breaks that within a few runs, so the mistake is an error, not
a scrambled mask. A row with an empty encoding is an image without instances.
Images are found by id (file stem) anywhere under the CSV's folder, masks/ folders excepted.
Written as `<dst>/annotations.csv` + `<dst>/images/`.
"""

import csv
import shutil
from pathlib import Path

import numpy as np

from datasets.coco import find_file
from datasets.errors import UserError
from datasets.records import (
    IMAGE_SUFFIXES,
    ImageRecord,
    Instance,
    dataset_categories,
    image_size,
    make_categories,
    record_rles,
    rle_box_mask,
)

ANNOTATIONS = "annotations.csv"
PIXEL_ORDERS = ("column-major", "row-major")
LAYOUTS = {
    # layout: (id, encoding, height, width, class column, default pixel order)
    "dsb2018": ("ImageId", "EncodedPixels", "Height", "Width", None, "column-major"),
    "sartorius": ("id", "annotation", "height", "width", "cell_type", "row-major"),
}


def read_rle_csv(
    path: str | Path, pixel_order: str | None = None, classes: list[str] | None = None
) -> list[ImageRecord]:
    """One record per image id, in order of first appearance; runs are checked but not decoded."""
    file = find_file(Path(path), ANNOTATIONS, "*.csv", "a run-length CSV file")
    if pixel_order not in (None, *PIXEL_ORDERS):
        raise UserError(f"pixel_order: unknown order '{pixel_order}'; valid: {', '.join(PIXEL_ORDERS)}")
    try:
        with open(file, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{file}: not a readable CSV file ({e})") from e
    if not rows:
        raise UserError(f"{file}: empty file; expected a header and one row per instance")
    header = [h.strip() for h in rows[0]]
    layout = next((n for n, cols in LAYOUTS.items() if cols[0] in header and cols[1] in header), None)
    if layout is None:
        expected = "; ".join(f"{n}: {', '.join(c for c in cols[:5] if c)}" for n, cols in LAYOUTS.items())
        raise UserError(f"{file}: header {','.join(header)} matches no run-length layout ({expected})")
    id_col, enc_col, h_col, w_col, class_col, default_order = LAYOUTS[layout]
    row_major = (pixel_order or default_order) == "row-major"
    col = {name: header.index(name) for name in (id_col, enc_col, h_col, w_col, class_col) if name in header}
    if class_col and class_col not in col:
        raise UserError(f"{file}: lacks the '{class_col}' column (the instance's class)")

    images = _image_index(file.parent)
    sizes: dict[str, tuple[int, int]] = {}
    per_image: dict[str, list] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        where = f"{file}: line {line}"
        if len(row) < len(header):
            raise UserError(f"{where}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
        image_id = row[col[id_col]].strip()
        if image_id not in sizes:
            if image_id not in images:
                raise UserError(
                    f"{where}: no image named '{image_id}' "
                    f"(any of {', '.join(IMAGE_SUFFIXES)}) under {file.parent}"
                )
            sizes[image_id] = image_size(images[image_id])
            per_image[image_id] = []
        height, width = sizes[image_id]
        if h_col in col and w_col in col:
            stated = (_int(row[col[h_col]], h_col, where), _int(row[col[w_col]], w_col, where))
            if stated != (height, width):
                raise UserError(
                    f"{where}: mask is {stated[1]}x{stated[0]} pixels but its image "
                    f"{images[image_id]} is {width}x{height}"
                )
        encoding = row[col[enc_col]].strip()
        if not encoding:
            continue
        counts = _counts(encoding, height, width, row_major, where, pixel_order or default_order, layout)
        name = row[col[class_col]].strip() if class_col else "nucleus"
        size = [width, height] if row_major else [height, width]
        per_image[image_id].append((name, {"size": size, "counts": counts}, where))

    if not per_image:
        raise UserError(f"{file}: empty dataset, no rows after the header")
    names = {name for items in per_image.values() for name, _, _ in items} or {"nucleus"}
    categories = make_categories(names, classes, str(file))
    ids = {c["name"]: c["id"] for c in categories}
    return [
        ImageRecord(
            image_id,
            images[image_id],
            instances=tuple(Instance(ids[n], seg, row_major=row_major, where=w) for n, seg, w in items),
            categories=categories,
            source=file,
        )
        for image_id, items in per_image.items()
    ]


def _image_index(folder: Path) -> dict[str, Path]:
    index = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and "masks" not in p.relative_to(folder).parts:
            index.setdefault(p.stem, p)
    return index


def _int(value: str, column: str, where: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"{where}: column {column} must be an integer, got '{value}'") from e


def _counts(
    encoding: str, height: int, width: int, row_major: bool, where: str, order: str, layout: str
) -> list[int]:
    """Kaggle (1-based start, length) pairs -> uncompressed COCO RLE counts (alternating 0s and 1s runs) in
    the file's pixel order, checking that every run lies inside the image and inside one column/row."""
    try:
        values = [int(v) for v in encoding.split()]
    except ValueError as e:
        raise UserError(f"{where}: encoded pixels must be integers 'start length ...' ({e})") from e
    if len(values) % 2:
        raise UserError(f"{where}: odd number of values in the encoded pixels; expected 'start length' pairs")
    total, line = height * width, (width if row_major else height)
    numbering = "left-to-right then top-to-bottom" if row_major else "top-to-bottom then left-to-right"
    hint = (
        f"pixels are read {order} ({numbering}, the {layout} default is {LAYOUTS[layout][5]}); "
        "is the pixel order right?"
    )
    counts, end = [], 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        start -= 1
        if length < 1 or start < end:
            raise UserError(
                f"{where}: run '{start + 1} {length}' overlaps the previous run or is not in increasing "
                "order; expected increasing starts and positive lengths"
            )
        if start + length > total:
            raise UserError(
                f"{where}: run '{start + 1} {length}' runs past the end of the {width}x{height} image "
                f"({total} pixels); {hint}"
            )
        if start // line != (start + length - 1) // line:
            raise UserError(
                f"{where}: run '{start + 1} {length}' wraps from one {'row' if row_major else 'column'} "
                f"into the next of the {width}x{height} image; {hint}"
            )
        if counts and start == end:  # touching runs (split at a line end): one run, a canonical RLE
            counts[-1] += length
        else:
            counts += [start - end, length]
        end = start + length
    if total > end:  # no trailing zero-length run: pycocotools' own RLEs end on the last run
        counts.append(total - end)
    return counts


def rle_line_runs(rle: dict, row_major: bool) -> str:
    """A COCO RLE as "start length ..." (1-based) in the given pixel order of its image, every run within
    one row (row-major) or column: found on the object's box with a blank line after each of its rows
    (columns), which no run crosses."""
    height, width = (int(v) for v in rle["size"])
    x, y, mask = rle_box_mask(rle)
    if row_major:
        padded, line, origin = np.pad(mask, ((0, 0), (0, 1))), width, y * width + x
    else:
        padded, line, origin = np.pad(mask, ((0, 1), (0, 0))).T, height, x * height + y
    flat = np.concatenate([[0], padded.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
    padded_line = padded.shape[1]  # position p of the padded box is its line p // padded_line
    starts = origin + (starts // padded_line) * line + starts % padded_line
    return " ".join(f"{s + 1} {n}" for s, n in zip(starts, lengths, strict=True))


def write_rle_csv(
    records: list[ImageRecord], dst: Path, layout: str = "dsb2018", pixel_order: str | None = None
) -> None:
    """One row per non-empty instance, or one row with an empty encoding for an image without any.
    A run that would cross a column (row) end is split there, so the file reads back in its own order."""
    if layout not in LAYOUTS:
        raise UserError(f"layout: unknown rle-csv layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    if pixel_order not in (None, *PIXEL_ORDERS):
        raise UserError(f"pixel_order: unknown order '{pixel_order}'; valid: {', '.join(PIXEL_ORDERS)}")
    categories = dataset_categories(records)
    id_col, enc_col, h_col, w_col, class_col, default_order = LAYOUTS[layout]
    if class_col is None and len(categories) > 1:
        names = ", ".join(c["name"] for c in categories)
        raise UserError(
            f"{records[0].source}: the {layout} layout holds one class but the dataset has "
            f"{len(categories)} ({names}); use layout=sartorius"
        )
    row_major = (pixel_order or default_order) == "row-major"
    names = {c["id"]: c["name"] for c in categories}
    (dst / "images").mkdir(parents=True)
    header = [id_col, enc_col, w_col, h_col] + ([class_col] if class_col else [])
    rows = []
    for record in records:
        height, width = image_size(record.image_path)
        shutil.copyfile(record.image_path, dst / "images" / f"{record.image_id}{record.image_path.suffix}")
        before = len(rows)
        for rle, instance in record_rles(record, height, width):
            runs = rle_line_runs(rle, row_major)
            if runs:
                rows.append(
                    [record.image_id, runs, width, height]
                    + ([names[instance.category_id]] if class_col else [])
                )
        if len(rows) == before:
            rows.append([record.image_id, "", width, height] + ([""] if class_col else []))
    with open(dst / ANNOTATIONS, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
