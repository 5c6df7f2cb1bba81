"""`platform.bench quality`: its validation set is DESIGN.md's (the shared DSB2018 images the bundled sample
does not hold), and its scoring rows come from the one inference path, the baseline and the ensemble."""

import torch

from datasets.instances import SAMPLE_DATA, InstanceDataset, coco_ground_truth, read_records
from datasets.records import image_size
from platform.benchmarks.quality import format_rows, plain_model, score_checkpoints, validation_records
from trainers.config import MaskRCNNConfig
from trainers.detection.combine import TTAModel, load_detector_model
from trainers.detection.model import build_model, save_checkpoint

CATEGORIES = [{"id": 1, "name": "nucleus"}]


def test_the_validation_set_is_the_shared_images_not_in_the_bundle():
    records = validation_records()
    bundled = {r.image_id for r in read_records(SAMPLE_DATA)}
    assert len(records) == 176 and not {r.image_id for r in records} & bundled
    assert len(bundled) == 24 and all(r.mask_paths for r in records)


def test_checkpoints_their_tta_and_their_ensemble_are_scored(tmp_path):
    small = [r for r in validation_records() if image_size(r.image_path) == (256, 256)]
    records = small[:2]
    gt = coco_ground_truth(InstanceDataset(records))
    folders = []
    for seed in (0, 1):
        cfg = MaskRCNNConfig(
            backbone="resnet18_fpn",
            norm="group",
            min_size=64,
            max_size=96,
            normalize="grey",
            box_detections_per_img=5,  # random weights: a few detections keep it cheap
            tta="flips" if seed else "off",  # a recipe's own tta (dsb2018_cpu has one)
        )
        torch.manual_seed(seed)
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        save_checkpoint(folder, cfg, build_model(cfg, 1), CATEGORIES, {})
        folders.append(folder)
    rows = score_checkpoints(folders, records, gt, "flips")
    assert [r.name for r in rows] == [
        "seed0",
        "seed0 + tta flips",
        "seed1",
        "seed1 + tta flips",
        "mask-vote ensemble of 2",
        "mask-vote ensemble of 2 + tta flips",
    ]
    assert all(0.0 <= r.metrics["segm_AP"] <= 1.0 and "kaggle_mAP" in r.metrics for r in rows)
    # seed1's config carries tta=flips: its plain row is still the model alone
    assert not isinstance(plain_model(folders[1])[0], TTAModel)
    assert isinstance(load_detector_model(folders[1])[0], TTAModel)
    table = format_rows(rows)
    assert "segm_AP" in table.splitlines()[0] and len(table.splitlines()) == len(rows) + 2
