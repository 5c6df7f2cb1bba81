"""`python -m platform.evaluate` end to end on real images with a tiny untrained model: the printed and
logged metrics, the COCO results JSON re-scored by pycocotools, the MLflow run, and input errors."""

import contextlib
import csv
import io
import json
from pathlib import Path

import mlflow
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.errors import UserError
from datasets.instances import read_records
from datasets.mask_folders import CATEGORIES
from tests.helpers import run_cli
from trainers.config import MaskRCNNConfig
from trainers.detection.baseline import baseline_metrics
from trainers.detection.model import build_model
from trainers.detection.train import save_checkpoint
from trainers.evaluation import COMPARED

OPERATING_POINT = 0.52  # the checkpoint's score_threshold: among an untrained model's scores (~0.5)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder as training writes it, of an untrained resnet18 Mask R-CNN on small inputs."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    cfg = MaskRCNNConfig(
        backbone="resnet18_fpn",
        min_size=128,
        max_size=160,
        weights="",
        anchor_sizes=(8, 16, 32, 64, 128),
        score_threshold=OPERATING_POINT,
    )
    torch.manual_seed(0)
    save_checkpoint(folder, cfg, build_model(cfg, num_classes=len(CATEGORIES)), CATEGORIES, {})
    return folder


def test_evaluate_prints_writes_and_logs(checkpoint, tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out" / "results.json"
    per_image = tmp_path / "out" / "per_image.csv"
    result = run_cli(
        "platform.evaluate",
        "--model",
        str(checkpoint),
        "--data",
        str(tiny_dataset),
        "--max-dets",
        "10",  # an untrained model fills every slot; fewer slots keep the test fast
        "--predictions-out",
        str(out),
        "--per-image-out",
        str(per_image),
        "--tracking-uri",
        uri,
        "--experiment",
        "evaluate-test",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "predicted 4/4 images" in result.stderr and "images/s, ETA" in result.stderr
    printed = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    for row in ("AP", "AP50", "AP75", "AP85", "AP95", "APs", "AR1", "AR10", "ARl", "AP_class_nucleus"):
        assert len(printed[row]) == 2, row  # a bbox and a segm column
    assert "AR100" not in printed  # at most 10 detections were asked for
    assert {"kaggle_mAP", "matched_mask_IoU"} <= set(printed)
    # The classical baseline beside the model, scored as it is (at most 10 detections per image too).
    baseline = baseline_metrics(read_records(tiny_dataset), "otsu", max_dets=10)
    assert printed["baseline"][0] == "(otsu)" and len(printed["model"]) == len(COMPARED)
    for k, key in enumerate(COMPARED):
        assert float(printed["baseline"][1 + k]) == pytest.approx(baseline[key], abs=5e-4), key
    assert baseline["kaggle_mAP"] > 0.1  # a threshold finds nuclei; the untrained model does not
    assert "worst 4 of 4 images by Kaggle score" in result.stdout
    rows = list(csv.DictReader(per_image.open()))
    assert [int(r["image_id"]) for r in rows] == [1, 2, 3, 4] and all(int(r["n_pred"]) <= 10 for r in rows)

    # The written results re-score with plain pycocotools against the ground truth written beside them.
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "per_image.csv",
        "results.gt.json",
        "results.json",
    ]
    results = json.loads(out.read_text())
    assert results and max(len([r for r in results if r["image_id"] == i]) for i in range(1, 5)) <= 10
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out.with_suffix(".gt.json")))
        reference = {}
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(gt, gt.loadRes(str(out)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            reference[iou_type] = ev.stats
    assert len(gt.getImgIds()) == 4 and len(gt.anns) > 100
    assert sum(int(r["n_true"]) for r in rows) == len(gt.anns)
    # TP + FN = objects, TP + FP = predictions at the model's operating point (its config's score_threshold)
    assert f"Kaggle metric at score >= {OPERATING_POINT}" in result.stdout
    for r in rows:
        tp, fp, fn = int(r["TP"]), int(r["FP"]), int(r["FN"])
        assert tp + fn == int(r["n_true"]) and tp + fp == int(r["n_pred"])
        image = int(r["image_id"])
        assert int(r["n_pred"]) == sum(
            x["image_id"] == image and x["score"] >= OPERATING_POINT for x in results
        )
    # An untrained model scores about 0, which would hide mismatched image ids; masks of the right size
    # (the images are 256x256 and 256x320) show the ids name the images predicted.
    assert len({tuple(r["segmentation"]["size"]) for r in results}) == 2
    for r in results:
        assert r["segmentation"]["size"] == [
            gt.imgs[r["image_id"]]["height"],
            gt.imgs[r["image_id"]]["width"],
        ]

    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("evaluate-test").experiment_id])
    logged = run.data.metrics
    for iou_type, stats in reference.items():
        for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")):
            assert logged[f"{iou_type}_{name}"] == pytest.approx(max(stats[i], 0.0), abs=1e-12), name
        # pycocotools' third maxDets is 100, but no image has more than 10 predictions: the same recall
        assert logged[f"{iou_type}_AR10"] == pytest.approx(stats[8], abs=1e-12)
        assert float(printed["AP"][("bbox", "segm").index(iou_type)]) == pytest.approx(stats[0], abs=5e-4)
    assert {"kaggle_mAP", "matched_mask_IoU", "segm_AP_class_nucleus"} <= set(logged)
    for key, value in baseline.items():
        assert logged[f"baseline_{key}"] == pytest.approx(value, abs=1e-12), key
    assert run.data.params["max_dets"] == "10" and run.data.params["images"] == "4"
    assert run.data.params["baseline"] == "otsu" and run.data.params["tta"] == "off"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    artifacts |= {f.path for d in ("plots", "predictions") for f in client.list_artifacts(run.info.run_id, d)}
    assert {
        "metrics.txt",
        "plots/pr_bbox.png",
        "plots/pr_segm.png",
        "plots/predictions.png",
        "plots/worst_images.png",
        "per_image.csv",
        "predictions/results.json",
        "predictions/results.gt.json",
    } <= artifacts


