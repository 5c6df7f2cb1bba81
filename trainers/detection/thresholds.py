"""The `thresholds` search: post-processing searched on cached predictions, without retraining.

Post-processing settings (POSTPROCESS_FIELDS) change which detections a trained model reports, not its
weights, so the `thresholds` search space tunes them on CACHED predictions: `cache_predictions` runs the
model once on the validation images with permissive settings (PERMISSIVE: every detection above a tiny
score, no NMS, up to 1000 per image) and stores every detection with its RLE mask; `apply_postprocess`
then re-applies torchvision's own post-processing (score threshold, class-wise NMS, top-k) and our
filters (class_score_thresh, mask_min_area) to the cache, and `score_postprocessed` scores the result:
a trial costs about a second instead of a training run.

Exactness: on a whole-image cache, apply_postprocess gives the detections the model itself reports with
the same settings (same boxes, scores and masks), because torchvision's score threshold, NMS and top-k
only select among the same candidates, NMS runs here on the boxes in the model's own (resized)
coordinates, and each mask depends only on its own box. Two limits: a box_score_thresh below the cache's
cannot bring back what the cache dropped, and an image whose cache was cut at PERMISSIVE's 1000 detections
is complete only above its lowest cached score (`complete_above`); both are logged. A tiled cache
(tile_size > 0) holds the stitched detections of whole images: NMS and top-k then run per image on the
stitched boxes, where the model runs them per tile, an approximation.
"""

import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.ops import boxes as box_ops

from datasets.errors import UserError
from datasets.instances import InstanceDataset, coco_ground_truth, quiet_pycocotools
from datasets.progress import Progress
from datasets.records import open_image, write_bytes_atomic
from trainers.config import MaskRCNNConfig, apply_overrides, from_dict, to_dict
from trainers.detection.inference import detect_candidates, image_tensor, mask_threshold_of, predict_records
from trainers.detection.model import load_checkpoint_model
from trainers.detection.postprocess import POSTPROCESS_FIELDS, keep_detections
from trainers.detection.refine import model_grey, refine_results
from trainers.detection.train import config_split
from trainers.evaluation import coco_report, kaggle_metrics

log = logging.getLogger(__name__)

# What the cache is made with. Score 0.001 rather than 0: a random or weak model gives thousands of
# near-zero candidates that no search would keep; NMS at IoU 1.0 suppresses nothing.
PERMISSIVE = {"box_score_thresh": 0.001, "box_nms_thresh": 1.0, "box_detections_per_img": 1000}


CACHE_VERSION = 2  # 2: .npz + JSON (1 was a pickle)


LOG_EVERY_S = 5.0


@dataclass
class PredictionCache:
    """Every permissive detection of a model on its validation images, and what scoring them needs.

    Detections are rows of the arrays, grouped by image (image i, id i + 1, is rows offsets[i]:offsets[i +
    1]) and within an image in the model's output order (score descending).
    """

    config: dict  # the checkpoint's MaskRCNNConfig (to_dict): defaults of every post-processing field
    categories: list[dict]  # the model's categories; labels are their ids
    ground_truth: dict  # COCO dataset dict of the validation images (coco_ground_truth), ids 1..N
    image_files: list[str]  # the validation images, in id order
    permissive: dict  # the post-processing the model ran with (PERMISSIVE)
    tiled: bool  # made by tiled inference (config tile_size > 0): NMS and top-k are approximations
    mask_threshold: float  # soft masks binarised at this value
    offsets: np.ndarray  # int64, images + 1
    complete_above: np.ndarray  # float, per image: every candidate scoring above this is in the cache
    labels: np.ndarray  # int64, category ids
    scores: np.ndarray  # float32, as the model output them
    nms_boxes: np.ndarray  # float32 N x 4 xyxy in the coordinates the model ran NMS in (its resized input)
    bboxes: np.ndarray  # float64 N x 4 COCO xywh in image pixels, as to_coco_results writes them
    areas: np.ndarray  # int64 mask pixels
    rles: list[dict] = field(repr=False)  # COCO RLEs (str counts)

    @cached_property
    def coco(self) -> COCO:
        gt = COCO()
        gt.dataset = self.ground_truth
        with quiet_pycocotools():
            gt.createIndex()
        return gt

    @cached_property
    def model_config(self) -> MaskRCNNConfig:
        return from_dict(MaskRCNNConfig, self.config, "cached model config")

    @property
    def images(self) -> int:
        return len(self.offsets) - 1


