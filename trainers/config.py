"""Typed, flat trainer configs and the one way values reach them.

Precedence: dataclass defaults < recipe < CLI `key=value` overrides (and Tune samples). Unknown keys and
values of the wrong type are UserErrors that name the key.
"""

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from datasets.errors import UserError

C = TypeVar("C")

BACKBONES = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet50_fpn_v2")
OPTIMIZERS = ("sgd", "adam", "adamw")
NORMS = ("frozen_bn", "bn", "sync_bn", "group")
AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class MaskRCNNConfig:
    # --- data ---
    data: str = ""  # dataset root; "" = the bundled sample (datasets/sample/dsb2018). Absolute on workers.
    data_format: str = "mask-folders"  # annotation format of `data`
    val_fraction: float = 0.25  # fraction of images held out for evaluation (seeded split by image)
    split_file: str = ""  # a split JSON from `platform.data split` ({"train": [ids], "val": [ids]}) instead
    augment: str = (
        "flips"  # augmentation preset (datasets/augment.py): none flips foram dsb2018 sartorius ...
    )
    tile_size: int = 0  # 0 = train on whole images resized to min_size/max_size; else full-resolution mode:
    # every epoch trains on all overlapping tile_size x tile_size tiles of every image at native resolution
    # (the model's resize is fixed to the tile size) and validates by tiled inference on the whole images
    tile_overlap: int = 64  # pixels shared by neighbouring tiles (train and validation)
    tile_min_visible: float = 0.1  # an object a tile cuts is trained on only if this fraction of it is
    # inside the tile (SAHI's slicing default, min_area_ratio=0.1): slivers teach fragments
    # --- model ---
    backbone: str = "resnet50_fpn"  # resnet18_fpn | resnet34_fpn | resnet50_fpn | resnet50_fpn_v2
    weights: str = ""  # whole-model weights: "" random init, "DEFAULT" torchvision COCO, or a state_dict path
    weights_backbone: str = ""  # backbone weights: "" random init, "DEFAULT" torchvision ImageNet, or a path
    trainable_backbone_layers: int = 3  # ResNet stages trained, counted from the top (0-5)
    norm: str = "frozen_bn"  # backbone normalisation: frozen_bn (pretrained) | bn | sync_bn | group
    # (sync_bn = BatchNorm whose statistics are computed over all DDP workers' images: small per-GPU batches)
    min_size: int = 800  # shorter image side after resizing, pixels
    max_size: int = 1333  # cap on the longer side after resizing, pixels
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # anchor side per FPN level (5 levels), pixels
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height/width ratios, at every level
    rpn_fg_iou_thresh: float = 0.7  # IoU at or above which an anchor is foreground for RPN training
    rpn_bg_iou_thresh: float = 0.3  # IoU below which an anchor is background for RPN training
    rpn_nms_thresh: float = 0.7  # NMS IoU threshold on RPN proposals
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept per level before NMS, training
    rpn_pre_nms_top_n_test: int = 1000  # proposals kept per level before NMS, inference
    rpn_post_nms_top_n_train: int = 2000  # proposals kept after NMS, training
    rpn_post_nms_top_n_test: int = 1000  # proposals kept after NMS, inference
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = 512  # ROIs sampled per image for the box/mask head losses
    box_score_thresh: float = 0.05  # detections below this score are dropped at inference
    box_nms_thresh: float = 0.5  # per-class NMS IoU threshold on detections
    box_detections_per_img: int = 100  # maximum detections per image at inference
    # --- optimisation ---
    optimizer: str = "sgd"  # sgd (momentum) | adam | adamw
    lr: float = 0.02  # base learning rate per optimizer step (before lr_reference_batch scaling)
    lr_reference_batch: int = 0  # 0 = use lr as given; else linear scaling rule (Goyal et al. 2017):
    # lr * global_batch / lr_reference_batch, global_batch = batch_size * workers * accumulate_steps images
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 / decoupled weight decay
    lr_steps: tuple[int, ...] = ()  # epochs at which the learning rate is multiplied by lr_gamma
    lr_step_iters: tuple[int, ...] = ()  # optimizer steps at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # factor applied at each of lr_steps and lr_step_iters
    lr_decay_every: int = 0  # 0 = off; else multiply the lr by lr_decay_factor every this many steps ...
    lr_decay_start: int = 0  # ... the first time at this optimizer step (0-based)
    lr_decay_factor: float = 1.0  # multiplier applied every lr_decay_every steps (e.g. 0.8)
    cosine_period_epochs: float = 0.0  # 0 = off; else cosine annealing with warm restarts, period in epochs
    cosine_period_mult: int = 1  # each cosine period is this many times longer than the previous one
    lr_min: float = 0.0  # lr at the bottom of each cosine period (same unit as lr, scaled along with it)
    warmup_iters: int = 0  # linear warm-up from lr/1000 over this many optimizer steps
    phases: tuple[str, ...] = ()  # "EPOCH:TRAINABLE_LAYERS[:LR_FACTOR]": from 0-based EPOCH train the top
    # TRAINABLE_LAYERS ResNet stages (0-5, as trainable_backbone_layers, which holds before the first phase)
    # with the lr multiplied by LR_FACTOR (default 1); e.g. "25:0" freezes the backbone from epoch 25 on
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    epochs: int = 12  # training epochs (a Tune search may stop a trial earlier)
    batch_size: int = 2  # images per worker per forward/backward pass
    accumulate_steps: int = 1  # batches whose gradients are summed (averaged) before one optimizer step
    amp: str = "off"  # mixed precision on GPU: off | bf16 | fp16 (fp16 adds a GradScaler); CPU: off only
    seed: int = 0  # seeds the split, the weights' init, augmentation and data order
    loader_workers: int = 0  # DataLoader worker processes per training worker

    def validate(self) -> None:
        from datasets.augment import PRESETS

        _one_of("augment", self.augment, tuple(PRESETS))
        _one_of("backbone", self.backbone, BACKBONES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("norm", self.norm, NORMS)
        if len(self.anchor_sizes) != 5:
            raise UserError(f"anchor_sizes: expected 5 sizes, one per FPN level, got {self.anchor_sizes}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise UserError(f"aspect_ratios: expected positive ratios, got {self.aspect_ratios}")
        for key in (
            "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh",
            "rpn_nms_thresh",
            "box_score_thresh",
            "box_nms_thresh",
            "val_fraction",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key}: expected a value in [0, 1], got {getattr(self, key)}")
        if self.rpn_bg_iou_thresh > self.rpn_fg_iou_thresh:
            raise UserError(
                f"rpn_bg_iou_thresh: {self.rpn_bg_iou_thresh} is above "
                f"rpn_fg_iou_thresh {self.rpn_fg_iou_thresh}"
            )
        if self.tile_size < 0 or 0 < self.tile_size < 32:
            raise UserError(f"tile_size: expected 0 (whole images) or >= 32 pixels, got {self.tile_size}")
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise UserError(f"tile_overlap: expected [0, {self.tile_size}) pixels, got {self.tile_overlap}")
        if not 0.0 <= self.tile_min_visible <= 1.0:
            raise UserError(f"tile_min_visible: expected a value in [0, 1], got {self.tile_min_visible}")
        for key in ("epochs", "batch_size", "min_size", "max_size", "box_detections_per_img"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise UserError(f"trainable_backbone_layers: expected 0-5, got {self.trainable_backbone_layers}")
        _one_of("amp", self.amp, AMP_MODES)
        for key in ("accumulate_steps", "cosine_period_mult"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        for key in ("lr_reference_batch", "lr_decay_every", "lr_decay_start", "warmup_iters"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or a positive integer, got {getattr(self, key)}")
        if self.cosine_period_epochs < 0:
            raise UserError("cosine_period_epochs: expected 0 (off) or a positive number of epochs")
        if self.cosine_period_epochs > 0 and not 0 <= self.lr_min < self.lr:
            raise UserError(f"lr_min: expected a value in [0, lr={self.lr}), got {self.lr_min}")
        self._validate_phases()

    def _validate_phases(self) -> None:
        from trainers.schedules import parse_phase

        starts = []
        for entry in self.phases:
            try:
                start, layers, factor = parse_phase(entry)
            except ValueError:
                raise UserError(
                    f"phases: '{entry}' is not EPOCH:TRAINABLE_LAYERS[:LR_FACTOR], e.g. 25:0 or 80:5:0.1"
                ) from None
            if start < 0:  # a phase after the last epoch is allowed: a shortened run never reaches it
                raise UserError(f"phases: '{entry}' starts at a negative epoch")
            if not 0 <= layers <= 5:
                raise UserError(f"phases: '{entry}' trains {layers} backbone stages; expected 0-5")
            if factor <= 0:
                raise UserError(f"phases: '{entry}' has lr factor {factor}; expected a positive number")
            if start in starts:
                raise UserError(f"phases: two phases start at epoch {start}")
            starts.append(start)


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{key}: unknown value '{value}'; valid: {', '.join(valid)}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """CLI `key=value` words -> {key: value-string}; the config's types decide how values are read."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(config: C, overrides: dict[str, Any], source: str = "override") -> C:
    """A copy of `config` with `overrides` applied; string values are parsed by the field's type."""
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"{source}: unknown config key '{key}' for {type(config).__name__}{hint}")
        changes[key] = _coerce(key, value, hints[key], source)
    updated = dataclasses.replace(config, **changes)
    updated.validate()
    return updated


def _coerce(key: str, value: Any, kind: Any, source: str) -> Any:
    def bad() -> UserError:
        return UserError(f"{source}: key '{key}' expects {_type_name(kind)}, got {value!r}")

    if typing.get_origin(kind) is tuple:
        elem = typing.get_args(kind)[0]
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise bad()
        try:
            return tuple(_scalar(v, elem) for v in value)
        except ValueError:
            raise bad() from None
    try:
        return _scalar(value, kind)
    except ValueError:
        raise bad() from None


def _scalar(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value.strip())
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    raise TypeError(f"unsupported config field type {kind}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a comma-separated list of {typing.get_args(kind)[0].__name__}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], values: dict[str, Any], source: str) -> C:
    return apply_overrides(cls(), values, source)


def write_json(config: Any, path: Path) -> None:
    """Atomic write: a reader never sees half a config."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
