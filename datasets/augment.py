"""Named augmentation presets (albumentations 2.0.8) that reproduce each reference workflow's augmentation.

Usage, for instance data:

    transform = augmentation("foram", seed=0)
    image, masks, kept = apply_transform(transform, image, masks)   # HxWx3 uint8, NxHxW bool

Boxes are never passed to albumentations: they are recomputed from the transformed masks
(`masks_to_boxes`), so boxes cannot drift from masks, and masks move with the image because every
geometric transform is applied to image and masks with the same parameters (tested in test_augment.py).

Two albumentations 2.0.8 behaviours every caller must know (both handled here):
- `A.Compose(..., seed=s)` gives each child transform its *own* generator seeded with `s`, so children
  draw identical random numbers: HorizontalFlip(p=0.5) and VerticalFlip(p=0.5) then flip together or not
  at all (only the identity and the 180-degree rotation ever occur). `reseed` shares one generator pair
  across the whole tree, which makes the children independent again.
- A DataLoader worker gets a pickled copy of the transform, so without reseeding every worker (and, with
  non-persistent workers, every epoch) replays the same augmentation sequence. Pass `seed_worker` as the
  DataLoader's `worker_init_fn`.
- OpenCV cannot warp or resize bool arrays; `apply_transform` hands masks over as uint8.
"""

import random
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import torch

from datasets.errors import UserError

# name -> function returning the list of transforms (fresh objects each call: a transform object must not
# sit in two pipelines, they would share random state)
PRESETS: dict[str, Callable[[], list]] = {}


def register_preset(name: str):
    def decorate(fn: Callable[[], list]) -> Callable[[], list]:
        PRESETS[name] = fn
        return fn

    return decorate


def augmentation(
    preset: str,
    seed: int,
    *,
    rotate: float = 0.0,
    scale: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    blur: float = 0.0,
) -> A.Compose | None:
    """The named preset as one seeded pipeline, or None for `none` with no extra augmentation.

    Non-zero magnitudes (MaskRCNNConfig's aug_* fields) append extra transforms after the preset
    (`extra_transforms`); all zero gives exactly the preset. Apply it as `transform(image=HxWx3 uint8,
    masks=[HxW uint8, ...])`, or through `apply_transform`, which also converts bool masks and drops
    instances that left the image. Raises UserError for an unknown name, listing the valid ones.
    """
    if preset not in PRESETS:
        raise UserError(f"augment: unknown preset '{preset}'; valid: {', '.join(PRESETS)}")
    transforms = PRESETS[preset]() + extra_transforms(rotate, scale, brightness, contrast, blur)
    if not transforms:
        return None
    return reseed(A.Compose(transforms), seed)


def extra_transforms(rotate: float, scale: float, brightness: float, contrast: float, blur: float) -> list:
    """Searchable augmentations: rotation within +-`rotate` degrees and zoom by [1 - scale, 1 + scale] (one
    affine warp, black fill, masks nearest-neighbour so they stay binary), brightness and contrast factors
    in [1 - m, 1 + m] (ColorJitter: factors, see the note above the presets), and on half of the images a
    Gaussian blur of sigma up to `blur` pixels. A zero magnitude adds nothing."""
    out = []
    if rotate or scale:
        out.append(_affine(rotate, scale))
    if brightness or contrast:
        out.append(
            A.ColorJitter(
                brightness=(1 - brightness, 1 + brightness),
                contrast=(1 - contrast, 1 + contrast),
                saturation=(1.0, 1.0),
                hue=(0.0, 0.0),
                p=1.0,
            )
        )
    if blur:
        out.append(A.GaussianBlur(sigma_limit=(0.0, blur), blur_limit=0, p=0.5))
    return out


