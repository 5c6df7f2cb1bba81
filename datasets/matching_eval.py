"""Measuring datasets.matching: queries cut from library volumes at a known volume, axis and index, rotated
counter-clockwise by a known angle and given Gaussian noise; a hit is the right volume and axis, the index
within +-2 slices (neighbours are near-identical) and the angle within +-10 degrees. Used by
tests/test_matching.py and `python -m platform.bench match` (hit rate and time per query vs library size).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu
from skimage.transform import rotate

from datasets import matching
from datasets.volumes import load_volume

ANGLES = (0, 35, 90, 160, 270)
NOISE_SIGMA = 15  # grey levels, on 0..255 images
INDEX_TOLERANCE = 2
ANGLE_TOLERANCE = 10


@dataclass(frozen=True)
class Query:
    volume: str  # file name
    axis: int
    index: int
    angle: float  # the query is the slice rotated counter-clockwise by this
    image: np.ndarray

    @property
    def expected_angle(self) -> float:
        return (-self.angle) % 360


def circular_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def rotated_query(volume: np.ndarray, axis: int, index: int, angle: float, rng: np.random.Generator):
    """The slice rotated counter-clockwise by `angle` (canvas enlarged so nothing is cut), plus noise."""
    image = np.take(volume, index, axis=axis).astype(np.float32)
    image = rotate(image, angle, resize=True, order=1, preserve_range=True)
    return np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape), 0, 255).astype(np.uint8)


def middle_index(volume: np.ndarray, axis: int, rng: np.random.Generator) -> int:
    """An index in the middle third of the object's extent along `axis` (object: the volume's Otsu mask);
    end slices are tiny blobs whose orientation and origin are ambiguous."""
    foreground = volume > threshold_otsu(volume)
    present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
    lo, hi = present[0], present[-1]
    return int(lo + (hi - lo) * rng.uniform(1 / 3, 2 / 3))


def make_queries(paths: list[Path], seed: int = 0) -> list[Query]:
    """One query per volume, cycling through the axes and ANGLES."""
    rng = np.random.default_rng(seed)
    queries = []
    for i, path in enumerate(paths):
        volume = load_volume(path)
        axis, angle = i % 3, ANGLES[i % len(ANGLES)]
        index = middle_index(volume, axis, rng)
        queries.append(Query(path.name, axis, index, angle, rotated_query(volume, axis, index, angle, rng)))
    return queries


@dataclass(frozen=True)
class Outcome:
    query: Query
    top: matching.Match
    seconds: float

    @property
    def hit(self) -> bool:
        q, top = self.query, self.top
        return (
            (top.volume, top.axis) == (q.volume, q.axis)
            and abs(top.index - q.index) <= INDEX_TOLERANCE
            and circular_diff(top.angle, q.expected_angle) <= ANGLE_TOLERANCE
        )

    def line(self) -> str:
        q, top = self.query, self.top
        return (
            f"{'hit ' if self.hit else 'MISS'} {q.volume} axis {q.axis} index {q.index} rotated {q.angle} -> "
            f"{top.volume} axis {top.axis} index {top.index} angle {top.angle:.0f} "
            f"(want {q.expected_angle:.0f}) score {top.score:.2f} dice {top.dice:.2f} ssim {top.ssim:.2f} "
            f"ncc {top.ncc:.2f} orb {top.orb_matches}"
        )


def run_queries(library: matching.Library, queries: list[Query], volumes: list[str] | None = None):
    """Each query's top match (searching only `volumes`, if given) and the time it took."""
    outcomes = []
    for q in queries:
        start = time.perf_counter()
        top = matching.match_slice(library, q.image, top_k=1, volumes=volumes)[0]
        outcomes.append(Outcome(q, top, time.perf_counter() - start))
    return outcomes


def summary(outcomes: list[Outcome]) -> tuple[float, float]:
    """(hit rate, mean seconds per query)."""
    return (
        sum(o.hit for o in outcomes) / len(outcomes),
        float(np.mean([o.seconds for o in outcomes])),
    )
