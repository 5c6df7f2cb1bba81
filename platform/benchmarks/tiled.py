"""Benchmark of tiled inference on a large mosaic of the sample images (`python -m platform.bench tiled`):
s/MP, peak memory, the stitching's overhead over the raw forward calls, and SAHI's slicer beside it when
installed."""

import resource
import time
from pathlib import Path

import numpy as np
import torch

from datasets.normalize import normalization
from datasets.records import load_image
from datasets.tiles import Tile, tile_grid
from trainers.config import MaskRCNNConfig
from trainers.detection.inference import predict_tiled, tile_tensor
from trainers.detection.model import build_model

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "datasets" / "sample" / "dsb2018"


def sample_mosaic(size: int, cell: int = 256) -> np.ndarray:
    """size x size x 3 uint8 made of the bundled sample images (cropped to cell x cell), repeated."""
    cells = [load_image(p)[:cell, :cell] for p in sorted(SAMPLE_IMAGES.glob("*/images/*.png"))]
    mosaic = np.empty((size, size, 3), dtype=np.uint8)
    corners = [(y, x) for y in range(0, size, cell) for x in range(0, size, cell)]
    for k, (y, x) in enumerate(corners):
        mosaic[y : y + cell, x : x + cell] = cells[k % len(cells)][: size - y, : size - x]
    return mosaic


class _TimedModel(torch.nn.Module):
    """The model with the wall time of its forward calls summed: the benchmark's raw-forward baseline."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.seconds = 0.0

    def forward(self, images):
        start = time.perf_counter()
        out = self.model(images)
        if images[0].is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N x 4 xyxy) with every box of `b` (M x 4): N x M."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_matches(iou: np.ndarray, threshold: float) -> int:
    """One-to-one matches with IoU >= threshold, best pairs first."""
    pairs = np.argwhere(iou >= threshold)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]])
    used_a, used_b = set(), set()
    for a, b in pairs[order].tolist():
        if a not in used_a and b not in used_b:
            used_a.add(a)
            used_b.add(b)
    return len(used_a)


def random_detector_config(
    backbone: str, side: int, score_threshold: float = 0.5, detections: int = 100
) -> MaskRCNNConfig:
    """The config of the benchmarks' random-weight Mask R-CNN: inputs of side x side at scale 1 (a native
    tile, or a whole image of that side), the dsb2018 recipe's small anchors, box_score_thresh =
    score_threshold. Random weights score every box about 0.6-0.8, so each input yields `detections`
    (box_detections_per_img) detections of about 37 x 37 px: with 100, roughly an input densely packed
    with nuclei, which is what costs time in the mask head, mask pasting and stitching."""
    return MaskRCNNConfig(
        backbone=backbone,
        min_size=side,
        max_size=side,
        anchor_sizes=(8, 16, 32, 64, 128),  # dsb2018_maskrcnn's: random-weight boxes come out nucleus-sized
        box_score_thresh=score_threshold,
        box_detections_per_img=detections,
    )


def benchmark_tiled(
    mosaic_size: int = 7000,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    backbone: str = "resnet18_fpn",
    score_threshold: float = 0.5,
    device: str = "cpu",
    sahi: bool = True,
    detections: int = 100,
) -> dict:
    """Print (and return) tiled-inference numbers on a mosaic_size^2 mosaic of the bundled sample images.

    The model is a randomly initialised Mask R-CNN (no weights can be downloaded here) built for native
    tiles: random_detector_config(backbone, tile_size, score_threshold, detections).
    Overhead = wall time / sum of the model's forward calls - 1 (tiling, mask cropping, stitching).
    With `sahi` and the sahi package importable, the same model runs through SAHI's get_sliced_prediction
    on the same image, slices and overlap, and the two results are compared box to box.
    """
    torch.manual_seed(0)
    cfg = random_detector_config(backbone, tile_size, score_threshold, detections)
    model = build_model(cfg, num_classes=1).to(device).eval()
    image = sample_mosaic(mosaic_size)
    timed = _TimedModel(model)
    with torch.inference_mode():  # first call: allocations and kernel selection, kept out of the timing
        model(
            [tile_tensor(image, Tile(0, 0, tile_size, tile_size), normalization(image, "range")).to(device)]
        )
    rss_before = peak_rss_mib()
    n_tiles = len(tile_grid(mosaic_size, mosaic_size, tile_size, overlap))
    print(
        f"tiled inference: {mosaic_size}x{mosaic_size} mosaic of sample images, {backbone} (random weights), "
        f"tiles {tile_size} overlap {overlap} batch {batch_size}, {n_tiles} tiles, device {device}, "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    detections = predict_tiled(
        timed,
        image,
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        score_threshold=score_threshold,
        progress=lambda line: print(line, flush=True),
    )
    total, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = peak_rss_mib()
    megapixels = mosaic_size * mosaic_size / 1e6
    numbers = {
        "mosaic_size": mosaic_size,
        "tiles": n_tiles,
        "detections": len(detections.scores),
        "seconds": total,
        "cpu_seconds": cpu,  # all threads; less disturbed than wall time by other work on the machine
        "seconds_per_megapixel": total / megapixels,
        "forward_seconds": timed.seconds,
        "overhead_percent": 100 * (total / timed.seconds - 1),
        "image_mib": image.nbytes / 2**20,
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib": peak,
    }
    _print_ours(numbers)
    if sahi:
        _compare_with_sahi(
            numbers, model, image, detections.boxes, tile_size, overlap, device, score_threshold
        )
    return numbers


def _print_ours(numbers: dict) -> None:
    print(f"  detections            {numbers['detections']}")
    print(
        f"  total                 {numbers['seconds']:.1f} s  ({numbers['seconds_per_megapixel']:.2f} s/MP), "
        f"CPU time {numbers['cpu_seconds']:.1f} s"
    )
    print(f"  sum of tile forwards  {numbers['forward_seconds']:.1f} s")
    print(f"  overhead              {numbers['overhead_percent']:.1f} %  (goal <= 10 %)")
    print(
        f"  peak RSS              {numbers['peak_rss_mib']:.0f} MiB (before inference "
        f"{numbers['peak_rss_mib_before']:.0f} MiB, of which the image {numbers['image_mib']:.0f} MiB)"
    )


def _compare_with_sahi(
    numbers: dict, model, image, boxes, tile_size: int, overlap: int, device, score_threshold: float
) -> None:
    """SAHI's get_sliced_prediction on the same image, slices and overlap, added to `numbers` and printed
    beside ours (nothing when sahi is not installed)."""
    sahi_result = _sahi_sliced(model, image, tile_size, overlap, device, score_threshold)
    if sahi_result is None:
        return
    sahi_boxes = sahi_result.pop("boxes")
    numbers.update({f"sahi_{k}": v for k, v in sahi_result.items()})
    numbers["sahi_detections"] = len(sahi_boxes)
    numbers["matched_sahi"] = greedy_matches(box_iou(boxes, sahi_boxes), 0.5)
    numbers["peak_rss_mib_after_sahi"] = peak_rss_mib()
    print("  side by side          ours      SAHI (get_sliced_prediction, batch 1, GREEDYNMM IOS 0.5)")
    for name, key, unit in (
        ("wall time", "seconds", "s"),
        ("CPU time", "cpu_seconds", "s"),
        ("sum of tile forwards", "forward_seconds", "s"),
        ("overhead", "overhead_percent", "%"),
        ("detections", "detections", ""),
    ):
        digits = 1 if unit else 0  # counts without decimals
        print(f"  {name:22s}{numbers[key]:8.{digits}f}  {numbers['sahi_' + key]:8.{digits}f} {unit}")
    print(
        f"  matched one-to-one    {numbers['matched_sahi']} (box IoU >= 0.5); peak RSS after SAHI "
        f"{numbers['peak_rss_mib_after_sahi']:.0f} MiB"
    )


class _PolygonMasksOnly(torch.nn.Module):
    """The model without the detections whose mask SAHI cannot turn into a polygon (masks made only of
    1-pixel-wide strokes, which random weights produce): SAHI raises "Invalid segmentation mask" on them.
    `seconds` is the time this filter took, to be taken out of SAHI's time."""

    def __init__(self, model: torch.nn.Module, mask_threshold: float):
        super().__init__()
        self.model, self.mask_threshold = model, mask_threshold
        self.dropped, self.seconds = 0, 0.0

    def forward(self, images):
        from sahi.utils.cv import get_coco_segmentation_from_bool_mask

        outputs = self.model(images)
        start = time.perf_counter()
        for out in outputs:
            masks = (out["masks"][:, 0] > self.mask_threshold).cpu().numpy()  # SAHI's own thresholding
            keep = torch.tensor(
                [bool(get_coco_segmentation_from_bool_mask(m)) for m in masks], dtype=torch.bool
            )
            self.dropped += int((~keep).sum())
            out.update({k: v[keep.to(v.device)] for k, v in out.items()})
        self.seconds += time.perf_counter() - start
        return outputs


