import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from datasets.instances import masks_to_boxes
from datasets.mask_folders import read_mask_folders
from datasets.records import load_image, patch_rle
from datasets.tiles import Detections, dense_masks, tile_grid
from platform.benchmarks.tiled import benchmark_tiled, sample_mosaic
from tests.helpers import SAMPLE
from trainers.config import MaskRCNNConfig
from trainers.detection import inference as tiled
from trainers.detection.inference import detections_to_coco, predict_tiled
from trainers.detection.model import build_model


class BlobDetector(torch.nn.Module):
    """A deterministic stand-in with torchvision's detection interface: every connected component of
    pixels brighter than 0.5 is one instance, scored by its mean brightness. Records its input sizes."""

    def __init__(self):
        super().__init__()
        self.input_sizes = []

    def forward(self, images):
        outputs = []
        for image in images:
            self.input_sizes.append(tuple(image.shape[1:]))
            grey = image[0].numpy()
            components, n = ndimage.label(grey > 0.5)
            masks = components[None] == np.arange(1, n + 1)[:, None, None]
            scores = [grey[m].mean() for m in masks]
            outputs.append(
                {
                    "boxes": torch.from_numpy(masks_to_boxes(masks)),
                    "scores": torch.tensor(scores, dtype=torch.float32).reshape(-1),
                    "labels": torch.ones(n, dtype=torch.int64),
                    "masks": torch.from_numpy(masks[:, None]).float(),
                }
            )
        return outputs


# 320 x 320 with tiles of 128 overlapping by 32: tiles start at 0, 96 and 192 on both axes, so the shared
# strips are columns (and rows) 96-127 and 192-223. (cx, cy, rx, ry, brightness) ellipses:
BLOBS = [
    (45, 45, 15, 15, 0.9),  # inside tile (0, 0) only
    (160, 160, 12, 12, 0.8),  # inside the centre tile only
    (270, 40, 14, 10, 0.7),  # inside the top-right tile only
    (112, 40, 25, 12, 0.95),  # cut by the vertical borders at 96 and 128
    (40, 112, 12, 25, 0.85),  # cut by the horizontal borders
    (208, 270, 10, 10, 0.75),  # wholly inside a shared strip: two tiles see all of it
    (208, 208, 22, 22, 0.65),  # at a tile corner: four tiles see pieces
    (160, 290, 110, 6, 0.6),  # long, across three tiles
    (95, 200, 7, 7, 1.0),  # two neighbours 9 px apart on either side of the border at 96 ...
    (119, 200, 7, 7, 0.55),  # ... which must not merge
]


