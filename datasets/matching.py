"""Find a 2D slice in a library of 3D volumes: which volume, which axis, which index, which rotation.

Part of the "find this slice in 3D" page; this module is the engine only (no HTTP). From Python:

    library = build_library(sorted(Path("../shared/data/adrenal3d/volumes").glob("*.nii.gz"))[:50])
    for m in match_slice(library, query_image, top_k=5):
        print(m.volume, m.axis, m.index, m.angle, m.score)

Every slice (library or query) is normalised the same way: Otsu mask (of the whole volume for library
slices, of the image for a query), specks dropped, then a square crop around the object's centroid whose
half side is the object's largest distance from the centroid, resized to `size` x `size`. The crop is
centred on the centroid rather than on the bounding box because a bounding box grows and shifts when the
object rotates, which would change the thumbnail's scale and centre between a query and its rotated
original; the centroid and the enclosing circle do not change, so rotating a thumbnail about its centre
is the same as rotating the object. Pixels outside that circle are set to zero so rotated corners carry
no information. The match is scale invariant: a query may be magnified differently from the library.

Matching is two stages (`match_slice`): a cheap coarse ranking of every library slice by the Dice
coefficient of the masks (at the best of the coarse angles, all slices at once as one matrix product) and
by the distance of log-scaled Hu moments; then, on the best `coarse` candidates, a rotation search scored
by SSIM, normalised cross-correlation and Dice, and a count of ORB feature matches that agree with the
found rotation.

Angle convention: `Match.angle` is the angle in degrees, in [0, 360), by which the query must be rotated
counter-clockwise (as displayed, row 0 at the top; the convention of `skimage.transform.rotate` and
`cv2.getRotationMatrix2D`) about its object's centroid to line up with the library slice. A query made by
rotating a library slice counter-clockwise by `t` degrees therefore matches with angle `(-t) % 360`.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

from datasets.errors import UserError
from datasets.volumes import load_volume

log = logging.getLogger(__name__)

MIN_OBJECT_PIXELS = 16  # smaller objects give thumbnails of a few blurred pixels: nothing to match
SPECK_FRACTION = 0.02  # connected components below this fraction of the largest one are noise specks
ORB_SCALE = 4  # ORB finds almost no keypoints on 64 px thumbnails: upsample before detecting
ORB_FULL = 20  # this many rotation-consistent ORB matches count as full ORB agreement
ORB_MAX_HAMMING = 64  # of 256 bits; worse descriptor matches are chance
ORB_MAX_SHIFT = 0.08  # of the thumbnail side: a match further from where the rotation puts it is wrong
HU_WEIGHT = 0.05  # coarse stage: Dice minus this times the Hu distance (Hu is weak on blobs, Dice is not)
# Final score weights; they sum to 1. ORB only nudges: on smooth blobs it finds few, repetitive corners.
W_SSIM, W_NCC, W_DICE, W_ORB = 0.35, 0.3, 0.25, 0.1
SCREEN_ANGLES = 3  # coarse angles (best by NCC + Dice) that also get SSIM; 3 covers 2-fold symmetry
FINE_DIVISIONS = 5  # the refinement around the best coarse angle uses angle_step / FINE_DIVISIONS
COARSE_CHUNK = 8192  # library slices per matrix product in the coarse stage (bounds its memory)


@dataclass(frozen=True)
class Library:
    """Precomputed thumbnails of every kept slice; row i of every array describes slice i."""

    names: list[str]  # volume file names; volume_ids index into this list
    volume_ids: np.ndarray  # (N,) int32
    axes: np.ndarray  # (N,) int8, the axis the slice was cut across (0, 1 or 2)
    indices: np.ndarray  # (N,) int32, the slice's index along that axis
    thumbs: np.ndarray  # (N, size, size) uint8, normalised grey thumbnail (0 outside the circle)
    masks: np.ndarray  # (N, size, size) bool, the object's mask in the thumbnail
    hu: np.ndarray  # (N, 7) float32, log-scaled Hu moments of the mask
    size: int  # thumbnail side in pixels

    def __len__(self) -> int:
        return len(self.volume_ids)


@dataclass(frozen=True)
class Match:
    volume: str  # the volume's file name
    axis: int  # 0, 1 or 2
    index: int  # slice index along `axis`
    angle: float  # degrees in [0, 360): rotate the query counter-clockwise by this to line up (see module)
    score: float  # combined score in about [-1, 1], higher is better; comparable within one query only
    dice: float  # Dice coefficient of the aligned masks
    ssim: float  # SSIM of the aligned thumbnails
    ncc: float  # normalised cross-correlation of the aligned thumbnails
    orb_matches: int  # ORB matches consistent with `angle`


@dataclass(frozen=True)
class _Thumb:
    grey: np.ndarray  # (size, size) uint8
    mask: np.ndarray  # (size, size) bool


# ------------------------------------------------------------------------------------------ normalising
def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop connected components much smaller than the largest (noise above the Otsu threshold)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:  # background plus at most one component
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= max(2, SPECK_FRACTION * areas.max())) + 1
    return np.isin(labels, keep)


def _circle(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2


def _thumbnail(grey: np.ndarray, mask: np.ndarray, size: int, circle: np.ndarray) -> _Thumb | None:
    """Crop a square around the object's enclosing circle, pad where it leaves the image, resize."""
    mask = _clean_mask(mask)
    ys, xs = np.nonzero(mask)
    if len(ys) < MIN_OBJECT_PIXELS:
        return None
    cy, cx = ys.mean(), xs.mean()
    half = int(np.ceil(np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max()))) + 1
    r0, c0 = int(round(cy)) - half, int(round(cx)) - half
    side = 2 * half + 1
    pad = max(0, -r0, -c0, r0 + side - grey.shape[0], c0 + side - grey.shape[1])
    g = np.pad(grey, pad) if pad else grey  # zero padding: load_volume maps the background to ~0
    m = np.pad(mask, pad) if pad else mask
    g = g[r0 + pad : r0 + pad + side, c0 + pad : c0 + pad + side].astype(np.float32)
    m = m[r0 + pad : r0 + pad + side, c0 + pad : c0 + pad + side].astype(np.float32)
    # INTER_AREA averages when shrinking (no aliasing, and it smooths the query's noise)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    g = cv2.resize(g, (size, size), interpolation=interp)
    m = cv2.resize(m, (size, size), interpolation=interp) >= 0.5
    # contrast stretch so a query with other grey levels compares with the library under SSIM too
    inside = g[circle]
    lo, hi = np.percentile(inside, (1, 99))
    g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    g[~circle] = 0
    m &= circle
    return _Thumb(grey=(g * 255).round().astype(np.uint8), mask=m)


