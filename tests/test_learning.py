"""Learning is real: on a handful of real images the loss falls clearly; the loop checkpoints and resumes."""

import json

import torch
from torch.utils.data import DataLoader

from datasets.augment import augmentation
from datasets.instances import InstanceDataset, collate, read_records
from tests.helpers import SAMPLE
from trainers.config import apply_overrides
from trainers.detection.model import load_checkpoint_model
from trainers.detection.train import build_optimizer, run_training, seed_everything, train_one_epoch
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe

SMALL = {"min_size": 128, "max_size": 160, "anchor_sizes": "8,16,32,64,128", "epochs": 1}


def test_training_loss_falls_on_real_images():
    seed_everything(0)
    cfg = apply_overrides(get_recipe("dsb2018_demo"), SMALL)
    from trainers.detection.model import build_model

    model = build_model(cfg, num_classes=1)
    loader = DataLoader(
        InstanceDataset(read_records(SAMPLE)[:4], augmentation("flips", 0)),
        batch_size=2,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = build_optimizer(cfg, model)
    losses = [
        train_one_epoch(model, optimizer, loader, "cpu", grad_clip=cfg.grad_clip)["loss"] for _ in range(8)
    ]
    assert losses[-1] < 0.6 * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


def test_run_training_reports_checkpoints_and_resumes(tiny_dataset, tmp_path):
    cfg = apply_overrides(get_recipe("dsb2018_demo"), {**SMALL, "data": str(tiny_dataset), "epochs": 1})
    seam = LocalSeam(checkpoint_dir=tmp_path / "ckpt")
    run_training(cfg, seam)
    assert len(seam.reports) == 1
    metrics = seam.reports[0]
    for key in ("epoch", "train_loss", "bbox_AP", "segm_AP", "bbox_AP50", "segm_AP75", "segm_AR100"):
        assert key in metrics, key
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["min_size"] == 128
    model, loaded_cfg, categories = load_checkpoint_model(tmp_path / "ckpt")
    assert loaded_cfg == cfg and categories == [{"id": 1, "name": "nucleus"}]
    # a second run with more epochs continues from the checkpoint instead of starting over
    longer = apply_overrides(cfg, {"epochs": 2})
    seam2 = LocalSeam(checkpoint_dir=tmp_path / "ckpt")
    run_training(longer, seam2)
    assert [r["epoch"] for r in seam2.reports] == [2]
    assert not (tmp_path / "ckpt.tmp").exists()
