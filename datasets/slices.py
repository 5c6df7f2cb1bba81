"""Slice-classification data: volumes (or a slice index from `platform.data slices`) to train/val slices.

`slice_index(source, slicing)` runs on the driver: a slice index CSV is used as it is; a volume source
(labels CSV, class folders) is sliced once into a cache folder keyed by the source and the slicing
settings, so a search's trials and later runs share the PNGs; the CLIs then hand the index to the workers.
With a slice index as `data`, the config's slicing fields must describe how it was cut: a model slices
new volumes with them. `split_rows` then assigns specimens to
train/val: the index's own split column when it has train and val rows, else a seeded specimen-level split
that balances the classes' slice counts (datasets/specimen_split.py). Every slice of a specimen lands in
the same split, so validation never sees a view of a training specimen.
"""

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from datasets.errors import UserError
from datasets.slice_index import INDEX_COLUMNS, extract_slices, read_index
from datasets.specimen_split import search_split
from datasets.volumes import read_volumes

log = logging.getLogger(__name__)

SAMPLE_VOLUMES = Path(__file__).parent / "sample" / "adrenal3d"
# git-ignored, like .mlflow/; PLATFORM_SLICE_CACHE moves it (tests, a shared filesystem on a cluster)
CACHE = Path(os.environ.get("PLATFORM_SLICE_CACHE") or Path(__file__).resolve().parents[1] / ".slices_cache")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_slice_index(path: Path) -> bool:
    if path.is_dir():
        path = path / "index.csv"
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return all(c in header for c in INDEX_COLUMNS)


def slice_index(source: str | Path, slicing: dict, cache: Path = CACHE) -> Path:
    """The index CSV of `source`'s slices: the index itself, or a cached extraction of its volumes."""
    source = Path(source).expanduser().resolve()
    if is_slice_index(source):
        return source / "index.csv" if source.is_dir() else source
    records = read_volumes(source)  # every bad row is reported here, before any slicing
    if any(not r.label for r in records):
        raise UserError(f"{source}: volumes without labels cannot train a classifier (expected a labels CSV)")
    files = sorted(str(r.path) for r in records)
    stamp = [source.as_posix(), files, [Path(f).stat().st_mtime_ns for f in files], slicing]
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=list).encode()).hexdigest()[:16]
    out = cache / f"{source.name}-{key}"
    if not (out / "index.csv").is_file():  # extract_slices renames a finished folder into place
        log.info("slicing %d volumes of %s into %s (cached for later runs)", len(records), source, out)
        extract_slices(records, out, **slicing)
    return out / "index.csv"


