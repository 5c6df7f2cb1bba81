"""The Ray Serve application: a detector deployment (a registered Mask R-CNN; tiled inference for images
larger than its tiles), a classifier deployment (a registered slice classifier or ensemble), a matcher
deployment (a slice library built from a folder of volumes: find a slice in 3D) and a FastAPI ingress
with the HTTP API and the web page (deploy/page/, at `/`). `python -m platform.serve` starts it; so does
a Serve config file:

    serve run deploy/serve.yaml        # from the repository root; `serve deploy` for a running cluster

Models load in `__init__` from the MLflow registry, pinned to the version their alias names at start;
with `reload_on_alias` a thread follows the alias and swaps in a new version once it is loaded, so no
request is dropped (a request keeps the version it started with). `@serve.batch` gathers detector tiles
and classifier slices, from one request or several, into one model call.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pycocotools import mask as mask_utils
from ray import serve
from ray.serve.handle import DeploymentHandle

from datasets.errors import UserError
from datasets.tiles import Tile, stitch_detections, tile_grid
from deploy.inputs import BadInput, decode_image, decode_volume, is_nifti
from deploy.library import library_paths, png, position_image, slice_image, volume_shape
from deploy.registry import default_tracking_uri, load_detector, resolve_registered, version_info
from trainers.config import from_dict

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log and the console

PAGE = Path(__file__).parent / "page"
MASK_THRESHOLD = 0.5
MATCH_THRESHOLD = 0.5  # mask IoU in the tiles' shared region at which two tile pieces are one object


@dataclass
class ServeSettings:
    """What the application serves and how; the `args` of a Serve config file, or platform.serve flags."""

    detector: str = ""  # models:/NAME@alias or models:/NAME/VERSION; "" = no /v1/segment
    classifier: str = ""  # a registered classifier or ensemble; "" = no /v1/classify
    library: str = ""  # a folder of NIfTI volumes to find slices in; "" = no /v1/match
    library_step: int = 1  # every n-th slice of each axis goes into the library
    tracking_uri: str = ""  # MLflow store holding the registry; "" = MLFLOW_TRACKING_URI or .mlflow/
    detector_replicas: int = 1
    classifier_replicas: int = 1
    cpus_per_replica: float = 1.0  # per model replica (torch uses this many threads)
    gpus_per_replica: float = 0.0  # per model replica; a fraction lets replicas share a GPU
    max_batch_size: int = 8  # tiles or slices per model call (@serve.batch); 1 = no batching
    # How long a partial batch waits for more. Short: a lone request pays all of it, while under load the
    # next batch fills from the requests that queued during the previous one anyway.
    batch_wait_timeout_s: float = 0.002
    max_upload_mb: float = 256.0  # request bodies over this are 413
    max_pixels: int = 150_000_000  # decoded image pixels (a 12k x 12k mosaic); over: 413
    max_voxels: int = 1024**3  # decoded NIfTI voxels; over: 413
    reload_on_alias: bool = False  # follow an alias (champion) to new versions without a restart
    reload_interval_s: float = 10.0  # how often the alias is checked

    def validate(self) -> None:
        if not (self.detector or self.classifier or self.library):
            raise UserError(
                "serve: nothing to serve; give a detector and/or a classifier (models:/NAME@alias) "
                "and/or a library folder"
            )
        positive = ("detector_replicas", "classifier_replicas", "max_batch_size", "max_pixels", "max_voxels")
        for key in (*positive, "library_step"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected at least 1, got {getattr(self, key)}")
        for key in ("cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        for key in ("max_upload_mb", "reload_interval_s"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}: expected a positive number, got {getattr(self, key)}")


def use_registry(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any  # deploy.registry.Detector, or a SliceClassifier / Ensemble
    info: dict  # deploy.registry.version_info + the URI served

    def ref(self) -> dict:
        """Which model answered, as each response names it."""
        return {"name": self.info["name"], "version": self.version}


class RegistryModel:
    """The served version of one registered model, loaded from the registry of `settings.tracking_uri`;
    with `settings.reload_on_alias`, a thread checks the alias every `reload_interval_s` and swaps in the
    version it names once that is loaded."""

    def __init__(self, uri: str, load: Callable[[str], Any], settings: ServeSettings):
        use_registry(settings.tracking_uri)
        self.uri, self._load = uri, load
        self.current = self._fetch(*resolve_registered(uri))
        if settings.reload_on_alias and "@" in uri:
            threading.Thread(target=self._follow, args=(settings.reload_interval_s,), daemon=True).start()

    def _fetch(self, name: str, version: str) -> Loaded:
        model = self._load(f"models:/{name}/{version}")
        return Loaded(version, model, {**version_info(name, version), "uri": self.uri})

    def _follow(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                name, version = resolve_registered(self.uri)
                if version != self.current.version:
                    old = self.current.version
                    self.current = self._fetch(name, version)  # one assignment: requests see old or new
                    log.warning("%s: now serving version %s (was %s)", self.uri, version, old)
            except Exception:  # a registry hiccup must not stop serving: keep the current version
                log.exception(
                    "%s: checking the alias failed; still serving version %s", self.uri, self.current.version
                )


@torch.inference_mode()
def grouped(items: list[tuple[Loaded, Any]], run: Callable[[Any, list], list]) -> list:
    """run(model, inputs) once per model version among the batch's items (a reload can put two in one
    batch), results back in the items' order."""
    out: list = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    for indices in groups.values():
        model = items[indices[0]][0].model
        for i, result in zip(indices, run(model, [items[i][1] for i in indices]), strict=True):
            out[i] = result
    return out


