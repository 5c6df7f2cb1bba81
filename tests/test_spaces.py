"""The Mask R-CNN search spaces beyond rpn_anchors and the config fields they search: the conditional
optimizer space, validation that names the field, and every new field reaching the torchvision model, the
optimizer, the augmentation pipeline and the training loop."""

import numpy as np
import pytest
import torch
from torch import nn

from datasets.augment import apply_transform, augmentation
from datasets.errors import UserError
from search_spaces import get_space, sample
from tests.test_model import TINY, _batch
from trainers.config import apply_overrides
from trainers.detection import train as loop
from trainers.detection.model import build_model
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe


def demo(**overrides):
    return apply_overrides(get_recipe("dsb2018_demo"), overrides)


def test_optimizer_space_is_conditional():
    space = get_space("optimizer")
    assert space.define_by_run and space.recipe == "dsb2018_demo"
    kinds, schedules = set(), set()
    for seed in range(50):
        values = sample(space, seed)
        cfg = apply_overrides(get_recipe(space.recipe), values, source="space optimizer")
        kind = values["optimizer"]
        kinds.add(kind)
        if kind == "sgd":
            assert {"momentum", "nesterov"} <= set(values) and 1e-3 <= values["lr"] <= 5e-2
        else:
            assert not {"momentum", "nesterov"} & set(values) and 1e-5 <= values["lr"] <= 1e-3
        low, high = (1e-4, 0.1) if kind == "adamw" else (1e-6, 1e-3)
        assert low <= values["weight_decay"] <= high
        if values["cosine_period_epochs"] > 0:
            schedules.add("cosine")
            assert not {"lr_gamma", "lr_steps"} & set(values)
        elif values["lr_gamma"] == 1.0:
            schedules.add("constant")
            assert "lr_steps" not in values and cfg.lr_steps == ()
        else:
            schedules.add("step")
            assert cfg.lr_steps and 0.05 <= cfg.lr_gamma <= 0.5
        optimizer = loop.build_optimizer(cfg, nn.Linear(2, 1))
        group = optimizer.param_groups[0]
        assert type(optimizer).__name__.lower() == kind and group["lr"] == values["lr"]
        assert group["weight_decay"] == values["weight_decay"]
        if kind == "sgd":
            assert group["momentum"] == values["momentum"] and group["nesterov"] == values["nesterov"]
    assert kinds == {"sgd", "adam", "adamw"} and schedules == {"cosine", "constant", "step"}


@pytest.mark.parametrize("name", ["roi_heads", "mask_head", "backbone", "augment"])
def test_new_spaces_search_their_fields(name):
    fields = {
        "roi_heads": {
            "box_batch_size_per_image",
            "box_positive_fraction",
            "box_score_thresh",
            "box_nms_thresh",
            "box_detections_per_img",
        },
        "mask_head": {"mask_head_layers", "mask_head_channels", "mask_loss_weight"},
        "backbone": {"backbone", "trainable_backbone_layers", "phases", "min_size", "tile_size"},
        "augment": {"augment", "aug_rotate", "aug_scale", "aug_brightness", "aug_contrast", "aug_blur"},
    }[name]
    space = get_space(name)
    assert space.description and space.recipe == "dsb2018_demo"
    values = sample(space, 0)
    assert set(values) == fields
    apply_overrides(get_recipe(space.recipe), values)  # validates


def test_nesterov_reaches_the_optimizer():
    params = nn.Linear(2, 1)
    assert loop.build_optimizer(demo(nesterov=True, momentum=0.9), params).param_groups[0]["nesterov"]
    assert not loop.build_optimizer(demo(), params).param_groups[0]["nesterov"]


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "resnet50_fpn_v2"])
def test_head_fields_reach_the_model(backbone):
    torch.manual_seed(0)
    cfg = demo(
        **TINY,
        backbone=backbone,
        box_positive_fraction=0.4,
        mask_head_layers=2,
        mask_head_channels=128,
        box_detections_per_img=5,  # a quick inference pass
    )
    model = build_model(cfg, num_classes=1)
    roi = model.roi_heads
    assert roi.fg_bg_sampler.positive_fraction == 0.4
    convs = [m for m in roi.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(256, 128), (128, 128)]
    norms = [type(m) for m in roi.mask_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == (2 if backbone == "resnet50_fpn_v2" else 0)  # v2 keeps its normalised mask head
    assert roi.mask_predictor.conv5_mask.in_channels == 128
    assert roi.mask_predictor.mask_fcn_logits.out_channels == 2
    if backbone != "resnet18_fpn":
        return  # the same head code: one training step and inference on the small backbone are enough
    images, targets = _batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_mask"]) and all(p.grad is not None for p in roi.mask_head.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)[0]
    assert out["masks"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"nesterov": True, "optimizer": "adamw"}, "nesterov"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"box_positive_fraction": 0.0}, "box_positive_fraction"),
        ({"box_positive_fraction": 1.5}, "box_positive_fraction"),
        ({"mask_head_layers": 0}, "mask_head_layers"),
        ({"mask_head_channels": 0}, "mask_head_channels"),
        ({"mask_loss_weight": -0.5}, "mask_loss_weight"),
        ({"aug_rotate": -1}, "aug_rotate"),
        ({"aug_scale": 1.0}, "aug_scale"),
        ({"aug_brightness": 1.2}, "aug_brightness"),
        ({"aug_contrast": -0.1}, "aug_contrast"),
        ({"aug_blur": -1}, "aug_blur"),
        ({"class_score_thresh": "0.5,1.2"}, "class_score_thresh"),
        ({"mask_min_area": -1}, "mask_min_area"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(UserError, match=f"^{field}: expected"):
        demo(**overrides)


def test_edge_values_are_valid():
    demo(box_positive_fraction=1.0, mask_loss_weight=0.0, class_score_thresh="0,1", nesterov=True)


def test_rotation_moves_image_and_masks_together():
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    masks = np.zeros((1, 96, 96), dtype=bool)
    image[10:40, 50:70] = 255  # off-centre, so any rotation moves it
    masks[0, 10:40, 50:70] = True
    transform = augmentation("none", seed=0, rotate=60.0)
    moved = 0
    for _ in range(5):
        out, out_masks, kept = apply_transform(transform, image, masks)
        bright = out[..., 0] >= 128
        assert len(kept) == 1
        iou = (bright & out_masks[0]).sum() / (bright | out_masks[0]).sum()
        assert iou > 0.9, iou
        moved += not np.array_equal(out_masks[0], masks[0])
    assert moved >= 4


def test_run_training_passes_the_fields_and_reports_latency(tiny_dataset, monkeypatch):
    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = kwargs
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, name, call)

    spy("augmentation", loop.augmentation)
    spy("train_one_epoch", loop.train_one_epoch)
    aug = {"aug_rotate": 10.0, "aug_scale": 0.1, "aug_brightness": 0.2, "aug_contrast": 0.3, "aug_blur": 0.5}
    cfg = demo(**TINY, **aug, data=str(tiny_dataset), epochs=1, mask_loss_weight=0.5, nesterov=True)
    seam = LocalSeam()
    loop.run_training(cfg, seam)
    assert seen["augmentation"] == {k.removeprefix("aug_"): v for k, v in aug.items()}
    assert seen["train_one_epoch"]["mask_loss_weight"] == 0.5
    (metrics,) = seam.reports
    assert 0 < metrics["val_ms_per_image"] < 60_000 and "segm_AP" in metrics
