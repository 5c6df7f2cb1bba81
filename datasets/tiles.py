"""Tiles for full-resolution training and tiled inference.

Training: `clip_instances` clips every instance to a tile of the grid and drops the slivers an overlap cut
leaves behind (`datasets.instances.tile_instance_masks` does the same from a record's RLEs, decoding only
what reaches the tile).
Inference: run the model per tile, then `stitch_detections` moves detections back to image coordinates
and merges the pieces of one object that several overlapping tiles saw (SAHI's sliced-inference
postprocess, with the match measured inside the tiles' shared region, see `stitch_detections`).

Coordinates: x is the column, y the row; boxes are (x1, y1, x2, y2) in pixel-edge coordinates as in
`datasets.instances.masks_to_boxes`; a tile covers rows y..y+height-1 and columns x..x+width-1.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from datasets.errors import UserError


@dataclass(frozen=True)
class Tile:
    x: int  # left column of the tile in the source image, pixels
    y: int  # top row of the tile in the source image, pixels
    width: int  # pixels; smaller than the tile size only when the image is
    height: int  # pixels

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) of the source image, for `image[tile.slices]`."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile starts along one axis: stride size - overlap, the last tile flush with the border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, size - overlap))
    return [*starts, length - size]  # the last stride is shorter: its overlap is larger than asked


def tile_grid(height: int, width: int, tile_size: int | tuple[int, int], overlap: int) -> list[Tile]:
    """Tiles covering every pixel of a height x width image, row by row.

    tile_size is (height, width) or one int for square tiles; neighbouring tiles share at least
    `overlap` pixels (exactly `overlap`, except before the last tile of a row or column, which is
    aligned to the border). An image smaller than the tile gives one tile of the image's size: tiles are
    never padded.
    """
    tile_h, tile_w = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    if min(tile_h, tile_w) < 1:
        raise UserError(f"tile_size: must be at least 1 pixel, got {tile_size}")
    if not 0 <= overlap < min(tile_h, tile_w):
        raise UserError(f"tile_overlap: must be in [0, tile size), got {overlap} for tiles {tile_h}x{tile_w}")
    if height < 1 or width < 1:
        raise UserError(f"tiles: empty image ({width}x{height})")
    return [
        Tile(x, y, min(tile_w, width), min(tile_h, height))
        for y in _starts(height, tile_h, overlap)
        for x in _starts(width, tile_w, overlap)
    ]


def clip_instances(
    masks: np.ndarray,
    tile: Tile,
    min_area: int = 0,
    min_visible: float = 0.0,
    areas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instances (NxHxW bool) cropped to a tile: (clipped masks, source indices).

    An instance the tile cuts is kept only if its visible part has at least `min_area` pixels and at
    least `min_visible` of its full area: a sliver at a tile border teaches the model to detect object
    fragments. An instance wholly inside the tile is always kept, however small (tiling must not delete
    small objects). `areas` (full areas per instance) may be passed to avoid recounting per tile.
    """
    if areas is None:
        areas = masks.reshape(len(masks), -1).sum(axis=1)
    crop = masks[(slice(None), *tile.slices)]
    visible = crop.reshape(len(crop), -1).sum(axis=1)
    index = np.flatnonzero(keep_clipped(visible, areas, min_area, min_visible))
    return crop[index].copy(), index.astype(np.int64)


def keep_clipped(
    visible: np.ndarray, areas: np.ndarray, min_area: int = 0, min_visible: float = 0.0
) -> np.ndarray:
    """Which instances a tile keeps, from their `visible` pixel counts inside it and their full `areas`
    (see clip_instances)."""
    whole = visible == areas
    return (visible > 0) & (whole | ((visible >= min_area) & (visible >= min_visible * areas)))


# ---- tiled inference ----------------------------------------------------------------------------------


