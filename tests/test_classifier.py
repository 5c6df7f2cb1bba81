"""Slice classifiers: timm models by name, weights from a local file, the two-phase schedule, the data
(slicing modes, specimen split, per-epoch sampling), and the training loop with early stopping and resume
on tiny volumes (no Ray here: LocalSeam runs the same loop; tests/test_classifier_cli.py runs it on Ray)."""

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from datasets.errors import UserError
from datasets.slices import SliceDataset, evenly_spaced, slice_index, split_rows
from datasets.slicing import volume_slices, whole_slice_box
from datasets.volumes import VolumeRecord, read_volumes
from tests.classifier_data import TINY, ball_or_box, write_volumes
from trainers.classification.model import (
    build_classifier,
    classify_volume,
    freeze_backbone,
    load_classifier_checkpoint,
    lr_at,
    predict_volumes,
)
from trainers.classification.train import run_training
from trainers.config import ClassifierConfig, apply_overrides
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("vols"))


def tiny_config(labels: Path, **overrides) -> ClassifierConfig:
    return apply_overrides(get_recipe("adrenal3d_cpu"), {**TINY, "data": str(labels), **overrides}, "test")


# --------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenetv3_small_050", "efficientnetv2_rw_t", "convnext_atto", "nasnetalarge"]
)
def test_timm_models_build_and_train_a_step(name):
    if name == "nasnetalarge":  # NASNet needs >= 331 px; build only (the paper's NASNet is too big for CPU)
        model = build_classifier(ClassifierConfig(model_name=name, in_chans=3), 5)
        assert model.get_classifier().out_features == 5
        return
    for in_chans in (1, 3):
        model = build_classifier(ClassifierConfig(model_name=name, in_chans=in_chans), 3)
        out = model(torch.rand(2, in_chans, 64, 64))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UserError, match="resnet18"):
        build_classifier(ClassifierConfig(model_name="resnet18x"), 2)


