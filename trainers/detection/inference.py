"""The one inference path of a Mask R-CNN: a whole image, or overlapping native-resolution tiles of an
image of any size merged mask-aware (datasets/tiles.py); batches of tiles from one image or from many
requests; COCO results with the model's own filters (trainers/detection/postprocess.py). Evaluation,
validation, the thresholds cache, the registry's pyfunc and the Serve detector all call it.

Memory is bounded by one batch of tiles plus the detections: each tile's soft masks are thresholded and
cut to each mask's extent as soon as the model returns them, so no dense N x H x W array of the whole
image ever exists. The image is only ever sliced, so it may be a np.memmap of a file larger than memory.

The model: torchvision's detection models resize every input to min_size/max_size. For tiles at native
resolution build the model with min_size = max_size = tile_size (MaskRCNNConfig min_size=, max_size=);
otherwise each tile is rescaled inside the model (the outputs still come back in tile pixels).
"""

import ctypes
import logging
from collections.abc import Callable

import numpy as np
import torch

from datasets.errors import UserError
from datasets.instances import encode_masks
from datasets.normalize import Normalization, apply, normalization
from datasets.progress import Progress
from datasets.records import ImageRecord, open_image, patch_rle
from datasets.tiles import Detections, Tile, TileDetections, stitch_detections, tile_grid
from trainers.detection.postprocess import filter_output, filter_results
from trainers.detection.refine import refine_results, to_image
from trainers.detection.scale import fit_to_model

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # seconds between progress lines of predict_tiled
MASK_CHUNK = 100  # masks pasted to image size at a time: 1000 full-size float masks would be GBs
MATCH_THRESHOLD = 0.5  # mask IoU in the tiles' shared region at which two tile pieces are one object
try:  # glibc's; see predict_tiled
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):
    _malloc_trim = None


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
    normalize: str = "range",
    progress: Callable[[str], None] | None = None,
) -> Detections:
    """Detections of a torchvision-style detection model on `image`, tile by tile, in image coordinates.

    image: HxW grey or HxWxC (C = 1, 3, or 2/4 with alpha, which is dropped), any dtype, normalised by
    the model's `normalize` mode with the whole image's statistics, as training does (datasets/normalize.py).
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
    norm = normalization(image, normalize)
    model.eval()
    per_tile: list[TileDetections] = []
    # A caller's `progress` is its own log: plain lines, also on a terminal.
    bar = Progress(
        len(tiles),
        "tiled inference:",
        "tiles",
        progress or log.info,
        every_s=PROGRESS_EVERY_S,
        final=False,
        terminal=False if progress else None,
    )
    with bar:
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first : first + batch_size]
            batch = [(tile, tile_tensor(image, tile, norm), score_threshold) for tile in chunk]
            per_tile += detect_tiles(model, device, batch, mask_threshold)
            bar.update(len(batch))
    return stitch_detections(per_tile, match_threshold=match_threshold, match_metric="iou", merge=merge)


@torch.inference_mode()
def detect_tiles(
    model, device, tiles: list[tuple[Tile, torch.Tensor, float]], mask_threshold: float = 0.5
) -> list[TileDetections]:
    """One model call on a batch of (tile, its tensor, score threshold): each tile's detections scoring at
    least its threshold, every mask cut to its extent at once, so the batch's full-tile soft masks (~100 MB
    a tile) are freed before the next batch. The tiles may come from different images and requests (the
    Serve detector batches tiles across requests)."""
    outputs = model([tensor.to(device) for _, tensor, _ in tiles])
    cropped = [
        crop_output(tile, output, score_threshold, mask_threshold)
        for (tile, _, score_threshold), output in zip(tiles, outputs, strict=True)
    ]
    del outputs
    trim_heap()
    return cropped


def stitched_results(
    per_tile: list[TileDetections], image_id: int, height: int, width: int, cfg=None, categories=None
) -> list[dict]:
    """The tiles' detections of one image merged into whole objects, as filtered COCO result dicts."""
    detections = stitch_detections(per_tile, match_threshold=MATCH_THRESHOLD, match_metric="iou")
    return coco_results(detections, image_id, height, width, cfg, categories)