@dataclass
class TileDetections:
    """One tile's model output, in tile coordinates."""

    tile: Tile
    boxes: np.ndarray  # N x 4 float (x1, y1, x2, y2)
    scores: np.ndarray  # N float
    labels: np.ndarray  # N int
    masks: np.ndarray | list[np.ndarray] | None = None  # N x tile.height x tile.width bool (threshold soft
    # masks first), or N cropped bool patches placed at mask_origins (a tiled mosaic keeps only those)
    mask_origins: np.ndarray | None = None  # N x 2 int (x, y) of each patch's top-left pixel in the tile


@dataclass
class Detections:
    """Detections in image coordinates. Masks are stored cropped (a full-resolution mosaic of 50 MP times
    hundreds of objects does not fit in memory): instance i is `masks[i]` placed with its top-left pixel at
    column mask_origins[i, 0], row mask_origins[i, 1]; `dense_masks` expands them."""

    boxes: np.ndarray  # N x 4 float32
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int64
    masks: list[np.ndarray] | None  # N bool patches, or None for box-only detections
    mask_origins: np.ndarray | None  # N x 2 int64 (x, y)


def dense_masks(detections: Detections, height: int, width: int) -> np.ndarray:
    """N x height x width bool masks of stitched detections."""
    out = np.zeros((len(detections.scores), height, width), dtype=bool)
    for i, (patch, (x, y)) in enumerate(zip(detections.masks or [], detections.mask_origins, strict=False)):
        out[i, y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    return out


def _trim(mask: np.ndarray, x: int, y: int) -> tuple[np.ndarray, int, int]:
    """A mask cut to its bounding box, with that box's top-left corner in image coordinates."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros((0, 0), dtype=bool), x, y
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], x + int(cols[0]), y + int(rows[0])


def _window(patch: np.ndarray, ox: int, oy: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The part of a placed patch inside the image window [x0, x1) x [y0, y1), zero-filled to its size."""
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    ax0, ay0 = max(x0, ox), max(y0, oy)
    ax1, ay1 = min(x1, ox + patch.shape[1]), min(y1, oy + patch.shape[0])
    if ax0 < ax1 and ay0 < ay1:
        out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = patch[ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox]
    return out


def _boxes_in_window(
    boxes: np.ndarray, ids: list[int], x0: int, y0: int, x1: int, y1: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, boxes clipped to the window) of the boxes among `ids` with some area inside the window."""
    clipped = np.clip(boxes[ids], [x0, y0, x0, y0], [x1, y1, x1, y1])
    keep = (clipped[:, 0] < clipped[:, 2]) & (clipped[:, 1] < clipped[:, 3])
    return np.asarray(ids, dtype=np.int64)[keep], clipped[keep]


def _overlap_score(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    inter = float(np.logical_and(a, b).sum())
    if metric == "iou":
        denominator = float(np.logical_or(a, b).sum())
    else:
        denominator = float(min(a.sum(), b.sum()))
    return inter / denominator if denominator else 0.0


def _box_score(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    def area(box):
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    denominator = area(a) + area(b) - inter if metric == "iou" else min(area(a), area(b))
    return inter / denominator if denominator else 0.0


def stitch_detections(
    per_tile: list[TileDetections],
    match_threshold: float = 0.5,
    match_metric: Literal["iou", "ios"] = "iou",
    merge: Literal["union", "nms"] = "union",
    class_agnostic: bool = False,
) -> Detections:
    """Per-tile detections -> one set in image coordinates, objects seen by several tiles merged once.

    Two detections from different tiles are the same object when, inside the region the two tiles share,
    their masks (boxes when there are no masks) match with IoU (or IoS, intersection over the smaller)
    >= match_threshold, and their labels agree unless class_agnostic. Measuring only inside the shared
    region is what makes the pieces of an object cut by the tile borders match: inside that region both
    tiles see the same pixels of it, whereas a whole-mask IoU of two pieces can be small.
    Matches are merged transitively (an object at a tile corner appears in four tiles).
    merge="union": one detection per group, mask = union of the pieces, box = the pieces' union box,
    score = the highest, label = that of the highest-scoring piece (SAHI's greedy NMM).
    merge="nms": keep only the highest-scoring piece of each group (SAHI's NMS).
    Detections from the same tile are never merged: the model's own NMS has dealt with those.
    """
    if match_metric not in ("iou", "ios"):
        raise UserError(f"match_metric: expected 'iou' or 'ios', got '{match_metric}'")
    if merge not in ("union", "nms"):
        raise UserError(f"merge: expected 'union' or 'nms', got '{merge}'")
    pieces = _gather(per_tile)
    parent = list(range(len(pieces.scores)))  # union-find over the pieces: one root per object
    for i, j in _matching_pairs(per_tile, pieces, match_threshold, match_metric, class_agnostic):
        parent[_root(parent, i)] = _root(parent, j)
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(_root(parent, i), []).append(i)
    return _merge_groups(list(groups.values()), pieces, merge)


@dataclass
class _Pieces:
    """Every tile's detections in image coordinates, one entry per detection, in tile order."""

    boxes: np.ndarray  # N x 4 float64
    scores: list[float]
    labels: list[int]
    tile_of: list[int]  # index in per_tile of the tile the detection came from
    with_masks: bool  # every tile has masks; otherwise boxes alone are matched and returned
    patches: list[np.ndarray]  # masks trimmed to their bounding boxes (empty without masks)
    origins: list[tuple[int, int]]  # (x, y) of each patch's top-left pixel in the image


def _gather(per_tile: list[TileDetections]) -> _Pieces:
    with_masks = bool(per_tile) and all(t.masks is not None for t in per_tile)
    pieces = _Pieces(np.zeros((0, 4)), [], [], [], with_masks, [], [])
    boxes = []
    for t_index, det in enumerate(per_tile):
        shift = np.array([det.tile.x, det.tile.y, det.tile.x, det.tile.y], dtype=np.float64)
        for i in range(len(det.scores)):
            boxes.append(np.asarray(det.boxes[i], dtype=np.float64) + shift)
            pieces.scores.append(float(det.scores[i]))
            pieces.labels.append(int(det.labels[i]))
            pieces.tile_of.append(t_index)
            if with_masks:
                ox, oy = det.mask_origins[i] if det.mask_origins is not None else (0, 0)
                patch, ox, oy = _trim(np.asarray(det.masks[i], dtype=bool), det.tile.x + ox, det.tile.y + oy)
                pieces.patches.append(patch)
                pieces.origins.append((ox, oy))
    pieces.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return pieces


def _root(parent: list[int], i: int) -> int:
    """Union-find's root of `i`, halving the path on the way."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _shared_windows(per_tile: list[TileDetections]) -> Iterator[tuple[int, int, tuple[int, int, int, int]]]:
    """(ta, tb, (x0, y0, x1, y1)) for every pair of overlapping tiles ta < tb: the region both see."""
    # Each tile's overlapping later tiles, found with numpy: for the 12,544 tiles of a 50k x 50k slide a
    # Python loop over all pairs would take about a minute (0.75 us a pair), this about 4 s.
    spans = np.array(
        [[t.tile.x, t.tile.y, t.tile.x + t.tile.width, t.tile.y + t.tile.height] for t in per_tile]
    )
    for ta in range(len(per_tile)):
        lo = np.maximum(spans[ta + 1 :, :2], spans[ta, :2])
        hi = np.minimum(spans[ta + 1 :, 2:], spans[ta, 2:])
        for tb in (ta + 1 + np.flatnonzero((lo < hi).all(axis=1))).tolist():
            (x0, y0), (x1, y1) = lo[tb - ta - 1].tolist(), hi[tb - ta - 1].tolist()
            yield ta, tb, (x0, y0, x1, y1)


def _matching_pairs(
    per_tile: list[TileDetections], pieces: _Pieces, threshold: float, metric: str, class_agnostic: bool
) -> Iterator[tuple[int, int]]:
    """(i, j): pieces of two overlapping tiles that match inside the tiles' shared region."""
    by_tile: dict[int, list[int]] = {}
    for i, t_index in enumerate(pieces.tile_of):
        by_tile.setdefault(t_index, []).append(i)
    for ta, tb, window in _shared_windows(per_tile):
        # Each tile's detections whose boxes reach into the shared window, clipped to it; only pairs
        # whose clipped boxes intersect can match (the pair test, vectorised: dense tiles hold hundreds).
        (ia, ba), (ib, bb) = (_boxes_in_window(pieces.boxes, by_tile.get(t, []), *window) for t in (ta, tb))
        wide = np.minimum(ba[:, None, 2], bb[None, :, 2]) > np.maximum(ba[:, None, 0], bb[None, :, 0])
        high = np.minimum(ba[:, None, 3], bb[None, :, 3]) > np.maximum(ba[:, None, 1], bb[None, :, 1])
        for a, b in np.argwhere(wide & high).tolist():
            i, j = int(ia[a]), int(ib[b])
            if not class_agnostic and pieces.labels[i] != pieces.labels[j]:
                continue
            if pieces.with_masks:
                score = _mask_score_in_window(pieces, i, j, window, metric)
            else:
                score = _box_score(ba[a], bb[b], metric)
            if score >= threshold:
                yield i, j


def _mask_score_in_window(
    pieces: _Pieces, i: int, j: int, window: tuple[int, int, int, int], metric: str
) -> float:
    """IoU or IoS of two pieces' masks within the window, measured only over the two patches' extent
    (outside it both are empty); 0 when neither mask reaches into the window."""
    x0, y0, x1, y1 = window
    (ax0, ay0), (bx0, by0) = pieces.origins[i], pieces.origins[j]
    (ah, aw), (bh, bw) = pieces.patches[i].shape, pieces.patches[j].shape
    sub = (
        max(x0, min(ax0, bx0)),
        max(y0, min(ay0, by0)),
        min(x1, max(ax0 + aw, bx0 + bw)),
        min(y1, max(ay0 + ah, by0 + bh)),
    )
    if not (sub[0] < sub[2] and sub[1] < sub[3]):
        return 0.0
    return _overlap_score(
        _window(pieces.patches[i], ax0, ay0, *sub), _window(pieces.patches[j], bx0, by0, *sub), metric
    )


def _merge_groups(groups: list[list[int]], pieces: _Pieces, merge: str) -> Detections:
    """One detection per group of matched pieces, highest score first (see `stitch_detections`)."""
    out_boxes, out_scores, out_labels, out_masks, out_origins = [], [], [], [], []
    for members in sorted(groups, key=lambda m: -max(pieces.scores[i] for i in m)):
        best = max(members, key=lambda i: pieces.scores[i])
        keep = members if merge == "union" else [best]
        stacked = pieces.boxes[keep]
        out_boxes.append([*stacked[:, :2].min(axis=0), *stacked[:, 2:].max(axis=0)])
        out_scores.append(pieces.scores[best])
        out_labels.append(pieces.labels[best])
        if pieces.with_masks:
            patch, ox, oy = _union(keep, pieces.patches, pieces.origins)
            out_masks.append(patch)
            out_origins.append((ox, oy))
    return Detections(
        boxes=np.asarray(out_boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.asarray(out_scores, dtype=np.float32),
        labels=np.asarray(out_labels, dtype=np.int64),
        masks=out_masks if pieces.with_masks else None,
        mask_origins=np.asarray(out_origins, dtype=np.int64).reshape(-1, 2) if pieces.with_masks else None,
    )


def _union(members: list[int], patches: list[np.ndarray], origins: list[tuple[int, int]]):
    placed = [(patches[i], *origins[i]) for i in members if patches[i].size]
    if not placed:
        return np.zeros((0, 0), dtype=bool), *origins[members[0]]
    x0 = min(ox for _, ox, _ in placed)
    y0 = min(oy for _, _, oy in placed)
    x1 = max(ox + p.shape[1] for p, ox, _ in placed)
    y1 = max(oy + p.shape[0] for p, _, oy in placed)
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for patch, ox, oy in placed:
        out[oy - y0 : oy - y0 + patch.shape[0], ox - x0 : ox - x0 + patch.shape[1]] |= patch
    return out, x0, y0