ARRAYS = {  # the cache's arrays and their dtype kinds (numpy's: i integer, f float); the rest is JSON
    "offsets": "i",
    "complete_above": "f",
    "labels": "i",
    "scores": "f",
    "nms_boxes": "f",
    "bboxes": "f",
    "areas": "i",
}
JSON_KEY = "json"  # the .npz member holding the other fields, as UTF-8 JSON bytes


def save_cache(cache: PredictionCache, out: str | Path) -> Path:
    """A PredictionCache as one .npz file (its arrays, and the other fields as JSON in the uint8 member
    `json`), written atomically: loaded without unpickling anything (load_cache)."""
    rest = {f.name: getattr(cache, f.name) for f in fields(PredictionCache) if f.name not in ARRAYS}
    text = json.dumps({"version": CACHE_VERSION, **rest}, separators=(",", ":"))
    buffer = io.BytesIO()
    arrays = {key: np.asarray(getattr(cache, key)) for key in ARRAYS}
    np.savez(buffer, **arrays, **{JSON_KEY: np.frombuffer(text.encode(), dtype=np.uint8)})
    return write_bytes_atomic(out, buffer.getvalue())


def load_cache(path: str | Path) -> PredictionCache:
    """A cache written by save_cache, read with allow_pickle=False; a UserError naming the file if it is
    not one (a pickle cache of an older version among them: remake it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction cache not found (make one with cache_predictions)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ARRAYS}
            rest = json.loads(npz[JSON_KEY].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a prediction cache (.npz; remake an older one): {first}") from None
    if not isinstance(rest, dict) or rest.get("version") != CACHE_VERSION:
        version = rest.get("version") if isinstance(rest, dict) else None
        raise UserError(f"{path}: prediction cache version {version}, expected {CACHE_VERSION}; remake it")
    for key, kind in ARRAYS.items():
        if arrays[key].dtype.kind != kind:
            raise UserError(f"{path}: {key} has dtype {arrays[key].dtype}, expected kind {kind!r}; remake it")
    missing = [f.name for f in fields(PredictionCache) if f.name not in ARRAYS and f.name not in rest]
    if missing:
        raise UserError(f"{path}: prediction cache lacks {', '.join(missing)}; remake it")
    # JSON has no tuples: the config comes back as to_dict gave it (tuple fields), checked on the way
    rest["config"] = to_dict(from_dict(MaskRCNNConfig, rest["config"], f"{path}: config"))
    return PredictionCache(**{f.name: arrays.get(f.name, rest.get(f.name)) for f in fields(PredictionCache)})


def cache_predictions(
    checkpoint: str | Path, out: str | Path, *, device: str | None = None, mask_threshold: float | None = None
) -> Path:
    """Run a checkpoint folder's model (model.pt, config.json, categories.json) on its validation images
    with PERMISSIVE post-processing and write a PredictionCache (save_cache: .npz, atomically) to `out`.

    The validation split is rebuilt as training built it (cfg.data, cfg.data_format, val_fraction, seed,
    split_file); whole images one at a time, or tiled inference when the config has tile_size > 0.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, categories = load_checkpoint_model(checkpoint, device)
    mask_threshold = mask_threshold_of(cfg, mask_threshold)  # the masks the model reports: its own
    _, val_records = config_split(cfg)
    if not val_records:
        raise UserError(f"val_fraction: {checkpoint}'s config leaves no validation images to cache")
    model.roi_heads.score_thresh = PERMISSIVE["box_score_thresh"]
    model.roi_heads.nms_thresh = PERMISSIVE["box_nms_thresh"]
    model.roi_heads.detections_per_img = PERMISSIVE["box_detections_per_img"]
    started = time.perf_counter()
    if cfg.tile_size:
        per_image = _tiled_candidates(model, val_records, cfg, device, mask_threshold)
    else:
        per_image = _whole_image_candidates(model, val_records, cfg, device, mask_threshold)
    counts = [len(p[0]) for p in per_image]
    cache = PredictionCache(
        config=to_dict(cfg),
        categories=list(categories),
        ground_truth=coco_ground_truth(InstanceDataset(val_records)).dataset,
        image_files=[str(r.image_path) for r in val_records],
        permissive=dict(PERMISSIVE),
        tiled=bool(cfg.tile_size),
        mask_threshold=mask_threshold,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        complete_above=np.array([p[6] for p in per_image], dtype=np.float64),
        labels=np.concatenate([p[0] for p in per_image]),
        scores=np.concatenate([p[1] for p in per_image]),
        nms_boxes=np.concatenate([p[2].reshape(-1, 4) for p in per_image]),
        bboxes=np.concatenate([p[3].reshape(-1, 4) for p in per_image]),
        areas=np.concatenate([p[4] for p in per_image]),
        rles=[rle for p in per_image for rle in p[5]],
    )
    save_cache(cache, out)
    log.info(
        "prediction cache %s: %d images, %d detections (%.1f s)",
        out,
        len(val_records),
        sum(counts),
        time.perf_counter() - started,
    )
    return out


