"""Tiled inference: a detection model run over overlapping native-resolution tiles of an image of any
size, the pieces of objects cut by tile borders merged mask-aware (datasets/tiles.py), and a benchmark.

Memory is bounded by one batch of tiles plus the detections: each tile's soft masks are thresholded and
cut to each mask's extent as soon as the model returns them, so no dense N x H x W array of the whole
image ever exists. The image is only ever sliced, so it may be a np.memmap of a file larger than memory.

The model: torchvision's detection models resize every input to min_size/max_size. For tiles at native
resolution build the model with min_size = max_size = tile_size (MaskRCNNConfig min_size=, max_size=);
otherwise each tile is rescaled inside the model (the outputs still come back in tile pixels).
"""

import ctypes
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.records import load_image, rle_to_json
from datasets.tiles import Detections, Tile, TileDetections, stitch_detections, tile_grid

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # seconds between progress lines of predict_tiled
try:  # glibc's; see predict_tiled
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):
    _malloc_trim = None
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "dsb2018"


@torch.inference_mode()
def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    match_threshold: float = 0.5,
    merge: str = "union",
    progress: Callable[[str], None] | None = None,
) -> Detections:
    """Detections of a torchvision-style detection model on `image`, tile by tile, in image coordinates.

    image: HxW grey or HxWxC (C = 1, 3, or 2/4 with alpha, which is dropped), uint8; other dtypes are
    scaled to 0..255 by the whole image's range, as `datasets.records.load_image` does for training.
    model: list of CHW float tensors in [0, 1] -> list of dicts with boxes (xyxy), scores, labels and
    masks (N x 1 x h x w soft); put on `device` by the caller. Set to eval mode here.
    Tiles of tile_size x tile_size pixels share `overlap` pixels (`datasets.tiles.tile_grid`); an image no
    larger than one tile is one model call on the whole image. Detections scoring below score_threshold
    are dropped, masks are binarised at mask_threshold, and the pieces several tiles saw of one object are
    merged when their masks match with IoU >= match_threshold inside the tiles' shared region
    (`datasets.tiles.stitch_detections`; merge="union" joins the pieces, "nms" keeps the best one).
    progress: receives a line (tiles done, tiles/s, ETA) every PROGRESS_EVERY_S seconds; default: log.
    """
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise UserError(f"predict_tiled: expected an HxW or HxWxC image (C 1-4), got shape {image.shape}")
    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    tiles = tile_grid(image.shape[0], image.shape[1], tile_size, overlap)
    # The range of the whole image, not of each tile: a per-tile range would change contrast tile to tile.
    value_range = (float(image.min()), float(image.max())) if image.dtype != np.uint8 else None
    report = progress or log.info
    model.eval()
    per_tile: list[TileDetections] = []
    start = last_report = time.perf_counter()
    for first in range(0, len(tiles), batch_size):
        batch = tiles[first : first + batch_size]
        outputs = model([tile_tensor(image, tile, value_range).to(device) for tile in batch])
        for tile, output in zip(batch, outputs, strict=True):
            per_tile.append(crop_output(tile, output, score_threshold, mask_threshold))
        del outputs
        trim_heap()
        done, now = first + len(batch), time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S and done < len(tiles):
            rate = done / (now - start)
            report(
                f"tiled inference: {done}/{len(tiles)} tiles, {rate:.2f} tiles/s, "
                f"ETA {(len(tiles) - done) / rate:.0f} s"
            )
            last_report = now
    return stitch_detections(per_tile, match_threshold=match_threshold, match_metric="iou", merge=merge)


def trim_heap() -> None:
    """Give freed heap memory back to the OS. Call after each batch of tiles: a batch frees its soft masks
    (N x tile, ~100 MB) while the small patches kept from them stay allocated in between; glibc keeps such
    fragmented holes resident, and the process grew by about the masks' size per tile (+30 MB per 256-px
    tile measured) instead of staying at one batch."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def tile_tensor(image: np.ndarray, tile: Tile, value_range: tuple[float, float] | None) -> torch.Tensor:
    """3 x h x w float in [0, 1] for one tile, made the way the training data loader makes its images."""
    crop = image[tile.slices]
    if value_range is not None:
        lo, hi = value_range
        crop = ((crop.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8)
    if crop.ndim == 2:
        crop = crop[..., None]
    if crop.shape[2] in (2, 4):  # grey + alpha or RGBA: alpha carries no signal
        crop = crop[..., :-1]
    # A copy: the image may be read-only (Ray Serve hands a replica its argument from the object store).
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255)
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def crop_output(tile: Tile, output: dict, score_threshold: float, mask_threshold: float) -> TileDetections:
    """One tile's model output as TileDetections whose masks are patches cut to each mask's extent."""
    keep = output["scores"] >= score_threshold
    binary = (output["masks"][:, 0] >= mask_threshold)[keep].cpu().numpy()  # index bools, not the floats
    rows, cols = binary.any(axis=2), binary.any(axis=1)
    patches, origins = [], []
    for i in range(len(binary)):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if not len(r):  # nothing above the threshold: an empty patch, kept so that the box survives
            patches.append(np.zeros((0, 0), dtype=bool))
            origins.append((0, 0))
            continue
        # a copy, so that the tile-sized array is freed with this batch
        patches.append(binary[i, r[0] : r[-1] + 1, c[0] : c[-1] + 1].copy())
        origins.append((int(c[0]), int(r[0])))
    return TileDetections(
        tile=tile,
        boxes=output["boxes"][keep].cpu().numpy(),
        scores=output["scores"][keep].cpu().numpy(),
        labels=output["labels"][keep].cpu().numpy(),
        masks=patches,
        mask_origins=np.asarray(origins, dtype=np.int64).reshape(-1, 2),
    )


def patch_rle(patch: np.ndarray, x: int, y: int, height: int, width: int) -> dict:
    """COCO RLE (compressed, JSON-ready) of a bool patch placed at column x, row y of a height x width
    image, without a full-image mask: RLE runs go down the columns, so the columns the patch spans are one
    contiguous stretch of the image's runs, and everything before and after it is a single zero run."""
    block = np.zeros((height, patch.shape[1]), dtype=bool)  # the patch's columns, full height
    block[y : y + patch.shape[0]] = patch
    flat = block.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)  # RLE counts start with a run of zeros, possibly empty
    runs[0] += x * height
    after = (width - x - patch.shape[1]) * height
    if len(runs) % 2:  # odd number of runs: the last one is zeros
        runs[-1] += after
    elif after:  # pycocotools writes no empty run at the end
        runs.append(after)
    return rle_to_json(mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width))


