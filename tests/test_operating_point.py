"""Operating points of slice classifiers (trainers/classification/operating_point.py): the cut-off and the
class weights against brute-force searches on hand-made probabilities, the decision of a loaded predictor
or ensemble with and without one, the training loop that chooses and saves it, and platform.evaluate's
metrics at argmax and at the operating point (recomputed here from its own predictions file)."""

import csv
import itertools
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from datasets.errors import UserError
from tests.classifier_data import TINY, write_volumes
from tests.helpers import run_cli
from trainers.classification.ensemble import Ensemble, load_predictor, save_ensemble
from trainers.classification.metrics import format_report, report
from trainers.classification.model import (
    build_classifier,
    load_classifier_checkpoint,
    save_classifier,
)
from trainers.classification.operating_point import (
    OPERATING_POINT_FILE,
    WEIGHT_GRID,
    OperatingPoint,
    decide,
    fit_operating_point,
)
from trainers.classification.train import run_training, slice_sets
from trainers.config import apply_overrides
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe


def brute_scores(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, float]:
    return (
        balanced_accuracy_score(labels, pred),
        f1_score(labels, pred, labels=list(range(n_classes)), average="macro", zero_division=0),
    )


# 14 volumes, 4 hyperplasia (class 0) among 10 normal (class 1): the hyperplasia volumes score 0.31-0.46 for
# their class, above every normal one but one (0.33), so argmax calls every volume normal.
HAND_P0 = np.array([0.46, 0.41, 0.37, 0.31, 0.33, 0.29, 0.27, 0.22, 0.20, 0.18, 0.12, 0.10, 0.07, 0.05])
HAND_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])


def test_cutoff_equals_a_brute_force_search_on_hand_made_probabilities():
    probs = np.stack([HAND_P0, 1 - HAND_P0], axis=1)
    point = fit_operating_point(probs, HAND_LABELS, ["hyperplasia", "normal"])
    assert point.positive == "hyperplasia"  # the rarer class is the one cut
    # every cut-off on a grid finer than the probabilities' 0.01 steps
    grid = np.round(np.arange(0.0, 1.0001, 0.005), 3)
    table = {t: brute_scores(HAND_LABELS, np.where(HAND_P0 >= t, 0, 1), 2) for t in grid}
    best = max(table.values())
    optimal = [t for t, s in table.items() if s == best]
    # by hand (descending: .46 H, .41 H, .37 H, .33 N, .31 H, .29 N, ...): a cut in (0.33, 0.37] catches
    # 3 of 4 hyperplasias and no normal volume, BA 0.875; one in (0.29, 0.31] all 4 and one normal, BA
    # 0.95, the unique best decision; (0.27, 0.29] adds a second normal, BA 0.9
    assert best[0] == pytest.approx(0.95)
    assert min(optimal) > 0.29 and max(optimal) <= 0.31
    assert min(optimal) <= point.threshold <= max(optimal)
    assert (point.balanced_accuracy, point.f1) == pytest.approx(best)
    assert np.array_equal(decide(probs, point), np.where(HAND_P0 >= optimal[0], 0, 1))
    assert np.array_equal(decide(probs, None), np.ones(14))  # argmax: every volume normal


@pytest.mark.parametrize("seed", range(4))
def test_cutoff_reaches_the_best_of_every_distinct_decision(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(40) < 0.3).astype(int)
    p1 = np.clip(rng.normal(0.25 + 0.2 * labels, 0.12), 0.0, 1.0).round(3)  # ties included
    probs = np.stack([1 - p1, p1], axis=1)
    point = fit_operating_point(probs, labels, ["a", "b"])
    # every distinct decision is "class 1 iff p1 >= v" for an observed v, or nothing positive
    cuts = [*np.unique(p1), 1.1]
    best = max(brute_scores(labels, (p1 >= v).astype(int), 2) for v in cuts)
    assert (point.balanced_accuracy, point.f1) == pytest.approx(best)
    assert brute_scores(labels, decide(probs, point), 2) == pytest.approx(best)