def reseed(transform: A.BaseCompose, seed: int) -> A.BaseCompose:
    """Give the whole pipeline one shared generator pair seeded by `seed` (see the module docstring)."""
    transform.set_random_seed(seed)  # records the seed on every node
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))  # one shared stream
    return transform


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a different, reproducible augmentation stream per worker and epoch.

    torch derives each worker's seed from the loader's base seed (drawn anew for every epoch from torch's
    generator) plus the worker id, so seeding torch once makes the whole run reproducible.
    """
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):  # Subset and friends
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        reseed(transform, info.seed % 2**32)


def apply_transform(
    transform: A.BaseCompose | None, image: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transform an image (HxWx3 uint8) with its instance masks (NxHxW bool).

    Returns (image, masks NxH'xW' bool, kept): `kept` indexes the input instances that still have a pixel,
    so labels and other per-instance fields can follow (`labels[kept]`).
    """
    if transform is None:
        return image, masks, np.arange(len(masks))
    if not len(masks):
        out = transform(image=image)["image"]
        return out, np.zeros((0, *out.shape[:2]), dtype=bool), np.arange(0)
    out = transform(image=image, masks=[m.astype(np.uint8) for m in masks])
    moved = np.stack(out["masks"]).astype(bool)
    kept = np.flatnonzero(moved.any(axis=(1, 2)))
    return out["image"], moved[kept], kept


# ---- presets ------------------------------------------------------------------------------------------
# Brightness/contrast semantics differ between transforms, and the papers quote factors:
# - A.ColorJitter(brightness=(a, b)) multiplies pixels by a factor in [a, b] and
#   A.ColorJitter(contrast=(a, b)) blends with the grey mean by a factor in [a, b]: torchvision's
#   ColorJitter semantics, hence what a paper's "factor in [0.9, 1.1]" means.
# - A.RandomBrightnessContrast(brightness_limit=l) ADDS l * 255 (brightness_by_max=True), i.e. it is not a
#   factor at all, and its contrast multiplies by 1 + c without centring on the mean in 2.0.8.
#   So factor ranges below go through ColorJitter, never RandomBrightnessContrast.
# - A.ColorJitter(hue=h) adds h of a full turn of the hue circle (torchvision's hue in [-0.5, 0.5]).
# - A.RandomGamma(gamma_limit=(80, 120)) raises [0, 1] pixels to a power gamma in [0.8, 1.2].


def _affine(rotate: float, scale: float) -> A.Affine:
    """Rotation within +-rotate degrees and zoom within 1 +- scale in one warp (image bilinear, masks
    nearest), the uncovered border black as a slice's background."""
    return A.Affine(
        rotate=(-rotate, rotate),
        scale=(1 - scale, 1 + scale),
        keep_ratio=True,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=1.0,
    )


@register_preset("none")
def _none() -> list:
    return []


@register_preset("flips")
def _flips() -> list:
    # The platform's default: independent horizontal and vertical flips.
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


@register_preset("foram")
def _foram() -> list:
    # Foraminifera Mask R-CNN paper: independent h/v flips p=0.5; brightness and contrast factor
    # [0.9, 1.1], saturation factor [0.99, 1.01], hue shift [-0.01, 0.01]; gamma [0.8, 1.2]. The colour
    # transforms are applied to every image (torchvision's ColorJitter has no probability), in a random
    # order as torchvision does.
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.ColorJitter(
            brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=(0.99, 1.01), hue=(-0.01, 0.01), p=1
        ),
        A.RandomGamma(gamma_limit=(80, 120), p=1),
    ]


DSB2018_CROP = 512  # Matterport NucleusConfig: IMAGE_MIN_DIM = IMAGE_MAX_DIM = 512, IMAGE_RESIZE_MODE "crop"


def _dsb2018_choices() -> list:
    exact = {"p": 1.0}
    return [
        A.HorizontalFlip(p=0.5),  # iaa.Fliplr(0.5): even when picked it flips half the time
        A.VerticalFlip(p=0.5),  # iaa.Flipud(0.5)
        A.OneOf(  # iaa.OneOf([Affine(rotate=90), Affine(rotate=180), Affine(rotate=270)]), pixel-exact here
            [
                A.Sequential([A.Transpose(**exact), A.VerticalFlip(**exact)]),  # 90
                A.Sequential([A.HorizontalFlip(**exact), A.VerticalFlip(**exact)]),  # 180
                A.Sequential([A.Transpose(**exact), A.HorizontalFlip(**exact)]),  # 270
            ],
            p=1.0,
        ),
        A.MultiplicativeNoise(multiplier=(0.8, 1.5), per_channel=False, elementwise=False, p=1.0),  # Multiply
        A.GaussianBlur(sigma_limit=(0.0, 5.0), blur_limit=0, p=1.0),  # GaussianBlur(sigma=(0, 5))
    ]