def test_pretrained_weights_from_a_local_file(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_classifier(ClassifierConfig(model_name="resnet18", pretrained=str(path), in_chans=3), 2)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 2  # timm replaced the 1000-class head
    grey = build_classifier(ClassifierConfig(model_name="resnet18", pretrained=str(path), in_chans=1), 2)
    # one grey channel: timm sums the RGB filters of the stem
    assert torch.allclose(grey.conv1.weight[:, 0], source.conv1.weight.sum(dim=1), atol=1e-6)
    with pytest.raises(UserError, match="does not fit"):
        build_classifier(ClassifierConfig(model_name="convnext_atto", pretrained=str(path)), 2)
    with pytest.raises(UserError, match="not found"):
        build_classifier(ClassifierConfig(pretrained=str(tmp_path / "missing.pth")), 2)


def test_head_only_phase_trains_only_the_head_and_keeps_batchnorm_statistics():
    from trainers.classification.model import backbone_norms_eval

    model = build_classifier(ClassifierConfig(model_name="resnet18", in_chans=1), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_backbone(model, True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.train()
    backbone_norms_eval(model)
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["fc.bias", "fc.weight"]
    freeze_backbone(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_two_phase_learning_rate_by_hand():
    cfg = ClassifierConfig(epochs=30, head_epochs=10, head_lr=1e-4, lr=5e-5, restart_epochs=5)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 5) == pytest.approx(0.5e-4)  # half way down the first cosine
    assert lr_at(cfg, 10) == pytest.approx(5e-5)  # the second phase starts at its own lr
    assert lr_at(cfg, 12.5) == pytest.approx(2.5e-5)
    assert lr_at(cfg, 14.999) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(cfg, 15) == pytest.approx(5e-5)  # warm restart
    one_period = ClassifierConfig(epochs=30, head_epochs=10, lr=5e-5, restart_epochs=0)
    assert lr_at(one_period, 20) == pytest.approx(2.5e-5)
    scaled = ClassifierConfig(head_epochs=0, lr=1e-3, batch_size=32, lr_reference_batch=64)
    assert lr_at(scaled, 0, world_size=4) == pytest.approx(2e-3)
    assert lr_at(scaled, 0) == pytest.approx(0.5e-3)
    assert math.isclose(
        lr_at(ClassifierConfig(head_epochs=2, epochs=1), 0.5), 1e-4 * 0.5 * (1 + math.cos(math.pi / 4))
    )


# ----------------------------------------------------------------------------------------------- data
def test_whole_slice_and_context_slicing_by_hand():
    rng = np.random.default_rng(0)
    volume = (rng.random((12, 10, 8)) * 255).astype(np.uint8)
    assert whole_slice_box(np.zeros((10, 8))) == (0, -1, 10, 9)  # padded to a centred square
    record = VolumeRecord(Path("v"), "v", "", "test")
    kept = [s for s in volume_slices(record, volume, axes=(0,), size=10, crop="none") if s.kept]
    assert len(kept) == 12
    expected = np.pad(volume[3], ((0, 0), (1, 1)), constant_values=0)  # pad value: the background grey
    assert kept[3].image.shape == (10, 10)
    assert np.array_equal(kept[3].image[:, 1:9], expected[:, 1:9])  # same size: no resampling
    rgb = [s for s in volume_slices(record, volume, axes=(0,), size=10, crop="none", context=1) if s.kept]
    assert rgb[3].image.shape == (10, 10, 3)
    for channel, index in enumerate((2, 3, 4)):
        assert np.array_equal(rgb[3].image[:, 1:9, channel], volume[index])
    assert np.array_equal(rgb[0].image[:, 1:9, 0], volume[0])  # clamped at the first slice


def test_distance_slices_match_brute_force_distances():
    rng = np.random.default_rng(1)
    volume = np.zeros((9, 9, 9), np.uint8)
    volume[1:8, 2:7, 1:6] = 255
    volume[rng.random(volume.shape) < 0.05] = 0  # holes, so distances are not just to the box's faces
    fg, bg = np.argwhere(volume > 0), np.argwhere(volume == 0)
    brute = np.zeros(volume.shape)
    brute[tuple(fg.T)] = np.sqrt(((fg[:, None, :] - bg[None, :, :]) ** 2).sum(-1)).min(axis=1)
    record = VolumeRecord(Path("v"), "v", "", "test")
    slices = volume_slices(record, volume, axes=(2,), size=9, crop="none", distance_scale=20)
    for s in (s for s in slices if s.kept):
        expected = np.minimum(brute[:, :, s.index] * 20, 255).round()
        assert np.array_equal(s.image, expected.astype(np.uint8)), s.index


def test_specimen_split_and_sampling(volumes, tmp_path):
    cfg = tiny_config(volumes)
    index = slice_index(volumes, cfg.slicing(), cache=tmp_path)
    assert index.parent.parent == tmp_path
    assert slice_index(volumes, cfg.slicing(), cache=tmp_path) == index  # cached
    train, val, classes = split_rows(index, 0.25, seed=0)
    assert classes == ["ball", "box"]
    train_specimens = {r["specimen"] for r in train}
    val_specimens = {r["specimen"] for r in val}
    assert not train_specimens & val_specimens
    assert len(val_specimens) == 4 and {r["label"] for r in val} == {"ball", "box"}
    assert split_rows(index, 0.25, seed=0)[1] == val  # deterministic
    capped = evenly_spaced(val, 3)
    assert all(sum(r["specimen"] == s for r in capped) == 3 for s in val_specimens)
    dataset = SliceDataset(train, index.parent, classes, input_size=32, in_chans=1, per_specimen=5)
    assert len(dataset) == 5 * len(train_specimens)
    first = [r["path"] for r in dataset.rows]
    dataset.resample(1)
    assert [r["path"] for r in dataset.rows] != first
    dataset.resample(0)
    assert [r["path"] for r in dataset.rows] == first
    image, label = dataset[0]
    assert image.shape == (1, 32, 32) and label in (0, 1)


def test_a_class_missing_from_a_split_is_an_error(tmp_path):
    labels = write_volumes(tmp_path / "v", per_class=1)  # one ball, one box: one split lacks a class
    index = slice_index(labels, ClassifierConfig(slice_size=16).slicing(), cache=tmp_path / "cache")
    with pytest.raises(UserError, match="has no specimen in the (train|val) split"):
        split_rows(index, 0.5, seed=0)


def test_unlabelled_volumes_cannot_train(tmp_path):
    folder = tmp_path / "unlabelled"
    write_volumes(folder, per_class=1)
    (folder / "labels.csv").unlink()
    with pytest.raises(UserError, match="without labels"):
        slice_index(folder / "volumes", ClassifierConfig(slice_size=16).slicing(), cache=tmp_path / "c")


# ----------------------------------------------------------------------------------------------- loop
def train(cfg: ClassifierConfig, checkpoint: Path) -> list[dict]:
    seam = LocalSeam(checkpoint)
    run_training(cfg, seam)
    return seam.reports


def test_training_learns_and_the_checkpoint_predicts_volumes(volumes, tmp_path):
    cfg = tiny_config(volumes, epochs=4, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5)
    reports = train(cfg, tmp_path / "ckpt")
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    last = reports[-1]
    for key in ("val_loss", "slice_acc", "slice_auc", "volume_acc", "volume_auc", "volume_f1_ball"):
        assert np.isfinite(last[key]), key
    # balls vs hollow boxes: learnable in a few epochs (the threshold at 0.5 still moves: AUC, not acc)
    assert last["volume_auc"] >= 0.9
    assert min(r["val_loss"] for r in reports) < reports[0]["val_loss"]
    # restore_best: model.pt holds the lowest-val_loss epoch, train_state.pt the latest weights
    saved = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    latest = torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=True)["model"]
    same = all(torch.equal(saved[k], latest[k]) for k in saved)
    assert same == (last["best_epoch"] == last["epoch"])
    predictor = load_classifier_checkpoint(tmp_path / "ckpt")
    assert predictor.classes == ["ball", "box"]
    rng = np.random.default_rng(5)
    for kind in ("ball", "box"):
        _, slice_probs, volume_probs = classify_volume(predictor, ball_or_box(kind, 16, 5.0, rng))
        assert slice_probs.shape[1] == 2 and np.allclose(slice_probs.sum(axis=1), 1, atol=1e-5)
        assert volume_probs == pytest.approx(slice_probs.mean(axis=0), abs=1e-6)
    with pytest.raises(UserError, match="nothing to classify"):
        classify_volume(predictor, np.zeros((16, 16, 16), np.uint8))
    records = read_volumes(volumes)
    probs, groups, labels = predict_volumes(predictor, records[:2])
    assert len(probs) == len(groups) == len(labels) and set(groups) == {r.specimen for r in records[:2]}
    cone = [VolumeRecord(records[0].path, "x", "cone", "labels.csv row 7")]
    with pytest.raises(UserError, match="labels.csv row 7: label 'cone' is not a class of the model"):
        predict_volumes(predictor, cone)


def test_early_stopping_on_validation_loss(volumes, tmp_path):
    # lr ~ 0: the validation loss never improves after the first epoch, so patience 2 stops after epoch 3
    cfg = tiny_config(volumes, epochs=6, lr=1e-12, early_stop_patience=2)
    reports = train(cfg, tmp_path / "ckpt")
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert [r["early_stopped"] for r in reports] == [0.0, 0.0, 1.0]


def test_resume_continues_exactly(volumes, tmp_path):
    cfg = tiny_config(volumes, epochs=3, head_epochs=1, mixup_alpha=0.2)
    full = train(cfg, tmp_path / "full")
    stopped = train(apply_overrides(cfg, {"epochs": 1}), tmp_path / "part")
    assert len(stopped) == 1
    resumed = train(cfg, tmp_path / "part")  # same folder: LocalSeam hands the loop its checkpoint
    assert [r["epoch"] for r in resumed] == [2, 3] and resumed[0]["resumed_at_epoch"] == 1
    for key in ("train_loss", "val_loss", "slice_acc"):
        assert resumed[-1][key] == pytest.approx(full[-1][key], rel=1e-5), key
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_the_weight_average_is_validated_handed_over_and_resumed(volumes, tmp_path):
    """ema_decay: validation and model.pt are the average (with BatchNorm statistics of its own weights),
    training goes on from the raw weights, and a resumed run ends where an uninterrupted one does."""
    cfg = tiny_config(volumes, epochs=3, head_epochs=1, ema_decay=0.9, restore_best=False)
    full = train(cfg, tmp_path / "full")
    train(apply_overrides(cfg, {"epochs": 1}), tmp_path / "part")
    steps_per_epoch = torch.load(tmp_path / "part" / "train_state.pt", weights_only=True)["ema_steps"]
    resumed = train(cfg, tmp_path / "part")
    assert [r["epoch"] for r in resumed] == [2, 3] and resumed[0]["resumed_at_epoch"] == 1
    for key in ("train_loss", "val_loss", "slice_acc"):
        assert resumed[-1][key] == pytest.approx(full[-1][key], rel=1e-5), key
    handed_over = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    state = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    assert steps_per_epoch > 0 and state["ema_steps"] == 3 * steps_per_epoch  # one update per step
    assert all(torch.equal(handed_over[k], state["ema"][k]) for k in handed_over)
    assert not all(torch.equal(handed_over[k], state["model"][k]) for k in handed_over)
    resumed_model = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(
        torch.allclose(handed_over[k].float(), resumed_model[k].float(), atol=1e-6) for k in resumed_model
    )
    # the raw model validated gives another loss: the reports were the average's
    raw = train(apply_overrides(cfg, {"ema_decay": 0.0}), tmp_path / "raw")
    assert raw[-1]["val_loss"] != pytest.approx(full[-1]["val_loss"], rel=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match="batch_size"):
        ClassifierConfig(batch_size=7).validate()
    with pytest.raises(UserError, match="context"):
        ClassifierConfig(context=1, in_chans=1).validate()
    with pytest.raises(UserError, match="crop"):
        ClassifierConfig(crop="tight").validate()
    with pytest.raises(UserError, match="axes"):
        ClassifierConfig(axes="3").validate()
    with pytest.raises(UserError, match="ema_decay"):
        ClassifierConfig(ema_decay=1.0).validate()