def coco_results(
    detections: Detections, image_id: int, height: int, width: int, cfg=None, categories=None
) -> list[dict]:
    """Stitched detections as COCO result dicts; with a MaskRCNNConfig `cfg`, its class_score_thresh and
    mask_min_area filters applied after stitching, so that a mask's area is that of the whole object, not
    of one tile's piece of it."""
    results = detections_to_coco(detections, image_id, height, width)
    return filter_results(results, cfg, categories) if cfg is not None else results


def image_tensor(image: np.ndarray, normalize: str = "range") -> torch.Tensor:
    """A whole image (HxW grey or HxWxC, any dtype) as the model's 3 x H x W float input in [0, 1]."""
    whole = Tile(0, 0, image.shape[1], image.shape[0])
    return tile_tensor(image, whole, normalization(image, normalize))


@torch.inference_mode()
def predict_image(
    model,
    image: np.ndarray,
    device,
    *,
    image_id: int = 1,
    tile_size: int = 0,
    tile_overlap: int = 64,
    tile_batch: int = 4,
    mask_threshold: float | None = None,
    cfg=None,
    categories=None,
    normalize: str | None = None,
    object_diameter: float | None = None,
) -> list[dict]:
    """COCO result dicts of one image: the whole image in one call (the model resizes it as in training),
    or with tile_size > 0 tiled inference at native resolution, `tile_batch` tiles per call. With a
    MaskRCNNConfig `cfg`, its class_score_thresh (in the order of the model's `categories`) and
    mask_min_area filters apply (trainers/detection/postprocess.py). The image is normalised by
    `normalize`, by default the cfg's mode ("range" without a cfg). With an `object_diameter` (default: the
    cfg's; 0 = off) an image of much larger objects is shrunk to it first (trainers/detection/scale.py).
    Soft masks are binarised at `mask_threshold`, by default the cfg's."""
    normalize = normalize or (cfg.normalize if cfg is not None else "range")
    mask_threshold = mask_threshold_of(cfg, mask_threshold)
    if object_diameter is None:
        object_diameter = cfg.object_diameter if cfg is not None else 0.0
    work = fit_to_model(image, object_diameter)  # the image itself, or shrunk to the objects it knows
    if tile_size:
        detections = predict_tiled(
            model,
            work,
            tile_size=tile_size,
            overlap=tile_overlap,
            batch_size=tile_batch,
            device=device,
            mask_threshold=mask_threshold,
            normalize=normalize,
        )
        results = coco_results(detections, image_id, *work.shape[:2], cfg, categories)
    else:
        model.eval()
        output = model([image_tensor(work, normalize).to(device)])[0]
        results = to_coco_results(output, image_id, mask_threshold, cfg=cfg, categories=categories)
    return to_image(results, work.shape[:2], image, normalize, cfg.mask_refine if cfg is not None else "off")


def predict_records(
    model,
    records: list[ImageRecord],
    device,
    *,
    log_every_s: float = 5.0,
    categories=None,
    **settings,
) -> list[dict]:
    """COCO result dicts for every image of `records` (predict_image's `settings`), image_id = position + 1
    (coco_ground_truth's ids), one image at a time (images differ in size), with a progress line every
    `log_every_s` seconds. The filters' `categories` default to the records' (the model's when it was
    trained on this dataset)."""
    categories = records[0].categories if categories is None and records else categories
    results = []
    with Progress(len(records), "predicted", "images", log.info, every_s=log_every_s) as bar:
        for index, record in enumerate(records):
            image = open_image(record.image_path)  # raw: predict_image normalises as the model was trained
            results += predict_image(
                model, image, device, image_id=index + 1, categories=categories, **settings
            )
            bar.update()
    return results


