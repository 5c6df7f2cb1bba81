"""Every annotation format reads, writes and round-trips real nucleus data; masks are compared as
pycocotools RLEs (identical RLEs are identical masks); bad input gives messages naming file and place."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.instances import (
    FORMATS,
    InstanceDataset,
    coco_ground_truth,
    convert,
    read_records,
    write_records,
)
from datasets.records import Instance, image_size, instance_rle, load_image, record_rles, rle_to_json
from datasets.rle_csv import rle_line_runs
from tests.helpers import SAMPLE, SHARED_DATA, sample_subset

CSV_WRITES = [
    ({"layout": "dsb2018"}, {}),  # column-major, the layout's default
    ({"layout": "dsb2018", "pixel_order": "row-major"}, {"pixel_order": "row-major"}),
    ({"layout": "sartorius"}, {}),  # row-major, the layout's default
    ({"layout": "sartorius", "pixel_order": "column-major"}, {"pixel_order": "column-major"}),
]


def _subset(tmp_path, n=5):
    root = tmp_path / "src"
    sample_subset(root, n)
    return root


def _rles(records) -> dict:
    """image id -> [(compressed RLE counts, category name, iscrowd)] of the non-empty instances."""
    out = {}
    for record in records:
        names = {c["id"]: c["name"] for c in record.categories}
        height, width = image_size(record.image_path)
        out[record.image_id] = [
            (rle["counts"], names[inst.category_id], inst.iscrowd)
            for rle, inst in record_rles(record, height, width)
            if mask_utils.area(rle)
        ]
    return out


def _round_trip_identical(root, tmp_path, csv_writes):
    reference = _rles(read_records(root))
    assert sum(map(len, reference.values())) > 50
    convert(root, tmp_path / "coco", "mask-folders", "coco")
    assert _rles(read_records(tmp_path / "coco", "coco")) == reference
    for i, (write_options, read_options) in enumerate(csv_writes):
        csv_dir, back = tmp_path / f"csv{i}", tmp_path / f"coco{i}"
        convert(tmp_path / "coco", csv_dir, "coco", "rle-csv", write_options=write_options)
        convert(csv_dir, back, "rle-csv", "coco", read_options=read_options)
        assert _rles(read_records(back, "coco")) == reference, write_options


def _via_round_trip(root, tmp_path):
    source = read_records(root)
    write_records(source, tmp_path / "coco", "coco")
    convert(tmp_path / "coco", tmp_path / "via", "coco", "via")
    convert(tmp_path / "via", tmp_path / "back", "via", "coco")
    before, after = read_records(tmp_path / "coco", "coco"), read_records(tmp_path / "back", "coco")
    assert [r.image_id for r in before] == [r.image_id for r in after]
    worst = 1.0
    for a, b in zip(before, after, strict=True):
        h, w = image_size(a.image_path)
        ra, rb = record_rles(a, h, w), record_rles(b, h, w)
        assert len(ra) == len(rb)
        assert [i.category_id for _, i in ra] == [i.category_id for _, i in rb]
        iou = np.diag(np.asarray(mask_utils.iou([r for r, _ in rb], [r for r, _ in ra], [0] * len(ra))))
        worst = min(worst, float(iou.min()))
    assert worst >= 0.9
    return worst


def test_registry_lists_every_format():
    assert set(FORMATS) == {"coco", "via", "mask-folders", "rle-csv", "label-images"}
    valid = "coco, label-images, mask-folders, rle-csv, via"
    with pytest.raises(UserError, match=f"unknown format 'nope'; valid: {valid}"):
        read_records(SAMPLE, "nope")
    with pytest.raises(UserError, match="mask-folders: unknown read option 'classes'; valid: "):
        read_records(SAMPLE, "mask-folders", classes=["a"])


def test_mask_folders_coco_rle_csv_round_trip_is_identical(tmp_path):
    _round_trip_identical(_subset(tmp_path), tmp_path, CSV_WRITES)


def test_coco_via_coco_keeps_every_instance(tmp_path):
    # the pixel-edge outline rasterises back exactly for masks without holes
    assert _via_round_trip(_subset(tmp_path), tmp_path) > 0.99


def test_coco_to_mask_folders_round_trip(tmp_path):
    root = _subset(tmp_path, 3)
    convert(root, tmp_path / "coco", "mask-folders", "coco")
    convert(tmp_path / "coco", tmp_path / "folders", "coco", "mask-folders")
    assert _rles(read_records(tmp_path / "folders")) == _rles(read_records(root))


def _multiclass_coco(tmp_path, n=3):
    """Sample nuclei relabelled as two classes (by size) in a COCO file, one of them a crowd region."""
    records = read_records(SAMPLE)[:n]
    write_records(records, tmp_path / "one", "coco")
    data = json.loads((tmp_path / "one" / "annotations.json").read_text())
    data["categories"] = [{"id": 7, "name": "small"}, {"id": 3, "name": "large"}]
    for ann in data["annotations"]:
        ann["category_id"] = 7 if ann["area"] < 150 else 3
    data["annotations"][0]["iscrowd"] = 1
    (tmp_path / "one" / "annotations.json").write_text(json.dumps(data))
    return tmp_path / "one", data


def test_labels_come_from_classes_and_crowds_are_honoured(tmp_path):
    path, data = _multiclass_coco(tmp_path)
    records = read_records(path, "coco")
    # ids renumbered 1..K in the order of the file's ids: 3 (large) -> 1, 7 (small) -> 2
    assert records[0].categories == ({"id": 1, "name": "large"}, {"id": 2, "name": "small"})
    dataset = InstanceDataset(records)
    assert dataset.categories == records[0].categories
    expected = [2 if a["category_id"] == 7 else 1 for a in data["annotations"] if a["image_id"] == 1]
    _, target = dataset[0]
    assert target["labels"].tolist() == expected[1:]  # the crowd region is not a training target
    gt = coco_ground_truth(dataset)
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    assert [a["category_id"] for a in anns] == expected and anns[0]["iscrowd"] == 1
    # a fixed class list sets the ids; via and rle-csv (sartorius) keep the classes
    fixed = read_records(path, "coco", classes=["small", "large"])
    assert [c["name"] for c in fixed[0].categories] == ["small", "large"]
    for fmt, options in (("via", {}), ("rle-csv", {"layout": "sartorius"})):
        write_records(records, tmp_path / fmt, fmt, **options)
        back = read_records(tmp_path / fmt, fmt)
        assert back[0].categories == records[0].categories
        assert [i.category_id for i in back[0].instances] == expected
    with pytest.raises(UserError, match="mask-folders holds one class but the dataset has 2 .large, small."):
        write_records(records, tmp_path / "folders", "mask-folders")
    assert not (tmp_path / "folders").exists()


def _tiny_image(folder, name="a.png", size=(8, 6)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 80, 120)).save(folder / name)
    return folder / name


def _via_region(xs, ys, category="1"):
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
        "region_attributes": {"category": category},
    }


def test_via_layouts(tmp_path):
    _tiny_image(tmp_path)
    square, tri = _via_region([1, 4, 4, 1], [1, 1, 4, 4], "2"), _via_region([5, 8, 5], [0, 0, 3], "10")
    layouts = {
        "dict.json": {"a.png123": {"filename": "a.png", "size": 123, "regions": [square, tri]}},
        "list.json": [{"filename": "a.png", "regions": [square, tri]}],
        "via1.json": {"a.png123": {"filename": "a.png", "regions": {"0": square, "1": tri}}},
    }
    for name, data in layouts.items():
        (tmp_path / name).write_text(json.dumps(data))
        (record,) = read_records(tmp_path / name, "via")
        assert [c["name"] for c in record.categories] == ["2", "10"]  # numeric order, not text order
        assert [i.category_id for i in record.instances] == [1, 2]
        rle, _ = record_rles(record, 6, 8)[0]
        assert mask_utils.area(rle) == 9 and list(mask_utils.toBbox(rle)) == [1, 1, 3, 3]
    project = {
        "_via_img_metadata": layouts["dict.json"],
        "_via_attributes": {"region": {"category": {"options": {"10": "benthic", "2": "planktic"}}}},
    }
    (tmp_path / "project.json").write_text(json.dumps(project))
    (record,) = read_records(tmp_path / "project.json", "via")
    assert [c["name"] for c in record.categories] == ["benthic", "planktic"]
    assert [i.category_id for i in record.instances] == [2, 1]


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def _coco(tmp_path, segmentation, **image):
    _tiny_image(tmp_path)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6, **image}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": segmentation}],
        "categories": [{"id": 1, "name": "cell"}],
    }
    return _write_json(tmp_path / "annotations.json", data)


def test_bad_coco(tmp_path):
    square = [[1, 1, 4, 1, 4, 4, 1, 4]]
    path = _coco(tmp_path, square)
    path.write_text('{"images": [')
    with pytest.raises(UserError, match=r"annotations.json: not valid JSON \(line 1, column 13"):
        read_records(tmp_path, "coco")
    _write_json(path, {"images": [], "annotations": []})
    with pytest.raises(UserError, match=r"annotations.json: lacks the 'categories' field"):
        read_records(tmp_path, "coco")
    _write_json(path, {"images": [], "annotations": [], "categories": []})
    with pytest.raises(UserError, match=r"annotations.json: empty dataset"):
        read_records(tmp_path, "coco")
    _coco(tmp_path, [[1, 1, 4, 1]])
    with pytest.raises(
        UserError, match=r"annotation 5, polygon 0: polygon has 2 point\(s\); expected at least 3"
    ):
        read_records(tmp_path, "coco")
    _coco(tmp_path, [[1, 1, 40, 1, 4, 4]])
    with pytest.raises(
        UserError, match=r"annotation 5, polygon 0: polygon point \(40, 1\) is outside the 8x6 image"
    ):
        read_records(tmp_path, "coco")
    _coco(tmp_path, {"size": [6, 8], "counts": [3, 50]})
    with pytest.raises(UserError, match=r"annotation 5: RLE counts cover 53 pixels but the 8x6 image has 48"):
        read_records(tmp_path, "coco")
    too_long = mask_utils.encode(np.asfortranarray(np.ones((6, 10), np.uint8)))["counts"].decode()
    _coco(tmp_path, {"size": [6, 8], "counts": too_long})
    with pytest.raises(UserError, match=r"annotation 5: RLE counts cover 60 pixels but the 8x6 image has 48"):
        read_records(tmp_path, "coco")
    _coco(tmp_path, {"size": [5, 5], "counts": [25]})
    with pytest.raises(UserError, match=r"annotation 5: mask is 5x5 pixels but its image is 8x6"):
        read_records(tmp_path, "coco")
    _coco(tmp_path, square, width=10)
    with pytest.raises(
        UserError, match=r"image 1 \('a.png'\): annotations say 10x6 pixels but .*a.png is 8x6"
    ):
        read_records(tmp_path, "coco")
    data = json.loads(_coco(tmp_path, square).read_text())
    data["annotations"][0]["category_id"] = 9
    _write_json(path, data)
    with pytest.raises(UserError, match=r"annotation 5: unknown category_id 9; expected one of: 1 \(cell\)"):
        read_records(tmp_path, "coco")
    _coco(tmp_path, square)
    with pytest.raises(
        UserError, match=r"annotations.json: unknown class name\(s\) 'cell'; expected one of: a, b"
    ):
        read_records(tmp_path, "coco", classes=["a", "b"])
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(UserError, match=r"a.png: not a readable image, expected a PNG, JPEG or TIFF"):
        read_records(tmp_path, "coco")
    (tmp_path / "a.png").unlink()
    with pytest.raises(UserError, match=r"image 1 \('a.png'\): image 'a.png' not found"):
        read_records(tmp_path, "coco")


def test_bad_via(tmp_path):
    _tiny_image(tmp_path)
    path = tmp_path / "via_region_data.json"
    entry = {"filename": "a.png", "regions": [_via_region([1, 4, 4], [1, 1, 4]), _via_region([1, 2], [1, 1])]}
    _write_json(path, {"a": entry})
    with pytest.raises(UserError, match=r"'a.png', region 1: polygon has 2 point\(s\); expected at least 3"):
        read_records(tmp_path, "via")
    entry["regions"][1] = _via_region([1, 4, 4], [1, 1, 9])
    _write_json(path, {"a": entry})
    with pytest.raises(
        UserError, match=r"'a.png', region 1: polygon point \(4, 9\) is outside the 8x6 image"
    ):
        read_records(tmp_path, "via")
    entry["regions"][1] = _via_region([1, 4, 4], [1, 1, 4], "forams")
    _write_json(path, {"a": entry})
    with pytest.raises(UserError, match=r"unknown class name\(s\) 'forams'; expected one of: 1, 2"):
        read_records(tmp_path, "via", classes=["1", "2"])
    del entry["regions"][1]["region_attributes"]["category"]
    _write_json(path, {"a": entry})
    with pytest.raises(UserError, match=r"'a.png', region 1: lacks region_attributes.category"):
        read_records(tmp_path, "via")
    _write_json(path, {"a": {"filename": "a.png"}})
    with pytest.raises(UserError, match=r"via_region_data.json: 'a.png': lacks the 'regions' field"):
        read_records(tmp_path, "via")
    _write_json(path, {})
    with pytest.raises(UserError, match=r"via_region_data.json: empty dataset"):
        read_records(tmp_path, "via")


def _csv(tmp_path, text):
    _tiny_image(tmp_path / "images")
    (tmp_path / "annotations.csv").write_text(text)
    return tmp_path


def test_bad_rle_csv(tmp_path):
    path = _csv(tmp_path, "ImageId,EncodedPixels,Height,Width\na,1 3 10 2,6,8\n")
    (record,) = read_records(path, "rle-csv")
    assert mask_utils.area(record_rles(record, 6, 8)[0][0]) == 5
    _csv(tmp_path, "ImageId,EncodedPixels,Height,Width\na,1 3,6,8\na,46 5,6,8\n")
    with pytest.raises(
        UserError, match=r"annotations.csv: line 3: run '46 5' runs past the end of the 8x6 image"
    ):
        read_records(path, "rle-csv")
    _csv(tmp_path, "ImageId,EncodedPixels,Height,Width\na,5 4,6,8\n")  # 5..8 wraps out of column 1
    with pytest.raises(
        UserError, match=r"line 2: run '5 4' wraps from one column into the next.*pixel order"
    ):
        read_records(path, "rle-csv")
    (record,) = read_records(path, "rle-csv", pixel_order="row-major")  # within row 1 when row-major
    assert list(mask_utils.toBbox(record_rles(record, 6, 8)[0][0])) == [4, 0, 4, 1]
    _csv(tmp_path, "ImageId,EncodedPixels,Height,Width\na,1 3,5,8\n")
    with pytest.raises(UserError, match=r"line 2: mask is 8x5 pixels but its image .*a.png is 8x6"):
        read_records(path, "rle-csv")
    _csv(tmp_path, "id,annotation,width,height,cell_type\na,1 3,8,6,astro\n")
    with pytest.raises(UserError, match=r"unknown class name\(s\) 'astro'; expected one of: cort, shsy5y"):
        read_records(path, "rle-csv", classes=["cort", "shsy5y"])
    _csv(tmp_path, "id,annotation,width,height,cell_type\nb,1 3,8,6,astro\n")
    with pytest.raises(UserError, match=r"line 2: no image named 'b'"):
        read_records(path, "rle-csv")
    _csv(tmp_path, "id,annotation,width,height,cell_type\n")
    with pytest.raises(UserError, match=r"annotations.csv: empty dataset"):
        read_records(path, "rle-csv")
    _csv(tmp_path, "name,pixels\na,1 3\n")
    with pytest.raises(UserError, match=r"header name,pixels matches no run-length layout"):
        read_records(path, "rle-csv")


def test_truncated_image_and_mask_size(tmp_path):
    root = _subset(tmp_path, 2)
    record = read_records(root)[1]
    data = record.image_path.read_bytes()
    record.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"{record.image_id}.png: not a readable image.*truncated"):
        InstanceDataset([record])[0]
    with pytest.raises(UserError, match=r"not a readable image.*truncated"):
        load_image(record.image_path)
    record.image_path.write_bytes(data)  # whole again: a conversion checks every image first
    Image.new("L", (5, 5), 255).save(record.mask_paths[0])
    with pytest.raises(UserError, match=rf"{record.mask_paths[0].name}: mask is 5x5 pixels but its image is"):
        convert(root, tmp_path / "out", "mask-folders", "coco")


def test_failed_conversion_leaves_no_output(tmp_path):
    root = _subset(tmp_path, 3)
    last = read_records(root)[-1]
    Image.new("L", (5, 5), 255).save(last.mask_paths[-1])  # the last image fails, after two were written
    for fmt in FORMATS:
        with pytest.raises(UserError, match="mask is 5x5 pixels"):
            convert(root, tmp_path / "out" / fmt, "mask-folders", fmt)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(UserError, match="already exists"):
        convert(root, root, "mask-folders", "coco")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "dsb2018").is_dir(), reason="../shared/data not present")
def test_round_trips_on_the_full_shared_dsb2018_subset(tmp_path):
    root = SHARED_DATA / "dsb2018" / "stage1_train"
    _round_trip_identical(root, tmp_path, CSV_WRITES[:3])
    _via_round_trip(root, tmp_path / "via")


def _line_runs_by_brute_force(mask: np.ndarray, row_major: bool) -> str:
    """Every pixel in the file's order; a run ends at a gap or at the end of a row (column)."""
    flat = mask.ravel(order="C" if row_major else "F")
    line = mask.shape[1] if row_major else mask.shape[0]
    runs, start = [], None
    for p, value in enumerate(flat):
        if value and start is None:
            start = p
        if start is not None and (not value or p % line == 0 and p != start):
            runs.append((start, p - start))
            start = p if value else None
    if start is not None:
        runs.append((start, len(flat) - start))
    return " ".join(f"{s + 1} {n}" for s, n in runs)


