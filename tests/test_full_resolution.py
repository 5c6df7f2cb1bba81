"""Full-resolution mode: every epoch trains on every tile of every image at native resolution."""

import numpy as np
import pytest

from datasets.errors import UserError
from datasets.instances import TiledInstanceDataset, instance_masks, read_records
from datasets.records import load_image
from datasets.splits import train_val_split
from datasets.tiles import tile_grid
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