def trim_heap() -> None:
    """Give freed heap memory back to the OS. Call after each batch of tiles: a batch frees its soft masks
    (N x tile, ~100 MB) while the small patches kept from them stay allocated in between; glibc keeps such
    fragmented holes resident, and the process grew by about the masks' size per tile (+30 MB per 256-px
    tile measured) instead of staying at one batch."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def tile_tensor(image: np.ndarray, tile: Tile, norm: Normalization) -> torch.Tensor:
    """3 x h x w float in [0, 1] for one tile under the whole image's normalisation, as training makes its
    images (datasets/normalize.py)."""
    # apply copies: the image may be read-only (Ray Serve hands a replica its argument from the object
    # store) or a memmap
    crop = apply(image[tile.slices], norm)
    return torch.from_numpy(crop).permute(2, 0, 1).float().div(255)


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


@torch.inference_mode()
def predict(model, loader, device, mask_threshold: float | None = None, *, cfg=None) -> list[dict]:
    """COCO result entries (bbox xywh, RLE segmentation, score, category) for every image in `loader`;
    with `cfg`, its class_score_thresh and mask_min_area filters applied (the loader's dataset categories
    are the model's) and its mask_threshold the default."""
    mask_threshold = mask_threshold_of(cfg, mask_threshold)
    model.eval()
    categories = getattr(loader.dataset, "categories", None)
    results = []
    for images_batch, targets in loader:
        outputs = model([img.to(device) for img in images_batch])
        for image, output, target in zip(images_batch, outputs, targets, strict=True):
            found = to_coco_results(
                output, target["image_id"], mask_threshold, cfg=cfg, categories=categories
            )
            if cfg is not None and cfg.mask_refine != "off":  # the tensor is the model input, 0-1
                found = refine_results(found, image.mean(dim=0).mul(255).cpu().numpy(), cfg.mask_refine)
            results.extend(found)
    return results


def mask_threshold_of(cfg, given: float | None = None) -> float:
    """The value soft masks are binarised at: `given`, else the config's mask_threshold, else 0.5."""
    if given is not None:
        return given
    return cfg.mask_threshold if cfg is not None else 0.5


def to_coco_results(
    output: dict[str, torch.Tensor],
    image_id: int,
    mask_threshold: float = 0.5,
    *,
    cfg=None,
    categories=None,
) -> list[dict]:
    """One torchvision detection output -> COCO result dicts (masks binarised at `mask_threshold`). With a
    MaskRCNNConfig `cfg`, the detections its class_score_thresh (in the order of the model's `categories`)
    and mask_min_area drop are left out first (trainers/detection/postprocess.py filter_output)."""
    if cfg is not None:
        output = filter_output(output, cfg, categories, mask_threshold)
    boxes = output["boxes"].cpu().numpy()
    if not len(boxes):
        return []
    masks = (output["masks"][:, 0] >= mask_threshold).cpu().numpy()
    rles = encode_masks(masks)
    scores, labels = output["scores"].cpu().tolist(), output["labels"].cpu().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": int(label),
            "score": float(score),
            "segmentation": rle,
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        }
        for (x1, y1, x2, y2), score, label, rle in zip(boxes, scores, labels, rles, strict=True)
    ]


@torch.inference_mode()
def detect_candidates(model, image: torch.Tensor, mask_threshold: float):
    """model([image])[0] taken apart, with the masks pasted, binarised and RLE-encoded MASK_CHUNK at a time
    (the same numbers: torchvision pastes every mask on its own), plus the boxes in the model's input
    coordinates (where roi_heads ran NMS). Returns nms_boxes, boxes, scores, labels (tensors), mask areas
    and RLEs."""
    original = [tuple(image.shape[-2:])]
    images, _ = model.transform([image])  # GeneralizedRCNN.forward, step by step
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    detections = model.roi_heads(features, proposals, images.image_sizes)[0][0]
    boxes, areas, rles = [torch.zeros((0, 4))], [np.zeros(0, dtype=np.int64)], []
    for start in range(0, len(detections["boxes"]), MASK_CHUNK):
        part = {k: v[start : start + MASK_CHUNK] for k, v in detections.items()}
        part = model.transform.postprocess([part], images.image_sizes, original)[0]
        masks = (part["masks"][:, 0] >= mask_threshold).cpu().numpy()
        boxes.append(part["boxes"].cpu())
        areas.append(masks.reshape(len(masks), -1).sum(axis=1).astype(np.int64))
        rles += encode_masks(masks)
    return (
        detections["boxes"].cpu(),
        torch.cat(boxes),
        detections["scores"].cpu(),
        detections["labels"].cpu(),
        np.concatenate(areas),
        rles,
    )
