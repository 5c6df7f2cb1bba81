"""Full-resolution mode: every epoch trains on every tile of every image at native resolution."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.instances import (
    TiledInstanceDataset,
    instance_masks,
    read_records,
    tile_instance_masks,
)
from datasets.records import ImageRecord, Instance, load_image, rle_counts, rle_crop, rle_to_json
from datasets.splits import train_val_split
from datasets.tiles import Tile, clip_instances, tile_grid
from platform.benchmarks.data import sample_mosaic_dataset, tile_targets
from tests.helpers import SAMPLE
from trainers.config import MaskRCNNConfig, apply_overrides
from trainers.detection.model import build_model
from trainers.detection.train import run_training
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe


def test_an_epoch_covers_every_pixel_of_every_image_at_native_resolution():
    records = read_records(SAMPLE)[:3]
    dataset = TiledInstanceDataset(records, tile_size=96, overlap=16, min_visible=0.0)
    covered = [np.zeros(load_image(r.image_path).shape[:2], dtype=int) for r in records]
    for index in range(len(dataset)):
        source, tile = dataset.tiles[index]
        image, target = dataset[index]
        full = load_image(records[source].image_path)
        # the tile is the source's pixels, unscaled
        np.testing.assert_array_equal(
            image.mul(255).round().byte().permute(1, 2, 0).numpy(), full[tile.slices]
        )
        assert target["image_id"] == source + 1
        covered[source][tile.slices] += 1
    assert all((c >= 1).all() for c in covered)


def test_tile_targets_are_the_clipped_instances_without_slivers():
    record = read_records(SAMPLE)[0]
    dataset = TiledInstanceDataset([record], tile_size=64, overlap=8, min_visible=0.5)
    full_masks, _ = instance_masks(record, load_image(record.image_path).shape[:2])
    areas = full_masks.sum(axis=(1, 2))
    for index in range(len(dataset)):
        _, tile = dataset.tiles[index]
        _, target = dataset[index]
        crops = full_masks[(slice(None), *tile.slices)]
        visible = crops.sum(axis=(1, 2))
        # brute force: kept = visible and (whole, or at least half of the object inside the tile)
        expected = [
            c for c, v, a in zip(crops, visible, areas, strict=True) if v and (v == a or v >= 0.5 * a)
        ]
        got = target["masks"].numpy().astype(bool)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)


def random_masks(rng, count: int, height: int, width: int) -> np.ndarray:
    """count x height x width bool: rectangles, noise, empty and full masks, reaching every border."""
    masks = np.zeros((count, height, width), dtype=bool)
    for mask in masks:
        kind = rng.integers(5)
        if kind == 0:
            mask[:] = rng.random((height, width)) < rng.random()
        elif kind == 1:
            mask[:] = True
        elif kind in (2, 3):
            y, x = rng.integers(height), rng.integers(width)
            mask[y : y + rng.integers(1, height + 1), x : x + rng.integers(1, width + 1)] = True
    return masks


def test_rle_crop_equals_pycocotools_decode_cropped():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        for mask in random_masks(rng, 5, height, width):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            np.testing.assert_array_equal(rle_counts(rle["counts"], "x").sum(), height * width)
            for tile in tile_grid(height, width, int(rng.integers(1, 25)), 0):
                for form in (rle, rle_to_json(rle)):  # bytes and str counts
                    np.testing.assert_array_equal(rle_crop(form, tile), mask[tile.slices])
                    checked += 1
    assert checked > 1000
    # uncompressed counts, and run lengths that need several characters and negative differences
    uncompressed = {"size": [3, 4], "counts": [2, 3, 0, 1, 6]}
    expected = mask_utils.decode(mask_utils.frPyObjects(uncompressed, 3, 4)).astype(bool)
    np.testing.assert_array_equal(rle_crop(uncompressed, Tile(1, 1, 3, 2)), expected[1:, 1:])
    big = np.zeros((3000, 2000), dtype=bool)
    big[5, 7], big[2990:, 1995:], big[1000:1400, 3:900] = True, True, True
    rle = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
    for tile in (Tile(1900, 2900, 100, 100), Tile(0, 0, 256, 256), Tile(700, 1200, 256, 256)):
        np.testing.assert_array_equal(rle_crop(rle, tile), big[tile.slices])


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        (b"P1", "cover 32 pixels but the 4x4 image has 16"),  # one run of 32 zeros: 0 + 0x20, then 1 << 5
        (b"4", "cover 4 pixels but the 4x4 image has 16"),  # one run of 4 zeros
        (b"", "cover 0 pixels but the 4x4 image has 16"),
        (b"0`", "pycocotools' encoding"),  # the last number is unfinished (0x20 set): rle_counts' check
        ("2\u00e9", "ASCII"),  # text from a JSON file
    ],
)
def test_malformed_rle_counts_are_a_user_error(counts, why):
    with pytest.raises(UserError, match=f"image 'x'.*{why}"):
        rle_crop({"size": [4, 4], "counts": counts}, Tile(0, 0, 4, 4), "image 'x'")


def test_tiles_of_rle_instances_are_cut_without_whole_image_masks(tmp_path):
    # COCO-like instances: overlapping, two classes, a crowd region and an empty mask (both never trained on)
    height, width = 70, 90
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 12, height, width)
    masks[3] = False
    instances = [
        Instance(
            1 + k % 2, rle_to_json(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))), iscrowd=k == 5
        )
        for k, m in enumerate(masks)
    ]
    instances.append(Instance(2, [[10.0, 10.0, 40.0, 12.0, 30.0, 50.0]]))  # a polygon
    record = ImageRecord("x", tmp_path / "x.png", instances=tuple(instances), source=tmp_path)
    full, labels = instance_masks(record, (height, width))
    # the crowd region and the empty masks are left out
    assert len(full) == sum(m.any() for k, m in enumerate(masks) if k != 5) + 1
    for tile in tile_grid(height, width, 32, 8):
        for min_visible in (0.0, 0.5):
            expected, index = clip_instances(full, tile, min_visible=min_visible)
            got, got_labels = tile_instance_masks(record, (height, width), tile, min_visible)
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(got_labels, labels[index])


def test_the_model_sees_tiles_at_scale_one():
    cfg = apply_overrides(get_recipe("dsb2018_demo"), {"tile_size": 128})
    model = build_model(cfg, num_classes=1)
    assert model.transform.min_size == (128,) and model.transform.max_size == 128


@pytest.mark.parametrize(
    ("key", "value"), [("tile_size", 16), ("tile_overlap", 128), ("tile_min_visible", 2)]
)
def test_bad_tile_fields_name_the_field(key, value):
    with pytest.raises(UserError, match=key):
        apply_overrides(MaskRCNNConfig(tile_size=128), {key: value})


def test_full_resolution_training_validates_by_tiled_inference(tiny_dataset, tmp_path):
    overrides = {
        "tile_size": 128,
        "tile_overlap": 0,
        "box_detections_per_img": 20,
        "rpn_post_nms_top_n_test": 100,
    }
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"), {"data": str(tiny_dataset), "epochs": 1, "batch_size": 2, **overrides}
    )
    seam = LocalSeam(checkpoint_dir=tmp_path / "ckpt")
    run_training(cfg, seam)
    metrics = seam.reports[0]
    train, _ = train_val_split(read_records(tiny_dataset), cfg.val_fraction, cfg.seed)
    tiles = sum(len(tile_grid(*load_image(r.image_path).shape[:2], 128, 0)) for r in train)
    assert metrics["train_images"] == tiles  # one epoch = every tile of every training image
    assert 0.0 <= metrics["segm_AP"] <= 1.0 and "kaggle_mAP" in metrics


def test_the_tile_benchmark_mosaic_holds_the_sample_nuclei_and_measures_both_paths(tmp_path):
    record = sample_mosaic_dataset(tmp_path, 384, cell=192)  # 2 x 2 cells, the last ones cut short
    sources = read_records(SAMPLE)
    masks, _ = instance_masks(record, (384, 384))
    for k, (y, x) in enumerate([(0, 0), (0, 192), (192, 0), (192, 192)]):
        source = load_image(sources[k].image_path)[:192, :192]
        height, width = source.shape[:2]
        np.testing.assert_array_equal(load_image(record.image_path)[y : y + height, x : x + width], source)
        cut = instance_masks(sources[k], load_image(sources[k].image_path).shape[:2])[0][:, :192, :192]
        cut = cut[cut.any(axis=(1, 2))]
        inside = masks[:, y : y + height, x : x + width]
        mine = inside[inside.any(axis=(1, 2))]
        assert sorted(m.tobytes() for m in mine) == sorted(m.tobytes() for m in cut)
    whole, tiled = (tile_targets(record, 128, 2, whole) for whole in (True, False))
    assert whole["tiles_per_s"] > 0 and tiled["tiles_per_s"] > 0
    assert tiled["peak_mib"] < whole["peak_mib"]  # one tile's masks instead of every nucleus' whole mask
