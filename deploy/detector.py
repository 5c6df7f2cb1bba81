"""The detector deployment: a registered Mask R-CNN answering /v1/segment through the one inference
path (trainers/detection/inference.py), tiled at native resolution for images larger than its tiles.
`@serve.batch` gathers tiles, from one request or several, into one model call."""

import asyncio

import numpy as np
import torch
from pycocotools import mask as mask_utils
from ray import serve

from datasets.normalize import normalization
from datasets.tiles import Tile, TileDetections, tile_grid
from deploy.registry import Detector, load_detector
from deploy.reloading import Loaded, RegistryModel, configure_batching, grouped
from deploy.settings import ServeSettings
from trainers.detection.inference import detect_tiles, stitched_results, tile_tensor
from trainers.detection.scale import fit_to_model, restore_results

MASK_THRESHOLD = 0.5


@serve.deployment
class DetectorDeployment:
    def __init__(self, settings: ServeSettings):
        self.registry = RegistryModel(settings.detector, load_detector, settings)
        configure_batching(self.infer, settings)
        self.window = 2 * settings.max_batch_size  # tiles in flight per request: bounds tensor memory

    def info(self) -> dict:
        return self.registry.current.info

    @staticmethod
    def run(detector: Detector, tiles: list[tuple[Tile, torch.Tensor, float]]) -> list[TileDetections]:
        """One model call on (tile, its tensor, score threshold) items of one model version."""
        return detect_tiles(detector.model, detector.device, tiles, MASK_THRESHOLD)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def infer(self, items: list[tuple[Loaded, tuple]]) -> list[TileDetections]:
        return await asyncio.to_thread(grouped, items, self.run)

    async def segment(self, image: np.ndarray, score_threshold: float, max_detections: int, tile_size: int):
        """Instances of an HxWx3 uint8 image: class, score, box (xyxy), COCO RLE mask, area; counts per
        class. tile_size 0: the model's own (its training tile size; 0 = the whole image at once)."""
        loaded = self.registry.current  # the whole request uses one version, whatever a reload does
        detector = loaded.model
        cfg = detector.config
        tile = tile_size or cfg.tile_size
        height, width = image.shape[:2]
        # objects much larger than the trained ones: the image shrunk to them, as predict_image does
        image = await asyncio.to_thread(fit_to_model, image, cfg.object_diameter)
        # tile 0: the whole image in one call (the model resizes it as it did in training)
        tiles = (
            tile_grid(*image.shape[:2], tile, min(cfg.tile_overlap, tile // 2))
            if tile
            else [Tile(0, 0, image.shape[1], image.shape[0])]
        )
        per_tile = []
        norm = normalization(image, cfg.normalize)  # the whole image's, as in training
        for start in range(0, len(tiles), self.window):
            chunk = tiles[start : start + self.window]
            items = ((loaded, (t, tile_tensor(image, t, norm), score_threshold)) for t in chunk)
            per_tile += await asyncio.gather(*(self.infer(item) for item in items))
        # Stitching and RLE encoding in a thread: the replica's event loop keeps feeding batches meanwhile.
        answer = await asyncio.to_thread(
            instances_json, per_tile, detector, (height, width), max_detections, image.shape[:2]
        )
        models = {"detector": loaded.ref()}
        return {"width": width, "height": height, "tiles": len(tiles), **answer, "models": models}


def instances_json(
    per_tile: list[TileDetections],
    detector: Detector,
    shape: tuple[int, int],
    max_detections: int,
    tiled_shape: tuple[int, int],
) -> dict:
    """Tile detections of the image rescaled to `tiled_shape` -> {count, counts per class, categories,
    instances (best first)} in the image's own `shape` after stitching, the model's class_score_thresh /
    mask_min_area filters and the max_detections cut (0 = all)."""
    entries = stitched_results(per_tile, 1, *tiled_shape, detector.config, detector.categories)
    if tiled_shape != shape:
        entries = restore_results(entries, tiled_shape, shape)
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
