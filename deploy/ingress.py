"""The HTTP API of the Serve application: a FastAPI ingress deployment with the routes (/healthz,
/v1/models, /v1/segment, /v1/classify, /v1/crop, /v1/preview, /v1/library, /v1/library/view, /v1/match)
and the web page (deploy/page/, at `/`). It refuses requests deploy/access.py rules out, reads uploads
(the raw body or one multipart file, under the size limit), decodes and checks them, hands the pixels to
the model deployments' handles and turns their answers, errors included, into responses."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from datasets.cropping import crop_object
from datasets.errors import UserError
from deploy.access import check_request, read_token
from deploy.inputs import BadInput, decode_image, decode_pixels, decode_volume, is_nifti
from deploy.library import png
from deploy.settings import ServeSettings, mb

PAGE = Path(__file__).parent / "page"

api = FastAPI(
    title="foram-platform",
    version="1",
    description="Segment and count instances, classify micro-CT slices and volumes, with the models "
    "registered in MLflow; find a slice in a library of volumes. Send the image or volume file as the raw "
    "request body with its Content-Type (image/png, ..., application/octet-stream), or as the one file of "
    "a multipart/form-data upload. The web page is at /.",
)
api.mount("/static", StaticFiles(directory=PAGE), name="static")
# The upload: the raw body (`curl -H 'Content-Type: image/png' --data-binary @image.png URL`) or one file
# of a form (`curl -F file=@image.png URL`); this tells the OpenAPI page to offer a file chooser for it.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY}}},
        },
    }
}
# Content types of a raw upload. Any other (text/plain, a form's urlencoded body, none at all) is 415:
# those are what another site's page can send without the browser asking this server first.
RAW_TYPES = (
    "application/octet-stream",
    "application/gzip",  # .nii.gz, as browsers label it
    "application/x-gzip",
    "application/x-nifti",
    "application/nifti",
)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, e: BadInput) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


@api.middleware("http")
async def _access(request: Request, call_next):
    """deploy/access.py's rules, before any route reads the request (settings set by Ingress.__init__)."""
    settings, token = request.app.state.access
    try:
        check_request(settings, token, request.url.path, request.headers)
    except BadInput as e:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


