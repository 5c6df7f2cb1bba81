"""The dataset summary's counts against dense brute force."""

from itertools import combinations

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.records import ImageRecord, Instance, rle_ious, rle_to_json
from datasets.summary import summarize, union_area


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def random_masks(rng, count: int, height: int, width: int) -> np.ndarray:
    """Rectangles and blobs that overlap, nest, repeat and touch edge to edge; some empty."""
    masks = np.zeros((count, height, width), dtype=bool)
    for k, mask in enumerate(masks):
        y, x = rng.integers(height), rng.integers(width)
        mask[y : y + rng.integers(1, 12), x : x + rng.integers(1, 12)] = True
        if k % 7 == 3:
            mask[:] = False
        elif k % 7 == 5:
            mask[:] = masks[k - 1]  # a repeat
        elif k % 7 == 6:
            mask[:, : width // 2] &= rng.random((height, width // 2)) < 0.5
    return masks


def test_overlaps_equal_dense_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    records, truth = [], {"overlap_pixels": 0, "overlapping_pairs": 0, "images_with_overlap": 0}
    for index in range(12):
        height, width = (int(v) for v in rng.integers(8, 40, 2))
        masks = random_masks(rng, int(rng.integers(0, 40)), height, width)
        image = tmp_path / f"{index}.png"
        Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(image)
        instances = tuple(Instance(1, rle_to_json(_rle(m))) for m in masks)
        records.append(ImageRecord(str(index), image, instances=instances, source=tmp_path))
        filled = masks[masks.any(axis=(1, 2))]
        extra = int(np.maximum(filled.sum(axis=0) - 1, 0).sum())
        truth["overlap_pixels"] += extra
        truth["images_with_overlap"] += extra > 0
        truth["overlapping_pairs"] += sum((a & b).any() for a, b in combinations(filled, 2))
        rles = [_rle(m) for m in filled]
        if rles:
            assert union_area(rles) == int(filled.any(axis=0).sum())
            dense = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))  # pycocotools, all pairs
            np.testing.assert_array_equal(rle_ious(rles, rles).toarray(), dense)
    summary = summarize(records)
    assert truth["overlapping_pairs"] > 20 and truth["images_with_overlap"] > 5  # the case is exercised
    assert {key: summary[key] for key in truth} == truth
