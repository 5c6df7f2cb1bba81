"""Class-stratified image-level splits for instance data, and the JSON split files trainers read.

An image holds instances of several classes, so it cannot be stratified by "its" class directly: each
image is assigned to the stratum of its dominant class (the class with most instances in it; ties go to
the class rarest in the whole dataset, because rare classes are the ones a careless split loses; images
without instances form their own stratum). Within every stratum the images are shuffled by the seed and
dealt to the splits in proportion to the ratio, continuing one dealing sequence across strata, so that
split sizes match the ratio to within one image overall and within about one image per stratum.

Split file: `{"train": [image ids], "val": [image ids]}` (any split names; k-fold writes one file per
fold), written atomically.

    split = stratified_split(items, ratio=(74, 30), seed=0, names=("train", "val"))  # foram: 2.47:1
    write_split("splits/foram.json", split)
    records_by_split = apply_split(records, read_split("splits/foram.json"))
"""

import json
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path

from datasets.errors import UserError
from datasets.records import write_json_atomic

NO_INSTANCES = "<no instances>"  # the stratum of images without any instance


def dominant_class(class_ids: Sequence[Hashable], overall: Counter) -> Hashable:
    """The image's stratum: its most frequent class; ties -> the class rarest in `overall`, then the
    smallest by string order; no instances -> NO_INSTANCES."""
    if not class_ids:
        return NO_INSTANCES
    counts = Counter(class_ids)
    top = max(counts.values())
    tied = [c for c, n in counts.items() if n == top]
    return min(tied, key=lambda c: (overall[c], str(c)))


def _strata(items: Sequence[tuple[str, Sequence[Hashable]]], seed: int) -> list[str]:
    """Image ids ordered stratum by stratum (largest stratum first), shuffled by the seed within each."""
    ids = [image_id for image_id, _ in items]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise UserError(f"split: image ids must be unique; repeated: {', '.join(map(str, duplicates[:5]))}")
    overall = Counter(c for _, classes in items for c in classes)
    strata: dict[Hashable, list[str]] = {}
    for image_id, classes in items:
        strata.setdefault(dominant_class(list(classes), overall), []).append(image_id)
    rng = random.Random(seed)
    order = []
    for key in sorted(strata, key=lambda k: (-len(strata[k]), str(k))):
        members = sorted(strata[key])  # input order must not matter, only the seed
        rng.shuffle(members)
        order.extend(members)
    return order


def _deal(n: int, weights: Sequence[float]) -> list[int]:
    """Bucket per position: position i goes to the bucket furthest behind its quota after i + 1 items,
    so every run of consecutive positions (a stratum) is split in proportion, give or take one.
    Quotas are whole numbers (largest remainder, at least one each), so the totals come out exact."""
    total = float(sum(weights))
    ideal = [n * w / total for w in weights]
    quota = [int(q) for q in ideal]
    by_remainder = sorted(range(len(weights)), key=lambda b: (-(ideal[b] - quota[b]), b))
    for b in by_remainder[: n - sum(quota)]:
        quota[b] += 1
    for b in range(len(quota)):
        if quota[b] == 0:  # a split with no image would break its consumer; take one from the largest
            quota[max(range(len(quota)), key=lambda c: quota[c])] -= 1
            quota[b] = 1
    given = [0] * len(weights)
    out = []
    for i in range(n):
        k = max(range(len(weights)), key=lambda b: (quota[b] / n * (i + 1) - given[b], -b))
        given[k] += 1
        out.append(k)
    return out


