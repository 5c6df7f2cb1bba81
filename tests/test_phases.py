"""Per-phase trainable layers: which parameters train in each epoch, validation, and a real 2-epoch run in
which the second phase freezes the backbone and its weights stop changing."""

import pytest
import torch

from datasets.errors import UserError
from trainers.config import apply_overrides
from trainers.detection.model import build_model, checkpoint_settings
from trainers.detection.train import run_training, seed_everything
from trainers.evaluation import SCORE_CUTOFFS
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe
from trainers.schedules import max_trainable_layers, phase_at, set_trainable_layers

TINY = {"min_size": 128, "max_size": 160, "anchor_sizes": "8,16,32,64,128"}


def trainable_stages(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layers", range(6))
def test_same_trainable_parameters_as_torchvision(layers):
    cfg = apply_overrides(get_recipe("dsb2018_demo"), {**TINY, "trainable_backbone_layers": layers})
    model = build_model(cfg, num_classes=1)
    by_torchvision = {n for n, p in model.named_parameters() if p.requires_grad}
    set_trainable_layers(model, 5)
    set_trainable_layers(model, layers)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == by_torchvision


def test_trainable_stages_per_epoch_dsb2018_phases():
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {**TINY, "epochs": 100, "trainable_backbone_layers": 0, "phases": "40:2,80:5:0.1"},
    )
    model = build_model(cfg, num_classes=1)
    expected = {
        0: set(),  # heads only (FPN, RPN and ROI heads always train)
        39: set(),
        40: {"layer3", "layer4"},  # Matterport's "4+" = ResNet stage 4 and 5 = torchvision layer3, layer4
        79: {"layer3", "layer4"},
        80: {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"},
        99: {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"},
    }
    for epoch, stages in expected.items():
        set_trainable_layers(model, phase_at(cfg, epoch)[0])
        assert trainable_stages(model) == stages, epoch
        assert all(p.requires_grad for p in model.backbone.fpn.parameters())
        assert all(p.requires_grad for p in model.roi_heads.parameters())
    assert [phase_at(cfg, e)[1] for e in (0, 40, 80)] == [1.0, 1.0, 0.1]
    assert max_trainable_layers(cfg) == 5


@pytest.mark.parametrize(
    "phases, message",
    [
        ("25", "not EPOCH:TRAINABLE_LAYERS"),
        ("a:1", "not EPOCH:TRAINABLE_LAYERS"),
        ("5:7", "trains 7 backbone stages"),
        ("5:1:0", "lr factor"),
        ("-1:1", "negative epoch"),
        ("5:1,5:2", "two phases start at epoch 5"),
    ],
)
def test_bad_phases_name_the_field(phases, message):
    with pytest.raises(UserError, match=f"phases: .*{message}"):
        apply_overrides(get_recipe("dsb2018_demo"), {"phases": phases})


def test_second_phase_freezes_the_backbone(tiny_dataset, tmp_path):
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {**TINY, "data": str(tiny_dataset), "epochs": 2, "batch_size": 1, "phases": "1:0"},
    )
    seed_everything(cfg.seed)  # run_training seeds the same way before it builds the model
    initial = build_model(cfg, num_classes=1).state_dict()
    snapshots = []
    ckpt = tmp_path / "ckpt"

    def on_report(metrics):  # the weights training continues from (model.pt is the best epoch's)
        snapshots.append(torch.load(ckpt / "train_state.pt", weights_only=True)["model"])

    run_training(cfg, LocalSeam(checkpoint_dir=ckpt, on_report=on_report))
    assert len(snapshots) == 2
    body = [k for k in initial if k.startswith("backbone.body.")]
    heads = [k for k in initial if k.startswith("roi_heads.") and "weight" in k]
    assert body and heads

    def changed(a, b, keys):
        return [k for k in keys if not torch.equal(a[k], b[k])]

    assert changed(initial, snapshots[0], body)  # epoch 0: all five stages train
    assert changed(snapshots[0], snapshots[1], body) == []  # epoch 1: the backbone is frozen
    assert changed(snapshots[0], snapshots[1], heads)  # ... while the heads keep learning


def test_the_run_hands_over_its_best_epoch_and_stops_early(tiny_dataset, tmp_path):
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {**TINY, "data": str(tiny_dataset), "epochs": 4, "batch_size": 1, "early_stop_patience": 1},
    )
    reports, latest = [], []
    ckpt = tmp_path / "ckpt"

    def on_report(metrics):
        reports.append(metrics)
        latest.append(torch.load(ckpt / "train_state.pt", weights_only=True)["model"])

    run_training(cfg, LocalSeam(checkpoint_dir=ckpt, on_report=on_report))
    aps = [r["segm_AP"] for r in reports]
    best = reports[-1]["best_epoch"]
    assert aps[best - 1] == max(aps) and aps.index(max(aps)) == best - 1  # the first epoch of the best value
    assert reports[-1]["best_segm_AP"] == max(aps)
    # stopped one epoch after its best, unless the last epoch came first
    assert len(reports) == min(best + 1, cfg.epochs)
    assert bool(reports[-1]["early_stopped"]) == (len(reports) < cfg.epochs)
    handed_over = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.equal(handed_over[k], latest[best - 1][k]) for k in handed_over)
    # with the operating point chosen for those weights: the best epoch's, not the last one's
    cuts = [r["score_threshold"] for r in reports]
    assert set(cuts) <= set(SCORE_CUTOFFS)
    assert checkpoint_settings(ckpt)[0].score_threshold == cuts[best - 1]
