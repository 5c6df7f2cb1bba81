"""Augmentation presets: masks and boxes move with the image, seeding, worker streams, and the loader
benchmark's numbers."""

from collections import Counter

import albumentations as A
import numpy as np
import pytest
import torch

from datasets.augment import (
    PRESETS,
    _dsb2018_choices,
    apply_transform,
    augmentation,
    reseed,
    seed_worker,
)
from datasets.errors import UserError
from datasets.instances import masks_to_boxes
from datasets.mask_folders import load_image, load_masks, read_mask_folders
from platform.benchmarks.data import loader_benchmark
from tests.helpers import SAMPLE

ALL = list(PRESETS)
AUGMENTING = [name for name in ALL if name != "none"]


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel holds its own position (row; column low byte; column high byte)."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols % 256, cols // 256], axis=2).astype(np.uint8)


# The eight exact symmetries of the pixel grid, as (apply to an array, move a pixel-edge box in an H x W
# image). A box (x1, y1, x2, y2) spans columns x1..x2-1 and rows y1..y2-1.
SYMMETRIES = {
    "identity": (lambda a: a, lambda b, h, w: (b[0], b[1], b[2], b[3])),
    "hflip": (lambda a: a[:, ::-1], lambda b, h, w: (w - b[2], b[1], w - b[0], b[3])),
    "vflip": (lambda a: a[::-1], lambda b, h, w: (b[0], h - b[3], b[2], h - b[1])),
    "rot180": (lambda a: a[::-1, ::-1], lambda b, h, w: (w - b[2], h - b[3], w - b[0], h - b[1])),
    "transpose": (lambda a: a.swapaxes(0, 1), lambda b, h, w: (b[1], b[0], b[3], b[2])),
    "rot90": (lambda a: np.rot90(a, 1), lambda b, h, w: (b[1], w - b[2], b[3], w - b[0])),
    "rot270": (lambda a: np.rot90(a, 3), lambda b, h, w: (h - b[3], b[0], h - b[1], b[2])),
    "antitranspose": (
        lambda a: a[::-1, ::-1].swapaxes(0, 1),
        lambda b, h, w: (h - b[3], w - b[2], h - b[1], w - b[0]),
    ),
}


def which_symmetry(before: np.ndarray, after: np.ndarray) -> str:
    matches = [
        name
        for name, (move, _) in SYMMETRIES.items()
        if move(before).shape == after.shape and np.array_equal(move(before), after)
    ]
    assert len(matches) == 1, matches
    return matches[0]


def real_sample(index: int) -> tuple[np.ndarray, np.ndarray]:
    record = read_mask_folders(SAMPLE)[index]
    image = load_image(record.image_path)
    return image, load_masks(record, image.shape[:2])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown preset 'fancy'; valid: none, flips, foram, dsb2018"):
        augmentation("fancy", seed=0)
    assert augmentation("none", seed=0) is None


@pytest.mark.parametrize("preset", AUGMENTING)
def test_same_seed_same_augmentation(preset):
    image, masks = real_sample(0)
    runs = []
    for seed in (5, 5, 6):
        transform = augmentation(preset, seed)
        runs.append([apply_transform(transform, image, masks) for _ in range(4)])
    for (a_img, a_masks, _), (b_img, b_masks, _) in zip(runs[0], runs[1], strict=True):
        assert np.array_equal(a_img, b_img) and np.array_equal(a_masks, b_masks)
    assert any(
        a.shape != c.shape or not np.array_equal(a, c)
        for (a, _, _), (c, _, _) in zip(runs[0], runs[2], strict=True)
    )


def test_flips_are_independent():
    # albumentations 2.0.8 seeds every child of a seeded Compose alike: the two flips would then always
    # fire together (only identity and rot180 ever occur). `reseed` shares one generator instead.
    image = coordinate_image(8, 12)
    transform = augmentation("flips", seed=0)
    seen = Counter(which_symmetry(image, transform(image=image)["image"]) for _ in range(200))
    assert set(seen) == {"identity", "hflip", "vflip", "rot180"}
    assert min(seen.values()) > 25