def stratified_split(
    items: Sequence[tuple[str, Sequence[Hashable]]],
    ratio: Sequence[float] | float,
    seed: int,
    names: Sequence[str] = ("train", "val"),
) -> dict[str, list[str]]:
    """Split image ids by class-stratified ratio, e.g. ratio=(74, 30) for the foram paper's 2.47:1.

    items: (image_id, class id of every instance in the image). ratio: weights, one per name; a single
    number r means r:1. Deterministic for a given seed and set of items (their order does not matter).
    Every split gets at least one image; each list is sorted.
    """
    weights = [float(ratio), 1.0] if isinstance(ratio, int | float) else [float(r) for r in ratio]
    if len(weights) != len(names):
        raise UserError(f"split: {len(weights)} ratio weights for {len(names)} splits ({', '.join(names)})")
    if any(w <= 0 for w in weights):
        raise UserError(f"split: ratio weights must be positive, got {weights}")
    if len(set(names)) != len(names):
        raise UserError(f"split: split names must differ, got {list(names)}")
    if len(items) < len(names):
        raise UserError(f"split: need at least {len(names)} images for {len(names)} splits, got {len(items)}")
    order = _strata(items, seed)
    buckets = _deal(len(order), weights)
    out: dict[str, list[str]] = {name: [] for name in names}
    for image_id, k in zip(order, buckets, strict=True):
        out[names[k]].append(image_id)
    return {name: sorted(ids) for name, ids in out.items()}


def stratified_kfold(
    items: Sequence[tuple[str, Sequence[Hashable]]], k: int, seed: int
) -> list[dict[str, list[str]]]:
    """k class-stratified folds: fold i is {"train": every other fold, "val": fold i}; the val sets are
    disjoint and together cover every image."""
    if k < 2:
        raise UserError(f"split: k-fold needs k >= 2, got {k}")
    if len(items) < k:
        raise UserError(f"split: need at least {k} images for {k} folds, got {len(items)}")
    order = _strata(items, seed)
    folds = _deal(len(order), [1.0] * k)
    return [
        {
            "train": sorted(i for i, f in zip(order, folds, strict=True) if f != fold),
            "val": sorted(i for i, f in zip(order, folds, strict=True) if f == fold),
        }
        for fold in range(k)
    ]


def write_split(path: str | Path, split: dict[str, list[str]]) -> Path:
    """Write a split file atomically, so a reader (or a crashed run) never sees a half-written split."""
    return write_json_atomic(path, split, indent=1)


def read_split(path: str | Path, required: Sequence[str] = ("train", "val")) -> dict[str, list[str]]:
    """A split file as {name: [image ids]}; UserError naming the file for anything malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: split file not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON split file ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f'{path}: expected an object {{"train": [...], "val": [...]}}')
    for name in required:
        if name not in data:
            raise UserError(f"{path}: split '{name}' missing (has: {', '.join(map(str, data)) or 'nothing'})")
    seen: dict[str, str] = {}
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise UserError(f"{path}: split '{name}' must be a list of image id strings")
        for image_id in ids:
            if image_id in seen:
                raise UserError(f"{path}: image '{image_id}' is in both '{seen[image_id]}' and '{name}'")
            seen[image_id] = name
    return data


def apply_split(
    records: Sequence, split: dict[str, list[str]], path: str | Path = "split"
) -> dict[str, list]:
    """Records (anything with an `image_id`) grouped by split name, in split-file order; UserError if the
    split names an image the dataset lacks."""
    by_id = {record.image_id: record for record in records}
    missing = [i for ids in split.values() for i in ids if i not in by_id]
    if missing:
        raise UserError(
            f"{path}: {len(missing)} image id(s) not in the dataset, e.g. {', '.join(missing[:3])}"
        )
    return {name: [by_id[i] for i in ids] for name, ids in split.items()}


def train_val_split(
    records: Sequence, val_fraction: float, seed: int, split_file: str = ""
) -> tuple[list, list]:
    """The trainer's split: the "train" and "val" images of `split_file` (written by
    `python -m platform.data split`) when given, else a seeded random split by image."""
    if split_file:
        groups = apply_split(records, read_split(split_file), split_file)
        return groups["train"], groups["val"]
    # datasets.instances loads albumentations (~2.5 s): only when a random split is made, not for every
    # reader of split files
    from datasets.instances import split_records

    return split_records(list(records), val_fraction, seed)
