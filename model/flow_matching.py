"""Rectified flow matching as FLUX trains it: latent packing, position ids, sigmas, noise, loss.

Inputs: RAW VAE latents [B, 16, H, W] (the data pipeline stores them before FLUX's shift and
scale). Outputs: packed tokens [B, L, 64] for FluxTransformer2DModel, its position ids, shifted
sigmas in (0, 1), noisy latents x_t = (1 - s) x0 + s noise and the velocity target noise - x0.
The transformer takes `timestep = sigma` in [0, 1] (it multiplies by 1000 itself).

Legend: B batch, C latent channels, H/W latent height/width (pixels / 8), L packed tokens
(H/2 * W/2), P packed channels (C * 4), T fixed timesteps. Noise/data/target tensors may have any
shape [B, ...]; the names say the packed case.
"""

import math
from collections.abc import Sequence

import torch


def scale_latents(
    raw_BCHW: torch.Tensor, *, scaling_factor: float, shift_factor: float
) -> torch.Tensor:
    """RAW VAE latents -> the scaled latents FLUX denoises: (raw - shift) * scaling."""
    return (raw_BCHW - shift_factor) * scaling_factor


def unscale_latents(
    latents_BCHW: torch.Tensor, *, scaling_factor: float, shift_factor: float
) -> torch.Tensor:
    """Inverse of scale_latents (what the VAE decoder takes)."""
    return latents_BCHW / scaling_factor + shift_factor


def pack_latents(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C * 4]: 2x2 patches in row-major order, each patch's
    channels ordered (c, dy, dx), the layout of diffusers' FluxPipeline."""
    batch, channels, height, width = latents_BCHW.shape
    if height % 2 or width % 2:
        raise ValueError(f"pack_latents: latent size {height}x{width} is not even")
    patches = latents_BCHW.reshape(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents_BLP: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents; height/width are the LATENT size (the H, W of latents_BCHW)."""
    batch, _, packed_channels = latents_BLP.shape
    patches = latents_BLP.reshape(batch, height // 2, width // 2, packed_channels // 4, 2, 2)
    patches = patches.permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed_channels // 4, height, width)


def latent_image_ids(height_latent: int, *, width_latent: int) -> torch.Tensor:
    """[L, 3] float32 rope ids of the packed tokens: (0, row, column) on the H/2 x W/2 grid."""
    rows = torch.arange(height_latent // 2).repeat_interleave(width_latent // 2)
    columns = torch.arange(width_latent // 2).repeat(height_latent // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).float()


def text_ids(length: int) -> torch.Tensor:
    """[L, 3] float32 rope ids of the text tokens: all zeros, as FLUX uses them."""
    return torch.zeros(length, 3)


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
