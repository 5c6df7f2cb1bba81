"""Mask R-CNN from a MaskRCNNConfig (every field reaches the torchvision model), and its checkpoint folder:
saved by training, loaded by inference and the registry."""

import json
import logging
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d

from datasets.coco import field, load_json
from datasets.errors import UserError
from trainers.checkpoints import load_into, read_state_dict, read_tensors
from trainers.config import MaskRCNNConfig, from_dict, to_dict, write_json

log = logging.getLogger(__name__)

NORM_LAYERS = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "sync_bn": nn.BatchNorm2d,  # converted to SyncBatchNorm by run_training when there are several workers
    "group": partial(nn.GroupNorm, 32),
}
# torchvision's own whole-model (COCO) and backbone (ImageNet) weights, used for weights="DEFAULT".
COCO_WEIGHTS = {
    "resnet50_fpn": detection.MaskRCNN_ResNet50_FPN_Weights,
    "resnet50_fpn_v2": detection.MaskRCNN_ResNet50_FPN_V2_Weights,
}


def build_model(cfg: MaskRCNNConfig, num_classes: int) -> detection.MaskRCNN:
    """Mask R-CNN for `num_classes` classes plus background; loads `cfg.weights` if set."""
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes),
        aspect_ratios=(cfg.aspect_ratios,) * len(cfg.anchor_sizes),
    )
    # Full-resolution mode: a full tile is fed at scale 1 (torchvision always resizes to min/max_size).
    min_size, max_size = (cfg.tile_size, cfg.tile_size) if cfg.tile_size else (cfg.min_size, cfg.max_size)
    kwargs = dict(
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
    )
    mask_layers = [cfg.mask_head_channels] * cfg.mask_head_layers
    num_anchors = anchors.num_anchors_per_location()[0]
    backbone_weights = _backbone_weights(cfg)
    if cfg.backbone == "resnet50_fpn_v2":
        # torchvision's v2 recipe (maskrcnn_resnet50_fpn_v2), rebuilt here because its builder fixes the
        # anchor generator and RPN head: BatchNorm throughout, a two-conv RPN head, conv box and mask heads.
        body = torchvision.models.resnet50(weights=backbone_weights)
        backbone = _resnet_fpn_extractor(body, cfg.trainable_backbone_layers, norm_layer=nn.BatchNorm2d)
        heads = dict(
            rpn_head=RPNHead(backbone.out_channels, num_anchors, conv_depth=2),
            box_head=FastRCNNConvFCHead(
                (backbone.out_channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d
            ),
            mask_head=MaskRCNNHeads(backbone.out_channels, mask_layers, 1, norm_layer=nn.BatchNorm2d),
        )
    else:
        backbone = resnet_fpn_backbone(
            backbone_name=cfg.backbone.removesuffix("_fpn"),
            weights=backbone_weights,
            norm_layer=NORM_LAYERS[cfg.norm],
            trainable_layers=cfg.trainable_backbone_layers,
        )
        heads = dict(
            rpn_head=RPNHead(backbone.out_channels, num_anchors),
            # built where MaskRCNN would build its own (before the box head), so the default config draws
            # the same initial weights as torchvision's default head
            mask_head=MaskRCNNHeads(backbone.out_channels, mask_layers, 1),
        )
    model = detection.MaskRCNN(backbone, **heads, **kwargs)
    if cfg.mask_head_channels != 256:
        # torchvision's predictor expects 256 input channels. Passing our own would make MaskRCNN require
        # num_classes=None and a box predictor too, so it is replaced instead; its transposed conv keeps
        # the head's width (Detectron2's MaskRCNNConvUpsampleHead does the same).
        channels = cfg.mask_head_channels
        model.roi_heads.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes + 1)
    if cfg.weights:
        load_weights(model, _whole_model_state(cfg))
    return model


def _backbone_weights(cfg: MaskRCNNConfig):
    if cfg.weights_backbone in ("", "none"):
        return None
    if cfg.weights_backbone == "DEFAULT":
        return "DEFAULT"  # torchvision resolves it to the backbone's own ImageNet weights enum
    raise UserError(
        f"weights_backbone: '{cfg.weights_backbone}' is not supported; use \"\" or DEFAULT, "
        "or pass a whole-model state_dict path as weights="
    )