def split_rows(index_csv: Path, val_fraction: float, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, val rows, class names sorted) of a slice index; UserError when a class has no
    specimen in a split (it could then be neither learned nor measured)."""
    rows = read_index(index_csv)
    if not rows:
        raise UserError(f"{index_csv}: no slices (every slice was below min_foreground?)")
    classes = sorted({r["label"] for r in rows})
    if "" in classes:
        raise UserError(f"{index_csv}: slices without a label (row of {rows[0]['path']}...)")
    if len(classes) < 2:
        raise UserError(f"{index_csv}: one class only ({classes[0]}); a classifier needs two or more")
    splits = {r["split"] for r in rows}
    if {"train", "val"} <= splits:
        split_of = {r["specimen"]: r["split"] for r in rows}
        where = f"{index_csv} split column"
    else:
        labels = {r["specimen"]: r["label"] for r in rows}
        weights: dict[str, float] = {}
        for r in rows:
            weights[r["specimen"]] = weights.get(r["specimen"], 0) + 1
        fractions = {"train": 1.0 - val_fraction, "val": val_fraction}
        split_of = search_split(labels, fractions, weights=weights, seed=seed, restarts=2, kicks=5).split_of
        where = f"val_fraction={val_fraction}"
    train = [r for r in rows if split_of[r["specimen"]] == "train"]
    val = [r for r in rows if split_of[r["specimen"]] == "val"]
    for name, part in (("train", train), ("val", val)):
        missing = sorted(set(classes) - {r["label"] for r in part})
        if missing:
            raise UserError(
                f"{index_csv}: class {', '.join(missing)} has no specimen in the {name} split ({where}); "
                "add specimens or change the split"
            )
    return train, val, classes


def evenly_spaced(rows: list[dict], per_specimen: int) -> list[dict]:
    """At most `per_specimen` slices of each specimen, evenly spaced through its (axis, index) order."""
    if per_specimen <= 0:
        return rows
    by_specimen: dict[str, list[dict]] = {}
    for r in rows:
        by_specimen.setdefault(r["specimen"], []).append(r)
    out = []
    for group in by_specimen.values():
        group.sort(key=lambda r: (int(r["axis"]), int(r["slice_index"])))
        take = np.unique(np.linspace(0, len(group) - 1, min(per_specimen, len(group))).round().astype(int))
        out += [group[i] for i in take]
    return out


def to_tensor(
    image: np.ndarray, input_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """A grey (HxW) or RGB (HxWx3) uint8 slice as the model's normalised C x S x S float input."""
    if image.ndim == 3:
        image = image[..., 0] if in_chans == 1 else image
    if image.shape[0] != input_size or image.shape[1] != input_size:
        image = cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] != in_chans:
        image = np.repeat(image[..., :1], in_chans, axis=2)
    tensor = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)  # a copy: PIL's is read-only
    means, stds = channel_stats(in_chans, mean, std)
    return (tensor - torch.tensor(means).view(-1, 1, 1)) / torch.tensor(stds).view(-1, 1, 1)


def channel_stats(
    in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The per-channel mean and std `to_tensor` subtracts and divides by: the RGB values for 3 channels, their
    averages for one grey channel. Exported classifiers state them (deploy/export.py)."""
    if in_chans == 3:
        return [float(m) for m in mean[:3]], [float(s) for s in std[:3]]
    return [float(np.mean(mean))], [float(np.mean(std))]


class SliceDataset(torch.utils.data.Dataset):
    """Slices of an index as (tensor, class index). With `per_specimen` > 0 each epoch draws that many
    slices of every specimen anew (`resample`), so an epoch costs specimens x per_specimen images."""

    def __init__(
        self,
        rows: list[dict],
        root: Path,
        classes: list[str],
        *,
        input_size: int,
        in_chans: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform=None,
        per_specimen: int = 0,
    ):
        self.all_rows = rows
        self.rows = rows
        self.root = root
        self.classes = classes
        self.index_of = {c: i for i, c in enumerate(classes)}
        self.input_size, self.in_chans, self.mean, self.std = input_size, in_chans, mean, std
        self.transform = transform
        self.per_specimen = per_specimen
        self.by_specimen: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            self.by_specimen.setdefault(r["specimen"], []).append(i)
        if per_specimen > 0:
            self.resample(0)

    def resample(self, seed: int) -> None:
        if self.per_specimen <= 0:
            return
        rng = np.random.default_rng(seed)
        picks = []
        for members in self.by_specimen.values():
            picks += list(rng.choice(members, self.per_specimen, replace=len(members) < self.per_specimen))
        self.rows = [self.all_rows[i] for i in sorted(picks)]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        """Slice `i` as stored: HxWx3 uint8 (grey slices repeated, as the paper's RGB slice files)."""
        path = self.root / self.rows[i]["path"]
        try:
            return np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable slice image ({e})") from e

    def images(self) -> list[np.ndarray]:
        return [self.image(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.rows[i]
        image = self.image(i)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        tensor = to_tensor(image, self.input_size, self.in_chans, self.mean, self.std)
        return tensor, self.index_of[row["label"]]

    @property
    def specimens(self) -> list[str]:
        return [r["specimen"] for r in self.rows]

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.index_of[r["label"]] for r in self.rows])
