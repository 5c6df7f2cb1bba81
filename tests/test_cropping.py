"""datasets.cropping.crop_object on hand-made images whose object, box and background are known."""

import numpy as np
import pytest

from datasets.cropping import crop_object
from datasets.errors import UserError


def disk_image(height=120, width=160, centre=(50, 90), radius=20, inside=200, outside=20, rgb=True):
    yy, xx = np.mgrid[:height, :width]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    grey = np.where(disk, inside, outside).astype(np.uint8)
    return (np.repeat(grey[..., None], 3, axis=2) if rgb else grey), disk


def test_bright_object_on_dark_is_cropped_square_with_margin():
    image, disk = disk_image()
    image[5:8, 5:8] = 220  # a speck: smaller than the disk, so not the object
    crop = crop_object(image, margin=0.1)
    assert not crop.inverted
    assert np.array_equal(crop.mask, disk)  # the speck is gone
    rows, cols = np.nonzero(disk)
    side = 41 + 2 * round(0.1 * 41)  # the disk spans 41 pixels; margin on both sides
    x0, y0, x1, y1 = crop.box
    assert x1 - x0 == y1 - y0 == side == crop.image.shape[0] == crop.image.shape[1]
    assert x0 <= cols.min() and x1 > cols.max() and y0 <= rows.min() and y1 > rows.max()
    # the disk's pixels kept as they were, everything else black
    inside = crop.image[rows - y0, cols - x0]
    assert (inside == 200).all()
    assert crop.image.sum() == 200 * 3 * disk.sum()


def test_dark_object_on_light_background_is_found_by_inverting():
    image, disk = disk_image(inside=30, outside=230)
    crop = crop_object(image)
    assert crop.inverted
    assert np.array_equal(crop.mask, disk)
    assert crop.image.max() == 30  # the object's own pixels on black


def test_sensitivity_moves_the_threshold_both_ways():
    # a bright core (200) in a fainter halo (90) on a dark background (10)
    image, core = disk_image(radius=10, inside=200, outside=10, rgb=False)
    _, halo = disk_image(radius=25, rgb=False)
    image[halo & ~core] = 90
    low, mid, high = (crop_object(image, sensitivity=s) for s in (0.0, 0.5, 1.0))
    assert low.threshold > mid.threshold > high.threshold
    assert low.mask.sum() <= mid.mask.sum() <= high.mask.sum()
    assert np.array_equal(high.mask, halo)  # the halo belongs to the object at high sensitivity
    assert np.array_equal(low.mask, core)  # only the core at low sensitivity


def test_object_at_the_border_is_padded_with_black():
    image = np.full((100, 120, 3), 20, np.uint8)
    image[:10, 20:80] = 200  # a wide bar along the top edge: its square reaches above the image
    crop = crop_object(image, margin=0.0)
    x0, y0, x1, y1 = crop.box
    assert (x0, x1) == (20, 80) and y0 < 0 and y1 - y0 == 60
    assert crop.image.sum() == 200 * 3 * 10 * 60
    assert (crop.image[-y0 : -y0 + 10] == 200).all()  # the bar, at its place in the square


def test_filled_holes_belong_to_the_object():
    image, disk = disk_image()
    _, hole = disk_image(radius=6)
    image[hole] = 20  # a ring: the hole is inside the object
    crop = crop_object(image)
    assert np.array_equal(crop.mask, disk)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": np.full((20, 20, 3), 7, np.uint8)}, "uniform"),
        ({"image": disk_image()[0], "sensitivity": 1.5}, "sensitivity"),
        ({"image": disk_image()[0], "margin": -0.1}, "margin"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        crop_object(**kwargs)