@pytest.mark.parametrize("case", ["flips", "dsb2018-rotations"])
def test_exact_geometry_moves_boxes_like_the_image(case):
    """flips and the DSB2018 90/180/270 rotations are pixel-exact: every transformed mask equals the
    source mask moved by the symmetry the image underwent, and its box equals the moved box."""
    if case == "flips":
        transform = augmentation("flips", seed=1)
        expected = {"identity", "hflip", "vflip", "rot180"}
    else:
        rotations = _dsb2018_choices()[2]
        transform = reseed(A.Compose([rotations]), 1)
        expected = {"rot90", "rot180", "rot270"}
    seen = set()
    for index in (0, 2):  # a square and a non-square (320 x 256) image
        _, masks = real_sample(index)
        height, width = masks.shape[1:]
        image = coordinate_image(height, width)
        boxes = masks_to_boxes(masks)
        for _ in range(12):
            out_image, out_masks, kept = apply_transform(transform, image, masks)
            op = which_symmetry(image, out_image)
            seen.add(op)
            move_array, move_box = SYMMETRIES[op]
            assert len(kept) == len(masks)
            for source, moved in zip(masks, out_masks, strict=True):
                assert np.array_equal(move_array(source), moved)
            moved_boxes = np.array([move_box(b, height, width) for b in boxes], dtype=np.float32)
            np.testing.assert_array_equal(masks_to_boxes(out_masks), moved_boxes)
    assert seen == expected


def marker_scene() -> tuple[np.ndarray, np.ndarray]:
    """Four bright squares on black, each one instance, far enough apart that blur cannot mix them."""
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    masks = np.zeros((4, 256, 256), dtype=bool)
    for k, (y, x) in enumerate([(50, 60), (60, 180), (170, 70), (185, 190)]):
        image[y : y + 17, x : x + 13] = 200
        masks[k, y : y + 17, x : x + 13] = True
    return image, masks


@pytest.mark.parametrize("preset", AUGMENTING)
def test_masks_follow_the_image_under_every_transform(preset):
    """Arbitrary rotations, scaling, crops, blur: each instance's mask must sit where its marker went."""
    assert_masks_follow_the_image(augmentation(preset, seed=3), preset)


MAGNITUDES = {"rotate": 40.0, "scale": 0.3, "brightness": 0.3, "contrast": 0.3, "blur": 1.5}


@pytest.mark.parametrize("preset", ["none", "flips", "dsb2018"])
def test_masks_follow_the_image_with_extra_magnitudes(preset):
    assert_masks_follow_the_image(augmentation(preset, seed=3, **MAGNITUDES), preset)


def assert_masks_follow_the_image(transform, preset: str) -> None:
    """Compared by centroids: of the mask, and of the marker's brightness above the local background."""
    image, masks = marker_scene()
    grey_bound = 0
    for _ in range(15):
        out_image, out_masks, kept = apply_transform(transform, image, masks)
        grey = out_image.astype(np.float64).mean(axis=2)
        height, width = grey.shape
        scale = np.sqrt(out_masks.sum() / masks[kept].sum()) if len(kept) else 1.0
        for mask in out_masks:
            ys, xs = np.nonzero(mask)
            if ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1:
                continue  # cut by the image border (crop, rotation): the marker is cut differently
            pad = int(40 * scale)
            y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, height)
            x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, width)
            window = grey[y0:y1, x0:x1]
            weight = window - np.median(window)
            weight[weight < 0.2 * weight.max()] = 0
            wy, wx = np.mgrid[y0:y1, x0:x1]
            marker = np.array([(weight * wy).sum(), (weight * wx).sum()]) / weight.sum()
            centre = np.array([ys.mean(), xs.mean()])
            assert np.abs(marker - centre).max() < 1.0 + 0.5 * scale, (preset, marker, centre)
            grey_bound += 1
    assert grey_bound >= 20  # the check did run on plenty of instances


@pytest.mark.parametrize("preset", ALL)
def test_zero_magnitudes_are_exactly_the_preset(preset):
    image, masks = real_sample(2)
    zero = dict.fromkeys(MAGNITUDES, 0.0)
    plain, with_zeros = augmentation(preset, seed=4), augmentation(preset, seed=4, **zero)
    if plain is None:
        assert with_zeros is None
        return
    assert len(with_zeros.transforms) == len(plain.transforms)
    for _ in range(3):
        a, b = apply_transform(plain, image, masks), apply_transform(with_zeros, image, masks)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_each_magnitude_changes_the_image_and_only_geometry_moves_masks(magnitude):
    image, masks = real_sample(2)
    transform = augmentation("none", seed=0, **{magnitude: MAGNITUDES[magnitude]})
    assert len(transform.transforms) == 1  # nothing but the one extra transform
    outputs = [apply_transform(transform, image, masks) for _ in range(6)]
    assert any(not np.array_equal(out, image) for out, _, _ in outputs)
    geometric = magnitude in ("rotate", "scale")
    for out, moved, kept in outputs:
        assert out.shape == image.shape and moved.shape[1:] == image.shape[:2]
        if not geometric:
            assert np.array_equal(moved, masks) and len(kept) == len(masks)
    assert geometric == any(
        len(kept) != len(masks) or not np.array_equal(moved, masks) for _, moved, kept in outputs
    )


