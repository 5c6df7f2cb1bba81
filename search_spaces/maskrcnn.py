"""Mask R-CNN search spaces."""

from ray import tune

from search_spaces import register_space


@register_space(
    "rpn_anchors", "anchor sizes and aspect ratios, RPN IoU thresholds, RPN NMS, pre/post-NMS top-k"
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