def test_missing_model_is_a_one_line_error_naming_it(tiny_dataset, tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli("platform.evaluate", "--model", str(missing), "--data", str(tiny_dataset), "--no-mlflow")
    assert result.returncode == 2
    assert (
        result.stderr.startswith(f"error: --model: {missing} not found") and "Traceback" not in result.stderr
    )


def test_bad_inputs_name_the_file_or_field(checkpoint, tiny_dataset, tmp_path):
    """In-process (the exit code 2 for a UserError is platform/_cli.py's, tested above)."""
    from platform.evaluate import main

    def error(*args: str) -> str:
        with pytest.raises(UserError) as caught:
            main([*args, "--no-mlflow"])
        return str(caught.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error("--model", str(checkpoint), "--data", str(empty))
    assert error("--model", str(checkpoint), "--data", str(tiny_dataset), "--exclude-class", "x") == (
        "--exclude-class: unknown class 'x'; valid: nucleus"
    )
    assert error("--model", str(checkpoint), "--data", str(tiny_dataset), "--tta", "rot45") == (
        "--tta: expected one of off, flips, flips+rot90, got 'rot45'"
    )
    assert "--split: needs --split-file" in error(
        "--model", str(checkpoint), "--data", str(tiny_dataset), "--split", "test"
    )
    (checkpoint / "categories.json").unlink()
    assert f"{checkpoint / 'categories.json'} not found" in error(
        "--model", str(checkpoint), "--data", str(tiny_dataset)
    )


@pytest.mark.parametrize(("own", "flag", "expected"), [("off", "flips", "flips"), ("flips", "off", None)])
def test_tta_flag_replaces_the_models_own(checkpoint, tiny_dataset, monkeypatch, own, flag, expected):
    """--tta wraps the bare model in the TTA asked for, in place of the TTA of its config (not on top)."""
    import trainers.detection.inference as inference
    from platform.evaluate import main
    from trainers.detection.combine import TTAModel

    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "tta": own}))
    seen = []
    monkeypatch.setattr(inference, "predict_records", lambda model, *args, **kwargs: seen.append(model) or [])
    assert main(["--model", str(checkpoint), "--data", str(tiny_dataset), "--tta", flag, "--no-mlflow"]) == 0
    [model] = seen
    if expected is None:
        assert not isinstance(model, TTAModel)
    else:
        assert isinstance(model, TTAModel) and model.mode == expected
        assert not isinstance(model.model, TTAModel)  # the bare model inside, not the config's TTA
