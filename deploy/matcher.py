"""The matcher deployment: a slice library built once at start from a folder of NIfTI volumes
(datasets.matching), answering "where in 3D is this slice" (/v1/match) and drawing the matched slices
and where they lie (/v1/library/view)."""

import asyncio
import logging
import time
from functools import lru_cache

import numpy as np
from ray import serve

from datasets.errors import UserError
from datasets.matching import build_library, match_slice
from datasets.volumes import load_volume
from deploy.inputs import user_error
from deploy.library import library_paths, png, position_image, slice_image, volume_shape
from deploy.settings import ServeSettings

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log and the console


@serve.deployment
class MatcherDeployment:
    """The slice library of `settings.library`, built once at start (datasets.matching.build_library)."""

    def __init__(self, settings: ServeSettings):
        self.paths = {p.name: p for p in library_paths(settings.library)}
        self.shapes = {name: volume_shape(path) for name, path in self.paths.items()}
        self.library = build_library(list(self.paths.values()), step=settings.library_step)
        self.step = settings.library_step
        # the page asks for a few matched slices per query: keep the last volumes rather than re-reading
        self._volume = lru_cache(maxsize=4)(self._load)
        log.warning("slice library: %d slices of %d volumes", len(self.library), len(self.paths))

    def _load(self, name: str) -> np.ndarray:
        return load_volume(self.paths[name])

    def info(self) -> dict:
        per_volume = np.bincount(self.library.volume_ids, minlength=len(self.library.names))
        return {
            "step": self.step,
            "slices": len(self.library),
            "volumes": [
                {"name": name, "shape": self.shapes[name], "slices": int(n)}
                for name, n in zip(self.library.names, per_volume, strict=True)
            ],
        }

    async def match(self, image: np.ndarray, top_k: int, volumes: list[str] | None) -> dict:
        """The top_k library slices most like `image`, with their rotation and position in the volume."""
        start = time.perf_counter()
        try:
            matches = await asyncio.to_thread(match_slice, self.library, image, top_k, volumes)
        except UserError as e:
            return user_error(e)
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
        except UserError as e:  # a volume unreadable since the start names its file, not the server's path
            return user_error(UserError(str(e).replace(str(self.paths[volume]), volume)))
        return {"png": await asyncio.to_thread(png, pixels)}