def _hu(mask: np.ndarray) -> np.ndarray:
    """Hu moments, log-scaled because the raw ones span ten orders of magnitude."""
    h = cv2.HuMoments(cv2.moments(mask.astype(np.uint8), binaryImage=True)).ravel()
    return (-np.sign(h) * np.log10(np.maximum(np.abs(h), 1e-12))).astype(np.float32)


def _to_grey(image: np.ndarray) -> np.ndarray:
    """Any 2D grey or RGB(A) image as uint8 grey; UserError for what is not an image."""
    image = np.asarray(image)
    if image.size == 0:
        raise UserError(f"query image is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        if image.dtype != np.uint8:
            image = _to_grey(image[..., :3].mean(axis=2))
        else:
            image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise UserError(f"query image has shape {image.shape}; expected a 2D grey or RGB image")
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    data = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(data.min()), float(data.max())
    return ((data - lo) * (255.0 / max(hi - lo, 1e-12))).round().astype(np.uint8)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 16:
        raise UserError(f"size must be an integer >= 16 (thumbnail side in pixels), got {size!r}")


# ------------------------------------------------------------------------------------------- library
def build_library(paths: Sequence[str | Path], step: int = 1, size: int = 64) -> Library:
    """Thumbnails of every `step`-th slice with an object, along all three axes of every volume.

    The object is everything above the Otsu threshold of the whole volume (one threshold per volume, so a
    slice with only background stays empty). Volumes are named by their file name, which must be unique.
    Raises UserError for an unreadable volume, duplicate names or bad settings.
    """
    if not isinstance(step, int) or step < 1:
        raise UserError(f"step must be an integer >= 1, got {step!r}")
    _check_size(size)
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no volumes given to build the slice library from")
    names = [p.name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"volume file names must be unique (they name the matches): {duplicates}")
    start = time.perf_counter()
    circle = _circle(size)
    vids, axes, idxs, thumbs, masks = [], [], [], [], []
    for vid, path in enumerate(paths):
        volume = load_volume(path)
        threshold = threshold_otsu(volume) if volume.min() < volume.max() else int(volume.max())
        foreground = volume > threshold
        for axis in range(3):
            # moveaxis gives views: slicing them copies nothing (np.take copies the whole volume)
            vol_view, fg_view = np.moveaxis(volume, axis, 0), np.moveaxis(foreground, axis, 0)
            counts = fg_view.sum(axis=(1, 2))
            for index in range(0, volume.shape[axis], step):
                if counts[index] < MIN_OBJECT_PIXELS:
                    continue
                thumb = _thumbnail(vol_view[index], fg_view[index], size, circle)
                if thumb is None:
                    continue
                vids.append(vid)
                axes.append(axis)
                idxs.append(index)
                thumbs.append(thumb.grey)
                masks.append(thumb.mask)
    if not thumbs:
        log.warning("slice library is empty: no volume slice has %d object pixels", MIN_OBJECT_PIXELS)
    masks_arr = np.array(masks, dtype=bool).reshape(-1, size, size)
    library = Library(
        names=names,
        volume_ids=np.array(vids, dtype=np.int32),
        axes=np.array(axes, dtype=np.int8),
        indices=np.array(idxs, dtype=np.int32),
        thumbs=np.array(thumbs, dtype=np.uint8).reshape(-1, size, size),
        masks=masks_arr,
        hu=np.array([_hu(m) for m in masks_arr], dtype=np.float32).reshape(-1, 7),
        size=size,
    )
    log.info(
        "slice library: %d slices from %d volumes in %.1f s",
        len(library),
        len(paths),
        time.perf_counter() - start,
    )
    return library


# ------------------------------------------------------------------------------------------- matching
def _rotate(image: np.ndarray, angle: float, interp: int) -> np.ndarray:
    size = image.shape[0]
    c = (size - 1) / 2
    rot = cv2.getRotationMatrix2D((c, c), angle, 1.0)  # positive = counter-clockwise as displayed
    return cv2.warpAffine(image, rot, (size, size), flags=interp, borderValue=0)


class _Rotations:
    """The query's thumbnail rotated by any angle, computed once per angle (candidates share angles)."""

    def __init__(self, query: _Thumb):
        self.query = query
        self.cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        key = round(angle % 360, 4)
        if key not in self.cache:
            grey = _rotate(self.query.grey.astype(np.float32) / 255, key, cv2.INTER_LINEAR)
            mask = _rotate(self.query.mask.astype(np.float32), key, cv2.INTER_LINEAR) >= 0.5
            self.cache[key] = (grey, mask)
        return self.cache[key]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def _pair_scores(
    query: np.ndarray, qmask: np.ndarray, grey: np.ndarray, mask: np.ndarray
) -> tuple[float, float, float]:
    ssim = float(structural_similarity(query, grey, data_range=1.0))
    # template and image have the same size, so matchTemplate gives the one global NCC value
    ncc = float(cv2.matchTemplate(query, grey, cv2.TM_CCOEFF_NORMED)[0, 0])
    dice = _dice(qmask, mask)
    return ssim, ncc, dice


def _orb_features(orb: cv2.ORB, thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Keypoint positions in thumbnail pixels and their descriptors (None when ORB finds none)."""
    big = cv2.resize(thumb, None, fx=ORB_SCALE, fy=ORB_SCALE, interpolation=cv2.INTER_CUBIC)
    # ORB ignores keypoints closer to the border than its patch size: pad so edge details count
    border = 32
    big = cv2.copyMakeBorder(big, border, border, border, border, cv2.BORDER_CONSTANT, value=0)
    keypoints, descriptors = orb.detectAndCompute(big, None)
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2) - border
    return points / ORB_SCALE, descriptors


def _orb_consistent(matcher: cv2.BFMatcher, query_feat, lib_feat, angle: float, size: int) -> int:
    """ORB matches whose query keypoint lands near its library keypoint under the found rotation.

    ORB itself is rotation invariant, so the query's features are computed once, unrotated; checking the
    geometry keeps only matches that agree with the angle (blob outlines give many chance matches).
    """
    (qp, qd), (lp, ld) = query_feat, lib_feat
    if qd is None or ld is None or len(qd) == 0 or len(ld) == 0:
        return 0
    c = (size - 1) / 2
    rot = cv2.getRotationMatrix2D((c, c), angle, 1.0)
    moved = qp @ rot[:, :2].T + rot[:, 2]
    count = 0
    for m in matcher.match(qd, ld):
        if m.distance <= ORB_MAX_HAMMING:
            if np.hypot(*(moved[m.queryIdx] - lp[m.trainIdx])) <= ORB_MAX_SHIFT * size:
                count += 1
    return count


def _align(
    rotations: _Rotations,
    lgrey: np.ndarray,
    lmask: np.ndarray,
    angles: np.ndarray,
    coarse_dice: np.ndarray,
    fine: float,
) -> tuple[float, float, float, float]:
    """Best rotation of the query onto one library slice: (angle in [0, 360), ssim, ncc, dice)."""

    def score(angle: float) -> tuple[float, float, float, float]:
        qgrey, qmask = rotations(angle)
        ssim, ncc, d = _pair_scores(qgrey, qmask, lgrey, lmask)
        return W_SSIM * ssim + W_NCC * ncc + W_DICE * d, ssim, ncc, d

    # SSIM costs 4x NCC: screen the coarse angles by NCC + Dice, score the best few with all three
    screen = [
        (cv2.matchTemplate(rotations(a)[0], lgrey, cv2.TM_CCOEFF_NORMED)[0, 0] + d, a)
        for a, d in zip(angles, coarse_dice, strict=True)
    ]
    screened = [a for _, a in sorted(screen, reverse=True)[:SCREEN_ANGLES]]
    best_angle, best = max(((a, score(a)) for a in screened), key=lambda t: t[1][0])
    for a in best_angle + np.arange(-FINE_DIVISIONS, FINE_DIVISIONS + 1) * fine:  # fixed before the loop
        s = score(a)
        if s[0] > best[0]:
            best_angle, best = a, s
    return float(best_angle % 360), best[1], best[2], best[3]


def _select(library: Library, volumes: Sequence[str] | None) -> np.ndarray:
    if volumes is None:
        return np.arange(len(library))
    volumes = [volumes] if isinstance(volumes, str) else list(volumes)
    unknown = [v for v in volumes if v not in library.names]
    if unknown:
        shown = ", ".join(library.names[:10]) + (" ..." if len(library.names) > 10 else "")
        raise UserError(f"unknown volume(s) {unknown}; the library has {len(library.names)}: {shown}")
    wanted = [library.names.index(v) for v in volumes]
    rows = np.flatnonzero(np.isin(library.volume_ids, wanted))
    if len(rows) == 0:
        raise UserError(f"volumes {volumes} have no slices with an object in the library")
    return rows


def match_slice(
    library: Library,
    image: np.ndarray,
    top_k: int = 5,
    volumes: list[str] | None = None,
    coarse: int = 50,
    angle_step: float = 10,
) -> list[Match]:
    """The `top_k` library slices most like `image`, best first, with the rotation that aligns them.

    `image` is a 2D grey or RGB(A) array of any dtype; its object is what lies above its Otsu threshold.
    `volumes` restricts the search to those volume file names. `coarse` library slices survive the
    Dice + Hu ranking into the rotation search, which tries every `angle_step` degrees and then refines
    around the best angle in steps of `angle_step / 5`. See the module docstring for the angle convention.
    Raises UserError for an empty image, an image without an object, an empty library or an unknown volume.
    """
    if len(library) == 0:
        raise UserError("the slice library has no slices (no volume had an object above its Otsu threshold)")
    if not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not isinstance(coarse, int) or coarse < 1:
        raise UserError(f"coarse must be an integer >= 1, got {coarse!r}")
    if not 0 < angle_step <= 180:
        raise UserError(f"angle_step must be in (0, 180] degrees, got {angle_step!r}")
    rows = _select(library, volumes)
    grey = _to_grey(image)
    if grey.min() == grey.max():
        raise UserError(f"query image is uniform (all pixels {grey.min()}): no object to match")
    size = library.size
    query = _thumbnail(grey, grey > threshold_otsu(grey), size, _circle(size))
    if query is None:
        raise UserError(f"query image has no object (fewer than {MIN_OBJECT_PIXELS} pixels above Otsu)")
    rotations = _Rotations(query)

    # Coarse: Dice of the query's mask at each coarse angle against every library mask, as matrix products.
    angles = np.arange(0.0, 360.0, angle_step)
    qmasks = np.stack([rotations(a)[1].ravel() for a in angles]).astype(np.float32)  # (A, P)
    dice = np.empty((len(rows), len(angles)), np.float32)
    # In chunks: the float copy of 100k library masks would take 1.6 GB at once.
    for start in range(0, len(rows), COARSE_CHUNK):
        lmasks = library.masks[rows[start : start + COARSE_CHUNK]].reshape(-1, size * size)
        lmasks = lmasks.astype(np.float32)  # (n, P)
        inter = lmasks @ qmasks.T  # (n, A)
        union = lmasks.sum(1, keepdims=True) + qmasks.sum(1)[None, :]
        dice[start : start + COARSE_CHUNK] = 2 * inter / np.maximum(union, 1)
    hu_dist = np.abs(library.hu[rows, :4] - _hu(query.mask)[:4]).sum(1)  # h1-h4 are >= 0: sign-stable
    coarse_score = dice.max(1) - HU_WEIGHT * hu_dist
    order = np.argsort(-coarse_score)[:coarse]
    keep = rows[order]
    dice_of = dict(zip(keep.tolist(), dice[order], strict=True))

    # Fine: rotation search with SSIM + NCC + Dice, then ORB matches at the found angle.
    orb = cv2.ORB_create(nfeatures=300, fastThreshold=10)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    query_feat = _orb_features(orb, query.grey)
    fine = angle_step / FINE_DIVISIONS
    results = []
    for row in keep:
        lgrey = library.thumbs[row].astype(np.float32) / 255
        best_angle, ssim, ncc, d = _align(rotations, lgrey, library.masks[row], angles, dice_of[row], fine)
        orb_count = _orb_consistent(
            matcher, query_feat, _orb_features(orb, library.thumbs[row]), best_angle, size
        )
        total = W_SSIM * ssim + W_NCC * ncc + W_DICE * d + W_ORB * min(orb_count / ORB_FULL, 1.0)
        results.append(
            Match(
                volume=library.names[library.volume_ids[row]],
                axis=int(library.axes[row]),
                index=int(library.indices[row]),
                angle=round(best_angle, 2) % 360,
                score=float(total),
                dice=float(d),
                ssim=ssim,
                ncc=ncc,
                orb_matches=orb_count,
            )
        )
    results.sort(key=lambda m: -m.score)
    return results[:top_k]
