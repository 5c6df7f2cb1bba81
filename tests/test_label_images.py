"""The label-images format (Cellpose/StarDist `_masks` pairs, images/ + labels/ folders): RLEs checked
against pycocotools on dense masks, label images against hand-computed ones and numpy references, round
trips through the other converters, and bad files named in one-line errors."""

import re

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.instances import FORMATS, convert, guess_format, instance_masks, read_records, write_records
from datasets.label_images import (
    label_dtype,
    labels_from_rles,
    read_label_image,
    rles_from_labels,
    write_label_image,
)
from datasets.records import ImageRecord, Instance, image_size, record_rles, rle_to_json
from datasets.summary import summarize
from tests.helpers import SAMPLE, run_cli, sample_subset
from tests.test_cli_errors import _assert_user_error


def _encode(mask: np.ndarray) -> dict:
    return rle_to_json(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def _cellpose_folder(root):
    """Two images with known labels: a.tif (16-bit grey) + a_masks.png (uint8), b.png (RGB) + b_masks.tif
    (uint16, values 3, 7, 300), and Cellpose by-products that are not images. Returns {name: labels}."""
    root.mkdir()
    rng = np.random.default_rng(1)
    a = np.zeros((12, 9), dtype=np.uint8)
    a[1:4, 2:6], a[6:11, 0:3], a[8, 8] = 1, 2, 5  # the last pixel of a column, a one-pixel object
    tifffile.imwrite(root / "a.tif", rng.integers(0, 4000, a.shape).astype(np.uint16))
    Image.fromarray(a).save(root / "a_masks.png")
    b = np.zeros((20, 30), dtype=np.uint16)
    b[0:5, 0:4], b[3:9, 10:25], b[15:20, 25:30] = 3, 300, 7  # touching the first and the last pixel
    b[4, 3] = 300  # one object's pixel inside another's box
    Image.fromarray(rng.integers(0, 255, (*b.shape, 3)).astype(np.uint8)).save(root / "b.png")
    tifffile.imwrite(root / "b_masks.tif", b)
    tifffile.imwrite(root / "b_flows.tif", np.zeros((3, *b.shape), dtype=np.float32))  # Cellpose output
    (root / "notes.json").write_text("{}")
    return {"a": a, "b": b}


def test_registered_and_guessed(tmp_path):
    assert "label-images" in FORMATS
    _cellpose_folder(tmp_path / "cp")
    assert guess_format(tmp_path / "cp") == "label-images"  # though it holds a JSON file
    assert guess_format(SAMPLE) == "mask-folders"
    yolo = tmp_path / "yolo"  # images/ + labels/*.txt is YOLO, not label images
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "labels" / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UserError, match="cannot tell the format"):
        guess_format(yolo)


def test_rles_from_labels_equal_pycocotools_on_dense_masks():
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        values = np.array([0, 1, 2, 9, 70000, 4_000_000_000], dtype=np.uint32)
        labels = values[rng.integers(0, len(values), (height, width))]
        labels[0, 0], labels[-1, -1] = 9, 70000  # runs that start at the first and end at the last pixel
        out = rles_from_labels(labels)
        assert [v for v, _ in out] == [int(v) for v in np.unique(labels) if v]
        for value, rle in out:
            assert rle == _encode(labels == value), (trial, value)
    assert rles_from_labels(np.zeros((4, 3), dtype=np.uint16)) == []


def test_labels_from_rles_earlier_wins():
    first = np.zeros((4, 5), dtype=bool)
    first[1:3, 1:4] = True
    second = np.zeros((4, 5), dtype=bool)
    second[0:2, 3:5] = True  # overlaps `first` at (1, 3)
    hidden = np.zeros((4, 5), dtype=bool)
    hidden[2, 2] = True  # inside `first`: no pixel left
    last = np.zeros((4, 5), dtype=bool)
    last[3, 4] = True  # the image's last pixel
    expected = np.array(
        [
            [0, 0, 0, 2, 2],
            [0, 1, 1, 1, 2],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 0, 4],
        ]
    )
    uncompressed = {"size": [4, 5], "counts": [19, 1]}  # `last` as run lengths
    bytes_counts = mask_utils.encode(np.asfortranarray(second.astype(np.uint8)))
    rles = [_encode(first), bytes_counts, _encode(hidden), uncompressed]
    labels = labels_from_rles(rles, 4, 5)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)


def test_labels_from_rles_matches_a_dense_reference():
    rng = np.random.default_rng(3)
    masks = rng.random((30, 17, 23)) < 0.2
    labels = labels_from_rles([_encode(m) for m in masks], 17, 23)
    reference = np.zeros((17, 23), dtype=np.int64)
    for k in range(len(masks) - 1, -1, -1):  # painted last to first, so the earlier one ends on top
        reference[masks[k]] = k + 1
    np.testing.assert_array_equal(labels, reference)