def blob_image(blobs=BLOBS, size=(320, 320)) -> np.ndarray:
    rows, cols = np.mgrid[: size[0], : size[1]]
    grey = np.zeros(size, dtype=np.float32)
    for cx, cy, rx, ry, value in blobs:
        grey[((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1] = value
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def whole_image_masks(model, image: np.ndarray) -> np.ndarray:
    """The reference: one model call on the whole image, masks binarised at 0.5."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    return (model([tensor])[0]["masks"][:, 0] >= 0.5).numpy()


def match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of two mask sets by IoU (Hungarian): (rows, cols, their IoUs)."""
    flat_a, flat_b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    inter = flat_a @ flat_b.T
    iou = inter / (flat_a.sum(1)[:, None] + flat_b.sum(1)[None] - inter)
    rows, cols = linear_sum_assignment(-iou)
    return rows, cols, iou[rows, cols]


def test_tiled_equals_whole_image_inside_tiles_and_across_borders():
    image = blob_image()
    reference = whole_image_masks(BlobDetector(), image)
    assert len(reference) == len(BLOBS)  # the blobs do not touch
    model = BlobDetector()
    detections = predict_tiled(model, image, tile_size=128, overlap=32, batch_size=4)
    assert model.input_sizes == [(128, 128)] * 9  # really tiled
    tiles = tile_grid(320, 320, 128, 32)
    crossing = [
        not any(m[t.slices].sum() == m.sum() for t in tiles) for m in reference
    ]  # no tile sees the whole object
    assert 0 < sum(crossing) < len(reference)
    tiled_masks = dense_masks(detections, 320, 320)
    assert len(tiled_masks) == len(reference)
    rows, cols, ious = match(reference, tiled_masks)
    assert len(rows) == len(reference)
    assert (ious >= 0.9).all(), list(zip(crossing, ious.round(3), strict=True))
    np.testing.assert_allclose(detections.boxes[cols], masks_to_boxes(reference[rows]))
    assert (detections.labels == 1).all()
    assert (np.diff(detections.scores) <= 0).all()  # best first


def test_nms_merge_keeps_one_piece_per_cut_object():
    image = blob_image()
    detections = predict_tiled(BlobDetector(), image, tile_size=128, overlap=32, merge="nms")
    assert len(detections.scores) == len(BLOBS)  # still one detection per object, not one per piece


def test_an_image_no_larger_than_a_tile_is_one_model_call():
    image = blob_image(BLOBS[:3], size=(100, 300))
    model = BlobDetector()
    detections = predict_tiled(model, image, tile_size=300, overlap=32)
    assert model.input_sizes == [(100, 300)]
    reference = whole_image_masks(BlobDetector(), image)
    np.testing.assert_array_equal(dense_masks(detections, 100, 300), reference)


def test_16_bit_grey_is_scaled_by_the_whole_image_range_as_for_training(tmp_path):
    # A dim blob alone in a tile: scaled by that tile's own range it would turn bright and be detected.
    image = np.full((200, 300), 1000, dtype=np.uint16)
    image[20:50, 20:50] = 60000
    image[150:180, 250:280] = 20000  # (20000 - 1000) / 59000 = 0.32 < 0.5: not an object
    Image.fromarray(image).save(tmp_path / "grey16.png")
    as_trained = load_image(tmp_path / "grey16.png")
    ours = predict_tiled(BlobDetector(), image, tile_size=128, overlap=32)
    reference = predict_tiled(BlobDetector(), as_trained, tile_size=128, overlap=32)
    assert len(ours.scores) == len(reference.scores) == 1
    np.testing.assert_allclose(ours.boxes, [[20, 20, 50, 50]])
    np.testing.assert_allclose(ours.scores, reference.scores)


def test_progress_lines(monkeypatch):
    monkeypatch.setattr(tiled, "PROGRESS_EVERY_S", 0.0)
    lines = []
    predict_tiled(
        BlobDetector(), blob_image(), tile_size=128, overlap=32, batch_size=2, progress=lines.append
    )
    assert len(lines) == 4  # after batches 1-4 of 5; none after the last
    assert lines[0].startswith("tiled inference: 2/9 tiles,") and "tiles/s" in lines[0] and "ETA" in lines[0]


def test_maskrcnn_through_tiles_gives_well_formed_detections_in_image_coordinates():
    torch.manual_seed(0)
    cfg = MaskRCNNConfig(
        backbone="resnet18_fpn",
        min_size=128,
        max_size=128,
        box_score_thresh=0.0,
        rpn_post_nms_top_n_test=100,  # fewer proposals than the default 1000 keeps this test at seconds
        box_detections_per_img=30,
    )
    model = build_model(cfg, num_classes=1)
    record = next(r for r in read_mask_folders(SAMPLE) if load_image(r.image_path).shape[:2] == (256, 320))
    image = load_image(record.image_path)
    height, width = image.shape[:2]
    detections = predict_tiled(model, image, tile_size=128, overlap=32, batch_size=3)
    n = len(detections.scores)
    assert n > 0 and detections.boxes.shape == (n, 4) and detections.labels.shape == (n,)
    assert detections.boxes.dtype == np.float32 and detections.labels.dtype == np.int64
    x1, y1, x2, y2 = detections.boxes.T
    assert (0 <= x1).all() and (x1 <= x2).all() and (x2 <= width).all()
    assert (0 <= y1).all() and (y1 <= y2).all() and (y2 <= height).all()
    assert x2.max() > 128 and y2.max() > 128  # detections of the later tiles were moved into the image
    assert len(detections.masks) == n and detections.mask_origins.shape == (n, 2)
    for patch, (x, y) in zip(detections.masks, detections.mask_origins, strict=True):
        assert patch.dtype == bool and 0 <= x and 0 <= y
        assert x + patch.shape[1] <= width and y + patch.shape[0] <= height
        if patch.size:  # patches are cut to their mask's extent
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
    assert (np.diff(detections.scores) <= 0).all()
    assert (detections.scores >= 0).all() and (detections.scores <= 1).all()
    assert (detections.labels == 1).all()


def coco_reference(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


@pytest.mark.parametrize(
    ("shape", "x", "y", "height", "width"),
    [
        ((5, 4), 3, 2, 12, 10),
        ((5, 4), 0, 0, 12, 10),  # at the top-left corner
        ((5, 4), 6, 7, 12, 10),  # touching the right and bottom borders
        ((12, 10), 0, 0, 12, 10),  # the whole image
        ((1, 1), 9, 11, 12, 10),  # the last pixel
        ((0, 0), 4, 4, 12, 10),  # empty patch
        ((40, 33), 17, 5, 70, 90),
    ],
)
def test_patch_rle_equals_pycocotools_on_the_dense_mask(shape, x, y, height, width):
    rng = np.random.default_rng(x * 100 + y)
    for fill in (0.0, 0.5, 1.0):
        patch = rng.random(shape) < fill
        if patch.size:
            patch[0, 0] = True  # the first pixel set: the counts must start with an empty zero run
        dense = np.zeros((height, width), dtype=bool)
        dense[y : y + shape[0], x : x + shape[1]] = patch
        ours = patch_rle(patch, x, y, height, width)
        expected = coco_reference(dense[None])[0]
        assert ours == {"size": [height, width], "counts": expected["counts"].decode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode({**ours, "counts": ours["counts"].encode()}), dense)


def test_detections_to_coco_equals_pycocotools_on_dense_masks():
    image = blob_image()
    detections = predict_tiled(BlobDetector(), image, tile_size=128, overlap=32)
    results = detections_to_coco(detections, image_id=7, height=320, width=320)
    expected = coco_reference(dense_masks(detections, 320, 320))
    assert len(results) == len(expected) == len(BLOBS)
    for result, rle, box, score in zip(results, expected, detections.boxes, detections.scores, strict=True):
        assert result["segmentation"]["counts"] == rle["counts"].decode("ascii")
        assert result["segmentation"]["size"] == [320, 320]
        x1, y1, x2, y2 = box.tolist()
        assert result["bbox"] == [x1, y1, x2 - x1, y2 - y1]
        assert (result["image_id"], result["category_id"], result["score"]) == (7, 1, float(score))
    boxes_only = Detections(detections.boxes, detections.scores, detections.labels, None, None)
    assert "segmentation" not in detections_to_coco(boxes_only, 7, 320, 320)[0]


def test_sample_mosaic_repeats_the_sample_images():
    mosaic = sample_mosaic(600, cell=256)
    images = [load_image(p)[:256, :256] for p in sorted(SAMPLE.glob("*/images/*.png"))]
    assert mosaic.shape == (600, 600, 3) and mosaic.dtype == np.uint8
    np.testing.assert_array_equal(mosaic[:256, :256], images[0])
    np.testing.assert_array_equal(mosaic[:256, 256:512], images[1])
    np.testing.assert_array_equal(mosaic[512:, 512:], images[8][:88, :88])  # row by row, cut at the border


def test_benchmark_runs_and_reports(capsys):
    numbers = benchmark_tiled(mosaic_size=160, tile_size=96, overlap=16, batch_size=2, sahi=False)
    assert numbers["tiles"] == 4 and numbers["forward_seconds"] <= numbers["seconds"]
    assert "overhead" in capsys.readouterr().out
