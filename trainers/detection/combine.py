"""Test-time augmentation (TTA) and the mask-vote detector ensemble, built as detection models with the
interface the one inference path calls (trainers/detection/inference.py): a list of CHW float images in
[0, 1] -> one dict per image of boxes (N x 4 xyxy), scores (N), labels (N) and soft masks (N x 1 x H x W).
So whole images, tiles, batches of tiles across Serve requests, evaluation and the registry get TTA and
ensembles without a change of their own, and the two compose: with_tta(MaskVoteEnsemble(...), "flips").

Merging (`merge_instances`): the instances that several outputs found in one image, all in that image's
frame, are matched greedily by score: the best unmatched instance seeds a group and takes, from every other
output, the unmatched instance whose mask (binarised at 0.5) overlaps it most, if that mask IoU is at least
0.5. A group's mask is the mean of its members' masks (soft masks for TTA; binary masks for the mask vote,
so a pixel stays where at least half the members have it), its score the mean of its members' scores, a
member that missed it counting as a zero mask and a zero score; its label the majority (ties: the better
scoring member's), its box the extent of the merged mask at 0.5. A group whose merged mask keeps no pixel
is dropped: fewer than half of the views or members saw it there.

Not for the thresholds search: inference.detect_candidates takes a Mask R-CNN apart (transform, rpn,
roi_heads) to cache its candidates before the box filters; a wrapper has no such parts.

Detections per image: callers set `model.roi_heads.detections_per_img` (platform/evaluate.py --max-dets);
a wrapper's `roi_heads` is a small stand-in whose detections_per_img sets every wrapped model's and caps
the merged output.

An ensemble folder holds detector_ensemble.json ({"method": "mask-vote", "members": ["member0", ...],
"tta": "off"}) and each member's checkpoint folder; its config (tile size, normalisation, filters) is the
first member's with the ensemble's tta, and the members must agree on normalize, tile_size and categories.
"""

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from datasets.errors import UserError
from datasets.records import folder_written_atomically
from trainers.checkpoints import member_folder
from trainers.config import TTA_MODES, MaskRCNNConfig
from trainers.detection.model import CHECKPOINT_FILES, checkpoint_settings, load_checkpoint_model

MASK_THRESHOLD = 0.5  # soft masks are binarised here for matching, voting and the merged boxes
ENSEMBLE_MASK_THRESHOLD = 0.5  # an ensemble's vote fractions are binarised here: half the members agree
MATCH_IOU = 0.5  # mask IoU at which instances of two outputs are one object
ENSEMBLE_FILE = "detector_ensemble.json"  # not ensemble.json: that marks a classifier ensemble
METHODS = ("mask-vote",)
AGREE = ("normalize", "tile_size")  # config fields every member must share: they shape the input

# Each view of an image, and the map from the view's frame back to the image's (masks only: merged boxes
# are the merged masks' extents). Rotations swap H and W; torchvision detectors take any size.
VIEWS = {
    "identity": (lambda x: x, lambda m: m),
    "hflip": (lambda x: x.flip(-1), lambda m: m.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda m: m.flip(-2)),
    "rot90": (lambda x: torch.rot90(x, 1, (-2, -1)), lambda m: torch.rot90(m, -1, (-2, -1))),
    "rot270": (lambda x: torch.rot90(x, -1, (-2, -1)), lambda m: torch.rot90(m, 1, (-2, -1))),
}
TTA_VIEWS = {
    "flips": ("identity", "hflip", "vflip"),
    "flips+rot90": ("identity", "hflip", "vflip", "rot90", "rot270"),
}


def mask_boxes(binary: torch.Tensor) -> torch.Tensor:
    """N x H x W bool -> N x 4 float xyxy extents (x2, y2 one past the last pixel); zeros for empty masks."""
    n, height, width = binary.shape
    rows, cols = binary.any(dim=2), binary.any(dim=1)
    ys = torch.arange(height, device=binary.device).expand(n, height)
    xs = torch.arange(width, device=binary.device).expand(n, width)
    y1 = torch.where(rows, ys, height).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x1 = torch.where(cols, xs, width).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~rows.any(dim=1)] = 0
    return boxes


