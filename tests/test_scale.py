"""Object-size rescaling at inference (trainers/detection/scale.py): the diameter estimate of hand-drawn
discs, when an image is (and is not) shrunk, instances mapped back exactly as scikit-image upsamples a mask,
and predict_image with `object_diameter` finding large objects at the size the detector knows."""

from dataclasses import replace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from skimage.draw import disk
from skimage.transform import resize

from datasets.errors import UserError
from datasets.instances import encode_masks
from tests.helpers import ThresholdDetector
from trainers.config import MaskRCNNConfig, apply_overrides
from trainers.detection.inference import predict_image
from trainers.detection.refine import refine_results
from trainers.detection.scale import (
    REACH,
    estimate_diameter,
    inference_scale,
    rescale_image,
    restore_results,
)


def discs(shape: tuple[int, int], radius: float, centres: list[tuple[int, int]]) -> tuple[np.ndarray, list]:
    """A dark uint8 image with bright discs, and each disc's bool mask."""
    image = np.full(shape, 20, dtype=np.uint8)
    masks = []
    for centre in centres:
        mask = np.zeros(shape, dtype=bool)
        mask[disk(centre, radius, shape=shape)] = True
        image[mask] = 200
        masks.append(mask)
    return image, masks


def test_the_estimate_is_the_median_equivalent_diameter_of_the_objects():
    image, masks = discs((200, 240), 12, [(30, 30), (30, 100), (100, 60), (150, 180)])
    extra, extra_masks = discs((200, 240), 20, [(150, 80)])
    image = np.maximum(image, extra)
    areas = sorted(int(m.sum()) for m in masks + extra_masks)
    expected = np.sqrt(4 * areas[2] / np.pi)  # the middle of five, by hand
    assert estimate_diameter(image) == pytest.approx(expected)
    assert estimate_diameter(np.dstack([image] * 3)) == pytest.approx(expected)  # RGB: the same objects
    assert estimate_diameter(np.zeros((50, 50), dtype=np.uint8)) == 0.0  # flat: nothing to measure


def test_only_clearly_larger_objects_shrink_the_image():
    big, _ = discs((240, 240), 22.5, [(60, 60), (60, 170), (170, 110)])  # diameter ~45
    factor = inference_scale(big, 15.0)
    assert factor == pytest.approx(REACH * 15.0 / estimate_diameter(big))  # shrunk to REACH x 15 px
    assert factor == pytest.approx(REACH * 15.0 / 45, abs=0.02)  # by hand: the discs are ~45 px across
    assert inference_scale(big, 0.0) == 1.0  # off
    assert inference_scale(big, 45.0 / REACH + 1) == 1.0  # within reach: left as it is
    small, _ = discs((240, 240), 3, [(60, 60), (60, 170)])  # smaller than trained: never upsampled
    assert inference_scale(small, 15.0) == 1.0


def test_restored_masks_are_scikit_images_upsampling_of_the_small_ones():
    rng = np.random.default_rng(0)
    small_shape, shape = (23, 31), (70, 95)  # non-integer factors, different per axis
    small = np.zeros((3, *small_shape), dtype=bool)
    small[0, 2:9, 3:12] = True
    small[1, 10:22, 20:31] = True  # touches the bottom and right edges
    small[2] = rng.random(small_shape) > 0.8  # ragged, many pieces
    results = [
        {"image_id": 1, "category_id": 2, "score": 0.9 - i / 10, "segmentation": rle}
        for i, rle in enumerate(encode_masks(small))
    ]
    restored = restore_results(results, small_shape, shape)
    assert len(restored) == 3
    for result, mask in zip(restored, small, strict=True):
        expected = resize(mask.astype(float), shape, order=1, mode="edge", anti_aliasing=False) >= 0.5
        ours = mask_utils.decode(result["segmentation"]).astype(bool)
        assert np.array_equal(ours, expected)
        rows, cols = np.flatnonzero(expected.any(axis=1)), np.flatnonzero(expected.any(axis=0))
        box = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]  # xywh by hand
        assert result["bbox"] == [float(v) for v in box]
        assert result["category_id"] == 2
    assert [r["score"] for r in restored] == [r["score"] for r in results]


def test_predict_image_shrinks_large_objects_to_the_trained_size():
    centres = [(50, 50), (50, 190), (180, 60), (190, 200)]
    image, masks = discs((260, 260), 24, centres)  # 48 px objects
    cfg = MaskRCNNConfig(object_diameter=8.0)  # reach 8 x REACH px: the 48 px discs shrink 3-4x
    detector = ThresholdDetector(level=0.5)
    calls = []
    original_forward = detector.forward
    detector.forward = lambda images: calls.append(images[0].shape) or original_forward(images)
    results = predict_image(detector, image, "cpu", cfg=cfg, categories=[{"id": 1, "name": "nucleus"}])
    assert max(calls[0][1:]) < 100  # the model saw the image shrunk 3-4x
    found = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1).astype(bool)
    assert found.shape == (4, 260, 260)  # back at the image's own size
    for mask in masks:
        ious = [(mask & f).sum() / (mask | f).sum() for f in found]
        assert max(ious) > 0.9
    unscaled = predict_image(detector, image, "cpu", cfg=cfg, object_diameter=0.0)
    assert len(unscaled) == 4 and calls[-1][1:] == (260, 260)


def test_masks_of_a_shrunk_image_are_refined_as_deep_as_it_was_shrunk():
    image, masks = discs((260, 260), 24, [(50, 50), (50, 190), (180, 60), (190, 200)])  # Otsu: the discs
    cfg = MaskRCNNConfig(object_diameter=8.0, mask_refine="otsu")
    categories = [{"id": 1, "name": "nucleus"}]
    results = predict_image(ThresholdDetector(level=0.5), image, "cpu", cfg=cfg, categories=categories)
    assert sorted(mask_utils.area([r["segmentation"] for r in results])) == sorted(m.sum() for m in masks)
    for mask in masks:
        assert any(np.array_equal(mask_utils.decode(r["segmentation"]), mask) for r in results)
    # the outlines came back off by more than the 1 px a full-size image's refinement moves
    unrefined = predict_image(
        ThresholdDetector(level=0.5), image, "cpu", cfg=replace(cfg, mask_refine="off"), categories=categories
    )
    one_px = mask_utils.decode([r["segmentation"] for r in refine_results(unrefined, image * 1.0, "otsu")])
    assert not all(any(np.array_equal(found, m) for m in masks) for found in one_px.transpose(2, 0, 1))


def test_rescale_image_keeps_the_value_range_and_channels():
    image = np.zeros((100, 80, 3), dtype=np.uint16)
    image[20:60, 10:50] = 40000
    small = rescale_image(image, 0.5)
    assert small.shape == (50, 40, 3) and small.dtype == np.float32
    assert small.max() == pytest.approx(40000, rel=1e-3)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_object_diameter_must_be_a_size(value):
    with pytest.raises(UserError, match="object_diameter"):
        apply_overrides(MaskRCNNConfig(), {"object_diameter": value})
