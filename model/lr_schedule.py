"""Learning-rate schedule of the report: trapezoidal (linear warm-up, constant, linear decay).

`trapezoid_factor(step)` multiplies the base learning rate; steps count optimizer updates from 0
within one stage. Each stage has its own trapezoid.
"""

from __future__ import annotations


def trapezoid_factor(step: int, *, num_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Factor in [0, 1] for optimizer step `step` (0-based) of a stage of `num_steps` updates.

    Warm-up rises linearly to 1 over `warmup_steps` (the first update already gets 1/warmup),
    decay falls linearly over the last `decay_steps` (the last update gets 1/decay).
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step {step} outside the stage's 0..{num_steps - 1}")
    if warmup_steps + decay_steps > num_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) exceed num_steps "
            f"({num_steps})"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = num_steps - step
    if remaining <= decay_steps:
        return remaining / decay_steps
    return 1.0
