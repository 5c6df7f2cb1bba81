"""Mask R-CNN search spaces."""

from ray import tune

from search_spaces import register_space


@register_space(
    "rpn_anchors",
    "anchor sizes and aspect ratios, RPN IoU thresholds, RPN NMS, pre/post-NMS top-k",
    recipe="dsb2018_quick",  # the demo: `python -m platform.tune --space rpn_anchors`
)
def rpn_anchors() -> dict:
    return {
        # torchvision's default, the Sartorius tuned sizes, and two scales for small nuclei
        "anchor_sizes": tune.choice(
            ["32,64,128,256,512", "24,40,80,128,256", "16,32,64,128,256", "8,16,32,64,128"]
        ),
        # torchvision's default and the Sartorius tuned ratios
        "aspect_ratios": tune.choice(["0.5,1.0,2.0", "0.33,1.0,3.0", "0.5,1.0", "1.0"]),
        "rpn_fg_iou_thresh": tune.uniform(0.5, 0.8),
        "rpn_bg_iou_thresh": tune.uniform(0.1, 0.4),
        "rpn_nms_thresh": tune.uniform(0.5, 0.8),
        "rpn_pre_nms_top_n_train": tune.choice([500, 1000, 2000]),
        "rpn_post_nms_top_n_train": tune.choice([250, 500, 1000]),
        "rpn_pre_nms_top_n_test": tune.choice([500, 1000]),
        "rpn_post_nms_top_n_test": tune.choice([250, 500, 1000]),
    }


# The spaces below search around dsb2018_demo: 4 epochs (ASHA rungs at 2 and 4), so epoch-valued choices
# (lr steps, cosine period, phases) are epochs of that run. Every name given to trial.suggest_* is a config
# field, so Ray passes the sampled values straight into the config.


@register_space(
    "optimizer",
    "conditional: sgd (lr, momentum, nesterov) or adam/adamw (lr); weight decay; step/cosine/constant "
    "schedule; warm-up",
    define_by_run=True,
)
def optimizer(trial) -> None:
    kind = trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"])
    if kind == "sgd":
        trial.suggest_float("lr", 1e-3, 5e-2, log=True)
        trial.suggest_float("momentum", 0.8, 0.99)
        trial.suggest_categorical("nesterov", [False, True])  # only here: validate() refuses it elsewhere
    else:
        trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    # AdamW's decay is decoupled from the gradient (multiplied by lr), so useful values are far larger
    if kind == "adamw":
        trial.suggest_float("weight_decay", 1e-4, 0.1, log=True)
    else:
        trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
    # Schedule, told apart by field values rather than a helper choice: cosine_period_epochs 4 = cosine
    # annealing over the whole run; 0 = no cosine, then lr_gamma 1.0 = constant lr, below 1 = step decay
    # by lr_gamma at the epochs of lr_steps.
    if trial.suggest_categorical("cosine_period_epochs", [0.0, 4.0]) == 0.0:
        if trial.suggest_categorical("lr_gamma", [1.0, 0.5, 0.2, 0.1, 0.05]) < 1.0:
            trial.suggest_categorical("lr_steps", ["2", "3", "2,3"])
    trial.suggest_categorical("warmup_iters", [0, 50, 200])


@register_space(
    "roi_heads",
    "ROI sampling (ROIs per image, positive fraction) and detection post-processing (score, NMS, max dets)",
)
def roi_heads() -> dict:
    return {
        "box_batch_size_per_image": tune.choice([64, 128, 256, 512]),
        "box_positive_fraction": tune.uniform(0.1, 0.5),
        # COCO AP rewards a low score threshold (more recall at the tail); the Kaggle metric scores at 0.5
        "box_score_thresh": tune.loguniform(1e-3, 0.2),
        "box_nms_thresh": tune.uniform(0.3, 0.7),
        "box_detections_per_img": tune.choice([100, 200, 400]),  # DSB2018 images hold up to ~400 nuclei
    }


@register_space("mask_head", "mask head depth and width, mask loss weight")
def mask_head() -> dict:
    return {
        "mask_head_layers": tune.randint(2, 7),  # 2..6 (upper bound exclusive); torchvision: 4
        "mask_head_channels": tune.choice([128, 256]),
        "mask_loss_weight": tune.uniform(0.5, 2.0),
    }


@register_space(
    "backbone",
    "ResNet depth, trainable stages and freeze/unfreeze phases, input size, full-resolution tiles",
)
def backbone() -> dict:
    return {
        "backbone": tune.choice(["resnet18_fpn", "resnet34_fpn", "resnet50_fpn"]),
        "trainable_backbone_layers": tune.randint(0, 6),  # 0..5, until the phase below
        # "EPOCH:LAYERS[:LR_FACTOR]": unfreeze all stages from epoch 1 or 2 (gradual unfreezing), freeze the
        # backbone for the last epochs (as foram_maskrcnn's "25:0"), or all stages at a tenth of the lr.
        # A phase that keeps the sampled trainable_backbone_layers (5 with "2:5") is the no-phase case.
        "phases": tune.choice(["1:5", "2:5", "2:0", "3:0", "2:5:0.1"]),
        # input size; the sample's images are 256x256 and 256x320, and max_size stays the recipe's 320
        "min_size": tune.choice([192, 256, 320]),
        "tile_size": tune.choice([0, 128, 256]),  # 0 = whole resized images; else native-resolution tiles
    }


@register_space("augment", "augmentation preset, rotation, zoom, brightness, contrast and blur magnitudes")
def augment() -> dict:
    return {
        # sartorius is left out: its 640-800 px short edge is for Sartorius images, not 256 px nuclei
        "augment": tune.choice(["none", "flips", "foram", "dsb2018"]),
        "aug_rotate": tune.uniform(0.0, 45.0),
        "aug_scale": tune.uniform(0.0, 0.3),
        "aug_brightness": tune.uniform(0.0, 0.3),
        "aug_contrast": tune.uniform(0.0, 0.3),
        "aug_blur": tune.uniform(0.0, 1.5),
    }