def run_detector(detector, tiles: list[tuple[Tile, torch.Tensor, float]]) -> list:
    """(tile, its tensor, score threshold) -> the tile's detections (trainers.detection.inference.TileDetections), each
    mask cut to its extent here, so a batch's full-tile soft masks (~100 MB a tile) are freed at once."""
    from trainers.detection.inference import crop_output, trim_heap

    outputs = detector.model([tensor.to(detector.device) for _, tensor, _ in tiles])
    cropped = [crop_output(t, o, thr, MASK_THRESHOLD) for (t, _, thr), o in zip(tiles, outputs, strict=True)]
    del outputs
    trim_heap()
    return cropped


def run_classifier(predictor, images: list[np.ndarray]) -> list[np.ndarray]:
    return list(predictor.predict_proba(images))


def _configure_batching(method, settings: ServeSettings) -> None:
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


def _user_error(e: UserError) -> dict:
    """A user error raised inside a model replica, returned (not raised) so the ingress answers 4xx."""
    return {"error": str(e), "status": e.status if isinstance(e, BadInput) else 422}


@serve.deployment
class DetectorDeployment:
    def __init__(self, settings: ServeSettings):
        self.registry = RegistryModel(settings.detector, load_detector, settings)
        _configure_batching(self.infer, settings)
        self.window = 2 * settings.max_batch_size  # tiles in flight per request: bounds tensor memory

    def info(self) -> dict:
        return self.registry.current.info

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def infer(self, items: list[tuple[Loaded, tuple]]) -> list:
        return await asyncio.to_thread(grouped, items, run_detector)

    async def segment(self, image: np.ndarray, score_threshold: float, max_detections: int, tile_size: int):
        """Instances of an HxWx3 uint8 image: class, score, box (xyxy), COCO RLE mask, area; counts per
        class. tile_size 0: the model's own (its training tile size; 0 = the whole image at once)."""
        from trainers.detection.inference import tile_tensor

        loaded = self.registry.current  # the whole request uses one version, whatever a reload does
        detector = loaded.model
        cfg = detector.config
        tile = tile_size or cfg.tile_size
        height, width = image.shape[:2]
        # tile 0: the whole image in one call (the model resizes it as it did in training)
        tiles = (
            tile_grid(height, width, tile, min(cfg.tile_overlap, tile // 2))
            if tile
            else [Tile(0, 0, width, height)]
        )
        per_tile = []
        for start in range(0, len(tiles), self.window):
            chunk = tiles[start : start + self.window]
            items = ((loaded, (t, tile_tensor(image, t, None), score_threshold)) for t in chunk)
            per_tile += await asyncio.gather(*(self.infer(item) for item in items))
        # Stitching and RLE encoding in a thread: the replica's event loop keeps feeding batches meanwhile.
        answer = await asyncio.to_thread(instances_json, per_tile, detector, height, width, max_detections)
        models = {"detector": loaded.ref()}
        return {"width": width, "height": height, "tiles": len(tiles), **answer, "models": models}


def instances_json(per_tile: list, detector, height: int, width: int, max_detections: int) -> dict:
    """Tile detections -> {count, counts per class, categories, instances (best first)} after stitching,
    the model's class_score_thresh / mask_min_area filters and the max_detections cut (0 = all)."""
    from trainers.detection.inference import detections_to_coco
    from trainers.detection.postprocess import filter_results

    detections = stitch_detections(per_tile, match_threshold=MATCH_THRESHOLD, match_metric="iou")
    entries = filter_results(
        detections_to_coco(detections, 1, height, width), detector.config, detector.categories
    )
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


def _top(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


@serve.deployment
class ClassifierDeployment:
    def __init__(self, settings: ServeSettings):
        from deploy.registry import load_classifier

        self.registry = RegistryModel(settings.classifier, load_classifier, settings)
        _configure_batching(self.infer, settings)

    def info(self) -> dict:
        return {**self.registry.current.info, "classes": list(self.registry.current.model.classes)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def infer(self, items: list[tuple[Loaded, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(grouped, items, run_classifier)

    async def classify(self, image: np.ndarray | None, volume: np.ndarray | None, top_k: int) -> dict:
        """Top-k classes of one slice image, or of a volume (its slices cut as the model's training slices
        were, classified one by one, then aggregated as in training) with each slice's top-k."""
        from trainers.classification.metrics import aggregate
        from trainers.classification.model import kept_slices

        loaded = self.registry.current
        predictor = loaded.model
        classes = list(predictor.classes)
        models = {"classifier": loaded.ref()}
        if volume is None:
            probs = await self.infer((loaded, image))
            return {"top": _top(probs, classes, top_k), "models": models}
        try:
            kept = await asyncio.to_thread(kept_slices, predictor, volume)
        except UserError as e:
            return _user_error(e)
        probs = np.stack(await asyncio.gather(*(self.infer((loaded, s.image)) for s in kept)))
        _, volume_probs = aggregate(probs, ["volume"] * len(kept), predictor.aggregate)
        return {
            "top": _top(volume_probs[0], classes, top_k),
            "aggregate": predictor.aggregate,
            "shape": list(volume.shape),
            "slices": [
                {"axis": s.axis, "index": s.index, "top": _top(p, classes, top_k)}
                for s, p in zip(kept, probs, strict=True)
            ],
            "models": models,
        }


@serve.deployment
class MatcherDeployment:
    """The slice library of `settings.library`, built once at start (datasets.matching.build_library)."""

    def __init__(self, settings: ServeSettings):
        from datasets.matching import build_library

        self.folder = settings.library
        self.paths = {p.name: p for p in library_paths(settings.library)}
        self.shapes = {name: volume_shape(path) for name, path in self.paths.items()}
        self.library = build_library(list(self.paths.values()), step=settings.library_step)
        self.step = settings.library_step
        # the page asks for a few matched slices per query: keep the last volumes rather than re-reading
        self._volume = lru_cache(maxsize=4)(self._load)
        log.warning("slice library: %d slices of %d volumes", len(self.library), len(self.paths))

    def _load(self, name: str) -> np.ndarray:
        from datasets.volumes import load_volume

        return load_volume(self.paths[name])

    def info(self) -> dict:
        per_volume = np.bincount(self.library.volume_ids, minlength=len(self.library.names))
        return {
            "folder": self.folder,
            "step": self.step,
            "slices": len(self.library),
            "volumes": [
                {"name": name, "shape": self.shapes[name], "slices": int(n)}
                for name, n in zip(self.library.names, per_volume, strict=True)
            ],
        }

    async def match(self, image: np.ndarray, top_k: int, volumes: list[str] | None) -> dict:
        """The top_k library slices most like `image`, with their rotation and position in the volume."""
        from datasets.matching import match_slice

        start = time.perf_counter()
        try:
            matches = await asyncio.to_thread(match_slice, self.library, image, top_k, volumes)
        except UserError as e:
            return _user_error(e)
        out = []
        for m in matches:
            shape = self.shapes[m.volume]
            out.append({**m.__dict__, "shape": shape, "position": m.index / max(shape[m.axis] - 1, 1)})
        searched = len(self.library)
        if volumes:
            chosen = [self.library.names.index(v) for v in volumes]
            searched = int(np.isin(self.library.volume_ids, chosen).sum())
        return {"matches": out, "searched": searched, "seconds": time.perf_counter() - start}

    async def view(self, volume: str, axis: int, index: int, kind: str) -> dict:
        """PNG of a library slice ('slice') or of where it lies in its volume ('position')."""
        if volume not in self.paths:
            return {"error": f"volume: {volume!r} is not in the library", "status": 404}
        draw = slice_image if kind == "slice" else position_image
        try:
            pixels = draw(await asyncio.to_thread(self._volume, volume), axis, index)
        except UserError as e:
            return _user_error(e)
        return {"png": await asyncio.to_thread(png, pixels)}


api = FastAPI(
    title="foram-platform",
    version="1",
    description="Segment and count instances, classify micro-CT slices and volumes, with the models "
    "registered in MLflow; find a slice in a library of volumes. Send the image or volume file as the raw "
    "request body. The web page is at /.",
)
api.mount("/static", StaticFiles(directory=PAGE), name="static")
# The upload is the raw body (no multipart parser needed; `curl --data-binary @image.png URL`); this tells
# the OpenAPI page to offer a file chooser for it.
_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@api.exception_handler(BadInput)
async def _bad_input(request: Request, e: BadInput) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


Sensitivity = Annotated[
    float, Query(ge=0.0, le=1.0, description="crop: 0.5 = Otsu's threshold, 1 keeps fainter parts")
]
Margin = Annotated[float, Query(ge=0.0, le=1.0, description="crop: margin around the object, of its size")]


def _crop(image: np.ndarray, sensitivity: float, margin: float):
    from datasets.cropping import crop_object

    try:
        return crop_object(image, sensitivity, margin)
    except UserError as e:
        raise BadInput(422, str(e)) from None


def _answer(result: dict) -> JSONResponse:
    if "error" in result:
        return JSONResponse({"error": result["error"]}, status_code=result["status"])
    return JSONResponse(result)


# No CPU reserved: the ingress waits on sockets and model replicas; decoding runs in its threads.
@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        detector: DeploymentHandle | None,
        classifier: DeploymentHandle | None,
        matcher: DeploymentHandle | None,
        settings: ServeSettings,
    ):
        self.detector, self.classifier, self.matcher, self.settings = detector, classifier, matcher, settings

    async def _body(self, request: Request) -> bytes:
        """The request body, refused as soon as it passes the upload limit (never held whole)."""
        limit = int(self.settings.max_upload_mb * 2**20)
        declared = request.headers.get("content-length", "")
        too_big = BadInput(413, f"upload over this server's limit of {self.settings.max_upload_mb:g} MB")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {
            "status": "ok",
            "detector": self.detector is not None,
            "classifier": self.classifier is not None,
            "library": self.matcher is not None,
        }

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The registered models being served: name, version, aliases, metrics from the registry."""
        out = []
        for role, handle in (("detector", self.detector), ("classifier", self.classifier)):
            if handle is not None:
                out.append({"role": role, **await handle.info.remote()})
        return {"models": out}

    @api.post("/v1/segment", openapi_extra=_UPLOAD)
    async def segment(
        self,
        request: Request,
        score_threshold: float = Query(0.0, ge=0.0, le=1.0, description="drop instances scoring lower"),
        max_detections: int = Query(0, ge=0, le=1_000_000, description="keep the best N (0 = all)"),
        tile_size: int = Query(0, ge=0, le=8192, description="tile side in pixels (0 = the model's)"),
    ) -> JSONResponse:
        """A PNG, JPEG or TIFF (8/16-bit grey or RGB) image -> instances (class, score, box, COCO RLE mask,
        area), counts per class and the model version that answered."""
        if self.detector is None:
            raise BadInput(404, "no detector is served (start the server with --detector models:/NAME@alias)")
        if 0 < tile_size < 32:
            raise BadInput(422, f"tile_size: expected 0 (the model's) or at least 32 pixels, got {tile_size}")
        body = await self._body(request)
        image = await asyncio.to_thread(decode_image, body, self.settings.max_pixels)
        return _answer(await self.detector.segment.remote(image, score_threshold, max_detections, tile_size))

    @api.post("/v1/classify", openapi_extra=_UPLOAD)
    async def classify(
        self,
        request: Request,
        top_k: int = Query(5, ge=1, le=1000, description="classes to list"),
        crop: bool = Query(False, description="crop an image to its main object on black first"),
        sensitivity: Sensitivity = 0.5,
        margin: Margin = 0.05,
    ) -> JSONResponse:
        """A slice image (PNG, JPEG, TIFF) -> its top-k classes (with crop=true: of its main object, cut
        out as /v1/crop shows); a NIfTI volume (.nii, .nii.gz) -> the volume's top-k and each classified
        slice's."""
        if self.classifier is None:
            raise BadInput(
                404, "no classifier is served (start the server with --classifier models:/NAME@alias)"
            )
        body = await self._body(request)
        if is_nifti(body):
            volume = await asyncio.to_thread(decode_volume, body, self.settings.max_voxels)
            return _answer(await self.classifier.classify.remote(None, volume, top_k))
        image = await asyncio.to_thread(decode_image, body, self.settings.max_pixels)
        if crop:
            image = (await asyncio.to_thread(_crop, image, sensitivity, margin)).image
        return _answer(await self.classifier.classify.remote(image, None, top_k))

    @api.post("/v1/crop", openapi_extra=_UPLOAD, response_class=Response)
    async def crop(self, request: Request, sensitivity: Sensitivity = 0.5, margin: Margin = 0.05):
        """An image -> its main object cropped square onto black, as PNG (what `/v1/classify?crop=true`
        classifies); the header X-Crop-Box has the square's x0,y0,x1,y1 in the image."""
        image = await asyncio.to_thread(decode_image, await self._body(request), self.settings.max_pixels)
        result = await asyncio.to_thread(_crop, image, sensitivity, margin)
        box = ",".join(map(str, result.box))
        body = await asyncio.to_thread(png, result.image)
        return Response(body, media_type="image/png", headers={"X-Crop-Box": box})

    @api.post("/v1/preview", openapi_extra=_UPLOAD, response_class=Response)
    async def preview(self, request: Request):
        """An image as the models see it (8-bit RGB), as PNG: how the page shows a TIFF."""
        image = await asyncio.to_thread(decode_image, await self._body(request), self.settings.max_pixels)
        return Response(await asyncio.to_thread(png, image), media_type="image/png")

    def _matcher(self) -> DeploymentHandle:
        if self.matcher is None:
            raise BadInput(404, "no slice library is served (start the server with --library FOLDER)")
        return self.matcher

    @api.get("/v1/library")
    async def library(self) -> dict:
        """The slice library: its folder, volumes (name, shape, slices kept) and slice count."""
        return await self._matcher().info.remote()

    @api.get("/v1/library/view", response_class=Response)
    async def library_view(
        self,
        volume: str = Query(..., description="volume file name"),
        axis: int = Query(..., ge=0, le=2),
        index: int = Query(..., ge=0),
        kind: Literal["slice", "position"] = Query("slice", description="the slice, or where it lies"),
    ):
        """PNG of a library slice, or of its volume's projection with the slice's plane drawn in red."""
        result = await self._matcher().view.remote(volume, axis, index, kind)
        if "error" in result:
            return _answer(result)
        return Response(result["png"], media_type="image/png")

    @api.post("/v1/match", openapi_extra=_UPLOAD)
    async def match(
        self,
        request: Request,
        top_k: int = Query(5, ge=1, le=50, description="matches to list"),
        volume: Annotated[list[str] | None, Query(description="only these volumes (repeatable)")] = None,
    ) -> JSONResponse:
        """A slice image -> the most similar library slices: volume, axis, index, the counter-clockwise
        rotation (degrees) that lines the image up with it, scores (SSIM, NCC, Dice, ORB matches) and the
        slice's position along its axis (0 = first slice, 1 = last)."""
        matcher = self._matcher()
        image = await asyncio.to_thread(decode_image, await self._body(request), self.settings.max_pixels)
        return _answer(await matcher.match.remote(image, top_k, volume or None))

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(PAGE / "index.html")


def settings_from(args: dict, source: str = "args") -> ServeSettings:
    """ServeSettings from a dict (a Serve config's `args`), unknown or ill-typed keys named; the tracking
    URI made explicit here, so replicas elsewhere use the store the application was built against."""
    return from_dict(
        ServeSettings, {**args, "tracking_uri": args.get("tracking_uri") or default_tracking_uri()}, source
    )


def check_models(settings: ServeSettings) -> dict[str, tuple[str, str]]:
    """{role: (name, version)} of the models to serve; a UserError for one the registry lacks or for a
    library folder without volumes."""
    if settings.library:
        library_paths(settings.library)
    use_registry(settings.tracking_uri)
    return {
        role: resolve_registered(uri)
        for role, uri in (("detector", settings.detector), ("classifier", settings.classifier))
        if uri
    }


def application(settings: ServeSettings):
    check_models(settings)  # before any replica starts: a missing model is one clear error
    model_options = {
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        # enough requests in a replica at once to fill a batch of slices
        "max_ongoing_requests": max(16, 2 * settings.max_batch_size),
    }
    detector = classifier = matcher = None
    if settings.library:
        # No CPU reserved: a query takes about half a second of one core, now and then; reserving a core
        # would leave a 2-core laptop unable to place the two model replicas.
        matcher = MatcherDeployment.options(ray_actor_options={"num_cpus": 0}).bind(settings)
    if settings.detector:
        detector = DetectorDeployment.options(num_replicas=settings.detector_replicas, **model_options)
        detector = detector.bind(settings)
    if settings.classifier:
        classifier = ClassifierDeployment.options(num_replicas=settings.classifier_replicas, **model_options)
        classifier = classifier.bind(settings)
    return Ingress.bind(detector, classifier, matcher, settings)


def build_app(args: dict):
    """Serve's application builder (`import_path: deploy.app:build_app`); `args` are ServeSettings fields."""
    return application(settings_from(args))
