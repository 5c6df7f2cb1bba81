"""Mask refinement (trainers/detection/refine.py): the column RLE codec against pycocotools, and the
refined masks against a whole-image reference written with pycocotools and scipy, on hand-made images."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from trainers.detection.baseline import foreground
from trainers.detection.refine import decode_columns, encode_columns, refine_results


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def result(mask: np.ndarray, score: float = 0.9) -> dict:
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": rle(mask), "bbox": box}


def disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def diamond(shape, centre, radius) -> np.ndarray:
    """|dy| + |dx| <= radius: one step of the cross-shaped dilation (or erosion) moves its edge 1 px."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.abs(yy - centre[0]) + np.abs(xx - centre[1]) <= radius


@pytest.mark.parametrize("seed", range(6))
def test_column_codec_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 40, size=2)
    mask = rng.random((height, width)) < rng.choice([0.05, 0.5, 0.95])
    mask[0, 0] = seed % 2 == 0  # a mask that starts with a foreground pixel, or not
    x0 = int(rng.integers(0, width))
    x1 = int(rng.integers(x0 + 1, width + 1))
    assert np.array_equal(decode_columns(rle(mask), x0, x1), mask[:, x0:x1])
    only = np.zeros_like(mask)
    only[:, x0:x1] = mask[:, x0:x1]
    encoded = encode_columns(mask[:, x0:x1], x0, width)
    assert np.array_equal(mask_utils.decode(encoded), only)
    assert encoded == rle(only)  # the same compressed string pycocotools writes


def reference(mask: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """The refinement on whole-image arrays: the 1-px band around the outline takes the foreground."""
    near = ndimage.binary_dilation(mask)
    core = ndimage.binary_erosion(mask)
    new = ndimage.binary_fill_holes((near & fg) | core)
    pieces, count = ndimage.label(new)
    if count > 1:
        new = pieces == 1 + np.argmax(np.bincount(pieces.ravel())[1:])
    return new if new.any() else mask


def test_outlines_move_one_pixel_towards_the_foreground_and_no_further():
    shape = (64, 80)
    truth = [diamond(shape, (20, 20), 10), diamond(shape, (40, 58), 12)]
    grey = np.where(truth[0] | truth[1], 200.0, 30.0)
    short = diamond(shape, (20, 20), 9)  # one pixel inside the object's edge
    wide = diamond(shape, (40, 58), 15)  # three pixels beyond it
    refined = refine_results([result(short), result(wide)], grey, "otsu")
    first, second = (mask_utils.decode(r["segmentation"]).astype(bool) for r in refined)
    assert np.array_equal(first, truth[0])  # hand-computed: the missing ring is the band
    assert np.array_equal(second, diamond(shape, (40, 58), 14))  # the band is 1 px: 15 -> 14, not 12
    for before, after in zip((short, wide), (first, second), strict=True):
        assert np.array_equal(after, reference(before, grey > 115))
    # a box grows to hold its grown mask; a shrunk mask keeps the model's box
    assert [r["bbox"] for r in refined] == [result(truth[0])["bbox"], result(wide)["bbox"]]
    assert refine_results([result(short)], grey, "off")[0]["segmentation"] == rle(short)


@pytest.mark.parametrize(("scale", "band"), [(1.0, 1), (0.5, 2), (1 / 3, 3), (0.4, 3)])
def test_an_image_shrunk_for_the_model_is_refined_as_many_pixels_deeper(scale, band):
    shape = (64, 64)
    truth = diamond(shape, (32, 32), 16)
    grey = np.where(truth, 200.0, 30.0)
    short = diamond(shape, (32, 32), 11)  # 5 px inside the object's edge: each band pixel wins one back
    refined = refine_results([result(short)], grey, "otsu", scale)[0]
    assert np.array_equal(mask_utils.decode(refined["segmentation"]), diamond(shape, (32, 32), 11 + band))


def test_random_masks_agree_with_the_whole_image_reference():
    rng = np.random.default_rng(7)
    shape = (50, 70)
    blobs = ndimage.gaussian_filter(rng.random(shape), 3)
    grey = (blobs - blobs.min()) / np.ptp(blobs) * 255
    fg = foreground(grey)
    masks = []
    for _ in range(12):
        centre = rng.integers(0, shape)
        masks.append(disk(shape, centre, rng.integers(2, 9)) & (rng.random(shape) < 0.97))
    refined = refine_results([result(m) for m in masks if m.any()], grey, "otsu")
    for m, r in zip([m for m in masks if m.any()], refined, strict=True):
        assert np.array_equal(mask_utils.decode(r["segmentation"]).astype(bool), reference(m, fg))


def test_a_mask_the_threshold_would_empty_keeps_its_pixels():
    grey = np.zeros((20, 20))
    grey[:2] = 255  # the only foreground, far from the mask
    mask = np.zeros((20, 20), bool)
    mask[12, 11:13] = True  # eroded to nothing, no foreground near it
    assert refine_results([result(mask)], grey, "otsu")[0]["segmentation"] == rle(mask)
