"""Evaluation agrees with pycocotools used directly, and with hand-computed cases."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from datasets.instances import InstanceDataset, coco_ground_truth, read_records
from tests.helpers import SAMPLE
from trainers.detection.inference import to_coco_results
from trainers.evaluation import coco_metrics


@pytest.fixture(scope="module")
def gt_and_targets():
    dataset = InstanceDataset(read_records(SAMPLE)[:4])
    return coco_ground_truth(dataset), [dataset[i][1] for i in range(len(dataset))]


def _output(masks: torch.Tensor, scores) -> dict:
    """A torchvision-style detection output from binary masks (probabilities 0.9 inside, 0.1 outside)."""
    from datasets.instances import masks_to_boxes

    boxes = torch.from_numpy(masks_to_boxes(masks.bool().numpy()))
    probs = masks.float()[:, None] * 0.8 + 0.1
    return {
        "boxes": boxes,
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "labels": torch.ones(len(masks), dtype=torch.int64),
        "masks": probs,
    }


def test_perfect_predictions_score_one(gt_and_targets):
    gt, targets = gt_and_targets
    results = []
    for t in targets:
        results += to_coco_results(_output(t["masks"], [0.9] * len(t["masks"])), t["image_id"])
    m = coco_metrics(gt, results)
    assert m["segm_AP"] == pytest.approx(1.0) and m["bbox_AP"] == pytest.approx(1.0)
    assert m["segm_AR100"] == pytest.approx(1.0)


def test_half_found_is_hand_computed(gt_and_targets):
    """Every other object found exactly, nothing else: precision is 1 up to the recall reached and 0 beyond,
    so COCO's 101-point interpolated AP is the share of recall points 0, 0.01, ..., 1 not above it."""
    gt, targets = gt_and_targets
    results, total, found = [], 0, 0
    for t in targets:
        keep = t["masks"][::2]
        total += len(t["masks"])
        found += len(keep)
        results += to_coco_results(_output(keep, [0.9] * len(keep)), t["image_id"])
    recall = found / total
    expected = np.count_nonzero(np.linspace(0, 1, 101) <= recall) / 101
    m = coco_metrics(gt, results)
    assert m["segm_AP"] == pytest.approx(expected, abs=1e-6)
    assert m["segm_AR100"] == pytest.approx(recall, abs=1e-6)


def test_no_predictions_score_zero(gt_and_targets):
    gt, _ = gt_and_targets
    assert all(v == 0.0 for v in coco_metrics(gt, []).values())


def test_matches_pycocotools_on_noisy_predictions(gt_and_targets):
    """Shifted, dropped and spurious predictions with random scores: our conversion + metrics equal a
    direct pycocotools run on independently encoded results."""
    gt, targets = gt_and_targets
    rng = np.random.default_rng(0)
    ours, reference = [], []
    for t in targets:
        masks = t["masks"][rng.random(len(t["masks"])) > 0.2]
        masks = torch.roll(masks, shifts=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), dims=(1, 2))
        spurious = torch.zeros((3, *masks.shape[1:]), dtype=masks.dtype)
        for k in range(3):
            y, x = rng.integers(0, masks.shape[1] - 12), rng.integers(0, masks.shape[2] - 12)
            spurious[k, y : y + 10, x : x + 10] = 1
        masks = torch.cat([masks, spurious])
        masks = masks[masks.flatten(1).any(1).bool()]
        scores = rng.random(len(masks)).tolist()
        ours += to_coco_results(_output(masks, scores), t["image_id"])
        for mask, score in zip(masks.numpy(), scores, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ys, xs = np.nonzero(mask)
            reference.append(
                {
                    "image_id": t["image_id"],
                    "category_id": 1,
                    "score": score,
                    "segmentation": rle,
                    "bbox": [
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() - xs.min() + 1),
                        float(ys.max() - ys.min() + 1),
                    ],
                }
            )
    metrics = coco_metrics(gt, ours)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(reference), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert metrics[f"{iou_type}_AP"] == pytest.approx(ev.stats[0], abs=1e-9)
        assert metrics[f"{iou_type}_AP50"] == pytest.approx(ev.stats[1], abs=1e-9)
        assert metrics[f"{iou_type}_AP75"] == pytest.approx(ev.stats[2], abs=1e-9)
        assert metrics[f"{iou_type}_AR100"] == pytest.approx(ev.stats[8], abs=1e-9)
    assert 0.05 < metrics["segm_AP"] < 0.95  # the case is neither trivial nor hopeless
