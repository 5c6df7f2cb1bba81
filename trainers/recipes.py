"""Named base configs ("recipes"). A recipe may also be a YAML/JSON file of config fields.

The four published workflows (../shared/docs/RECIPES.md) become recipes here as the training issue lands;
`dsb2018_demo` is the CPU-sized one the demo and the tests run.
"""

from collections.abc import Callable
from pathlib import Path

import yaml

from datasets.errors import UserError
from trainers.config import MaskRCNNConfig, apply_overrides

RECIPES: dict[str, tuple[Callable[[], MaskRCNNConfig], str]] = {}


def register_recipe(name: str, description: str):
    def deco(fn: Callable[[], MaskRCNNConfig]) -> Callable[[], MaskRCNNConfig]:
        RECIPES[name] = (fn, description)
        return fn

    return deco


def get_recipe(name_or_path: str) -> MaskRCNNConfig:
    """A registered recipe by name, or a YAML/JSON file whose keys are config fields."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path][0]()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise UserError(f"--recipe: file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
        return apply_overrides(MaskRCNNConfig(), values, source=str(path))
    raise UserError(
        f"--recipe: unknown recipe '{name_or_path}'; valid: {', '.join(sorted(RECIPES))} or a .yaml file"
    )


@register_recipe("default", "torchvision's Mask R-CNN ResNet-50-FPN defaults")
def default() -> MaskRCNNConfig:
    return MaskRCNNConfig()


@register_recipe(
    "dsb2018_demo", "CPU-sized: ResNet-18-FPN from scratch (GroupNorm), 256 px nuclei, bundled sample"
)
def dsb2018_demo() -> MaskRCNNConfig:
    return MaskRCNNConfig(
        backbone="resnet18_fpn",
        norm="group",  # from scratch with 2-image batches: BatchNorm statistics would be noise
        trainable_backbone_layers=5,
        min_size=256,
        max_size=320,
        anchor_sizes=(16, 32, 64, 128, 256),  # nuclei are 10-40 px
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=128,
        optimizer="sgd",
        lr=0.01,
        grad_clip=10.0,
        warmup_iters=10,
        epochs=4,  # ASHA rungs at 2 and 4 epochs (grace period 2, reduction factor 2)
        batch_size=2,
    )
