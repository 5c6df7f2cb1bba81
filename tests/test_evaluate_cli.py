"""`python -m platform.evaluate` end to end on real images with a tiny untrained model: the printed and
logged metrics, the COCO results JSON re-scored by pycocotools, the MLflow run, and input errors."""

import contextlib
import io
import json
from pathlib import Path

import mlflow
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.errors import UserError
from datasets.mask_folders import CATEGORIES
from tests.helpers import run_cli
from trainers.config import MaskRCNNConfig
from trainers.detection.model import build_model
from trainers.detection.train import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder as training writes it, of an untrained resnet18 Mask R-CNN on small inputs."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    cfg = MaskRCNNConfig(
        backbone="resnet18_fpn", min_size=128, max_size=160, weights="", anchor_sizes=(8, 16, 32, 64, 128)
    )
    torch.manual_seed(0)
    save_checkpoint(folder, cfg, build_model(cfg, num_classes=len(CATEGORIES)), CATEGORIES, {})
    return folder


def test_evaluate_prints_writes_and_logs(checkpoint, tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out" / "results.json"
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

    # The written results re-score with plain pycocotools against the ground truth written beside them.
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.gt.json", "results.json"]
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
    assert run.data.params["max_dets"] == "10" and run.data.params["images"] == "4"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    artifacts |= {f.path for d in ("plots", "predictions") for f in client.list_artifacts(run.info.run_id, d)}
    assert {
        "metrics.txt",
        "plots/pr_bbox.png",
        "plots/pr_segm.png",
        "plots/predictions.png",
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
    assert "--split: needs --split-file" in error(
        "--model", str(checkpoint), "--data", str(tiny_dataset), "--split", "test"
    )
    (checkpoint / "categories.json").unlink()
    assert f"{checkpoint / 'categories.json'} not found" in error(
        "--model", str(checkpoint), "--data", str(tiny_dataset)
    )