def brute_weights(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The best (balanced accuracy, macro F1) of argmax(probs * w) over every w on the grid; weights only
    count relative to each other, so the first class's stays 1. Rounded: float ties are ties."""
    return max(
        tuple(round(v, 9) for v in brute_scores(labels, (probs * [1.0, wb, wc]).argmax(1), 3))
        for wb, wc in itertools.product(WEIGHT_GRID, WEIGHT_GRID)
    )


def test_class_weights_reach_a_brute_force_search_on_a_hand_made_three_class_case():
    # class c is right but under-confident: argmax never says c (balanced accuracy 2/3); by hand, weighting
    # c by 1.5 gets all nine right (the tie on the third "a" row goes to a, the first)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    probs = np.array(
        [
            [0.60, 0.30, 0.10], [0.50, 0.30, 0.20], [0.45, 0.25, 0.30],
            [0.30, 0.60, 0.10], [0.30, 0.45, 0.25], [0.25, 0.50, 0.25],
            [0.45, 0.20, 0.35], [0.30, 0.40, 0.30], [0.40, 0.30, 0.30],
        ]
    )  # fmt: skip
    point = fit_operating_point(probs, labels, ["a", "b", "c"])
    assert point.positive == "" and len(point.weights) == 3
    pred = decide(probs, point)
    assert np.array_equal(pred, (probs * point.weights).argmax(1))
    assert (point.balanced_accuracy, point.f1) == pytest.approx(brute_scores(labels, pred, 3))
    assert brute_scores(labels, probs.argmax(1), 3)[0] == pytest.approx(2 / 3)
    assert brute_weights(probs, labels) == pytest.approx((1.0, 1.0))
    assert (point.balanced_accuracy, point.f1) == pytest.approx((1.0, 1.0))


@pytest.mark.parametrize("seed", range(4))
def test_class_weights_never_lose_to_argmax_nor_beat_brute_force(seed):
    # coordinate ascent can stop short of the grid's best (seed 3 here: 0.750 vs 0.778), never below argmax
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 12 + [1] * 12 + [2] * 6)
    base = np.array([[0.6, 0.25, 0.15], [0.25, 0.6, 0.15], [0.4, 0.35, 0.25]])
    probs = np.clip(base[labels] + rng.uniform(-0.12, 0.12, (30, 3)), 0.01, None)
    probs /= probs.sum(1, keepdims=True)
    point = fit_operating_point(probs, labels, ["a", "b", "c"])
    argmax = brute_scores(labels, probs.argmax(1), 3)
    assert argmax[0] - 1e-9 <= point.balanced_accuracy <= brute_weights(probs, labels)[0] + 1e-9


def test_no_operating_point_without_two_classes_in_the_labels():
    assert fit_operating_point(np.full((3, 2), 0.5), np.zeros(3, int), ["a", "b"]) is None


# --------------------------------------------------------------------------------------------- predictor
@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("op_vols"))


def tiny_config(labels: Path, **overrides):
    return apply_overrides(get_recipe("adrenal3d_cpu"), {**TINY, "data": str(labels), **overrides}, "test")


def biased_checkpoint(folder: Path, cfg, point: OperatingPoint | None) -> Path:
    """An untrained classifier whose head leans to class 0 ("ball"): p(box) about 0.17, varying a little
    with the image; saved with `point`."""
    torch.manual_seed(0)
    model = build_classifier(cfg, 2)
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
        model.fc.bias.copy_(torch.tensor([1.0, 0.0]))
    folder.mkdir(parents=True)
    save_classifier(folder, cfg, model.state_dict(), ["ball", "box"], point)
    return folder


def images(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(n)]


def test_predictor_decides_at_its_operating_point_and_old_checkpoints_argmax(volumes, tmp_path):
    cfg = tiny_config(volumes)
    old = load_classifier_checkpoint(biased_checkpoint(tmp_path / "old", cfg, None))
    assert not (tmp_path / "old" / OPERATING_POINT_FILE).exists() and old.operating_point is None
    probs = old.predict_proba(images())
    assert (probs[:, 1] < 0.5).all()
    assert np.array_equal(old.predict(images()), probs.argmax(1))  # no operating point: argmax, all ball

    cut = float(np.median(probs[:, 1]))
    point = OperatingPoint(["ball", "box"], "box", cut)
    new = load_classifier_checkpoint(biased_checkpoint(tmp_path / "new", cfg, point))
    assert new.operating_point == point
    decided = new.predict(images())
    assert np.array_equal(decided, (probs[:, 1] >= cut).astype(int))
    assert 0 < decided.sum() < len(decided)  # some volumes change their decision, not all