def _sahi_sliced(model, image, tile_size, overlap, device, score_threshold) -> dict | None:
    """Times and boxes (N x 4 xyxy) of SAHI's sliced prediction with the same model, image, slices and
    score threshold; its default merge (GREEDYNMM, IOS >= 0.5) and no extra whole-image pass (which a
    mosaic larger than memory cannot afford). None when sahi is not installed."""
    try:
        from sahi.models.torchvision import TorchVisionDetectionModel
        from sahi.predict import get_sliced_prediction
    except ImportError:
        print("  SAHI                  not installed (pip install sahi to compare)")
        return None
    timed = _TimedModel(model)
    filtered = _PolygonMasksOnly(timed, mask_threshold=0.5)
    wrapper = TorchVisionDetectionModel(
        model=filtered, device=device, confidence_threshold=score_threshold, category_mapping={"1": "object"}
    )
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = get_sliced_prediction(
        image,
        wrapper,
        slice_height=tile_size,
        slice_width=tile_size,
        overlap_height_ratio=overlap / tile_size,
        overlap_width_ratio=overlap / tile_size,
        perform_standard_pred=False,
        verbose=0,
    )
    seconds = time.perf_counter() - start - filtered.seconds
    cpu = _cpu_seconds() - cpu_start - filtered.seconds  # the filter runs on one thread: CPU = wall
    if filtered.dropped:
        print(f"  SAHI                  {filtered.dropped} detections without a polygon mask left out")
    boxes = np.array([p.bbox.to_xyxy() for p in result.object_prediction_list], dtype=np.float64)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "forward_seconds": timed.seconds,
        "overhead_percent": 100 * (seconds / timed.seconds - 1),
        "boxes": boxes.reshape(-1, 4),
    }
