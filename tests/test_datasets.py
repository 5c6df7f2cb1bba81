"""The mask-folders sample as a training dataset: images, masks, boxes, COCO ground truth, flips, the
seeded split and error messages that name the file."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.augment import augmentation
from datasets.errors import UserError
from datasets.instances import (
    InstanceDataset,
    coco_ground_truth,
    masks_to_boxes,
    read_records,
    split_records,
)
from datasets.mask_folders import load_image, load_masks
from tests.helpers import SAMPLE, SHARED_DATA

OVERLAPPING = "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9"


def test_sample_reads_as_rgb_with_one_mask_per_file():
    records = read_records(SAMPLE)
    assert len(records) == 24
    for record in records[:5]:
        image = load_image(record.image_path)
        with Image.open(record.image_path) as raw:
            assert raw.mode == "RGBA"  # the alpha channel is dropped, not blended
            np.testing.assert_array_equal(image, np.asarray(raw)[..., :3])
        masks = load_masks(record, image.shape[:2])
        assert len(masks) == len(record.mask_paths) and masks.dtype == bool


def test_overlapping_masks_are_kept():
    record = next(r for r in read_records(SAMPLE) if r.image_id == OVERLAPPING)
    masks = load_masks(record, load_image(record.image_path).shape[:2])
    assert (masks.sum(axis=0) > 1).any()


def test_boxes_match_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((30, 40, 50)) > 0.995  # sparse random pixels: many 1-pixel-wide boxes
    masks[0] = False
    masks[0, 7, 9] = True  # a single pixel is a 1x1 box
    masks = masks[masks.any(axis=(1, 2))]
    ours = masks_to_boxes(masks)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ref = mask_utils.toBbox(rles)  # x, y, w, h
    np.testing.assert_allclose(ours[:, :2], ref[:, :2])
    np.testing.assert_allclose(ours[:, 2:] - ours[:, :2], ref[:, 2:])
    np.testing.assert_array_equal(masks_to_boxes(np.zeros((1, 5, 5), bool)[:0]), np.zeros((0, 4)))


def test_dataset_items_and_coco_ground_truth_agree():
    records = read_records(SAMPLE)[:3]
    dataset = InstanceDataset(records)
    gt = coco_ground_truth(dataset)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[target["image_id"]]))
        assert len(anns) == len(target["masks"]) == len(target["boxes"])
        areas = sorted(a["area"] for a in anns)
        assert areas == sorted(target["masks"].sum(dim=(1, 2)).tolist())
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_flips_move_masks_with_the_image():
    records = read_records(SAMPLE)[:1]
    plain = InstanceDataset(records)[0]
    flipped = InstanceDataset(records, augmentation("flips", seed=3))
    for _ in range(4):
        image, target = flipped[0]
        for dims in ([], [2], [1], [1, 2]):
            if image.equal(plain[0].flip(dims) if dims else plain[0]):
                expected = plain[1]["masks"].flip(dims) if dims else plain[1]["masks"]  # N, H, W like C, H, W
                assert target["masks"].sum() == expected.sum()
                assert {m.numpy().tobytes() for m in target["masks"]} == {
                    m.numpy().tobytes() for m in expected
                }
                break
        else:
            pytest.fail("augmented image is not a flip of the original")


def test_split_is_seeded_and_disjoint():
    records = read_records(SAMPLE)
    train, val = split_records(records, 0.25, seed=1)
    assert len(val) == 6 and len(train) == 18
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    assert split_records(records, 0.25, seed=1) == (train, val)
    assert split_records(records, 0.25, seed=2) != (train, val)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="data folder not found"):
        read_records(tmp_path / "missing")
    with pytest.raises(UserError, match="empty dataset"):
        read_records(tmp_path)
    with pytest.raises(UserError, match="unknown format 'nope'"):
        read_records(tmp_path, "nope")
    folder = tmp_path / "img1"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.new("RGB", (8, 6)).save(folder / "images" / "img1.png")
    Image.new("L", (5, 5), 255).save(folder / "masks" / "m.png")
    record = read_records(tmp_path)[0]
    with pytest.raises(UserError, match=r"m.png: mask is 5x5 pixels but its image is 8x6"):
        load_masks(record, (6, 8))
    (folder / "masks" / "m.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"m.png: not a readable image"):
        load_masks(record, (6, 8))


@pytest.mark.skipif(not (SHARED_DATA / "dsb2018").is_dir(), reason="../shared/data not present")
def test_reads_the_full_shared_dsb2018_subset():
    records = read_records(SHARED_DATA / "dsb2018" / "stage1_train")
    assert len(records) == 200
    assert sum(len(r.mask_paths) for r in records) == 8648


def test_folder_written_atomically(tmp_path):
    from datasets.records import folder_written_atomically

    dst = tmp_path / "out"
    with folder_written_atomically(dst) as work:
        work.mkdir()
        (work / "a.txt").write_text("one")
        assert not dst.exists()  # nothing at the destination until the block ends
    assert (dst / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with folder_written_atomically(dst) as work:
            work.mkdir()
            (work / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (dst / "a.txt").read_text() == "one"  # the failed write left the old folder as it was
    with folder_written_atomically(dst) as work:
        work.mkdir()
        (work / "b.txt").write_text("two")
    assert [p.name for p in dst.iterdir()] == ["b.txt"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_atomic_writes_get_the_permissions_a_plain_write_gets(tmp_path):
    from datasets.records import write_bytes_atomic

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")  # open(): 0666 less the umask, as every tool the user has writes
    written = write_bytes_atomic(tmp_path / "atomic.txt", b"x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