def test_a_wrong_operating_point_file_names_the_file(volumes, tmp_path):
    folder = biased_checkpoint(
        tmp_path / "c", tiny_config(volumes), OperatingPoint(["ball", "box"], "box", 0.3)
    )
    spec = json.loads((folder / OPERATING_POINT_FILE).read_text())
    (folder / OPERATING_POINT_FILE).write_text(json.dumps({**spec, "classes": ["x", "y"]}))
    with pytest.raises(UserError, match="operating_point.json: operating point for classes"):
        load_classifier_checkpoint(folder)


def test_ensemble_keeps_its_operating_point_and_class_weights(volumes, tmp_path):
    cfg = tiny_config(volumes)
    dirs = [biased_checkpoint(tmp_path / f"m{i}", cfg, None) for i in range(2)]
    members = [load_predictor(d) for d in dirs]
    probs = np.mean([m.predict_proba(images()) for m in members], axis=0)
    point = OperatingPoint(["ball", "box"], "box", float(np.median(probs[:, 1])))
    save_ensemble(
        tmp_path / "ens", Ensemble("soft", members, class_weights=[1.0, 1.0], operating_point=point), dirs
    )
    loaded = load_predictor(tmp_path / "ens")
    assert loaded.operating_point == point and loaded.class_weights == [1.0, 1.0]
    assert np.array_equal(loaded.predict(images()), (probs[:, 1] >= point.threshold).astype(int))
    plain = Ensemble("soft", members)  # without one: argmax, as before
    assert np.array_equal(plain.predict(images()), probs.argmax(1))


def test_serving_answers_the_decision_at_the_operating_point(volumes, tmp_path):
    from deploy.classifier import _decision

    cfg = tiny_config(volumes)
    point = OperatingPoint(["ball", "box"], "box", 0.25)
    predictor = load_classifier_checkpoint(biased_checkpoint(tmp_path / "c", cfg, point))
    probs = np.array([0.7, 0.3])  # argmax: ball; at the cut-off 0.25 on box: box
    assert _decision(predictor, probs) == {
        "predicted": "box",
        "decision": {"rule": "cut-off", "class": "box", "threshold": 0.25},
    }
    old = load_classifier_checkpoint(biased_checkpoint(tmp_path / "old", cfg, None))
    assert _decision(old, probs) == {"predicted": "ball", "decision": {"rule": "argmax"}}


def test_report_scores_decisions_at_the_operating_point():
    groups = [f"v{i}" for i in range(14) for _ in range(2)]
    slice_p0 = np.repeat(HAND_P0, 2) + np.tile([-0.01, 0.01], 14)
    probs = np.stack([slice_p0, 1 - slice_p0], axis=1)
    labels = np.repeat(HAND_LABELS, 2)
    point = OperatingPoint(["hyperplasia", "normal"], "hyperplasia", 0.3)
    metrics, _ = report(probs, labels, groups, ["hyperplasia", "normal"], point=point)
    at_point = np.where(HAND_P0 >= 0.3, 0, 1)
    assert metrics["volume_bal_acc"] == pytest.approx(0.5)  # argmax: all normal
    assert metrics["volume_op_bal_acc"] == pytest.approx(balanced_accuracy_score(HAND_LABELS, at_point))
    assert metrics["volume_op_recall_hyperplasia"] == pytest.approx(1.0)
    assert metrics["volume_op_f1"] == pytest.approx(f1_score(HAND_LABELS, at_point, average="macro"))
    assert metrics["slice_op_acc"] == pytest.approx(np.mean(np.where(slice_p0 >= 0.3, 0, 1) == labels))
    lines = format_report(metrics, ["hyperplasia", "normal"]).splitlines()
    row = next(line for line in lines if line.startswith("op_bal_acc "))
    assert row.split()[2] == f"{metrics['volume_op_bal_acc']:.3f}"
    assert any(line.startswith("bal_acc ") for line in lines)
    classes = ["hyperplasia", "normal"]
    plain = format_report(report(probs, labels, groups, classes)[0], classes)
    assert "op_acc" not in plain  # no operating point, no op rows


