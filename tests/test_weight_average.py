"""trainers/run.WeightAverage (ema_decay): the exponential moving average of the weights and buffers,
checked against the warm-up decay worked by hand; its state survives a checkpoint; the field is checked."""

import pytest
import torch

from datasets.errors import UserError
from trainers.config import MaskRCNNConfig
from trainers.run import WeightAverage, weight_average


def small_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    return model


def set_values(model, weight: float, mean: float, batches: int) -> None:
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[1].running_mean.fill_(mean)
        model[1].num_batches_tracked.fill_(batches)


def test_the_average_follows_the_warm_up_decay_worked_by_hand():
    model = small_model()
    set_values(model, 1.0, 10.0, 1)
    average = WeightAverage(model, decay=0.5)
    weights, means = [1.0, 3.0, 5.0], [10.0, 20.0, 40.0]
    for step, (w, m) in enumerate(zip(weights, means, strict=True), start=1):
        set_values(model, w, m, step)
        average.update(model)
    # step 1 copies; step k > 1 keeps 1 - k^(-2/3) of the average, at most the decay 0.5:
    # step 2: 0.370; step 3: 1 - 3^(-2/3) = 0.519, capped at 0.5
    d2 = 1 - 2 ** (-2 / 3)
    expected_w = 0.5 * (d2 * 1.0 + (1 - d2) * 3.0) + 0.5 * 5.0  # 3.630
    expected_m = 0.5 * (d2 * 10.0 + (1 - d2) * 20.0) + 0.5 * 40.0  # 28.15
    assert expected_w == pytest.approx(3.630, abs=1e-3) and expected_m == pytest.approx(28.15, abs=1e-2)
    assert average.model[0].weight.item() == pytest.approx(expected_w, rel=1e-6)
    assert average.model[1].running_mean.item() == pytest.approx(expected_m, rel=1e-6)  # buffers too
    assert average.model[1].num_batches_tracked.item() == 3  # a count is copied, not averaged
    assert model[0].weight.item() == 5.0  # the trained model keeps its own weights


def test_the_state_restores_the_average_and_its_step():
    model = small_model()
    average = WeightAverage(model, decay=0.9)
    for w in (1.0, 2.0, 4.0):
        set_values(model, w, w, 1)
        average.update(model)
    restored = WeightAverage(small_model(), decay=0.9)
    restored.load(average.state())
    assert restored.steps == 3
    set_values(model, 8.0, 8.0, 1)
    average.update(model)
    restored.update(model)  # the same step (the same decay) after the restore
    assert restored.model[0].weight.item() == pytest.approx(average.model[0].weight.item(), rel=1e-7)


def test_zero_is_off_and_a_decay_of_one_is_refused():
    assert weight_average(0.0, small_model()) is None
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UserError, match="ema_decay: expected 0 \\(off\\) or a decay in \\(0, 1\\)"):
            MaskRCNNConfig(ema_decay=bad).validate()
