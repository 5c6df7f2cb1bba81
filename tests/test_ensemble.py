"""Ensembles: soft and majority voting and the PatchEnsemble rule by hand, the patch fit on validation
predictions, and an ensemble folder that saves, loads and predicts like its members combined."""

import json

import numpy as np
import pytest
import torch

from datasets.errors import UserError
from trainers.classification.ensemble import (
    Ensemble,
    combine,
    fit_class_weights,
    fit_patch,
    load_predictor,
    patch,
    reweight,
    save_ensemble,
)
from trainers.classification.model import SliceClassifier, build_classifier, save_classifier
from trainers.config import ClassifierConfig

CLASSES = ["a", "b", "c"]


def member(seed: int, classes=CLASSES, **cfg) -> SliceClassifier:
    config = ClassifierConfig(model_name="resnet18", in_chans=1, input_size=32, slice_size=32, **cfg)
    torch.manual_seed(seed)
    return SliceClassifier(build_classifier(config, len(classes)).eval(), config, list(classes))


def test_soft_and_vote_by_hand():
    p1 = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    p2 = np.array([[0.1, 0.8, 0.1], [0.1, 0.6, 0.3]])
    p3 = np.array([[0.5, 0.4, 0.1], [0.4, 0.3, 0.3]])
    members = [member(0), member(1), member(2)]
    soft = combine(Ensemble("soft", members), [p1, p2, p3])
    assert np.allclose(soft, [[0.4, 0.5, 0.1], [0.7 / 3, 1.4 / 3, 0.3]])
    vote = combine(Ensemble("vote", members), [p1, p2, p3])
    assert vote.argmax(axis=1).tolist() == [0, 1]  # 2 votes for a (soft would say b); 2 votes for b
    assert np.allclose(vote.sum(axis=1), 1)
    tie = combine(Ensemble("vote", members[:2]), [p1[:1], p2[:1]])  # a vs b, one vote each
    assert tie.argmax() == 1  # the mean probability breaks the tie: b 0.55 > a 0.35


def test_patch_rule_by_hand():
    primary = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    secondary = np.array([[0.1, 0.85, 0.05], [0.2, 0.7, 0.1], [0.05, 0.9, 0.05]])
    out = patch(primary, secondary, classes=[1], threshold=0.8)
    # rows 0 and 2: the secondary says b with >= 0.8 and takes over; row 1: only 0.7, the primary stays
    assert np.array_equal(out, np.stack([secondary[0], primary[1], secondary[2]]))
    assert np.array_equal(patch(primary, secondary, classes=[2], threshold=0.5), primary)


def test_fit_patch_finds_the_weak_class_and_a_threshold():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    onehot = np.eye(3)[labels]
    # primary: right on a and c, but says a for most b; secondary: confident and right on b, noisy elsewhere
    primary = np.where(labels[:, None] == 1, [0.6, 0.3, 0.1], onehot * 0.8 + 0.2 / 3)
    secondary = np.where(labels[:, None] == 1, [0.05, 0.9, 0.05], [0.2, 0.45, 0.35])  # says b, unsure
    classes, threshold, f1 = fit_patch(primary, secondary, labels, CLASSES)
    assert classes == ["b"] and 0.45 < threshold <= 0.9
    assert f1 == pytest.approx(1.0)
    # a useless secondary: no patch
    assert fit_patch(primary, np.full_like(secondary, 1 / 3), labels, CLASSES)[0] == []


def test_fit_patch_at_volume_level_uses_specimens():
    labels = np.array([0, 0, 1, 1])
    groups = ["s1", "s1", "s2", "s2"]
    primary = np.array([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])  # s2 (class 1) wrong
    secondary = np.array([[0.4, 0.6], [0.9, 0.1], [0.1, 0.9], [0.2, 0.8]])
    classes, threshold, f1 = fit_patch(primary, secondary, labels, ["x", "y"], groups)
    assert classes == ["y"] and threshold <= 0.8 and f1 == pytest.approx(1.0)


def test_ensemble_folder_round_trip(tmp_path):
    members = [member(0), member(1)]
    dirs = []
    for i, m in enumerate(members):
        folder = tmp_path / f"ckpt{i}"
        folder.mkdir()
        save_classifier(folder, m.config, m.model.state_dict(), m.classes)
        dirs.append(folder)
    ensemble = Ensemble("patch", [load_predictor(d) for d in dirs], ["b"], 0.55)
    out = save_ensemble(tmp_path / "ens", ensemble, dirs)
    assert json.loads((out / "ensemble.json").read_text())["patch_classes"] == ["b"]
    loaded = load_predictor(out)
    images = [np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8) for i in range(5)]
    expected = patch(members[0].predict_proba(images), members[1].predict_proba(images), [1], 0.55)
    assert np.allclose(loaded.predict_proba(images), expected, atol=1e-6)
    with pytest.raises(UserError, match="already exists"):
        save_ensemble(tmp_path / "ens", ensemble, dirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt0", "ckpt1", "ens"]  # no temp left over


def test_members_must_agree():
    with pytest.raises(UserError, match="different classes"):
        Ensemble("soft", [member(0), member(1, classes=["a", "b", "x"])])
    with pytest.raises(UserError, match="cut differently"):
        Ensemble("soft", [member(0), member(1, crop="none")])
    with pytest.raises(UserError, match="primary and a secondary"):
        Ensemble("patch", [member(0), member(1), member(2)])
    with pytest.raises(UserError, match="unknown ensemble method"):
        Ensemble("stack", [member(0)])


def test_class_weights_move_the_operating_point_and_keep_the_ranking():
    # positives (class 0) score 0.35-0.45, negatives 0.05-0.3: argmax calls everything class 1
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 80)
    p0 = np.where(labels == 0, rng.uniform(0.35, 0.45, 100), rng.uniform(0.05, 0.3, 100))
    probs = np.stack([p0, 1 - p0], axis=1)
    groups = [f"s{i}" for i in range(100)]  # one slice per specimen: volume level = slice level
    weights, acc = fit_class_weights(probs, labels, ["pos", "neg"], groups, "mean", "acc")
    assert acc == 1.0 and weights[0] > 1.0
    w = weights[0] / weights[1]
    cut = 1 / (1 + w)  # p0 * w > 1 - p0  <=>  p0 > 1 / (1 + w): it must fall between the two groups
    assert 0.3 <= cut <= 0.35
    reweighted = reweight(probs, weights)
    assert np.array_equal(np.argsort(reweighted[:, 0]), np.argsort(probs[:, 0]))  # ranking (AUC) kept
    swapped = fit_class_weights(probs[:, ::-1], 1 - labels, ["neg", "pos"], groups, "mean", "acc")
    assert swapped[1] == 1.0 and swapped[0][1] > 1.0  # the same fix, found for the other class index
