"""A detector's operating point (MaskRCNNConfig.score_threshold): chosen in validation as the cut-off of the
highest Kaggle metric, kept as given when choose_score_threshold is off, and the objects every user-facing
path reports (deploy.registry.reported)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from datasets.instances import InstanceDataset, coco_ground_truth, collate, read_records
from deploy.registry import reported
from tests.helpers import ThresholdDetector
from trainers.config import MaskRCNNConfig
from trainers.detection.train import cutoff_with_tta, validate


def bright_and_dim(root: Path) -> Path:
    """One 64x64 image, mask-folders layout: two annotated nuclei at grey 230 (ThresholdDetector score 0.9)
    and two unannotated blobs at 160 (score 0.63), all above its level 0.55."""
    image = np.zeros((64, 64), dtype=np.uint8)
    folder = root / "img"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k, (y, x, value, annotated) in enumerate(
        [(4, 4, 230, True), (40, 8, 230, True), (8, 40, 160, False), (40, 40, 160, False)]
    ):
        image[y : y + 12, x : x + 12] = value
        if annotated:
            mask = np.zeros_like(image)
            mask[y : y + 12, x : x + 12] = 255
            Image.fromarray(mask).save(folder / "masks" / f"m{k}.png")
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(folder / "images" / "img.png")
    return root


@pytest.mark.parametrize("choose", [True, False])
def test_validation_chooses_the_cutoff_of_the_best_kaggle_metric(tmp_path, choose):
    """Hand-computed: at cut-offs up to 0.6 the dim blobs are 2 false positives beside 2 exact matches
    (Kaggle 2/4 = 0.5 at every IoU threshold); above 0.6 up to 0.9 only the nuclei remain (1.0); above
    0.9 nothing (0). The best cut-offs tie at 1.0 from 0.65 to 0.9, and the nearest to 0.5 is 0.65."""
    records = read_records(bright_and_dim(tmp_path), "mask-folders")
    dataset = InstanceDataset(records, normalize="range")
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    cfg = MaskRCNNConfig(choose_score_threshold=choose, score_threshold=0.5)
    metrics = validate(cfg, ThresholdDetector(0.55), loader, "cpu", coco_ground_truth(dataset))
    assert metrics["score_threshold"] == (0.65 if choose else 0.5)
    assert metrics["kaggle_mAP"] == pytest.approx(1.0 if choose else 0.5)
    assert metrics["segm_AP"] == pytest.approx(1.0)  # AP ranks every detection: the cut-off leaves it alone


def test_the_handed_over_operating_point_is_chosen_under_the_models_tta(tmp_path):
    """TTA of a detector equivariant by construction finds the same instances and scores: the same cut-off
    as validation's without TTA (tests/test_combine.py checks TTA itself)."""
    records = read_records(bright_and_dim(tmp_path), "mask-folders")
    gt = coco_ground_truth(InstanceDataset(records, normalize="range"))
    cfg = MaskRCNNConfig(tta="flips+rot90", normalize="range")
    detector = ThresholdDetector(0.55)
    assert cutoff_with_tta(cfg, detector, detector.state_dict(), records, "cpu", gt) == 0.65


def test_reported_objects_are_those_at_the_operating_point():
    results = [{"score": s} for s in (0.95, 0.65, 0.64, 0.1)]
    cfg = MaskRCNNConfig(score_threshold=0.65)
    assert [r["score"] for r in reported(results, cfg)] == [0.95, 0.65]
    assert [r["score"] for r in reported(results, cfg, 0.0)] == [0.95, 0.65, 0.64, 0.1]  # asked for all
