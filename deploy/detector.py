"""The detector deployment: a registered Mask R-CNN answering /v1/segment through the one inference
path (trainers/detection/inference.py), tiled at native resolution for images larger than its tiles.
`@serve.batch` gathers tiles, from one request or several, into one model call."""

import asyncio
import math

import numpy as np
import torch
from pycocotools import mask as mask_utils
from ray import serve

from datasets.normalize import normalization
from datasets.tiles import Tile, TileDetections, tile_grid
from deploy.inputs import BadInput, user_error
from deploy.registry import Detector, load_detector
from deploy.reloading import Loaded, RegistryModel, configure_batching, grouped
from deploy.settings import ServeSettings, mb
from trainers.detection.inference import detect_tiles, mask_threshold_of, stitched_results, tile_tensor
from trainers.detection.refine import to_image
from trainers.detection.scale import fit_to_model


@serve.deployment
class DetectorDeployment:
    def __init__(self, settings: ServeSettings):
        self.registry = RegistryModel(settings.detector, load_detector, settings)
        configure_batching(self.infer, settings)
        self.window = 2 * settings.max_batch_size  # tiles in flight per request: bounds tensor memory
        self.limits = (mb(settings.max_mask_mb), settings.max_tiles)

    def info(self) -> dict:
        return self.registry.current.info

    @staticmethod
    def run(detector: Detector, tiles: list[tuple[Tile, torch.Tensor, float]]) -> list[TileDetections]:
        """One model call on (tile, its tensor, score threshold) items of one model version."""
        return detect_tiles(detector.model, detector.device, tiles, mask_threshold_of(detector.config))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def infer(self, items: list[tuple[Loaded, tuple]]) -> list[TileDetections]:
        return await asyncio.to_thread(grouped, items, self.run)

    async def segment(
        self, image: np.ndarray, score_threshold: float | None, max_detections: int, tile_size: int
    ):
        """Instances of an image's pixels (HxW or HxWxC, any dtype: decode_pixels), normalised here by the
        model's own mode: class, score, box (xyxy), COCO RLE mask, area; counts per class. score_threshold
        None: the model's operating point (its config's score_threshold). tile_size 0: the model's own (its
        training tile size; 0 = the whole image at once)."""
        loaded = self.registry.current  # the whole request uses one version, whatever a reload does
        detector = loaded.model
        cfg = detector.config
        if score_threshold is None:
            score_threshold = cfg.score_threshold
        height, width = image.shape[:2]
        # objects much larger than the trained ones: the image shrunk to them, as predict_image does
        original, image = image, await asyncio.to_thread(fit_to_model, image, cfg.object_diameter)
        try:
            tiles = plan_tiles(image.shape[:2], tile_size, cfg, self.limits)
        except BadInput as e:
            return user_error(e)
        per_tile = []
        norm = normalization(image, cfg.normalize)  # the whole image's, as in training
        for start in range(0, len(tiles), self.window):
            chunk = tiles[start : start + self.window]
            items = ((loaded, (t, tile_tensor(image, t, norm), score_threshold)) for t in chunk)
            per_tile += await asyncio.gather(*(self.infer(item) for item in items))
        # Stitching and RLE encoding in a thread: the replica's event loop keeps feeding batches meanwhile.
        answer = await asyncio.to_thread(
            instances_json, per_tile, detector, original, max_detections, image.shape[:2]
        )
        models = {"detector": loaded.ref()}
        # the model's own operating point beside the answer: a caller that asked for everything (the page's
        # slider) knows where the model would have cut
        return {
            "width": width, "height": height, "tiles": len(tiles), **answer,
            "operating_point": cfg.score_threshold, "models": models,
        }  # fmt: skip


def plan_tiles(shape: tuple[int, int], tile_size: int, cfg, limits: tuple[int, int]) -> list[Tile]:
    """The tiles one request runs: tile_size's (0: the model's own; the model's 0: the whole image in one
    call, resized by the model as in training). A BadInput when one call's pasted masks (torchvision
    pastes box_detections_per_img float32 masks at the full size of what it ran on) would pass
    `limits`' bytes, or the tiles their count: a whole image too large 413, a tile_size too large 422.
    A whole-image model's image is not tiled unasked: it trained on whole images resized to its
    min_size..max_size, and native-resolution tiles would show it objects at another scale."""
    max_mask_bytes, max_tiles = limits
    height, width = shape
    tile = tile_size or cfg.tile_size
    per_pixel = 4 * cfg.box_detections_per_img
    largest = int(math.isqrt(max_mask_bytes // per_pixel)) // 32 * 32  # a tile side that fits
    pixels = min(tile, height) * min(tile, width) if tile else height * width  # tiles are never padded
    if pixels * per_pixel > max_mask_bytes:
        cost = (
            f"{cfg.box_detections_per_img} float32 masks at this size take {pixels * per_pixel >> 20} MB, "
            f"over this server's limit of {max_mask_bytes >> 20} MB (max_mask_mb)"
        )
        if tile:
            raise BadInput(422, f"tile_size: {tile} px tiles' {cost}; expected at most {largest}")
        raise BadInput(
            413,
            f"image is {width}x{height} and this model segments whole images: its {cost}; send "
            f"tile_size={min(largest, 1024)} (up to {largest}) to segment it in tiles",
        )
    if not tile:
        return [Tile(0, 0, width, height)]
    overlap = min(cfg.tile_overlap, tile // 2)
    # counted from one column and one row of the grid, so a refused grid is never built
    count = len(tile_grid(height, tile, tile, overlap)) * len(tile_grid(tile, width, tile, overlap))
    if count > max_tiles:
        raise BadInput(
            413,
            f"{width}x{height} in {tile} px tiles is {count} tiles, over this server's limit of "
            f"{max_tiles} (max_tiles); send a larger tile_size or a smaller image",
        )
    return tile_grid(height, width, tile, overlap)


def instances_json(
    per_tile: list[TileDetections],
    detector: Detector,
    image: np.ndarray,
    max_detections: int,
    tiled_shape: tuple[int, int],
) -> dict:
    """Tile detections of `image` rescaled to `tiled_shape` -> {count, counts per class, categories,
    instances (best first)} in the image's own shape after stitching, the model's class_score_thresh /
    mask_min_area filters, its mask refinement (as predict_image does) and the max_detections cut (0 =
    all)."""
    cfg = detector.config
    entries = stitched_results(per_tile, 1, *tiled_shape, cfg, detector.categories)
    entries = to_image(entries, tiled_shape, image, cfg.normalize, cfg.mask_refine)
    entries = sorted(entries, key=lambda r: -r["score"])[: max_detections or None]
    names = {c["id"]: c["name"] for c in detector.categories}
    counts = dict.fromkeys(names.values(), 0)
    instances = []
    for r in entries:
        x, y, w, h = r["bbox"]
        name = names.get(r["category_id"], str(r["category_id"]))
        counts[name] = counts.get(name, 0) + 1
        instances.append(
            {
                "class": name,
                "class_id": r["category_id"],
                "score": r["score"],
                "box": [x, y, x + w, y + h],
                "area": int(mask_utils.area(r["segmentation"])),
                "mask": r["segmentation"],
            }
        )
    categories = [{"id": c["id"], "name": c["name"]} for c in detector.categories]
    return {"count": len(instances), "counts": counts, "categories": categories, "instances": instances}