@pytest.mark.parametrize("preset", ALL)
def test_presets_on_real_images_keep_masks_consistent(preset):
    """Over the bundled DSB2018 sample: shapes and dtypes, binary masks, valid boxes, no instance gained,
    and every mask still equal to its own region of a label map that went through the same transform."""
    transform = augmentation(preset, seed=11)
    records = read_mask_folders(SAMPLE)
    for record in records[:: max(1, len(records) // 6)]:
        image = load_image(record.image_path)
        masks = load_masks(record, image.shape[:2])
        if transform is None:
            assert apply_transform(transform, image, masks)[1] is masks
            continue
        labels = np.zeros(image.shape[:2], dtype=np.uint8)
        for k, mask in enumerate(masks):
            labels[mask] = k + 1
        shared = masks.sum(axis=0) > 1  # overlapping pixels: the label map holds only one of them
        planes = [m.astype(np.uint8) for m in masks] + [labels, shared.astype(np.uint8)]
        out = transform(image=image, masks=planes)
        out_image, moved = out["image"], np.stack(out["masks"])
        assert out_image.dtype == np.uint8 and out_image.ndim == 3 and out_image.shape[2] == 3
        assert moved.shape == (len(planes), *out_image.shape[:2])
        assert set(np.unique(moved[: len(masks)])) <= {0, 1}  # nearest-neighbour: no blended mask values
        out_labels, out_shared = moved[-2], moved[-1].astype(bool)
        for k in range(len(masks)):
            own = moved[k].astype(bool) & ~out_shared
            assert np.array_equal(own, (out_labels == k + 1) & ~out_shared), (preset, record.image_id, k)
        image2, masks2, kept = apply_transform(augmentation(preset, 11), image, masks)
        assert masks2.dtype == bool and masks2.shape[1:] == image2.shape[:2] and len(kept) <= len(masks)
        assert (masks2.any(axis=(1, 2))).all()
        boxes = masks_to_boxes(masks2)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 2] <= image2.shape[1]).all() and (boxes[:, 3] <= image2.shape[0]).all()


def test_preset_output_sizes():
    image, masks = real_sample(0)  # 256 x 256
    assert apply_transform(augmentation("dsb2018", 0), image, masks)[0].shape == (512, 512, 3)
    short = min(apply_transform(augmentation("sartorius", 0), image, masks)[0].shape[:2])
    assert short in (640, 672, 704, 736, 768, 800)
    assert apply_transform(augmentation("foramdeepslice", 0), image, masks)[0].shape == image.shape
    out, none, kept = apply_transform(augmentation("foram", 0), image, masks[:0])
    assert out.shape == image.shape and none.shape == (0, 256, 256) and len(kept) == 0


class _Flipping(torch.utils.data.Dataset):
    def __init__(self):
        self.image = coordinate_image(6, 10)
        self.transform = augmentation("flips", seed=0)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> str:
        return which_symmetry(self.image, self.transform(image=self.image)["image"])


def _epochs(worker_init_fn) -> list[list[str]]:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        _Flipping(), batch_size=8, num_workers=2, worker_init_fn=worker_init_fn, collate_fn=list
    )
    return [[op for batch in loader for op in batch] for _ in range(2)]


def test_seed_worker_gives_each_worker_and_epoch_its_own_stream():
    plain = _epochs(None)
    assert plain[0] == plain[1]  # the pitfall: every epoch replays the same augmentations
    assert plain[0][:8] == plain[0][8:]  # and both workers draw the same sequence
    seeded = _epochs(seed_worker)
    assert seeded[0] != seeded[1] and seeded[0][:8] != seeded[0][8:]
    assert _epochs(seed_worker) == seeded  # still reproducible from torch's seed


def test_loader_benchmark_returns_numbers(tiny_dataset):
    result = loader_benchmark(tiny_dataset, preset="foram", passes=1)
    assert result["images"] == 4 and result["images_per_s"] > 0 and result["instances_per_s"] > 0


@pytest.mark.slow
def test_loader_benchmark_heaviest_preset_on_the_sample():
    result = loader_benchmark(preset="sartorius", passes=1)
    assert result["images"] == len(read_mask_folders(SAMPLE)) and result["images_per_s"] > 0
