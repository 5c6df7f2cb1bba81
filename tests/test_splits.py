"""Train/val splits of instance datasets: ratios, k-fold, seeding, split files and their errors."""

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from datasets.errors import UserError
from datasets.splits import (
    NO_INSTANCES,
    apply_split,
    dominant_class,
    read_split,
    stratified_kfold,
    stratified_split,
    write_split,
)


def foram_like(n_images: int = 104, seed: int = 0) -> list[tuple[str, list[int]]]:
    """Images with a skewed dominant class, like the foram mosaics (4 classes, sediment commonest)."""
    rng = random.Random(seed)
    items = []
    for i in range(n_images):
        main = rng.choices([1, 2, 3, 4], weights=[0.13, 0.25, 0.22, 0.40])[0]
        classes = [main] * rng.randint(20, 60) + [rng.randint(1, 4) for _ in range(rng.randint(0, 15))]
        items.append((f"img{i:03d}", classes))
    items.append(("empty", []))
    return items


def strata_of(items):
    overall = Counter(c for _, classes in items for c in classes)
    return {image_id: dominant_class(classes, overall) for image_id, classes in items}


def test_dominant_class_ties_go_to_the_rarest_class():
    overall = Counter({1: 100, 2: 5, 3: 50})
    assert dominant_class([1, 1, 3], overall) == 1
    assert dominant_class([1, 2, 3, 3, 2], overall) == 2
    assert dominant_class([], overall) == NO_INSTANCES


def test_ratio_split_sizes_and_class_proportions():
    items = foram_like()
    split = stratified_split(items, ratio=(74, 30), seed=0, names=("train", "val"))
    assert sorted(split["train"] + split["val"]) == sorted(i for i, _ in items)
    assert not set(split["train"]) & set(split["val"])
    total = len(items)
    assert abs(len(split["train"]) - total * 74 / 104) <= 1
    strata = strata_of(items)
    overall = Counter(strata.values())
    for name, fraction in (("train", 74 / 104), ("val", 30 / 104)):
        counts = Counter(strata[i] for i in split[name])
        for cls, n in overall.items():
            # each stratum is dealt in proportion, give or take one image
            assert abs(counts[cls] - n * fraction) < 2, (name, cls, counts[cls], n * fraction)
            if cls != NO_INSTANCES:
                share, expected = counts[cls] / len(split[name]), n / total
                assert abs(share - expected) < 0.06, (name, cls, share, expected)


def test_single_number_ratio_means_r_to_1():
    split = stratified_split(foram_like(), ratio=2.47, seed=3)
    assert abs(len(split["train"]) / len(split["val"]) - 2.47) < 0.15


def test_same_seed_same_split_and_input_order_does_not_matter():
    items = foram_like()
    a = stratified_split(items, (4, 1), seed=7)
    b = stratified_split(list(reversed(items)), (4, 1), seed=7)
    c = stratified_split(items, (4, 1), seed=8)
    assert a == b
    assert a != c


def test_kfold_disjoint_cover_and_stratified():
    items = foram_like()
    folds = stratified_kfold(items, k=5, seed=1)
    assert len(folds) == 5
    ids = sorted(i for i, _ in items)
    vals = [set(f["val"]) for f in folds]
    for a in range(5):
        assert sorted(folds[a]["train"] + folds[a]["val"]) == ids
        for b in range(a + 1, 5):
            assert not vals[a] & vals[b]
    assert sorted(i for v in vals for i in v) == ids
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    strata = strata_of(items)
    for cls, n in Counter(strata.values()).items():
        for v in vals:
            assert abs(sum(strata[i] == cls for i in v) - n / 5) < 2
    assert stratified_kfold(items, k=5, seed=1) == folds


def test_every_split_gets_an_image_even_when_tiny():
    split = stratified_split(
        [("a", [1]), ("b", [2]), ("c", [])], (10, 1, 1), seed=0, names=("tr", "va", "te")
    )
    assert all(len(v) == 1 for v in split.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": (1, 1, 1)}, "3 ratio weights for 2 splits"),
        ({"ratio": (1, 0)}, "must be positive"),
        ({"ratio": (1, 1), "names": ("train", "train")}, "must differ"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        stratified_split(foram_like(10), seed=0, **kwargs)


def test_bad_items():
    with pytest.raises(UserError, match="at least 2 images"):
        stratified_split([("a", [1])], (1, 1), seed=0)
    with pytest.raises(UserError, match="repeated: a"):
        stratified_split([("a", [1]), ("a", [2])], (1, 1), seed=0)
    with pytest.raises(UserError, match="k >= 2"):
        stratified_kfold(foram_like(10), k=1, seed=0)


def test_split_file_round_trip_atomic(tmp_path):
    split = stratified_split(foram_like(), (74, 30), seed=0)
    path = write_split(tmp_path / "splits" / "foram.json", split)
    assert read_split(path) == split
    assert json.loads(path.read_text()).keys() == {"train", "val"}
    assert [p.name for p in path.parent.iterdir()] == ["foram.json"]  # no temporary left behind
    records = [SimpleNamespace(image_id=i) for i, _ in foram_like()]
    grouped = apply_split(records, split)
    assert [r.image_id for r in grouped["val"]] == split["val"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_split(tmp_path / "s.json", {"train": ["a"], "val": ["b"]})
    with pytest.raises(TypeError):
        write_split(path, {"train": [object()], "val": []})
    assert read_split(path) == {"train": ["a"], "val": ["b"]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not a JSON split file"),
        ("[]", "expected an object"),
        ('{"train": ["a"]}', "split 'val' missing"),
        ('{"train": ["a"], "val": [1]}', "list of image id strings"),
        ('{"train": ["a"], "val": ["a"]}', "in both 'train' and 'val'"),
    ],
)
def test_bad_split_files(tmp_path, text, message):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        read_split(path)
    assert str(path) in str(info.value)


def test_missing_split_file_and_unknown_ids(tmp_path):
    with pytest.raises(UserError, match="split file not found"):
        read_split(tmp_path / "nope.json")
    with pytest.raises(UserError, match="1 image id"):
        apply_split([SimpleNamespace(image_id="a")], {"train": ["a"], "val": ["zz"]})


def test_trainer_reads_a_split_file(tmp_path):
    from datasets.instances import read_records
    from datasets.splits import train_val_split
    from tests.helpers import SAMPLE

    records = read_records(SAMPLE)
    ids = [r.image_id for r in records]
    path = write_split(tmp_path / "s.json", {"train": ids[:20], "val": ids[20:]})
    train, val = train_val_split(records, 0.5, 0, str(path))
    assert [r.image_id for r in train] == ids[:20] and [r.image_id for r in val] == ids[20:]
    train, val = train_val_split(records, 0.25, 0)  # no file: the seeded random split
    assert len(val) == 6 and len(train) == 18
    write_split(tmp_path / "bad.json", {"train": ["nope"], "val": ids[:1]})
    with pytest.raises(UserError, match="bad.json: 1 image id"):
        train_val_split(records, 0.25, 0, str(tmp_path / "bad.json"))
