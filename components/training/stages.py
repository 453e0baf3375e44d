"""One progressive stage of the fine-tune: which FLUX blocks train, for how many updates, and the
shape of its trapezoidal learning rate. The report's three stages are three values of it
(pipelines/configs/*.toml); the loop (components/training/loop.py) walks them in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.flux_stages import check_parts


@dataclass(frozen=True, kw_only=True, slots=True)
class StageConfig:
    """One progressive stage: which FLUX blocks train and for how long."""

    name: str
    """Stage name (MLflow child run name, checkpoint tag)."""
    num_steps: int
    """Optimizer updates in this stage."""
    flux_blocks: tuple[int, ...]
    """Trainable FLUX blocks, indexed 0..56 (double blocks first); the report's lists."""
    warmup_steps: int = 0
    """Linear warm-up updates at the start of the stage's trapezoid."""
    decay_steps: int = 0
    """Linear decay updates at the end of the stage's trapezoid."""
    flux_parts: tuple[str, ...] = ("all",)
    """Which parts of the listed blocks train (model/flux_stages.py: FLUX_PARTS): ["all"], or
    e.g. ["attention"] or ["attention", "mlp"]; the rest of those blocks stays frozen."""

    def __post_init__(self) -> None:
        check_parts(self.flux_parts)
        if self.num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if not self.flux_blocks or len(set(self.flux_blocks)) != len(self.flux_blocks):
            raise ValueError("flux_blocks must list distinct block indices")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > self.num_steps:
            raise ValueError("warmup_steps + decay_steps must not exceed num_steps")
