"""Tiles: the grid, instances clipped to tiles, and stitching per-tile detections back together."""

from dataclasses import dataclass

import numpy as np
import pytest

from datasets.errors import UserError
from datasets.instances import masks_to_boxes
from datasets.mask_folders import load_image, load_masks, read_mask_folders
from datasets.tiles import (
    Tile,
    TileDetections,
    clip_instances,
    dense_masks,
    stitch_detections,
    tile_grid,
)
from tests.helpers import SAMPLE


def test_tile_grid_hand_computed():
    # 10 wide, tiles of 4 with overlap 1: starts 0, 3, 6 (stride 3), the last one flush: 10 - 4 = 6
    assert [t.x for t in tile_grid(4, 10, 4, 1)] == [0, 3, 6]
    # 11 wide: 0, 3, 6 then 7 (the last overlaps its neighbour by 3 > 1)
    assert [t.x for t in tile_grid(4, 11, 4, 1)] == [0, 3, 6, 7]
    assert tile_grid(3, 5, (8, 8), 2) == [Tile(0, 0, 5, 3)]  # smaller than a tile: one unpadded tile
    grid = tile_grid(5, 7, (4, 3), 1)
    assert [(t.x, t.y, t.width, t.height) for t in grid] == [
        (0, 0, 3, 4), (2, 0, 3, 4), (4, 0, 3, 4), (0, 1, 3, 4), (2, 1, 3, 4), (4, 1, 3, 4),
    ]  # fmt: skip


@pytest.mark.parametrize("size", [(1, 1), (37, 50), (256, 320), (513, 257)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 0), (64, 16), ((50, 80), 30), (7, 5)])
def test_tile_grid_covers_every_pixel_with_the_asked_overlap(size, tile, overlap):
    height, width = size
    tiles = tile_grid(height, width, tile, overlap)
    cover = np.zeros(size, dtype=int)
    for t in tiles:
        assert 0 <= t.x and t.x + t.width <= width and 0 <= t.y and t.y + t.height <= height
        cover[t.slices] += 1
    assert (cover >= 1).all()
    xs, ys = sorted({t.x for t in tiles}), sorted({t.y for t in tiles})
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    for starts, tile_len, length in ((xs, tile_w, width), (ys, tile_h, height)):
        if length <= tile_len:
            assert starts == [0]
            continue
        assert starts[-1] + tile_len == length  # the last tile is aligned to the border
        gaps = np.diff(starts)
        assert (gaps[:-1] == tile_len - overlap).all()  # exactly the asked overlap ...
        assert 1 <= gaps[-1] <= tile_len - overlap  # ... and at least that before the last tile


def test_tile_grid_rejects_bad_options():
    with pytest.raises(UserError, match="tile_overlap"):
        tile_grid(100, 100, 32, 32)
    with pytest.raises(UserError, match="tile_size"):
        tile_grid(100, 100, 0, 0)


@dataclass
class TileSample:
    tile: Tile
    image: np.ndarray  # the tile's pixels, a copy
    masks: np.ndarray  # N x tile.height x tile.width bool, the kept instances clipped to the tile
    source_index: np.ndarray  # N int64: each kept instance's index in the source masks


def tile_instances(image: np.ndarray, masks: np.ndarray, tile_size, overlap: int) -> list[TileSample]:
    """Every tile of the grid with its instances clipped to it: ground truth as per-tile detections."""
    samples = []
    for tile in tile_grid(*image.shape[:2], tile_size, overlap):
        clipped, index = clip_instances(masks, tile)
        samples.append(TileSample(tile, image[tile.slices].copy(), clipped, index))
    return samples


def sample_instances(index: int = 3) -> tuple[np.ndarray, np.ndarray]:
    record = read_mask_folders(SAMPLE)[index]
    image = load_image(record.image_path)
    return image, load_masks(record, image.shape[:2])


def test_clipped_masks_equal_the_source_cropped():
    image, masks = sample_instances()
    samples = tile_instances(image, masks, tile_size=96, overlap=24)
    assert len(samples) == len(tile_grid(*image.shape[:2], 96, 24))
    for s in samples:
        np.testing.assert_array_equal(s.image, image[s.tile.slices])
        crop = masks[(slice(None), *s.tile.slices)]
        touched = np.flatnonzero(crop.any(axis=(1, 2)))
        np.testing.assert_array_equal(s.source_index, touched)  # no filter: every touched instance
        np.testing.assert_array_equal(s.masks, crop[touched])


def test_slivers_dropped_by_area_and_visible_fraction():
    masks = np.zeros((4, 10, 20), dtype=bool)
    masks[0, 2:6, 8:12] = True  # 16 px, 8 visible in the left tile (half)
    masks[1, 2:4, 9:16] = True  # 14 px, 2 visible in the left tile
    masks[2, 0:2, 0:2] = True  # 4 px wholly inside: kept however small
    masks[3, 5:9, 9:11] = True  # 8 px, 4 visible (half) but under min_area
    tile = Tile(0, 0, 10, 10)
    clipped, index = clip_instances(masks, tile, min_area=5, min_visible=0.4)
    assert index.tolist() == [0, 2]
    np.testing.assert_array_equal(clipped[0], masks[0, :, :10])
    _, index = clip_instances(masks, tile, min_area=0, min_visible=0.6)
    assert index.tolist() == [2]
    _, index = clip_instances(masks, tile)
    assert index.tolist() == [0, 1, 2, 3]


def detections_from_samples(samples) -> list[TileDetections]:
    out = []
    for s in samples:
        out.append(
            TileDetections(
                tile=s.tile,
                boxes=masks_to_boxes(s.masks),
                scores=np.linspace(1.0, 0.5, len(s.masks)),
                labels=np.ones(len(s.masks), dtype=np.int64),
                masks=s.masks,
            )
        )
    return out


def as_sorted_set(masks: np.ndarray) -> list[bytes]:
    return sorted(np.packbits(m).tobytes() for m in masks)


@pytest.mark.parametrize(("index", "tile", "overlap"), [(3, 96, 24), (0, 64, 16), (5, (100, 70), 40)])
def test_stitching_tiles_of_ground_truth_reproduces_the_instances(index, tile, overlap):
    image, masks = sample_instances(index)
    samples = tile_instances(image, masks, tile, overlap)
    stitched = stitch_detections(detections_from_samples(samples))
    dense = dense_masks(stitched, *image.shape[:2])
    assert len(dense) == len(masks)
    assert as_sorted_set(dense) == as_sorted_set(masks)
    order = np.lexsort(masks_to_boxes(dense).T[::-1])
    expected = np.lexsort(masks_to_boxes(masks).T[::-1])
    np.testing.assert_array_equal(stitched.boxes[order], masks_to_boxes(masks)[expected])


def test_stitching_keeps_neighbours_apart_and_respects_labels():
    # two objects touching across a tile border, one seen whole by both tiles
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 5:10, 10:14] = True  # inside the overlap (columns 10..19): both tiles see it whole
    masks[1, 5:10, 14:22] = True  # touching object 0, cut by the first tile
    masks[2, 12:18, 2:28] = True  # long object across both tiles
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    samples = tile_instances(image, masks, (20, 20), 10)
    detections = detections_from_samples(samples)
    stitched = stitch_detections(detections)
    assert as_sorted_set(dense_masks(stitched, 20, 30)) == as_sorted_set(masks)
    # different labels never merge unless class_agnostic
    detections[1].labels = detections[1].labels + 1
    assert len(stitch_detections(detections).scores) == 6
    assert len(stitch_detections(detections, class_agnostic=True).scores) == 3


def test_stitch_nms_keeps_the_best_piece_and_box_only_detections_merge():
    tiles = [Tile(0, 0, 20, 20), Tile(10, 0, 20, 20)]
    # the same 6x6 object at columns 12..17 seen by both tiles, scores 0.9 and 0.8
    per_tile = [
        TileDetections(tiles[0], np.array([[12.0, 2, 18, 8]]), np.array([0.9]), np.array([1])),
        TileDetections(tiles[1], np.array([[2.0, 2, 8, 8]]), np.array([0.8]), np.array([1])),
    ]
    stitched = stitch_detections(per_tile, merge="nms")
    assert stitched.masks is None
    np.testing.assert_allclose(stitched.boxes, [[12, 2, 18, 8]])
    np.testing.assert_allclose(stitched.scores, [0.9])
    per_tile[1].boxes = np.array([[8.0, 2, 14, 8]])  # now at columns 18..23: IoU in the overlap 0
    assert len(stitch_detections(per_tile).scores) == 2
    with pytest.raises(UserError, match="match_metric"):
        stitch_detections(per_tile, match_metric="dice")