# One image's candidates: labels, scores, nms_boxes, bboxes (xywh), mask areas, RLEs, complete_above.
Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list, float]


def _tiled_candidates(model, records, cfg, device, mask_threshold: float) -> list[Candidates]:
    # Tile outputs are cropped at once (detect_tiles); one tile at a time bounds the memory of
    # PERMISSIVE's full-tile soft masks.
    results = predict_records(
        model,
        records,
        device,
        tile_size=cfg.tile_size,
        tile_overlap=cfg.tile_overlap,
        tile_batch=1,
        mask_threshold=mask_threshold,
        normalize=cfg.normalize,
        object_diameter=cfg.object_diameter,
        log_every_s=LOG_EVERY_S,
    )
    per_image = []
    for index in range(len(records)):
        mine = [r for r in results if r["image_id"] == index + 1]
        order = np.argsort([-r["score"] for r in mine], kind="stable")
        mine = [mine[i] for i in order]
        bboxes = np.array([r["bbox"] for r in mine], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([bboxes[:, :2], bboxes[:, :2] + bboxes[:, 2:]], axis=1)
        rles = [r["segmentation"] for r in mine]
        areas = np.array([mask_utils.area(r) for r in rles], dtype=np.int64)
        per_image.append(
            (
                np.array([r["category_id"] for r in mine], dtype=np.int64),
                np.array([r["score"] for r in mine], dtype=np.float32),
                xyxy.astype(np.float32),
                bboxes,
                areas,
                _refined(rles, bboxes, records[index].image_path, cfg),
                PERMISSIVE["box_score_thresh"],  # tiles are not cut at a total per image
            )
        )
    return per_image


def _whole_image_candidates(model, records, cfg, device, mask_threshold: float) -> list[Candidates]:
    model.eval()
    per_image = []
    with Progress(len(records), "cached", "images", log.info, every_s=LOG_EVERY_S) as bar:
        for record in records:
            # as predict_image feeds it
            pixels = open_image(record.image_path)
            image = image_tensor(pixels, cfg.normalize).to(device)
            nms_boxes, boxes, scores, labels, areas, rles = detect_candidates(model, image, mask_threshold)
            boxes = boxes.numpy()
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
            complete = PERMISSIVE["box_score_thresh"]
            if len(scores) >= PERMISSIVE["box_detections_per_img"]:  # cut at top-k: lower ones are gone
                complete = max(complete, float(scores.min()))
            per_image.append(
                (
                    labels.numpy().astype(np.int64),
                    scores.numpy().astype(np.float32),
                    nms_boxes.numpy().astype(np.float32),
                    xywh,  # float32 differences, as to_coco_results computes its xywh
                    areas,
                    _refined(rles, xywh, pixels, cfg),
                    complete,
                )
            )
            bar.update()
    return per_image


def _refined(rles: list[dict], bboxes: np.ndarray, image: np.ndarray | Path, cfg) -> list[dict]:
    """Candidate masks as the model reports them, refined by its mask_refine (trainers/detection/refine.py)
    on `image` (its pixels, or its file when they are not at hand). Their areas stay the unrefined ones:
    predict_image's filters (mask_min_area) run before refinement too."""
    if cfg.mask_refine == "off" or not rles:
        return rles
    found = [{"segmentation": rle, "bbox": box.tolist()} for rle, box in zip(rles, bboxes, strict=True)]
    grey = model_grey(open_image(image) if isinstance(image, Path) else image, cfg.normalize)
    return [r["segmentation"] for r in refine_results(found, grey, cfg.mask_refine)]


def postprocess_config(cache: PredictionCache, params: dict) -> MaskRCNNConfig:
    """The cached model's config with `params` applied (strings parsed and values checked as for any
    override); UserError naming a key that is not a post-processing field."""
    other = sorted(set(params) - set(POSTPROCESS_FIELDS))
    if other:
        raise UserError(
            f"{', '.join(other)}: not post-processing fields; a search on cached predictions can change "
            f"only {', '.join(POSTPROCESS_FIELDS)}"
        )
    return apply_overrides(cache.model_config, params, source="thresholds")


def apply_postprocess(cache: PredictionCache, params: dict) -> list[dict]:
    """COCO result dicts of the cached detections under `params` (POSTPROCESS_FIELDS; missing ones take the
    cached model's config values), per image in torchvision's order (roi_heads.postprocess_detections):
    score > box_score_thresh, class-wise NMS (torchvision's batched_nms) at box_nms_thresh, the first
    box_detections_per_img by score; then the filters of keep_detections. The results share the cache's
    RLE dicts: copy before changing them."""
    cfg = postprocess_config(cache, params)
    _warn_if_incomplete(cache, cfg)
    selected = cache.scores > cfg.box_score_thresh
    kept = []
    for i in range(cache.images):
        start, stop = cache.offsets[i], cache.offsets[i + 1]
        index = start + np.flatnonzero(selected[start:stop])
        if not len(index):
            continue
        # Boxes, scores and labels as roi_heads held them; remove_small_boxes already ran in the model.
        order = box_ops.batched_nms(
            torch.from_numpy(cache.nms_boxes[index]),
            torch.from_numpy(cache.scores[index]),
            torch.from_numpy(cache.labels[index]),
            cfg.box_nms_thresh,
        )
        kept.append(index[order[: cfg.box_detections_per_img].numpy()])
    if not kept:
        return []
    kept = np.concatenate(kept)
    keep = keep_detections(
        cache.labels[kept],
        cache.scores[kept],
        cache.areas[kept],
        cfg.class_score_thresh,
        cfg.mask_min_area,
        cache.categories,
    )
    kept = kept[keep]
    image_ids = np.searchsorted(cache.offsets, kept, side="right")  # row -> image index + 1
    return [
        {
            "image_id": image_id,
            "category_id": label,
            "score": score,
            "segmentation": cache.rles[row],
            "bbox": bbox,
        }
        for row, image_id, label, score, bbox in zip(
            kept.tolist(),
            image_ids.tolist(),
            cache.labels[kept].tolist(),
            cache.scores[kept].tolist(),
            cache.bboxes[kept].tolist(),
            strict=True,
        )
    ]


_warned: set[tuple[int, str]] = set()


def _warn_if_incomplete(cache: PredictionCache, cfg: MaskRCNNConfig) -> None:
    # Once per cache and kind, not once per trial.
    def warn(kind: str, message: str, *args) -> None:
        if (id(cache), kind) not in _warned:
            _warned.add((id(cache), kind))
            log.warning(message, *args)

    if cfg.box_score_thresh < cache.permissive["box_score_thresh"]:
        warn(
            "score",
            "box_score_thresh %g is below the cache's %g: the detections in between are not cached",
            cfg.box_score_thresh,
            cache.permissive["box_score_thresh"],
        )
    elif (cache.complete_above > cfg.box_score_thresh).any():
        warn(
            "cut",
            "%d image(s) had more than %d candidates: at box_score_thresh %g their results may miss some",
            int((cache.complete_above > cfg.box_score_thresh).sum()),
            cache.permissive["box_detections_per_img"],
            cfg.box_score_thresh,
        )
    if cfg.box_detections_per_img > cache.permissive["box_detections_per_img"]:
        warn(
            "topk",
            "box_detections_per_img %d is above the cache's %d",
            cfg.box_detections_per_img,
            cache.permissive["box_detections_per_img"],
        )


def score_postprocessed(
    cache: PredictionCache, results: list[dict], max_dets: int | None = None
) -> dict[str, float]:
    """COCO metrics (bbox_* and segm_*, trainers/evaluation.py's coco_report), the Kaggle metric of every
    result (score_threshold 0: the searched thresholds already chose the detections) and `detections`.
    max_dets: COCO's per-image limit, by default the cache's (so every result counts; results made by
    apply_postprocess hold at most box_detections_per_img per image, and AP at that limit is the same)."""
    gt = cache.coco
    max_dets = max_dets or cache.permissive["box_detections_per_img"]
    metrics = coco_report(gt, results, max_dets)[0]
    metrics.update(kaggle_metrics(gt, results, score_threshold=0.0))
    metrics["detections"] = float(len(results))
    return metrics


def evaluate_thresholds(cache: PredictionCache, params: dict) -> dict[str, float]:
    """One trial of the `thresholds` search: score_postprocessed of apply_postprocess."""
    return score_postprocessed(cache, apply_postprocess(cache, params))
