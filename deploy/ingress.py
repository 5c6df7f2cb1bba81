"""The HTTP API of the Serve application: a FastAPI ingress deployment with the routes (/healthz,
/v1/models, /v1/segment, /v1/classify, /v1/crop, /v1/preview, /v1/library, /v1/library/view, /v1/match)
and the web page (deploy/page/, at `/`). It decodes and checks uploads, hands the pixels to the model
deployments' handles and turns their answers, errors included, into responses."""

import asyncio
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle

from datasets.cropping import crop_object
from datasets.errors import UserError
from deploy.inputs import BadInput, decode_image, decode_volume, is_nifti
from deploy.library import png
from deploy.settings import ServeSettings

PAGE = Path(__file__).parent / "page"

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
    try:
        return crop_object(image, sensitivity, margin)
    except UserError as e:
        raise BadInput(422, str(e)) from None


def _answer(result: dict) -> JSONResponse:
    """A model deployment's answer; its user errors (deploy.inputs.user_error) with their 4xx status."""
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
