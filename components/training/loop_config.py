"""What the training loop needs of a training config (pipelines build it from their TrainConfig),
and the settings of its weight average (EMA)."""

from __future__ import annotations

from dataclasses import dataclass

from components.training.objective import ObjectiveConfig
from components.training.optimizer import GuardConfig, OptimizerConfig
from components.training.stages import StageConfig

EMA_TARGETS = ("raw", "ema")


@dataclass(frozen=True, kw_only=True, slots=True)
class EmaConfig:
    """An exponential moving average of every parameter the training has trained so far."""

    decay: float | None = None
    """Per-step decay (e.g. 0.999: the average spans about 1 / (1 - decay) steps); None = no EMA."""
    start_step: int = 0
    """Optimizer steps, counted over all stages, before the average starts; until then the
    shadows follow the weights."""
    validate_on: str = "raw"
    """The weights validation losses and image grids are computed on: "raw" or "ema"."""

    def __post_init__(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must lie in (0, 1), got {self.decay}")
        if self.start_step < 0:
            raise ValueError("ema.start_step must be >= 0")
        if self.validate_on not in EMA_TARGETS:
            raise ValueError(f"ema.validate_on must be one of {list(EMA_TARGETS)}")
        if self.validate_on == "ema" and self.decay is None:
            raise ValueError('ema.validate_on = "ema" needs ema.decay')

    @property
    def enabled(self) -> bool:
        return self.decay is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    """What the loop needs of a training config (pipelines build it from their TrainConfig)."""

    stages: tuple[StageConfig, ...]
    optimizer: OptimizerConfig
    objective: ObjectiveConfig
    guard: GuardConfig
    micro_batch_size: int
    """Samples per worker per forward/backward."""
    accumulation_steps: int
    """Micro-batches per worker per optimizer step (of a fresh training; a resumed one keeps
    the batch layout its checkpoint records)."""
    validate_every_steps: int
    """Optimizer steps between validations (and at each stage's end)."""
    checkpoint_every_steps: int
    """Optimizer steps between checkpoints (and at each stage's end)."""
    seed: int
    """Seed of every draw (batch plans: seed + stage index; step draws: step_generator)."""
    compute_bf16: bool = False
    """bf16 autocast around the forwards; master weights, grads and AdamW states stay fp32."""
    async_checkpoints: bool = False
    """Write checkpoints in the background (host copy first), publishing each when done."""
    ema: EmaConfig = EmaConfig()