Sensitivity = Annotated[
    float, Query(ge=0.0, le=1.0, description="crop: 0.5 = Otsu's threshold, 1 keeps fainter parts")
]
Margin = Annotated[float, Query(ge=0.0, le=1.0, description="crop: margin around the object, of its size")]
# A TIFF stack's plane and a multi-channel image's channel, as platform.predict's --page and --channel.
Page = Annotated[int | None, Query(ge=0, description="the plane of a TIFF stack (Z, T, pages), from 0")]
Channel = Annotated[int | None, Query(ge=0, description="the channel of a multi-channel image, from 0")]


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
        api.state.access = (settings, read_token(settings))
        self.max_decoded = mb(settings.max_decoded_mb)

    async def _stream(self, request: Request) -> AsyncIterator[bytes]:
        """The request body's chunks, refused as soon as they pass the upload limit (never held whole)."""
        limit = mb(self.settings.max_upload_mb)
        declared = request.headers.get("content-length", "")
        too_big = BadInput(413, f"upload over this server's limit of {self.settings.max_upload_mb:g} MB")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            yield chunk

    async def _body(self, request: Request) -> bytes:
        """The uploaded file: the raw body of an image/*, NIfTI or octet-stream request, or the one file of
        a multipart/form-data one, both under the upload limit; 415 for any other Content-Type."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith("image/") or kind in RAW_TYPES:
            return b"".join([chunk async for chunk in self._stream(request)])
        if kind != "multipart/form-data":
            raise BadInput(
                415,
                f"Content-Type {kind or 'missing'}: expected image/..., application/octet-stream, a NIfTI "
                "type or multipart/form-data with one file",
            )
        # Files over 1 MB are spooled to disk while the form is parsed; other fields are small by rule.
        parser = MultiPartParser(request.headers, self._stream(request), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise BadInput(400, f"malformed multipart upload ({e.message})") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise BadInput(
                400, "multipart upload without a file: expected one file field (e.g. -F file=@x.png)"
            )
        try:
            return await files[0].read()
        finally:
            await form.close()

    async def _decode(self, body: bytes, page: int | None, channel: int | None, rgb8: bool) -> np.ndarray:
        """An uploaded image decoded within the limits: its pixels at full precision (decode_pixels), or
        with `rgb8` as 8-bit RGB (16-bit scaled by its range) for a classifier, a crop and the page."""
        decode = decode_image if rgb8 else decode_pixels
        return await asyncio.to_thread(
            decode, body, self.settings.max_pixels, self.max_decoded, page, channel
        )

    async def _image(self, request: Request, page: int | None, channel: int | None, rgb8: bool) -> np.ndarray:
        return await self._decode(await self._body(request), page, channel, rgb8)

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
        score_threshold: float | None = Query(
            None,
            ge=0.0,
            le=1.0,
            description="drop instances scoring lower (default: the model's operating point)",
        ),
        max_detections: int = Query(0, ge=0, le=1_000_000, description="keep the best N (0 = all)"),
        tile_size: int = Query(0, ge=0, le=8192, description="tile side in pixels (0 = the model's)"),
        page: Page = None,
        channel: Channel = None,
    ) -> JSONResponse:
        """A PNG, JPEG, BMP or TIFF/OME-TIFF (8/16-bit, float, grey, RGB or a chosen channel or plane)
        image -> instances (class, score, box, COCO RLE mask, area), counts per class and the model version
        that answered. The pixels reach the model at full precision and get its own normalisation, as in
        training and platform.predict."""
        if self.detector is None:
            raise BadInput(404, "no detector is served (start the server with --detector models:/NAME@alias)")
        if 0 < tile_size < 32:
            raise BadInput(422, f"tile_size: expected 0 (the model's) or at least 32 pixels, got {tile_size}")
        image = await self._image(request, page, channel, rgb8=False)
        return _answer(await self.detector.segment.remote(image, score_threshold, max_detections, tile_size))

    @api.post("/v1/classify", openapi_extra=_UPLOAD)
    async def classify(
        self,
        request: Request,
        top_k: int = Query(5, ge=1, le=1000, description="classes to list"),
        crop: bool = Query(False, description="crop an image to its main object on black first"),
        sensitivity: Sensitivity = 0.5,
        margin: Margin = 0.05,
        page: Page = None,
        channel: Channel = None,
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
            volume = await asyncio.to_thread(decode_volume, body, self.settings.max_voxels, self.max_decoded)
            return _answer(await self.classifier.classify.remote(None, volume, top_k))
        image = await self._decode(body, page, channel, rgb8=True)
        if crop:
            image = (await asyncio.to_thread(_crop, image, sensitivity, margin)).image
        return _answer(await self.classifier.classify.remote(image, None, top_k))

    @api.post("/v1/crop", openapi_extra=_UPLOAD, response_class=Response)
    async def crop(
        self,
        request: Request,
        sensitivity: Sensitivity = 0.5,
        margin: Margin = 0.05,
        page: Page = None,
        channel: Channel = None,
    ):
        """An image -> its main object cropped square onto black, as PNG (what `/v1/classify?crop=true`
        classifies); the header X-Crop-Box has the square's x0,y0,x1,y1 in the image."""
        image = await self._image(request, page, channel, rgb8=True)
        result = await asyncio.to_thread(_crop, image, sensitivity, margin)
        box = ",".join(map(str, result.box))
        body = await asyncio.to_thread(png, result.image)
        return Response(body, media_type="image/png", headers={"X-Crop-Box": box})

    @api.post("/v1/preview", openapi_extra=_UPLOAD, response_class=Response)
    async def preview(self, request: Request, page: Page = None, channel: Channel = None):
        """An image as 8-bit RGB (16-bit and float scaled by their range, as a classifier sees them), as PNG:
        how the page shows a TIFF."""
        image = await self._image(request, page, channel, rgb8=True)
        return Response(await asyncio.to_thread(png, image), media_type="image/png")

    def _matcher(self) -> DeploymentHandle:
        if self.matcher is None:
            raise BadInput(404, "no slice library is served (start the server with --library FOLDER)")
        return self.matcher

    @api.get("/v1/library")
    async def library(self) -> dict:
        """The slice library: its volumes (name, shape, slices kept) and slice count (no server paths)."""
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
        image = await self._image(request, None, None, rgb8=True)
        return _answer(await matcher.match.remote(image, top_k, volume or None))

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(PAGE / "index.html")
