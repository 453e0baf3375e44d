"""The one rectified-flow module, as FLUX trains and samples: sigmas, noising, loss, the shifted
Euler sampler and classifier-free guidance.

Training: sigma from a logit-normal density moved by FLUX's resolution-dependent shift
(`sample_sigmas`), x_sigma = (1 - sigma) x0 + sigma noise (`add_noise`), and the transformer
regresses the velocity noise - x0 (`velocity_target`, `flow_matching_loss`). Validation uses
fixed sigmas (`fixed_sigmas`). Sampling: N sigmas evenly spaced from 1 to 1/N, shifted, then 0
(`flux_sigmas`); each Euler step moves x along the predicted velocity,
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i); with v = noise - x0 exactly, one step
from sigma 1 lands on x0. `sample` is that sampler with optional guidance
v = v_u + s (v_c - v_u) against the unconditional input. The transformer takes
`timestep = sigma` in [0, 1] (it multiplies by 1000 itself).

Legend: B batch, L packed tokens, P (or C) packed channels, T fixed timesteps, N steps.
Noise/data/target tensors may have any shape [B, ...]; the names say the packed case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity(x_BLC, sigmas_B) -> the predicted velocity [B, L, C]."""


def resolution_shift_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's shift mu: linear in the packed token count, base_shift at 256, max_shift at 4096."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(timesteps_T: torch.Tensor, *, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift exp(mu) / (exp(mu) + (1/t - 1)); mu = 0 is the identity."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / timesteps_T - 1.0))


def sample_sigmas(
    batch_size: int,
    *,
    mu: float,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """[B] float32 training sigmas: u ~ N(mean, std), t = sigmoid(u), sigma = time_shift(t, mu).

    time_shift(sigmoid(u), mu) == sigmoid(u + mu) exactly; the sigmoid form never hits 1/0 in
    float32, so sigmas stay in (0, 1). Draws on the generator's device.
    """
    logits_B = torch.randn(batch_size, generator=generator, device=generator.device)
    return torch.sigmoid(logits_B * logit_std + logit_mean + mu)


def fixed_sigmas(timesteps: Sequence[float], *, mu: float = 0.0) -> torch.Tensor:
    """[T] float32 sigmas for deterministic validation: given t in (0, 1), shifted by mu."""
    timesteps_T = torch.tensor(list(timesteps), dtype=torch.float32)
    if not bool(((timesteps_T > 0) & (timesteps_T < 1)).all()):
        raise ValueError(f"fixed_sigmas: timesteps must lie in (0, 1), got {list(timesteps)}")
    return time_shift(timesteps_T, mu=mu)


def _broadcast(sigmas_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas_B.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(
    data_BLP: torch.Tensor, *, noise_BLP: torch.Tensor, sigmas_B: torch.Tensor
) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, sigma broadcast over all but the batch dim."""
    sigmas = _broadcast(sigmas_B, data_BLP)
    return (1.0 - sigmas) * data_BLP + sigmas * noise_BLP


def velocity_target(data_BLP: torch.Tensor, *, noise_BLP: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma = noise - x0: what the transformer predicts."""
    return noise_BLP - data_BLP


def flow_matching_loss(
    prediction_BLP: torch.Tensor,
    *,
    target_BLP: torch.Tensor,
    weights_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar MSE: mean over each sample's elements, then mean over the batch (each sample's
    error times weights_B when given; None means uniform weights of 1)."""
    # fp32 here: a bf16 mean over ~64K elements per sample loses the small differences.
    error_B = (prediction_BLP.float() - target_BLP.float()).pow(2).flatten(1).mean(dim=1)
    if weights_B is not None:
        error_B = error_B * weights_B.float()
    return error_B.mean()


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


def guided(conditional: VelocityFn, unconditional: VelocityFn | None, scale: float) -> VelocityFn:
    """The velocity the sampler follows: `conditional` at scale 1 (one network call per step),
    else classifier-free guidance against `unconditional`."""
    if scale == 1.0:
        return conditional
    if unconditional is None:
        raise ValueError(f"cfg scale {scale} needs an unconditional velocity")
    return partial(
        guided_velocity, conditional=conditional, unconditional=unconditional, scale=float(scale)
    )


def sample(
    velocity: VelocityFn,
    noise_BLC: torch.Tensor,
    *,
    num_steps: int,
    unconditional: VelocityFn | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Packed latents [B, L, C] from packed noise: `num_steps` Euler steps on FLUX's shifted
    sigmas (shift from L), guided by `cfg_scale` against `unconditional`."""
    sigmas_N1 = flux_sigmas(num_steps, mu=resolution_shift_mu(noise_BLC.shape[1]))
    return euler_sample(
        guided(velocity, unconditional, cfg_scale),
        noise_BLC,
        sigmas_N1=sigmas_N1.to(noise_BLC.device),
    )