@register_preset("dsb2018")
def _dsb2018() -> list:
    # Matterport's nucleus sample (the DSB2018 Mask R-CNN workflow): the image is upsampled 2x
    # (IMAGE_MIN_SCALE = 2, bilinear; masks nearest) and a random 512x512 crop taken, then
    # iaa.SomeOf((0, 2), [Fliplr(0.5), Flipud(0.5), OneOf(rot 90/180/270), Multiply((0.8, 1.5)),
    # GaussianBlur(sigma=(0, 5))]): 0, 1 or 2 of those five (uniformly), applied in list order.
    # The Multiply is in Matterport's code although RECIPES.md does not list it. Images smaller than
    # 256 pixels on a side are zero-padded to the crop (Matterport would fail on them).
    return [
        A.RandomScale(scale_limit=(1.0, 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),  # scale 1 + 1 = 2
        A.RandomCrop(height=DSB2018_CROP, width=DSB2018_CROP, pad_if_needed=True, fill=0, fill_mask=0, p=1.0),
        A.OneOf(  # SomeOf((0, 2)): the count n is uniform over {0, 1, 2}
            [
                A.NoOp(p=1.0),
                A.SomeOf(_dsb2018_choices(), n=1, replace=False, p=1.0),
                A.SomeOf(_dsb2018_choices(), n=2, replace=False, p=1.0),
            ],
            p=1.0,
        ),
    ]


# Detectron2's default training resize (ResizeShortestEdge, sample_style "choice"), used by the
# Sartorius notebooks.
SARTORIUS_SHORT_EDGES = (640, 672, 704, 736, 768, 800)


@register_preset("sartorius")
def _sartorius() -> list:
    # Sartorius Detectron2 workflow, the "more augmentation" variant (val 0.300): Detectron2's default
    # RandomFlip (horizontal, p=0.5) and ResizeShortestEdge, plus RandomContrast(0.8, 1.2),
    # RandomBrightness(0.8, 1.2) (Detectron2 factors: brightness multiplies, contrast blends with the
    # mean; always applied) and a vertical flip p=0.5. The write-up gives no numbers for "more resizing",
    # so the short edge uses Detectron2's default choices. Detectron2's max_size=1333 cap is not applied:
    # it never binds for 704x520 Sartorius images (long edge at most 1083).
    # Note: torchvision's Mask R-CNN resizes again to its own min_size; give the model the same min_size
    # choices (or min_size equal to the image) so that this resize is not undone.
    return [
        A.HorizontalFlip(p=0.5),
        A.SmallestMaxSize(max_size=list(SARTORIUS_SHORT_EDGES), interpolation=cv2.INTER_LINEAR, p=1.0),
        A.ColorJitter(brightness=(1.0, 1.0), contrast=(0.8, 1.2), saturation=(1.0, 1.0), hue=(0.0, 0.0), p=1),
        A.ColorJitter(brightness=(0.8, 1.2), contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=(0.0, 0.0), p=1),
        A.VerticalFlip(p=0.5),
    ]


@register_preset("foramdeepslice")
def _foramdeepslice() -> list:
    # ForamDeepSlice classifier: rotation +-45 degrees and scale 0.8-1.2 (one affine warp, black fill as
    # the cropped slice background), horizontal flip, brightness/contrast, colour jitter. The paper gives
    # no magnitudes for the photometric part: brightness and contrast factors [0.8, 1.2] and saturation
    # [0.8, 1.2], hue +-0.02 are our choice (torchvision-style factors). CutMix and Mixup mix labels across
    # images, so they belong to the classifier's batch collation, not to this per-image pipeline.
    return [
        _affine(45, 0.2),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(
            brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=(-0.02, 0.02), p=1
        ),
    ]


@register_preset("dihedral")
def _dihedral() -> list:
    # The 8 rotations/reflections of a square, nothing else: exact on binary shape masks (no interpolation,
    # no photometric change), where a slice's orientation carries no class information.
    return [A.RandomRotate90(p=1.0), A.HorizontalFlip(p=0.5)]
