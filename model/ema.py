"""Exponential moving average of weights: shadow <- decay * shadow + (1 - decay) * weight.

`WeightAverage` keeps one shadow per parameter name, created as a copy of the parameter the
first time it is tracked (a parameter that has not trained yet has been constant, so its average
is itself). `update` applies one step to every tracked shadow. After N updates from theta_0 the
shadow is decay^N * theta_0 + sum_k (1 - decay) * decay^(N - k) * theta_k. Under FSDP2 a
parameter is a DTensor shard and its shadow a DTensor sharded the same way: each worker averages
its own rows, no communication.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The worker's own rows of a DTensor (or the tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class WeightAverage:
    """EMA shadows of named parameters; see the module docstring."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadows: dict[str, torch.Tensor] = {}

    def track(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Start a shadow (a copy of the weight) for every name not tracked yet."""
        with torch.no_grad():
            for name, param in named:
                if name not in self.shadows:
                    self.shadows[name] = param.detach().clone()

    def reset(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Set the shadows of `named` to the weights (an average that has not started)."""
        with torch.no_grad():
            for name, param in named:
                _local(self.shadows[name]).copy_(_local(param.detach()))

    def update(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """One step for the shadows of `named`: shadow += (1 - decay) * (weight - shadow)."""
        pairs = [(self.shadows[name], param) for name, param in named]
        if not pairs:
            return
        with torch.no_grad():
            torch._foreach_lerp_(
                [_local(shadow) for shadow, _ in pairs],
                [_local(param.detach()) for _, param in pairs],
                1.0 - self.decay,
            )

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the tracked parameters of `model` hold their shadows; the raw
        weights come back after (validation on the averaged weights)."""
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            raw = {name: _local(parameters[name].detach()).clone() for name in self.shadows}
            for name, shadow in self.shadows.items():
                _local(parameters[name].detach()).copy_(_local(shadow))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, weight in raw.items():
                    _local(parameters[name].detach()).copy_(weight)
