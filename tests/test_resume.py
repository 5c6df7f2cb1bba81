"""A run stopped after an epoch and resumed from its checkpoint ends exactly where an uninterrupted run
does: same weights, same losses (CPU ops are deterministic here; GPU ops may not be), with or without the
weight average."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.augment import augmentation
from trainers.config import apply_overrides
from trainers.detection.train import run_training
from trainers.ray_seam import LocalSeam
from trainers.recipes import get_recipe
from trainers.run import seed_epoch

SMALL = {"min_size": 128, "max_size": 160, "anchor_sizes": "8,16,32,64,128", "batch_size": 1}


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def on_report(metrics: dict) -> None:
        if metrics["epoch"] == epoch:
            raise Stop  # after the checkpoint of `epoch` is written, as a killed run would be

    return on_report


@pytest.mark.parametrize(
    "overrides",
    [{"augment": "foram"}, {"augment": "foram", "ema_decay": 0.9, "restore_best": False, "epochs": 2}],
    ids=["raw", "weight-average"],
)
def test_resumed_run_equals_uninterrupted_run(tiny_dataset, tmp_path, overrides):
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"), {**SMALL, "data": str(tiny_dataset), "epochs": 3, **overrides}
    )
    straight = LocalSeam(checkpoint_dir=tmp_path / "straight")
    run_training(cfg, straight)

    stopped = LocalSeam(checkpoint_dir=tmp_path / "resumed", on_report=stop_after(1))
    with pytest.raises(Stop):
        run_training(cfg, stopped)
    resumed = LocalSeam(checkpoint_dir=tmp_path / "resumed")
    run_training(cfg, resumed)

    assert [r["epoch"] for r in resumed.reports] == list(range(2, cfg.epochs + 1))
    assert resumed.reports[0]["resumed_at_epoch"] == 1
    for a, b in zip(straight.reports[1:], resumed.reports, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["segm_AP"] == pytest.approx(b["segm_AP"], abs=1e-6)
    final_a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    final_b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key, value in final_a.items():
        torch.testing.assert_close(value, final_b[key], rtol=1e-5, atol=1e-6, msg=key)
    if cfg.ema_decay:  # the run hands over (and validated) the average, and training went on from its own
        state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
        assert state["ema_steps"] == sum(r["train_optimizer_steps"] for r in straight.reports)
        assert all(torch.equal(final_b[k], state["ema"][k]) for k in final_b)
        assert not all(torch.equal(final_b[k], state["model"][k]) for k in final_b)


def test_seed_epoch_streams_differ_by_epoch_and_rank_and_repeat_exactly():
    """Reseeding per epoch must not replay one epoch's randomness every epoch, nor share it across ranks."""
    transform = augmentation("foram", 0)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    generator = torch.Generator()
    loader = DataLoader(range(16), batch_size=16, shuffle=True, generator=generator)

    def draw(rank: int, epoch: int):
        seed_epoch(0, rank, epoch, generator, transform)
        return next(iter(loader)).tolist(), transform(image=image)["image"].tobytes(), torch.rand(1).item()

    assert draw(0, 3) == draw(0, 3)
    order, augmented, sample = draw(0, 3)
    for other in (draw(0, 4), draw(1, 3)):
        assert other[0] != order and other[1] != augmented and other[2] != sample
