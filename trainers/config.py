"""Typed, flat trainer configs and the one way values reach them.

Precedence: dataclass defaults < recipe < CLI `key=value` overrides (and Tune samples). Unknown keys and
values of the wrong type are UserErrors that name the key.
"""

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from datasets.errors import UserError
from datasets.normalize import NORMALIZATIONS  # range | percentile | grey: how pixels become input

C = TypeVar("C")

BACKBONES = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet50_fpn_v2")
OPTIMIZERS = ("sgd", "adam", "adamw")
NORMS = ("frozen_bn", "bn", "sync_bn", "group")
AMP_MODES = ("off", "bf16", "fp16")
TTA_MODES = ("off", "flips", "flips+rot90")  # test-time augmentation (trainers/detection/combine.py)
# The largest side a Mask R-CNN input is resized or tiled to (a 67-megapixel input): a config file, which a
# registered model carries, cannot make every image it sees cost unbounded memory.
MAX_INPUT_SIDE = 8192
BASELINES = ("otsu", "otsu-watershed", "off")  # the classical baseline (trainers/detection/baseline.py)
MASK_REFINES = ("off", "otsu")  # mask outlines snapped to the foreground (trainers/detection/refine.py)


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
    normalize: str = "range"  # input normalisation: range | percentile | grey, see NORMALIZATIONS
    tile_size: int = 0  # 0 = train on whole images resized to min_size/max_size; else full-resolution mode:
    # every epoch trains on all overlapping tile_size x tile_size tiles of every image at native resolution
    # (the model's resize is fixed to the tile size) and validates by tiled inference on the whole images
    tile_overlap: int = 64  # pixels shared by neighbouring tiles (train and validation)
    tile_min_visible: float = 0.1  # an object a tile cuts is trained on only if this fraction of it is
    # inside the tile (SAHI's slicing default, min_area_ratio=0.1): slivers teach fragments
    # Magnitudes of extra augmentations after the preset (0 = off), the `augment` search space's knobs:
    aug_rotate: float = 0.0  # random rotation within +-this many degrees
    aug_scale: float = 0.0  # random zoom by a factor within [1 - this, 1 + this]
    aug_brightness: float = 0.0  # brightness factor within [1 - this, 1 + this]
    aug_contrast: float = 0.0  # contrast factor within [1 - this, 1 + this]
    aug_blur: float = 0.0  # Gaussian blur with sigma up to this many pixels (half of the images)
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
    box_positive_fraction: float = 0.25  # fraction of those ROIs that are foreground (at most)
    mask_head_layers: int = 4  # 3x3 conv layers of the mask head (torchvision: 4)
    mask_head_channels: int = 256  # channels of each mask head layer (torchvision: 256)
    mask_loss_weight: float = 1.0  # weight of the mask loss in the training loss (others weigh 1)
    box_score_thresh: float = 0.05  # detections below this score are dropped at inference
    class_score_thresh: tuple[float, ...] = ()  # per-class score thresholds in category order, applied after
    # the model (its own box_score_thresh first); () = box_score_thresh for every class
    mask_min_area: int = 0  # detections whose binary mask has fewer pixels are dropped at inference
    mask_threshold: float = 0.5  # soft masks are binarised at this value at inference (torchvision: 0.5)
    mask_refine: str = (
        "off"  # off | otsu: each mask's outline (1 px deep) follows the image's Otsu foreground
    )
    box_nms_thresh: float = 0.5  # per-class NMS IoU threshold on detections
    # The operating point: detections scoring at least score_threshold are the objects the model reports
    # (predict's label images, tables and counts; serving's default; the Kaggle metric and the per-image
    # errors of evaluation); COCO AP ranks every detection above box_score_thresh, as Detectron2 evaluates
    # at 0.05 and its demo shows 0.5.
    score_threshold: float = 0.5
    choose_score_threshold: bool = True  # training sets score_threshold to the cut-off (0.05-0.95) with the
    # highest Kaggle metric on the validation images, for the weights it hands over (as a classifier's
    # operating point is chosen); false keeps score_threshold as given
    box_detections_per_img: int = 100  # maximum detections per image at inference
    tta: str = "off"  # test-time augmentation at inference: off | flips | flips+rot90 (instances of the
    # transformed images mapped back and merged by mask IoU, scores and soft masks averaged)
    object_diameter: float = 0.0  # median object diameter (px) the model trained on; > 0: an image whose
    # objects look much larger (Otsu estimate) is shrunk to it at inference (trainers/detection/scale.py)
    baseline: str = "otsu"  # classical baseline scored beside the model on the validation images: otsu |
    # otsu-watershed | off (never a champion candidate; it shows whether learning beat a threshold)
    # --- optimisation ---
    optimizer: str = "sgd"  # sgd (momentum) | adam | adamw
    lr: float = 0.02  # base learning rate per optimizer step (before lr_reference_batch scaling)
    lr_reference_batch: int = 0  # 0 = use lr as given; else linear scaling rule (Goyal et al. 2017):
    # lr * global_batch / lr_reference_batch, global_batch = batch_size * workers * accumulate_steps images
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD with Nesterov momentum
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
    amp: str = "off"  # mixed precision: off | bf16 | fp16 (fp16 adds a GradScaler); CPU: off | bf16
    seed: int = 0  # seeds the split, the weights' init, augmentation and data order
    early_stop_patience: int = 0  # stop after this many epochs without a higher validation segm_AP; 0 = off
    restore_best: bool = True  # the run's model is its epoch of highest validation segm_AP; false: the last
    ema_decay: float = 0.0  # 0 = off; else validation and the handed-over model use an exponential moving
    # average of the weights (trainers/run.WeightAverage: decay 1 - step^(-2/3) up to this, e.g. 0.999)
    loader_workers: int = 0  # DataLoader worker processes per training worker

    def validate(self) -> None:
        from datasets.augment import PRESETS  # albumentations takes ~2.5 s to import: only when validating

        _one_of("augment", self.augment, tuple(PRESETS))
        _one_of("backbone", self.backbone, BACKBONES)
        _one_of("normalize", self.normalize, NORMALIZATIONS)
        _one_of("tta", self.tta, TTA_MODES)
        _one_of("baseline", self.baseline, BASELINES)
        _one_of("mask_refine", self.mask_refine, MASK_REFINES)
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
            "score_threshold",
            "val_fraction",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key}: expected a value in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.mask_threshold < 1.0:  # 0 or 1 would make every mask the box, or empty
            raise UserError(f"mask_threshold: expected a value in (0, 1), got {self.mask_threshold}")
        if self.rpn_bg_iou_thresh > self.rpn_fg_iou_thresh:
            raise UserError(
                f"rpn_bg_iou_thresh: {self.rpn_bg_iou_thresh} is above "
                f"rpn_fg_iou_thresh {self.rpn_fg_iou_thresh}"
            )
        if self.tile_size < 0 or 0 < self.tile_size < 32:
            raise UserError(f"tile_size: expected 0 (whole images) or >= 32 pixels, got {self.tile_size}")
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise UserError(f"tile_overlap: expected [0, {self.tile_size}) pixels, got {self.tile_overlap}")
        if not (math.isfinite(self.object_diameter) and self.object_diameter >= 0):
            raise UserError(f"object_diameter: expected 0 (off) or pixels, got {self.object_diameter}")
        if not 0.0 <= self.tile_min_visible <= 1.0:
            raise UserError(f"tile_min_visible: expected a value in [0, 1], got {self.tile_min_visible}")
        for key in ("epochs", "batch_size", "min_size", "max_size", "box_detections_per_img"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        for key in ("min_size", "max_size", "tile_size"):  # what the model resizes to: its memory
            if getattr(self, key) > MAX_INPUT_SIDE:
                raise UserError(f"{key}: expected at most {MAX_INPUT_SIDE} pixels, got {getattr(self, key)}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise UserError(f"trainable_backbone_layers: expected 0-5, got {self.trainable_backbone_layers}")
        _one_of("amp", self.amp, AMP_MODES)
        self._validate_optimisation()
        self._validate_phases()

    def _validate_optimisation(self) -> None:
        for key in ("accumulate_steps", "cosine_period_mult"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        for key in (
            "lr_reference_batch",
            "lr_decay_every",
            "lr_decay_start",
            "warmup_iters",
            "early_stop_patience",
        ):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or a positive integer, got {getattr(self, key)}")
        if self.cosine_period_epochs < 0:
            raise UserError("cosine_period_epochs: expected 0 (off) or a positive number of epochs")
        _check_ema_decay(self.ema_decay)
        if self.cosine_period_epochs > 0 and not 0 <= self.lr_min < self.lr:
            raise UserError(f"lr_min: expected a value in [0, lr={self.lr}), got {self.lr_min}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            # torch.optim.SGD refuses nesterov without momentum; Adam(W) has no nesterov switch at all
            raise UserError(
                f"nesterov: expected optimizer=sgd with momentum > 0, got optimizer={self.optimizer} "
                f"momentum={self.momentum}"
            )
        if not 0.0 < self.box_positive_fraction <= 1.0:
            raise UserError(
                f"box_positive_fraction: expected a fraction in (0, 1], got {self.box_positive_fraction}"
            )
        for key in ("mask_head_layers", "mask_head_channels"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        for key in ("mask_loss_weight", "mask_min_area", "aug_rotate", "aug_blur"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        # factors drawn from [1 - m, 1 + m]: m >= 1 would allow a zoom/brightness/contrast factor of 0 or less
        for key in ("aug_scale", "aug_brightness", "aug_contrast"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"{key}: expected a magnitude in [0, 1), got {getattr(self, key)}")
        for value in self.class_score_thresh:
            if not 0.0 <= value <= 1.0:
                raise UserError(
                    f"class_score_thresh: expected per-class scores in [0, 1], got {self.class_score_thresh}"
                )

    def _validate_phases(self) -> None:
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


CROPS = ("object", "none")
AGGREGATES = ("mean", "vote")


@dataclass
class ClassifierConfig:
    """A timm slice classifier (ForamDeepSlice, RECIPES.md section 2): `epochs` in all, of which the first
    `head_epochs` train the head only (backbone frozen, lr `head_lr`, cosine), the rest everything (lr
    `lr`, cosine with warm restarts every `restart_epochs`); AdamW; early stopping on validation loss."""

    # --- data ---
    data: str = ""  # "" = the bundled adrenal3d sample; a volume source (labels CSV, class folders) that is
    # sliced into a cache, or a slice index CSV from `python -m platform.data slices`. Absolute on workers.
    val_fraction: float = 0.2  # specimens held out for validation when the slice index has no split
    split_seed: int = 0  # seeds that split; apart from `seed` so that repeats with other seeds (--seeds,
    # ensemble members) hold out the same specimens and can be compared and combined without leakage
    axes: str = "all"  # volume axes slices are cut across: 0, 1, 2, a list such as 0,2, or all
    slice_size: int = 224  # side of the extracted slice images, pixels (volume sources)
    crop: str = "object"  # object: square box around the object (the paper's "intelligent cropping", scale
    # lost); none: the whole slice (object size stays visible, as for glands of fixed voxel size)
    crop_margin: float = 0.1  # crop=object: margin around the object's box, fraction of its side
    min_foreground: float = 0.01  # slices with less object (Otsu) than this fraction are dropped
    context: int = 0  # 1: each image holds the slices before/at/after as RGB ("2.5D"; needs in_chans=3)
    distance_scale: float = 0.0  # 0: raw grey; else voxels become their distance to the background (Otsu
    # mask) x this many grey levels per voxel: slices of binary masks then show 3D thickness
    slices_per_specimen: int = 0  # training slices drawn per specimen each epoch (0 = all): neighbouring
    # slices are near copies, so a fresh sample per epoch covers the data at a fraction of the cost
    val_slices_per_specimen: int = 0  # evenly spaced validation slices per specimen (0 = all)
    aggregate: str = "mean"  # volume-level prediction from slices: mean probability | vote (majority)
    augment: str = "foramdeepslice"  # per-slice augmentation preset (datasets/augment.py)
    # --- model ---
    model_name: str = "resnet18"  # any timm model name (timm.list_models())
    pretrained: str = ""  # "" random init; "timm" = timm's pretrained weights (downloads); or a weights file
    input_size: int = 224  # model input side, pixels (224 or 384 in the paper; slices are resized to it)
    in_chans: int = 3  # 3: grey slices repeated to RGB (as ImageNet weights expect); 1: one grey channel
    drop_rate: float = 0.0  # dropout before the classifier head
    # --- optimisation ---
    epochs: int = 30  # training epochs in all (a Tune search or early stopping may end a run earlier)
    head_epochs: int = 10  # the first this many epochs train the head only, the backbone frozen
    head_lr: float = 1e-4  # lr of the head-only phase (cosine to 0 over the phase)
    lr: float = 5e-5  # lr once everything trains (cosine with warm restarts)
    restart_epochs: float = 0.0  # warm-restart period of the second phase, epochs (0 = one cosine period)
    warmup_epochs: float = 0.0  # linear warm-up of the lr over the run's first epochs (from-scratch training)
    lr_reference_batch: int = 0  # 0 = lrs as given; else scaled by global_batch / lr_reference_batch
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # Mixup Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = 0.0  # CutMix Beta(alpha, alpha); 0 = off
    mix_prob: float = 1.0  # probability a batch is mixed (Mixup or CutMix, switching 50/50 when both on)
    early_stop_patience: int = 5  # stop after this many epochs without a lower validation loss; 0 = off
    restore_best: bool = True  # the run's model is the epoch of lowest validation loss (Keras'
    # restore_best_weights); false: the last epoch's
    precise_bn_batches: int = 50  # before each validation, BatchNorm statistics are recomputed over this many
    # training batches with the current weights (Detectron2's PreciseBN; 0 = off): the running averages lag
    # weights that move fast (from scratch, high lr) and then evaluate a model that never existed
    ema_decay: float = 0.0  # 0 = off; else validation, the best epoch and the handed-over model use an
    # exponential moving average of the weights (trainers/run.WeightAverage; timm's --model-ema, e.g. 0.999)
    batch_size: int = 32  # slices per worker per step (even: Mixup/CutMix pair the batch with its flip)
    amp: str = "off"  # mixed precision: off | bf16 | fp16 (fp16 adds a GradScaler); CPU: off | bf16
    seed: int = 0  # seeds the weights' init, augmentation, mixing and data order (not the split)
    loader_workers: int = 0  # DataLoader worker processes per training worker

    def validate(self) -> None:
        # albumentations (augment) takes ~2.5 s to import: only when validating, not for every CLI start
        from datasets.augment import PRESETS
        from datasets.slicing import parse_axes

        try:
            parse_axes(self.axes)
        except UserError as e:
            raise UserError(f"axes: {e}") from None
        _one_of("crop", self.crop, CROPS)
        _one_of("aggregate", self.aggregate, AGGREGATES)
        _one_of("augment", self.augment, tuple(PRESETS))
        _one_of("amp", self.amp, AMP_MODES)
        for key in ("val_fraction", "min_foreground", "label_smoothing", "mix_prob", "drop_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key}: expected a value in [0, 1], got {getattr(self, key)}")
        for key in ("slice_size", "input_size"):
            if getattr(self, key) < 16:
                raise UserError(f"{key}: expected at least 16 pixels, got {getattr(self, key)}")
        if self.in_chans not in (1, 3):
            raise UserError(f"in_chans: expected 1 (grey) or 3 (grey repeated to RGB), got {self.in_chans}")
        if self.context not in (0, 1):
            raise UserError(
                f"context: expected 0 (one slice) or 1 (neighbouring slices as RGB), got {self.context}"
            )
        if self.context and self.in_chans != 3:
            raise UserError("context: 1 stacks three slices as RGB channels; it needs in_chans=3")
        if self.epochs < 1:
            raise UserError(f"epochs: expected a positive integer, got {self.epochs}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise UserError(f"batch_size: expected an even number >= 2 (Mixup pairs), got {self.batch_size}")
        for key in ("head_lr", "lr"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}: expected a positive learning rate, got {getattr(self, key)}")
        for key in (
            "crop_margin",
            "slices_per_specimen",
            "val_slices_per_specimen",
            "distance_scale",
            "head_epochs",  # more than `epochs`: the whole (shortened) run trains the head only
            "restart_epochs",
            "warmup_epochs",
            "lr_reference_batch",
            "weight_decay",
            "mixup_alpha",
            "cutmix_alpha",
            "early_stop_patience",
            "precise_bn_batches",
            "loader_workers",
        ):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        _check_ema_decay(self.ema_decay)

    def slicing(self) -> dict:
        """The slice-extraction settings, as `datasets.slicing.volume_slices` takes them: a model only
        understands slices cut the way its training slices were."""
        from datasets.slicing import parse_axes  # as in validate: not at every CLI start

        return dict(
            axes=parse_axes(self.axes),
            size=self.slice_size,
            crop=self.crop,
            margin=self.crop_margin,
            min_foreground=self.min_foreground,
            context=self.context,
            distance_scale=self.distance_scale,
        )


CONFIG_CLASSES = (MaskRCNNConfig, ClassifierConfig)


def config_class(values: dict[str, Any]) -> type:
    """The config class `values` (a recipe file, a checkpoint's config.json) belongs to: the one whose
    fields hold all its keys; Mask R-CNN when both do (a file of shared keys such as `epochs`)."""
    keys = set(values)
    for cls in CONFIG_CLASSES:
        if keys <= set(typing.get_type_hints(cls)):
            return cls
    return MaskRCNNConfig  # its apply_overrides names the unknown key


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{key}: unknown value '{value}'; valid: {', '.join(valid)}")


def _check_ema_decay(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UserError(f"ema_decay: expected 0 (off) or a decay in (0, 1), got {value}")


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
    if not isinstance(values, dict):  # a config file's content: a forged one may be any JSON value
        raise UserError(f"{source}: expected an object of {cls.__name__} keys, got {type(values).__name__}")
    try:
        return apply_overrides(cls(), values, source)
    except UserError as e:  # validate's messages name the field; this one names the file as well
        if str(e).startswith(f"{source}: "):
            raise
        raise UserError(f"{source}: {e}") from None


def write_json(config: Any, path: Path) -> None:
    """Atomic write: a reader never sees half a config."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def parse_phase(entry: str) -> tuple[int, int, float]:
    """ "EPOCH:TRAINABLE_LAYERS[:LR_FACTOR]" -> (epoch, layers, lr factor); ValueError if malformed."""
    parts = entry.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(entry)
    return int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0
