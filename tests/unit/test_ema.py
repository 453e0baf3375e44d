"""The weight average (model/ema.py) against its closed form on a recorded trajectory."""

import pytest
import torch

from model.ema import WeightAverage


def test_after_n_updates_the_shadow_is_the_closed_form_average_of_the_trajectory():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 0.8
    average = WeightAverage(decay)
    average.track(model.named_parameters())
    trajectory = [model.weight.detach().clone()]
    for _ in range(6):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        average.update(model.named_parameters())
        trajectory.append(model.weight.detach().clone())
    n = len(trajectory) - 1
    closed = decay**n * trajectory[0] + sum(
        (1 - decay) * decay ** (n - k) * trajectory[k] for k in range(1, n + 1)
    )
    torch.testing.assert_close(average.shadows["weight"], closed, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(average.shadows["weight"], model.weight)


def test_applied_puts_the_shadows_in_and_the_raw_weights_back():
    model = torch.nn.Linear(2, 2)
    average = WeightAverage(0.5)
    average.track(model.named_parameters())
    raw = model.weight.detach().clone()
    average.shadows["weight"] += 1.0
    with average.applied(model):
        torch.testing.assert_close(model.weight.detach(), raw + 1.0)
    assert torch.equal(model.weight.detach(), raw)
    average.reset(model.named_parameters())
    assert torch.equal(average.shadows["weight"], raw)


def test_a_decay_outside_the_open_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay must lie in"):
        WeightAverage(1.0)