def test_rle_csv_runs_equal_brute_force():
    rng = np.random.default_rng(5)
    for trial in range(150):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        mask = rng.random((height, width)) < rng.choice([0.0, 0.3, 0.9, 1.0])
        if trial % 3 == 0:  # across column and row ends: the bottom of one column and the top of the next
            mask[:] = False
            mask[-1, : width // 2], mask[0, 1 : width // 2 + 1] = True, True
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        for row_major in (False, True):
            assert rle_line_runs(rle, row_major) == _line_runs_by_brute_force(mask, row_major)


def test_row_major_rles_are_transposed_exactly():
    """Sartorius CSVs number pixels row by row: the reader's RLE is of the transposed mask, turned into the
    image's own column-major RLE on the object's box; pycocotools' encode of the mask is the reference."""
    rng = np.random.default_rng(7)
    for trial in range(120):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((height, width)) < rng.choice([0.0, 0.2, 0.8, 1.0])
        if trial % 4 == 0:
            mask[:] = False
            y, x = rng.integers(height), rng.integers(width)
            mask[y : y + int(rng.integers(1, 9)), x : x + int(rng.integers(1, 9))] = True
        transposed = mask_utils.encode(np.asfortranarray(mask.T.astype(np.uint8)))
        instance = Instance(1, rle_to_json(transposed), row_major=True)
        assert instance_rle(instance, height, width) == mask_utils.encode(
            np.asfortranarray(mask.astype(np.uint8))
        )