def detections_to_coco(detections: Detections, image_id: int, height: int, width: int) -> list[dict]:
    """COCO result dicts (bbox xywh, RLE segmentation when there are masks, score, category_id = label)."""
    results = []
    for i, ((x1, y1, x2, y2), score, label) in enumerate(
        zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist(), strict=True)
    ):
        entry = {
            "image_id": image_id,
            "category_id": int(label),
            "score": float(score),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
        }
        if detections.masks is not None:
            x, y = detections.mask_origins[i].tolist()
            entry["segmentation"] = patch_rle(detections.masks[i], x, y, height, width)
        results.append(entry)
    return results


# ---- benchmark ----------------------------------------------------------------------------------------


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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _greedy_matches(iou: np.ndarray, threshold: float) -> int:
    """One-to-one matches with IoU >= threshold, best pairs first."""
    pairs = np.argwhere(iou >= threshold)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]])
    used_a, used_b = set(), set()
    for a, b in pairs[order].tolist():
        if a not in used_a and b not in used_b:
            used_a.add(a)
            used_b.add(b)
    return len(used_a)


def benchmark_tiled(
    mosaic_size: int = 7000,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    backbone: str = "resnet18_fpn",
    score_threshold: float = 0.5,
    device: str = "cpu",
    sahi: bool = True,
) -> dict:
    """Print (and return) tiled-inference numbers on a mosaic_size^2 mosaic of the bundled sample images.

    The model is a randomly initialised Mask R-CNN (no weights can be downloaded here) built for native
    tiles (min_size = max_size = tile_size) with the dsb2018 recipe's small anchors and box_score_thresh =
    score_threshold. Random weights score every box about 0.6-0.8, so each tile yields
    box_detections_per_img (100) detections of about 37 x 37 px: roughly a tile densely packed with
    nuclei, which is what costs time in the mask head, mask pasting and stitching.
    Overhead = wall time / sum of the model's forward calls - 1 (tiling, mask cropping, stitching).
    With `sahi` and the sahi package importable, the same model runs through SAHI's get_sliced_prediction
    on the same image, slices and overlap, and the two results are compared box to box.
    """
    from trainers.config import MaskRCNNConfig
    from trainers.maskrcnn import build_model

    torch.manual_seed(0)
    cfg = MaskRCNNConfig(
        backbone=backbone,
        min_size=tile_size,
        max_size=tile_size,
        anchor_sizes=(8, 16, 32, 64, 128),  # dsb2018_maskrcnn's: random-weight boxes come out nucleus-sized
        box_score_thresh=score_threshold,
    )
    model = build_model(cfg, num_classes=1).to(device).eval()
    image = sample_mosaic(mosaic_size)
    timed = _TimedModel(model)
    with torch.inference_mode():  # first call: allocations and kernel selection, kept out of the timing
        model([tile_tensor(image, Tile(0, 0, tile_size, tile_size), None).to(device)])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    print(f"  detections            {numbers['detections']}")
    print(
        f"  total                 {total:.1f} s  ({numbers['seconds_per_megapixel']:.2f} s/MP), "
        f"CPU time {cpu:.1f} s"
    )
    print(f"  sum of tile forwards  {timed.seconds:.1f} s")
    print(f"  overhead              {numbers['overhead_percent']:.1f} %  (goal <= 10 %)")
    print(
        f"  peak RSS              {peak:.0f} MiB (before inference {rss_before:.0f} MiB, of which the "
        f"image {numbers['image_mib']:.0f} MiB)"
    )
    sahi_result = _sahi_sliced(model, image, tile_size, overlap, device, score_threshold) if sahi else None
    if sahi_result is not None:
        sahi_boxes = sahi_result.pop("boxes")
        numbers.update({f"sahi_{k}": v for k, v in sahi_result.items()})
        numbers["sahi_detections"] = len(sahi_boxes)
        numbers["matched_sahi"] = _greedy_matches(_box_iou(detections.boxes, sahi_boxes), 0.5)
        numbers["peak_rss_mib_after_sahi"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    return numbers


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