def test_label_dtype():
    assert label_dtype(0) == label_dtype(65535) == np.uint16
    assert label_dtype(65536) == label_dtype(2**32 - 1) == np.uint32
    with pytest.raises(ValueError, match="do not fit"):
        label_dtype(2**32)


def test_write_and_read_label_image(tmp_path):
    labels = np.arange(70000, dtype=np.uint32).reshape(280, 250)
    write_label_image(tmp_path / "x.tif", labels)
    back = read_label_image(tmp_path / "x.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]  # no temporary file left


def _smaller_wins(masks: np.ndarray) -> np.ndarray:
    """The masks as label images keep them: a pixel belongs to the smallest mask covering it (the
    earlier of equal areas)."""
    areas = masks.reshape(len(masks), -1).sum(1)
    rank = np.argsort(areas, kind="stable")
    owner = np.full(masks.shape[1:], -1)
    for k in rank[::-1]:  # largest first, so the smallest ends on top
        owner[masks[k]] = k
    return np.stack([owner == k for k in range(len(masks))])


def test_mask_folders_round_trip(tmp_path):
    root = sample_subset(tmp_path / "src", 3)
    convert(root, tmp_path / "labels", "mask-folders", "label-images")
    source, back = read_records(root), read_records(tmp_path / "labels", "label-images")
    assert [r.image_id for r in back] == [r.image_id for r in source]
    assert back[0].categories == ({"id": 1, "name": "object"},)
    for a, b in zip(source, back, strict=True):
        assert b.image_path.read_bytes() == a.image_path.read_bytes()  # copied, not re-encoded
        shape = image_size(a.image_path)
        original, _ = instance_masks(a, shape)
        masks, _ = instance_masks(b, shape)
        assert len(masks) == len(original) > 0  # label k is the k-th instance
        np.testing.assert_array_equal(masks, _smaller_wins(original))

    convert(tmp_path / "labels", tmp_path / "coco", "label-images", "coco")
    via_coco = read_records(tmp_path / "coco", "coco")
    for a, b in zip(back, via_coco, strict=True):
        height, width = image_size(a.image_path)
        assert [rle["counts"] for rle, _ in record_rles(a, height, width)] == [
            rle["counts"] for rle, _ in record_rles(b, height, width)
        ]


def _records(tmp_path, instances, categories=({"id": 1, "name": "cell"},)):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(image)
    return [ImageRecord("img", image, instances=instances, categories=categories, source=tmp_path)]


def test_writer_smaller_wins_and_skips_crowds(tmp_path):
    big, small, crowd = (np.zeros((8, 10), dtype=bool) for _ in range(3))
    big[1:7, 1:7] = True
    small[3:5, 5:9] = True  # half inside `big`
    crowd[0, :] = True
    instances = (
        Instance(1, _encode(big)),
        Instance(1, _encode(crowd), iscrowd=1),
        Instance(1, _encode(small)),
    )
    write_records(_records(tmp_path, instances), tmp_path / "out", "label-images")
    labels = tifffile.imread(tmp_path / "out" / "labels" / "img.tif")
    expected = np.zeros((8, 10), dtype=np.uint16)
    expected[big] = 1
    expected[small] = 2  # smaller: keeps the overlap; the crowd region is not an instance
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["img.png"]


def test_cellpose_layout(tmp_path):
    known = _cellpose_folder(tmp_path / "cp")
    records = read_records(tmp_path / "cp", "label-images", category="nucleus")
    assert [r.image_id for r in records] == ["a", "b"]  # the _flows file is not an image
    assert records[0].categories == ({"id": 1, "name": "nucleus"},)
    for record in records:
        labels = known[record.image_id]
        counts = np.bincount(labels.ravel())
        values = np.flatnonzero(counts[1:]) + 1
        height, width = labels.shape
        areas = [int(mask_utils.area(rle)) for rle, _ in record_rles(record, height, width)]
        assert areas == counts[values].tolist()
    masks, classes = instance_masks(records[1], (20, 30))
    np.testing.assert_array_equal(masks[2], known["b"] == 300)  # values in increasing order: 3, 7, 300
    assert classes.tolist() == [1, 1, 1]


def test_folder_layout_reads_png_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    labels = np.zeros((6, 7), dtype=np.uint16)
    labels[1:3, 1:3], labels[4:6, 2:7] = 1000, 2
    Image.fromarray(np.zeros((6, 7, 3), dtype=np.uint8)).save(tmp_path / "images" / "x.jpg")
    Image.fromarray(labels).save(tmp_path / "labels" / "x.png")  # 16-bit PNG
    assert guess_format(tmp_path) == "label-images"
    (record,) = read_records(tmp_path, "label-images")
    masks, _ = instance_masks(record, (6, 7))
    np.testing.assert_array_equal(masks, np.stack([labels == 2, labels == 1000]))


def _bad_folder(tmp_path, write_mask, shape=(20, 30)):
    root = tmp_path / "bad"
    root.mkdir()
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(root / "b.png")
    write_mask(root)
    return root


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GOOD = np.arange(600, dtype=np.uint16).reshape(20, 30)
BAD_MASKS = {
    "float": (
        lambda r: tifffile.imwrite(r / "b_masks.tif", GOOD.astype(np.float32)),
        "b_masks.tif",
        "float32",
    ),
    "rgb": (lambda r: Image.new("RGB", (30, 20)).save(r / "b_masks.png"), "b_masks.png", "3 channels"),
    "negative": (
        lambda r: tifffile.imwrite(r / "b_masks.tif", -GOOD.astype(np.int16)),
        "b_masks.tif",
        "negative",
    ),
    "shape": (lambda r: tifffile.imwrite(r / "b_masks.tif", GOOD[:10, :10]), "b_masks.tif", "10x10 pixels"),
    "missing": (lambda r: None, "b.png", "no label image b_masks.tif"),
    "truncated-tif": (
        lambda r: (
            tifffile.imwrite(r / "b_masks.tif", GOOD, compression="zlib"),
            _truncated(r / "b_masks.tif"),
        ),
        "b_masks.tif",
        "truncated or corrupt",
    ),
    "truncated-png": (
        lambda r: (Image.fromarray(GOOD).save(r / "b_masks.png"), _truncated(r / "b_masks.png")),
        "b_masks.png",
        "not a readable image",
    ),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_bad_label_images_are_named(tmp_path, case):
    write_mask, name, what = BAD_MASKS[case]
    root = _bad_folder(tmp_path, write_mask)
    with pytest.raises(UserError, match=re.escape(str(root / name))) as error:
        read_records(root, "label-images")
    assert what in str(error.value)
    if case == "shape":  # both files and both sizes
        assert str(root / "b.png") in str(error.value) and "is 30x20" in str(error.value)


def test_folder_layout_missing_label_and_two_classes(tmp_path):
    (tmp_path / "pairs" / "images").mkdir(parents=True)
    (tmp_path / "pairs" / "labels").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "pairs" / "images" / "y.png")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "pairs" / "images" / "y.png"))):
        read_records(tmp_path / "pairs", "label-images")
    two = ({"id": 1, "name": "cell"}, {"id": 2, "name": "debris"})
    with pytest.raises(UserError, match=r"label-images holds one class .* \(cell, debris\)"):
        write_records(_records(tmp_path, (), two), tmp_path / "out", "label-images")
    assert not (tmp_path / "out").exists()


