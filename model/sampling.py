"""FLUX's flow-matching Euler sampler and classifier-free guidance of its velocity.

The schedule is FLUX's: N sigmas evenly spaced from 1 to 1/N, moved by the resolution-dependent
time shift, then a final 0; each step moves x along the predicted velocity:
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i). With v = noise - x0 exactly, one
step from sigma 1 lands on x0.

Legend: B batch, L packed image tokens, C packed channels, N steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.flow_matching import time_shift


def flux_sigmas(num_steps: int, *, mu: float) -> torch.Tensor:
    """[N + 1] decreasing sigmas from ~1 to 0 with FLUX's shift `mu`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base_N = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted_N = time_shift(base_N, mu=mu)
    return torch.cat([shifted_N, shifted_N.new_zeros(1)]).to(torch.float32)


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_BLC: torch.Tensor,
    *,
    sigmas_N1: torch.Tensor,
    start_index: int = 0,
) -> torch.Tensor:
    """Integrate from sigmas_N1[start_index] down to 0; `velocity(x_BLC, sigmas_B)` predicts.

    start_index > 0 starts part-way (img2img: noise_BLC must then already be the noised image).
    """
    sample_BLC = noise_BLC
    batch_size = noise_BLC.shape[0]
    for index in range(start_index, len(sigmas_N1) - 1):
        sigma, next_sigma = sigmas_N1[index], sigmas_N1[index + 1]
        velocity_BLC = velocity(sample_BLC, sigma.expand(batch_size))
        sample_BLC = sample_BLC + (next_sigma - sigma) * velocity_BLC
    return sample_BLC


def guided_velocity(
    sample_BLC: torch.Tensor,
    sigmas_B: torch.Tensor,
    *,
    conditional: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    unconditional: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Classifier-free guidance of a velocity: v_u + scale * (v_c - v_u) (scale 1 = v_c, 0 = v_u;
    bind the two predictors with functools.partial to get a `velocity` for the samplers)."""
    unconditional_BLC = unconditional(sample_BLC, sigmas_B)
    return unconditional_BLC + scale * (conditional(sample_BLC, sigmas_B) - unconditional_BLC)
