"""`python -m platform.data` as a user runs it: convert and inspect real data; bad input is one line,
exit code 2, and leaves no output behind."""

import json
import math
import statistics
from pathlib import Path

import pytest

from tests.helpers import SAMPLE, SHARED_DATA, run_cli, sample_subset
from tests.test_cli_errors import _assert_user_error


def _subset(tmp_path, n=3):
    root = tmp_path / "src"
    sample_subset(root, n)
    return root


def test_convert_then_inspect(tmp_path):
    root = _subset(tmp_path)
    masks = sum(len(list(p.glob("masks/*.png"))) for p in root.iterdir())
    out = run_cli(
        "platform.data", "convert", str(root), str(tmp_path / "csv"), "--from", "mask-folders",
        "--to", "rle-csv", "--to-layout", "sartorius",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 3 images" in out.stdout
    plot, numbers = tmp_path / "summary.png", tmp_path / "summary.json"
    out = run_cli(
        "platform.data", "inspect", str(tmp_path / "csv"), "--plot", str(plot), "--json", str(numbers)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(rle-csv)" in out.stdout and f"nucleus             {masks}" in out.stdout
    for needle in ("instances per image", "size histogram", "overlapping pixels", "empty masks"):
        assert needle in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(numbers.read_text())
    assert summary["images"] == 3 and summary["instances"] == masks == sum(summary["instances_per_image"])
    diameter = (4 * statistics.median(summary["instance_areas"]) / math.pi) ** 0.5
    assert f"median diameter (px)  {diameter:.1f}" in out.stdout


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    root = _subset(tmp_path)
    (root / "extra").mkdir()  # a folder without images/extra.png, found after the others were read
    dst = tmp_path / "out"
    _assert_user_error(
        run_cli("platform.data", "convert", str(root), str(dst), "--from", "mask-folders", "--to", "coco"),
        "extra/images/extra.png",
        "image not found",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "broken.json").write_text("{")
    _assert_user_error(
        run_cli("platform.data", "inspect", str(tmp_path / "broken.json"), "--format", "coco"),
        "broken.json",
        "not valid JSON",
    )


def test_split_writes_a_stratified_split_and_folds(tmp_path):
    out = run_cli(
        "platform.data", "split", str(SAMPLE), "--out", str(tmp_path / "split.json"), "--ratio", "74:30"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["train"]) == 17 and len(split["val"]) == 7  # 24 images at 74:30
    assert not set(split["train"]) & set(split["val"])
    out = run_cli("platform.data", "split", str(SAMPLE), "--out", str(tmp_path / "k.json"), "--kfold", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    vals = [set(json.loads((tmp_path / f"k-fold{i}.json").read_text())["val"]) for i in range(3)]
    assert sum(map(len, vals)) == 24 and len(set.union(*vals)) == 24


@pytest.mark.skipif(not (SHARED_DATA / "adrenal3d").is_dir(), reason="../shared/data not present")
def test_slices_with_a_specimen_split(tmp_path):
    import csv

    labels = tmp_path / "labels.csv"
    rows = list(csv.DictReader((SHARED_DATA / "adrenal3d" / "labels.csv").open()))
    by_label = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    subset = [r for group in by_label.values() for r in group[:6]]  # 6 specimens per class
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label"])
        writer.writeheader()
        for row in subset:
            writer.writerow({"file": str(SHARED_DATA / "adrenal3d" / "volumes" / Path(row["file"]).name),
                             "label": row["label"]})  # fmt: skip
    out = run_cli(
        "platform.data", "slices", str(labels), str(tmp_path / "slices"), "--axis", "0",
        "--split", "train=0.5,val=0.5",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    index = list(csv.DictReader((tmp_path / "slices" / "index.csv").open()))
    assert index and all(r["split"] in ("train", "val") for r in index)
    split_of = {}
    for r in index:
        assert split_of.setdefault(r["specimen"], r["split"]) == r["split"]  # no specimen in two splits
    assert "CV %" in out.stdout
    out = run_cli("platform.data", "slices", str(labels), str(tmp_path / "slices"))
    _assert_user_error(out, "already exists")
