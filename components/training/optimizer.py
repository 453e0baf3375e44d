"""AdamW as the report runs it, its trapezoidal learning rate, and the guard that skips bad steps.

`build_optimizer` puts decay on matrices only; `set_learning_rate` applies a stage's trapezoid
(model/lr_schedule.py) at a step; `StepGuard` judges each step from its loss and gradient norm:
apply it, or skip it (non-finite loss or gradient, or a norm spike against the recent median),
and gives up with TrainingDivergedError after too many skips in a row. Its state is part of a
training checkpoint, so a resumed run judges exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from components.training.stages import StageConfig
from model.lr_schedule import trapezoid_factor


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW as the report runs it (one learning rate for every group)."""

    learning_rate: float = 1e-5
    """Peak learning rate of every parameter group."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not biases or norm scales)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    epsilon: float = 1e-8
    """AdamW denominator epsilon."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class GuardConfig:
    """When a step is skipped instead of applied, and when training gives up."""

    spike_factor: float = 10.0
    """Skip a step whose gradient norm exceeds this many times the recent median."""
    spike_window: int = 20
    """Recent applied steps the median is taken over (needs 5 before it judges)."""
    max_consecutive_skips: int = 5
    """Abort after this many skipped steps in a row."""

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.spike_window < 5 or self.max_consecutive_skips < 1:
            raise ValueError("spike_factor > 1, spike_window >= 5, max_consecutive_skips >= 1")


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or a gradient-norm spike."""


@dataclass
class StepGuard:
    """Decides per step: apply, or skip (non-finite loss / gradient-norm spike)."""

    config: GuardConfig
    recent_norms: list[float] = field(default_factory=list)
    consecutive_skips: int = 0

    def judge(self, loss: float, grad_norm: float) -> str:
        """ "ok", "nonfinite" or "spike"; raises TrainingDivergedError after too many skips."""
        verdict = "ok"
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            verdict = "nonfinite"
        elif len(self.recent_norms) >= 5:
            if grad_norm > self.config.spike_factor * statistics.median(self.recent_norms):
                verdict = "spike"
        if verdict == "ok":
            self.consecutive_skips = 0
            self.recent_norms = (self.recent_norms + [grad_norm])[-self.config.spike_window :]
            return verdict
        self.consecutive_skips += 1
        if self.consecutive_skips > self.config.max_consecutive_skips:
            raise TrainingDivergedError(
                f"{self.consecutive_skips} consecutive skipped steps (last: {verdict}, "
                f"loss {loss}, grad norm {grad_norm})"
            )
        return verdict

    def state_dict(self) -> dict[str, Any]:
        return {"recent_norms": list(self.recent_norms), "skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent_norms = list(state["recent_norms"])
        self.consecutive_skips = int(state["skips"])


def build_optimizer(
    parameters: Sequence[tuple[str, nn.Parameter]], config: OptimizerConfig
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decay on matrices only."""
    decayed = [param for _, param in parameters if param.ndim >= 2]
    plain = [param for _, param in parameters if param.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.epsilon,
    )


def set_learning_rate(
    optimizer: torch.optim.Optimizer, *, stage: StageConfig, step: int, base: float
) -> float:
    """Apply the stage's trapezoid at `step`; returns the learning rate used."""
    rate = base * trapezoid_factor(
        step,
        num_steps=stage.num_steps,
        warmup_steps=stage.warmup_steps,
        decay_steps=stage.decay_steps,
    )
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate
