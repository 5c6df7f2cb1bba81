"""Input normalisation (datasets/normalize.py): hand-computed cases, the whole image's statistics for every
tile, and the same pixels in training and inference."""

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.instances import InstanceDataset, read_records
from datasets.normalize import apply, normalization, normalize
from datasets.records import load_image, to_rgb8
from datasets.tiles import Tile
from tests.helpers import SAMPLE
from trainers.detection.inference import image_tensor, tile_tensor


def test_range_keeps_8_bit_and_scales_16_bit_by_its_min_max():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(normalize(rgb, "range"), rgb)
    grey16 = np.array([[100, 200], [300, 1100]], dtype=np.uint16)
    expected = np.round((grey16 - 100) / 1000 * 255).astype(np.uint8)  # hand-computed: lo 100, hi 1100
    out = normalize(grey16, "range")
    assert (
        out.shape == (2, 2, 3)
        and np.array_equal(out[..., 0], expected)
        and np.array_equal(out[..., 2], expected)
    )
    assert np.array_equal(to_rgb8(grey16), out)  # the serving decoder's conversion is the same function


def test_percentile_stretches_each_channel_and_clips_outliers():
    ramp = np.arange(1000, dtype=np.float32).reshape(20, 50)
    image = np.stack([ramp, ramp * 2 + 10, np.full_like(ramp, 7)], axis=2)
    image[0, 0, 0] = 1e6  # one hot pixel: a min-max stretch would squash everything else to black
    out = normalize(image, "percentile")
    for c in range(3):
        lo, hi = np.percentile(image[..., c], (1.0, 99.8))
        expected = np.clip((image[..., c] - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round()
        assert np.array_equal(out[..., c], expected.astype(np.uint8))
    assert out[..., 0].max() == 255 and np.median(out[..., 0]) > 100  # not squashed by the outlier


def test_grey_inverts_a_bright_background_so_objects_are_bright():
    dark = np.full((40, 40), 20, dtype=np.uint8)
    dark[10:20, 10:20] = 200  # fluorescence: a bright nucleus on black
    bright = 255 - dark  # bright-field: a dark nucleus on white
    for image in (dark, bright, np.stack([bright] * 3, axis=2)):
        out = normalize(image, "grey")
        assert out[15, 15, 0] == 255 and out[0, 0, 0] == 0, image.shape
        assert np.array_equal(out[..., 0], out[..., 1])
    assert normalization(bright, "grey").invert and not normalization(dark, "grey").invert


@pytest.mark.parametrize("mode", ["range", "percentile", "grey"])
def test_a_tile_is_normalised_with_the_whole_image_statistics(mode):
    image = np.random.default_rng(1).gamma(2.0, 300.0, (64, 96, 3)).astype(np.uint16)
    image[:32, :48] //= 8  # a dark quarter: its own statistics would differ from the image's
    whole = normalize(image, mode)
    tile = Tile(0, 0, 48, 32)
    assert np.array_equal(apply(image[tile.slices], normalization(image, mode)), whole[tile.slices])
    tensor = tile_tensor(image, tile, normalization(image, mode))
    assert torch.equal(tensor, torch.from_numpy(whole[tile.slices]).permute(2, 0, 1).float().div(255))
    assert torch.equal(image_tensor(image, mode), torch.from_numpy(whole).permute(2, 0, 1).float().div(255))


def test_training_sees_what_inference_sees(tmp_path):
    record = read_records(SAMPLE)[0]
    raw = np.asarray(Image.open(record.image_path))
    sample, _ = InstanceDataset([record], normalize="grey")[0]
    assert torch.equal(sample, image_tensor(raw, "grey"))
    assert np.array_equal(load_image(record.image_path, "grey"), normalize(raw, "grey"))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        normalization(np.zeros((2, 2), dtype=np.uint8), "zscore")
