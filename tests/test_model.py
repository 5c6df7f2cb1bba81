import pytest
import torch

from tests.helpers import SAMPLE
from trainers.config import BACKBONES, apply_overrides
from trainers.detection.model import build_model
from trainers.recipes import get_recipe

TINY = {
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": "8,16,32,64,128",
    "rpn_post_nms_top_n_train": 64,
    "box_batch_size_per_image": 32,
}


def _batch():
    from datasets.instances import InstanceDataset, collate, read_records

    images, targets = collate([InstanceDataset(read_records(SAMPLE)[:1])[0]])
    images = [torch.nn.functional.interpolate(images[0][None], size=(64, 64))[0]]
    masks = (
        torch.nn.functional.interpolate(targets[0]["masks"][None].float(), size=(64, 64))[0].round().byte()
    )
    masks = masks[masks.flatten(1).any(1).bool()]
    from datasets.instances import masks_to_boxes

    target = {
        "masks": masks,
        "labels": torch.ones(len(masks), dtype=torch.int64),
        "boxes": torch.from_numpy(masks_to_boxes(masks.bool().numpy())),
    }
    return images, [target]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_one_step_without_nan(backbone):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("dsb2018_demo"), {**TINY, "backbone": backbone, "norm": "group"})
    model = build_model(cfg, num_classes=1)
    images, targets = _batch()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images)[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_fields_reach_the_model():
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {
            **TINY,
            "aspect_ratios": "0.33,1.0,3.0",
            "rpn_nms_thresh": 0.61,
            "rpn_pre_nms_top_n_test": 123,
            "rpn_post_nms_top_n_test": 45,
            "rpn_fg_iou_thresh": 0.66,
            "rpn_bg_iou_thresh": 0.22,
            "rpn_batch_size_per_image": 77,
            "box_batch_size_per_image": 88,
            "box_score_thresh": 0.12,
            "box_nms_thresh": 0.34,
            "box_detections_per_img": 56,
            "trainable_backbone_layers": 2,
        },
    )
    model = build_model(cfg, num_classes=3)
    rpn, roi = model.rpn, model.roi_heads
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    assert rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert rpn.anchor_generator.aspect_ratios[0] == (0.33, 1.0, 3.0)
    assert rpn.head.cls_logits.out_channels == 3
    assert (
        rpn.nms_thresh == 0.61
        and rpn._pre_nms_top_n["testing"] == 123
        and rpn._post_nms_top_n["testing"] == 45
    )
    assert rpn.proposal_matcher.high_threshold == 0.66 and rpn.proposal_matcher.low_threshold == 0.22
    assert rpn.fg_bg_sampler.batch_size_per_image == 77 and roi.fg_bg_sampler.batch_size_per_image == 88
    assert roi.score_thresh == 0.12 and roi.nms_thresh == 0.34 and roi.detections_per_img == 56
    assert roi.box_predictor.cls_score.out_features == 4
    trainable = {n.split(".")[2] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"} or {
        n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad
    } == {"layer3", "layer4"}


def test_weights_from_a_file_and_anchor_change_reinitialises_rpn_head(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("dsb2018_demo"), TINY)
    source = build_model(cfg, num_classes=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    same = build_model(apply_overrides(cfg, {"weights": str(path)}), num_classes=1)
    for key, value in source.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key
    other = build_model(
        apply_overrides(cfg, {"weights": str(path), "aspect_ratios": "0.5,1.0"}), num_classes=2
    )
    assert "rpn.head.cls_logits" in caplog.text and "roi_heads.box_predictor.cls_score" in caplog.text
    assert torch.equal(
        other.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
        source.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
    )


def test_bad_weights_file_is_a_user_error(tmp_path):
    from datasets.errors import UserError

    cfg = apply_overrides(get_recipe("dsb2018_demo"), TINY)
    with pytest.raises(UserError, match="weights: file not found"):
        build_model(apply_overrides(cfg, {"weights": str(tmp_path / "none.pt")}), 1)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable torch state_dict"):
        build_model(apply_overrides(cfg, {"weights": str(tmp_path / "junk.pt")}), 1)


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "resnet50_fpn_v2"])
def test_default_config_builds_torchvisions_model(backbone):
    """With the head fields at their defaults, the model has exactly the tensors of torchvision's own
    builder (norm=bn: torchvision uses BatchNorm when no weights are loaded)."""
    from torchvision.models import detection

    from trainers.config import MaskRCNNConfig

    cfg = apply_overrides(MaskRCNNConfig(), {"backbone": backbone, "norm": "bn"})
    ours = build_model(cfg, num_classes=1).state_dict()
    builder = getattr(detection, f"maskrcnn_{backbone}")
    theirs = builder(weights=None, weights_backbone=None, num_classes=2).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_mask_loss_weight_reaches_the_gradient():
    """train_one_epoch weighs loss_mask in the optimised sum only: weight 0 leaves the mask head without
    gradient, weight 2 doubles it, and the logged loss_mask stays the unweighted term."""
    from trainers.detection.train import train_one_epoch

    torch.manual_seed(0)
    model = build_model(apply_overrides(get_recipe("dsb2018_demo"), TINY), num_classes=1)
    mask_params = [*model.roi_heads.mask_head.parameters(), *model.roi_heads.mask_predictor.parameters()]
    box_params = list(model.roi_heads.box_predictor.parameters())
    batch = _batch()

    def run(weight):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays as it is
        grads = {}

        def record(*_):
            grads["mask"] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in mask_params]
            grads["box"] = [p.grad.clone() for p in box_params]

        optimizer.register_step_pre_hook(record)
        torch.manual_seed(1)  # the same RPN/ROI samples in every run
        stats = train_one_epoch(model, optimizer, [batch], "cpu", mask_loss_weight=weight)
        return stats, grads

    (s0, g0), (s1, g1), (s2, g2) = run(0.0), run(1.0), run(2.0)
    assert all(not g.any() for g in g0["mask"]) and any(g.any() for g in g1["mask"])
    for one, two in zip(g1["mask"], g2["mask"], strict=True):
        torch.testing.assert_close(two, 2 * one)
    for zero, one in zip(g0["box"], g1["box"], strict=True):
        torch.testing.assert_close(zero, one)  # the other terms are untouched
    assert s0["loss_mask"] == pytest.approx(s1["loss_mask"]) == pytest.approx(s2["loss_mask"])
    assert s0["loss_mask"] > 0
    assert s2["loss"] - s0["loss"] == pytest.approx(2 * s0["loss_mask"], rel=1e-5)