def match_groups(binary: torch.Tensor, scores: torch.Tensor, sources: torch.Tensor, iou: float) -> list:
    """Greedy matching by score (see the module docstring): lists of instance indices, the seed first and
    the rest by score. Mask IoU is computed only for pairs whose mask extents overlap, on that overlap."""
    boxes = mask_boxes(binary)
    areas = binary.flatten(1).sum(dim=1).tolist()
    x1, y1, x2, y2 = boxes.T
    # N x N bools, not float intersections: 5 views x 700 detections stay ~12 MB per comparison
    overlap = (x1[:, None] < x2[None]) & (x1[None] < x2[:, None]) & (y1[:, None] < y2[None])
    overlap &= (y1[None] < y2[:, None]) & (sources[:, None] != sources[None])  # one per output in a group
    extents, owner, score = boxes.long().tolist(), sources.tolist(), scores.tolist()
    order = torch.argsort(scores.cpu(), descending=True, stable=True).tolist()
    taken = [False] * len(order)
    groups = []
    for seed in order:
        if taken[seed]:
            continue
        best: dict[int, tuple[float, int]] = {}  # output -> (IoU, instance)
        for other in overlap[seed].nonzero().flatten().tolist():
            if taken[other]:
                continue
            x1, y1 = max(extents[seed][0], extents[other][0]), max(extents[seed][1], extents[other][1])
            x2, y2 = min(extents[seed][2], extents[other][2]), min(extents[seed][3], extents[other][3])
            inter = int((binary[seed, y1:y2, x1:x2] & binary[other, y1:y2, x1:x2]).sum())
            value = inter / (areas[seed] + areas[other] - inter)
            if value >= iou and value > best.get(owner[other], (-1.0, 0))[0]:
                best[owner[other]] = (value, other)
        rest = sorted((i for _, i in best.values()), key=lambda i: -score[i])
        for i in (seed, *rest):
            taken[i] = True
        groups.append([seed, *rest])
    return groups


