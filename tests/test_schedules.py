"""Learning-rate schedules: the per-step factor against hand-computed values and torch's own schedulers;
the linear scaling rule; one optimizer step per `accumulate_steps` batches."""

import math

import pytest
import torch

from datasets.errors import UserError
from trainers.config import MaskRCNNConfig, apply_overrides
from trainers.detection.train import build_optimizer, build_scheduler, scaled_lr, train_one_epoch
from trainers.schedules import lr_factor


def factors(overrides: dict, steps: int, steps_per_epoch: int = 10) -> list[float]:
    cfg = apply_overrides(MaskRCNNConfig(), overrides)
    return [lr_factor(cfg, s, steps_per_epoch) for s in range(steps)]


def test_constant_by_default():
    assert factors({}, 5) == [1.0] * 5


def test_step_decay_at_epochs_and_at_iterations():
    # 10 steps per epoch: epochs 2 and 3 begin at steps 20 and 30
    got = factors({"lr_steps": "2,3", "lr_gamma": 0.1}, 40)
    assert got[:20] == [1.0] * 20
    assert got[20:30] == pytest.approx([0.1] * 10)
    assert got[30:] == pytest.approx([0.01] * 10)
    got = factors({"lr_step_iters": "3,5", "lr_gamma": 0.5}, 7)
    assert got == pytest.approx([1, 1, 1, 0.5, 0.5, 0.25, 0.25])


def test_multiplicative_decay_every_n_iterations_from_m():
    # Sartorius: x0.8 every 1000 iterations from iteration 2000
    cfg = apply_overrides(
        MaskRCNNConfig(), {"lr_decay_every": 1000, "lr_decay_start": 2000, "lr_decay_factor": 0.8}
    )
    expected = {0: 1.0, 1999: 1.0, 2000: 0.8, 2999: 0.8, 3000: 0.64, 4000: 0.512, 9999: 0.8**8}
    for step, value in expected.items():
        assert lr_factor(cfg, step, steps_per_epoch=243) == pytest.approx(value), step


def test_linear_warmup_then_step():
    got = factors({"warmup_iters": 4, "lr_step_iters": "6"}, 8)
    warm = [1e-3 + (1 - 1e-3) * s / 4 for s in range(4)]
    assert got == pytest.approx(warm + [1.0, 1.0, 0.1, 0.1])


@pytest.mark.parametrize("mult", [1, 2])
def test_cosine_warm_restarts_matches_torch(mult):
    steps_per_epoch, lr, lr_min = 5, 0.1, 0.001
    cfg = apply_overrides(
        MaskRCNNConfig(),
        {"lr": lr, "cosine_period_epochs": 2, "cosine_period_mult": mult, "lr_min": lr_min},
    )
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=mult, eta_min=lr_min)
    expected = []
    for _ in range(45):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    got = [lr * lr_factor(cfg, s, steps_per_epoch) for s in range(45)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # by hand: the middle of the first period is halfway between lr and lr_min; a restart returns to lr
    assert got[5] == pytest.approx((lr + lr_min) / 2)
    assert got[10] == pytest.approx(lr)
    assert got[9] == pytest.approx(lr_min + (lr - lr_min) * (1 + math.cos(math.pi * 9 / 10)) / 2)


def test_phase_lr_factor_applies_from_its_epoch():
    got = factors({"epochs": 4, "phases": "1:3,3:5:0.1"}, 40)
    assert got[:30] == [1.0] * 30 and got[30:] == pytest.approx([0.1] * 10)


def test_scheduler_steps_the_optimizer_lr():
    cfg = apply_overrides(MaskRCNNConfig(), {"lr": 0.5, "lr_step_iters": "2", "lr_gamma": 0.1})
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05])


def test_linear_scaling_rule():
    cfg = apply_overrides(MaskRCNNConfig(), {"lr": 0.02, "batch_size": 2})
    assert scaled_lr(cfg, world_size=8) == 0.02  # off by default
    cfg = apply_overrides(cfg, {"lr_reference_batch": 16, "accumulate_steps": 2})
    assert scaled_lr(cfg, world_size=4) == pytest.approx(0.02 * (2 * 4 * 2) / 16)
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.02 * 4 / 16)
    opt = build_optimizer(cfg, torch.nn.Linear(2, 1), world_size=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)


class _TinyDetector(torch.nn.Module):
    """Stands in for Mask R-CNN in train_one_epoch: (images, targets) -> dict of losses."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        x = torch.stack([img.mean() for img in images])
        return {"loss_a": ((self.w * x - 1) ** 2).mean()}


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    return [([torch.rand(3, 4, 4, generator=g)], [{"boxes": torch.zeros(0, 4)}]) for _ in range(n)]


@pytest.mark.parametrize("accumulate, batches, expected_steps", [(1, 6, 6), (3, 6, 2), (4, 6, 2), (2, 5, 3)])
def test_accumulation_steps_once_per_group(accumulate, batches, expected_steps):
    model = _TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_one_epoch(
        model, opt, _batches(batches), "cpu", scheduler=sched, accumulate_steps=accumulate
    )
    assert len(calls) == expected_steps == stats["optimizer_steps"]
    assert sched.last_epoch == expected_steps and stats["images"] == batches


def test_accumulated_gradient_is_the_mean_of_the_group():
    data = _batches(4)
    big = _TinyDetector()
    loss = sum(big(images, targets)["loss_a"] for images, targets in data) / 4
    loss.backward()
    model = _TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves w alone, grads stay readable
    opt.zero_grad = lambda set_to_none=True: None  # keep the gradient after the step to inspect it
    train_one_epoch(model, opt, data, "cpu", accumulate_steps=4)
    assert model.w.grad == pytest.approx(big.w.grad)


def test_fp16_on_cpu_is_a_user_error_naming_the_field_and_bf16_runs():
    from trainers.detection.train import autocast_dtype

    cfg = apply_overrides(MaskRCNNConfig(), {"amp": "fp16"})
    with pytest.raises(UserError, match="amp"):
        autocast_dtype(cfg, torch.device("cpu"))
    assert autocast_dtype(apply_overrides(cfg, {"amp": "bf16"}), torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype(apply_overrides(cfg, {"amp": "off"}), torch.device("cpu")) is None
    with pytest.raises(UserError, match="amp: unknown value"):
        apply_overrides(cfg, {"amp": "fp8"})