def _whole_model_state(cfg: MaskRCNNConfig) -> dict[str, torch.Tensor]:
    if cfg.weights == "DEFAULT":
        if cfg.backbone not in COCO_WEIGHTS:
            raise UserError(
                f"weights: torchvision has COCO weights for {', '.join(COCO_WEIGHTS)}, not {cfg.backbone}"
            )
        return COCO_WEIGHTS[cfg.backbone].DEFAULT.get_state_dict(progress=True)
    state = read_tensors(Path(cfg.weights), where="weights")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint rather than a bare state_dict
    if not isinstance(state, dict):
        raise UserError(f"weights: {cfg.weights} holds a {type(state).__name__}, expected a state_dict")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor whose name and shape match; return the names left at their initialisation.

    Shapes differ where the number of classes (predictors) or of anchors per location (RPN head) changed;
    those layers start fresh, and the log says which, as Detectron2 does.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    fresh = sorted(k for k in own if k not in usable)
    if fresh:
        heads = sorted({k.rsplit(".", 1)[0] for k in fresh})
        log.warning(
            "weights: %d tensors re-initialised (shape or name differs): %s", len(fresh), ", ".join(heads)
        )
    return fresh


CHECKPOINT_FILES = ("model.pt", "config.json", "categories.json")  # what inference needs (no optimizer state)


def save_checkpoint(
    folder: Path, cfg: MaskRCNNConfig, model: nn.Module | dict, categories, train_state: dict
) -> None:
    """model.pt (a state_dict, loads with weights_only=True), config.json, categories.json, train_state.pt;
    `model` is the model or the state_dict to hand over (a run's best epoch)."""
    torch.save(model if isinstance(model, dict) else model.state_dict(), folder / "model.pt")
    torch.save(train_state, folder / "train_state.pt")
    write_json(cfg, folder / "config.json")
    (folder / "categories.json").write_text(json.dumps(list(categories), indent=2) + "\n")


def checkpoint_settings(folder: Path) -> tuple[MaskRCNNConfig, list[dict]]:
    """A checkpoint folder's config and categories, without its weights; a UserError naming the file and
    the field for a value of the wrong type."""
    config_file = folder / "config.json"
    cfg = from_dict(MaskRCNNConfig, load_json(config_file), str(config_file))
    return cfg, check_categories(load_json(folder / "categories.json"), folder / "categories.json")


def check_categories(categories, where: Path) -> list[dict]:
    """categories.json's content: a non-empty list of {"id": positive integer, "name": text}, ids unique."""
    if not isinstance(categories, list) or not categories:
        raise UserError(f"{where}: expected a non-empty list of categories, got {type(categories).__name__}")
    for i, category in enumerate(categories):
        field(category, "id", f"{where}: [{i}]", int)
        field(category, "name", f"{where}: [{i}]", str)
        if category["id"] < 1:  # a bool is not an int to `field`
            raise UserError(f"{where}: [{i}]: field 'id' must be a positive integer, got {category['id']!r}")
    (most, count), *_ = Counter(c["id"] for c in categories).most_common(1)
    if count > 1:
        raise UserError(f"{where}: category id {most} repeats")
    return categories


def load_checkpoint_model(folder: Path, device="cpu") -> tuple[torch.nn.Module, MaskRCNNConfig, list[dict]]:
    """The model of a checkpoint folder, in eval mode, with its config and categories. The weights are
    read first and must hold as many classes as categories.json lists: a forged list cannot make the
    model it builds larger than its weights file."""
    cfg, categories = checkpoint_settings(folder)
    state = read_state_dict(folder / "model.pt", device)
    classes = state.get("roi_heads.box_predictor.cls_score.bias")
    if classes is None or tuple(classes.shape) != (len(categories) + 1,):
        found = "no box predictor" if classes is None else f"weights for {classes.shape[0] - 1} categories"
        raise UserError(
            f"{folder / 'model.pt'}: {found}, but {folder / 'categories.json'} lists {len(categories)}"
        )
    model = build_model(_without_weights(cfg), num_classes=len(categories))
    load_into(model, state, str(folder / "model.pt"))
    return model.to(device).eval(), cfg, categories


def _without_weights(cfg: MaskRCNNConfig) -> MaskRCNNConfig:
    # The checkpoint's own tensors replace any initial weights: never download or read them again.
    return from_dict(MaskRCNNConfig, {**to_dict(cfg), "weights": "", "weights_backbone": ""}, "checkpoint")