# ----------------------------------------------------------------------------------------- training
def test_training_chooses_and_saves_the_operating_point_of_its_model(volumes, tmp_path):
    cfg = tiny_config(volumes, epochs=2)
    seam = LocalSeam(tmp_path / "ckpt")
    run_training(cfg, seam)
    last = seam.reports[-1]
    for key in ("volume_bal_acc", "volume_op_bal_acc", "volume_op_f1", "slice_op_acc", "op_threshold"):
        assert np.isfinite(last[key]), key
    predictor = load_classifier_checkpoint(tmp_path / "ckpt")
    point = predictor.operating_point
    assert point is not None and point.threshold == pytest.approx(
        [r for r in seam.reports if r["epoch"] == last["best_epoch"]][0]["op_threshold"]
    )
    # chosen again from the saved model's own validation probabilities: the same decisions
    _, val, _ = slice_sets(cfg)
    _, details = report(predictor.predict_proba(val.images()), val.labels, val.specimens, val.classes)
    volume = details["volume"]
    refit = fit_operating_point(volume["probs"], volume["labels"], val.classes)
    assert np.array_equal(decide(volume["probs"], refit), decide(volume["probs"], point))
    assert refit.balanced_accuracy == pytest.approx(point.balanced_accuracy)


# ----------------------------------------------------------------------------------------- evaluate
def evaluate(folder: Path, volumes: Path, out: Path, *mlflow_args: str) -> tuple[str, list[dict]]:
    """platform.evaluate's printed report and its predictions file (one row per volume)."""
    result = run_cli(
        "platform.evaluate", "--model", str(folder), "--data", str(volumes), "--predictions-out", str(out),
        *(mlflow_args or ("--no-mlflow",)),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, list(csv.DictReader(out.open()))


def test_evaluate_reports_metrics_at_argmax_and_at_the_operating_point(volumes, tmp_path):
    cfg = tiny_config(volumes)
    # a checkpoint without an operating point: argmax decisions, no op rows
    printed, rows = evaluate(biased_checkpoint(tmp_path / "old", cfg, None), volumes, tmp_path / "old.csv")
    assert "decision: argmax" in printed and "op_acc" not in printed and "bal_acc" in printed
    p_box = np.array([float(r["p_box"]) for r in rows])
    assert [r["predicted"] for r in rows] == [["ball", "box"][k] for k in (p_box >= 0.5).astype(int)]
    # the same weights with a cut-off in the widest gap between the volumes' p(box) (the file rounds)
    values = np.unique(p_box)
    gap = int(np.argmax(np.diff(values)))
    point = OperatingPoint(["ball", "box"], "box", float(values[gap : gap + 2].mean()))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = biased_checkpoint(tmp_path / "ckpt", cfg, point)
    printed, rows = evaluate(
        folder, volumes, tmp_path / "op.csv", "--tracking-uri", uri, "--experiment", "op"
    )
    assert f"decision: box if p(box) >= {point.threshold:.4f}" in printed
    assert np.allclose([float(r["p_box"]) for r in rows], p_box, atol=2e-6)  # same model, same data
    truth = np.array([r["label"] == "box" for r in rows], int)
    at_point, argmax = (p_box >= point.threshold).astype(int), (p_box >= 0.5).astype(int)
    assert [r["predicted"] for r in rows] == [["ball", "box"][k] for k in at_point]
    assert not np.array_equal(at_point, argmax)
    table = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    expected = {
        "bal_acc": balanced_accuracy_score(truth, argmax),
        "op_bal_acc": balanced_accuracy_score(truth, at_point),
        "f1": f1_score(truth, argmax, average="macro", labels=[0, 1], zero_division=0),
        "op_f1": f1_score(truth, at_point, average="macro", labels=[0, 1], zero_division=0),
        "op_acc": np.mean(at_point == truth),
    }
    for name, value in expected.items():
        assert table[name][1] == f"{value:.3f}", name  # the volume column, as the table rounds
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("op").experiment_id])[0]
    assert run.data.params["op_rule"] == "cut-off" and run.data.params["op_class"] == "box"
    assert float(run.data.params["op_threshold"]) == pytest.approx(point.threshold, abs=1e-6)
    assert run.data.metrics["volume_op_bal_acc"] == pytest.approx(expected["op_bal_acc"])
    assert run.data.metrics["volume_bal_acc"] == pytest.approx(expected["bal_acc"])