def test_cli_failed_conversion_writes_nothing_and_inspect_guesses(tmp_path):
    root = _bad_folder(tmp_path, BAD_MASKS["truncated-tif"][0])
    _assert_user_error(
        run_cli("platform.data", "convert", str(root), str(tmp_path / "out"), "--from", "label-images",
                "--to", "coco"),
        str(root / "b_masks.tif"),
    )  # fmt: skip
    two = ({"id": 1, "name": "cell"}, {"id": 2, "name": "debris"})
    write_records(_records(tmp_path, (), two), tmp_path / "coco", "coco")
    _assert_user_error(
        run_cli("platform.data", "convert", str(tmp_path / "coco"), str(tmp_path / "out"), "--from", "coco",
                "--to", "label-images"),
        "cell, debris",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "coco", "img.png"]
    _cellpose_folder(tmp_path / "cp")
    out = run_cli("platform.data", "inspect", str(tmp_path / "cp"), "--plot", str(tmp_path / "cp.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(label-images)" in out.stdout and "object" in out.stdout


def test_images_of_over_255_instances_are_written_and_summarised(tmp_path):
    # pycocotools' area() of a list of more than 255 RLEs raises OverflowError under numpy 2 (it builds its
    # result from the count as uint8); DSB2018 images hold up to ~375 nuclei, mosaics thousands
    labels = np.arange(1, 301, dtype=np.uint16).repeat(4).reshape(30, 40)  # 300 objects of 4 pixels
    labels[:, :2] = 0
    masks = labels[None] == np.arange(1, 301, dtype=np.uint16)[:, None, None]
    masks = masks[masks.any(axis=(1, 2))]
    instances = tuple(Instance(1, _encode(m)) for m in masks)
    records = _records(tmp_path, instances)
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(records[0].image_path)
    write_records(records, tmp_path / "out", "label-images")
    written = tifffile.imread(tmp_path / "out" / "labels" / "img.tif")
    assert len(np.unique(written)) - 1 == len(masks) > 255
    summary = summarize(records)
    assert summary["instances"] == len(masks) and summary["overlap_pixels"] == 0