def merge_instances(
    outputs: list[dict],
    *,
    vote: bool = False,
    iou: float = MATCH_IOU,
    max_detections: int | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """One detection output from several outputs of the same image, all in its frame (see the module
    docstring for the rule). vote=False (TTA): soft masks averaged; vote=True (the ensemble's mask vote):
    binary masks averaged, so the result, binarised at 0.5, keeps the pixels at least half the members
    have. The outputs' boxes are not read. Best first, at most `max_detections` (None: all); `size` (H, W)
    is needed only when no output has a mask tensor of the image's size."""
    if not outputs:
        raise ValueError("merge_instances: no outputs to merge")
    height, width = size or outputs[0]["masks"].shape[-2:]
    soft = torch.cat([o["masks"].reshape(-1, height, width) for o in outputs]).float()
    scores = torch.cat([o["scores"] for o in outputs]).float()
    labels = torch.cat([o["labels"] for o in outputs])
    sources = torch.cat([torch.full((len(o["scores"]),), k) for k, o in enumerate(outputs)])
    binary = soft >= MASK_THRESHOLD
    groups = match_groups(binary, scores, sources.to(soft.device), iou)
    group_of = torch.empty(len(scores), dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    group_of = group_of.to(soft.device)
    summed = binary.float() if vote else soft
    masks = torch.zeros((len(groups), height, width), device=soft.device).index_add_(0, group_of, summed)
    masks /= len(outputs)
    merged_scores = torch.zeros(len(groups), device=soft.device).index_add_(0, group_of, scores)
    merged_scores /= len(outputs)
    # Counter keeps first-seen order among equal counts: a tie goes to the better-scoring member
    merged_labels = [Counter(labels[members].tolist()).most_common(1)[0][0] for members in groups]
    merged_labels = torch.as_tensor(merged_labels, dtype=labels.dtype, device=labels.device)
    keep = (masks >= MASK_THRESHOLD).flatten(1).any(dim=1)
    kept = keep.nonzero().flatten()
    kept = kept[torch.argsort(merged_scores[kept], descending=True, stable=True)][:max_detections]
    return {
        "boxes": mask_boxes(masks[kept] >= MASK_THRESHOLD),
        "scores": merged_scores[kept],
        "labels": merged_labels[kept.to(labels.device)],
        "masks": masks[kept, None],
    }


class DetectionsLimit:
    """A wrapper's stand-in for Mask R-CNN's `roi_heads`, for the one thing callers set there:
    detections_per_img (set on every wrapped model, and the cap of the wrapper's merged output)."""

    def __init__(self, wrapper: nn.Module):
        self._wrapper = wrapper

    @property
    def detections_per_img(self) -> int | None:
        return self._wrapper.detections_per_img

    @detections_per_img.setter
    def detections_per_img(self, value: int) -> None:
        self._wrapper.detections_per_img = value
        for model in self._wrapper.wrapped():
            heads = getattr(model, "roi_heads", None)
            if heads is not None:
                heads.detections_per_img = value


def detections_limit(model: nn.Module) -> int | None:
    heads = getattr(model, "roi_heads", None)
    return getattr(heads, "detections_per_img", None)


class TTAModel(nn.Module):
    """`model` on each view of every image (mode flips: identity, horizontal and vertical flip; flips+rot90:
    also 90 and 270 degree rotations), the views' instances mapped back and merged (soft masks averaged).
    Costs one model call per view; the views' soft masks of one batch are held at once."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        if mode not in TTA_VIEWS:
            raise UserError(f"tta: expected one of {', '.join(TTA_MODES)}, got '{mode}'")
        self.model, self.mode = model, mode
        self.detections_per_img = detections_limit(model)

    @property
    def roi_heads(self) -> DetectionsLimit:
        return DetectionsLimit(self)

    def wrapped(self) -> list[nn.Module]:
        return [self.model]

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        views = TTA_VIEWS[self.mode]
        # one call per view: a batch's images then share their shape (rotations swap H and W)
        per_view = [self.model([VIEWS[v][0](x) for x in images]) for v in views]
        merged = []
        for i, image in enumerate(images):
            outputs = [
                {**per_view[k][i], "masks": VIEWS[v][1](per_view[k][i]["masks"])} for k, v in enumerate(views)
            ]
            size = tuple(image.shape[-2:])
            merged.append(merge_instances(outputs, max_detections=self.detections_per_img, size=size))
        return merged


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """`model` under test-time augmentation `mode` (MaskRCNNConfig.tta) in place of any TTA it has: the bare
    model for "off", never TTA of TTA."""
    bare = model.model if isinstance(model, TTAModel) else model
    return bare if mode == "off" else TTAModel(bare, mode)


class MaskVoteEnsemble(nn.Module):
    """Detection models of the same input normalisation and categories (`check_members`) as one: their
    instances matched and merged by mask vote, each member's masks binarised at its own mask_threshold
    (`thresholds`, default 0.5 each), so the vote fraction is binarised at 0.5 (ENSEMBLE_MASK_THRESHOLD).
    Its detections_per_img starts as the first member's."""

    def __init__(self, members: list[nn.Module], thresholds: list[float] | None = None):
        super().__init__()
        if not members:
            raise UserError("ensemble: no member models")
        self.members = nn.ModuleList(members)
        self.thresholds = thresholds or [MASK_THRESHOLD] * len(members)
        self.detections_per_img = detections_limit(members[0])

    @property
    def roi_heads(self) -> DetectionsLimit:
        return DetectionsLimit(self)

    def wrapped(self) -> list[nn.Module]:
        return list(self.members)

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        per_member = [
            [{**o, "masks": (o["masks"] >= t).float()} for o in member(images)]
            for member, t in zip(self.members, self.thresholds, strict=True)
        ]
        return [
            merge_instances(
                [outputs[i] for outputs in per_member],
                vote=True,
                max_detections=self.detections_per_img,
                size=tuple(image.shape[-2:]),
            )
            for i, image in enumerate(images)
        ]


def check_members(configs: list[MaskRCNNConfig], categories: list[list[dict]], names: list[str]) -> None:
    """A UserError naming the members and the field when they do not share the input normalisation, the
    tile size or the categories (ids and names, in order)."""
    for name, cfg, cats in zip(names[1:], configs[1:], categories[1:], strict=True):
        for key in AGREE:
            ours, theirs = getattr(configs[0], key), getattr(cfg, key)
            if ours != theirs:
                raise UserError(
                    f"ensemble: members differ in {key}: {names[0]} has {ours!r}, {name} has {theirs!r} "
                    "(members must see the same input)"
                )
        ours, theirs = [(c["id"], c["name"]) for c in categories[0]], [(c["id"], c["name"]) for c in cats]
        if ours != theirs:
            raise UserError(
                f"ensemble: members differ in categories: {names[0]} has {ours}, {name} has {theirs}"
            )


def member_settings(folder: Path) -> tuple[MaskRCNNConfig, list[dict]]:
    """A checkpoint folder's config and categories, without loading its weights (a mismatch is caught in
    seconds)."""
    for file in CHECKPOINT_FILES:
        if not (folder / file).is_file():
            raise UserError(
                f"ensemble: {folder / file} not found (a member is a Mask R-CNN checkpoint folder)"
            )
    return checkpoint_settings(folder)


def check_folders(folders: list[Path], names: list[str] | None = None) -> list[MaskRCNNConfig]:
    """check_members on checkpoint folders (named by `names`, default their paths); their configs."""
    settings = [member_settings(Path(f)) for f in folders]
    check_members([s[0] for s in settings], [s[1] for s in settings], names or [str(f) for f in folders])
    return [s[0] for s in settings]


def is_ensemble_folder(path: Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def save_ensemble(folder: Path, members: list[Path], method: str = "mask-vote", tta: str = "off") -> Path:
    """detector_ensemble.json and each member's checkpoint files (no optimizer state), written beside
    `folder` and renamed into place; the members are checked first (`check_folders`)."""
    if method not in METHODS:
        raise UserError(f"method: unknown detector ensemble method '{method}'; valid: {', '.join(METHODS)}")
    if tta not in TTA_MODES:
        raise UserError(f"tta: expected one of {', '.join(TTA_MODES)}, got '{tta}'")
    check_folders(members)
    folder = Path(folder).resolve()
    if folder.exists():
        raise UserError(f"{folder}: already exists (choose a new ensemble folder)")
    names = [f"member{i}" for i in range(len(members))]
    with folder_written_atomically(folder) as tmp:
        tmp.mkdir()
        for name, src in zip(names, members, strict=True):
            (tmp / name).mkdir()
            for file in CHECKPOINT_FILES:
                shutil.copy2(Path(src) / file, tmp / name / file)
        spec = {"method": method, "members": names, "tta": tta}
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def load_ensemble(folder: Path, device="cpu") -> tuple[MaskVoteEnsemble, MaskRCNNConfig, list[dict]]:
    """An ensemble folder's model (without its TTA, which the caller applies from the config), its config
    (ensemble_config's, with the ensemble's tta) and its categories."""
    spec_file = Path(folder) / ENSEMBLE_FILE
    try:
        spec = json.loads(spec_file.read_text())
        names, method, tta = list(spec["members"]), spec["method"], spec.get("tta", "off")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{spec_file}: not a valid detector ensemble description ({e})") from None
    if method not in METHODS or tta not in TTA_MODES or not names:
        raise UserError(f"{spec_file}: method {method!r}, tta {tta!r}, members {names}: not a valid ensemble")
    folders = [member_folder(folder, n, spec_file) for n in names]
    check_folders(folders, names)
    members = [load_checkpoint_model(f, device) for f in folders]
    cfg = replace(ensemble_config([c for _, c, _ in members]), tta=tta)
    thresholds = [c.mask_threshold for _, c, _ in members]
    return MaskVoteEnsemble([m for m, _, _ in members], thresholds), cfg, members[0][2]


def ensemble_config(configs: list[MaskRCNNConfig]) -> MaskRCNNConfig:
    """The config a mask-vote ensemble of members with `configs` runs with: the first member's, its masks
    the members' agreement fractions kept where at least half of them have the pixel, and its operating
    point the members' mean (an instance's ensemble score is its members' mean score)."""
    cut = sum(c.score_threshold for c in configs) / len(configs)
    return replace(configs[0], mask_threshold=ENSEMBLE_MASK_THRESHOLD, score_threshold=round(cut, 4))


def load_detector_model(folder: Path, device="cpu") -> tuple[nn.Module, MaskRCNNConfig, list[dict]]:
    """A checkpoint folder's or an ensemble folder's model with its config's TTA, in eval mode, its config
    and its categories: what every loader of a registered detector calls."""
    if is_ensemble_folder(folder):
        model, cfg, categories = load_ensemble(folder, device)
    else:
        model, cfg, categories = load_checkpoint_model(Path(folder), device)
    return with_tta(model, cfg.tta).eval(), cfg, categories
