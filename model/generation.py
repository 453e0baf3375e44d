"""The maths of the generation modes: latent sizes, attention-focus weights, img2img start, inpaint.

Pure torch, no I/O. components/inference/generator.py composes these with the encoders, the
connector and FLUX. Focus weights multiply the reference image's token states, which Qwen2-VL lays
out row-major on the merged grid (grid_thw's h/merge x w/merge). img2img starts the Euler sampler
part-way down FLUX's sigmas from the init latent noised as rectified flow does, x = (1 - s) x0 + s
noise; inpaint also resets the kept (unmasked) latents to the init latent at the next sigma after
each step.

Legend: B batch, L packed latent tokens, C packed channels, N steps, H/W pixel or latent sizes
(named), G grid tokens (rows x columns of the merged image-token grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from model.latent_codec import pack_latents
from model.rectified_flow import add_noise, euler_sample

LATENT_SIDE_MULTIPLE = 16
"""Pixel sides must divide by the VAE's /8 and then FLUX's 2x2 packing."""


def latent_size(width: int, height: int, *, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(latent_height, latent_width) of a width x height image; sides must be multiples of
    2 * vae_scale_factor (16 for FLUX's VAE) so the latent packs into 2x2 patches."""
    multiple = 2 * vae_scale_factor
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise ValueError(
            f"image size {width}x{height}: sides must be multiples of {multiple} and >= {multiple}"
        )
    return height // vae_scale_factor, width // vae_scale_factor


def num_packed_tokens(latent_height: int, latent_width: int) -> int:
    """Packed FLUX image tokens of a latent (2x2 patches): what the resolution shift depends on."""
    return (latent_height // 2) * (latent_width // 2)


def merged_grid(grid_thw: Sequence[int], *, merge_size: int) -> tuple[int, int]:
    """(rows, columns) of an image's tokens after Qwen2-VL's merge_size x merge_size merge."""
    temporal, height, width = (int(value) for value in grid_thw)
    if temporal != 1 or height % merge_size or width % merge_size:
        raise ValueError(f"grid_thw {tuple(grid_thw)} is not a single image's merged grid")
    return height // merge_size, width // merge_size


def circle_focus_weights(
    grid_height: int, grid_width: int, *, center_x: float, center_y: float, radius: float
) -> torch.Tensor:
    """[G] float32 radial weights, row-major: clip(1 - d / (radius * min side), 0, 1).

    d is the distance in token units from (center_x * grid_width, center_y * grid_height) to the
    token centre (column + 0.5, row + 0.5); centre and radius are fractions of the image.
    """
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    rows_G = torch.arange(grid_height, dtype=torch.float64).repeat_interleave(grid_width) + 0.5
    columns_G = torch.arange(grid_width, dtype=torch.float64).repeat(grid_height) + 0.5
    distance_G = torch.hypot(columns_G - center_x * grid_width, rows_G - center_y * grid_height)
    weights_G = 1.0 - distance_G / (radius * min(grid_height, grid_width))
    return weights_G.clamp(0.0, 1.0).to(torch.float32)


def grid_focus_weights(
    grid_height: int,
    grid_width: int,
    *,
    rows: int,
    columns: int,
    cells: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """[G] float32, row-major: 1 where the token's centre lies in a marked (row, column) cell of a
    rows x columns grid laid over the image, else 0. A centre exactly on a cell border belongs to
    the cell below / to the right."""
    marked = {(int(row), int(column)) for row, column in cells}
    weights = []
    for token_row in range(grid_height):
        # floor((row + 0.5) / grid_height * rows) in integers: no float rounding at borders.
        cell_row = (2 * token_row + 1) * rows // (2 * grid_height)
        for token_column in range(grid_width):
            cell_column = (2 * token_column + 1) * columns // (2 * grid_width)
            weights.append(1.0 if (cell_row, cell_column) in marked else 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def apply_focus(tokens_GD: torch.Tensor, weights_G: torch.Tensor) -> torch.Tensor:
    """Multiply each image-token state by its focus weight (cast to the states' dtype/device)."""
    if tokens_GD.shape[0] != weights_G.shape[0]:
        raise ValueError(
            f"{tokens_GD.shape[0]} image tokens but {weights_G.shape[0]} focus weights"
        )
    return tokens_GD * weights_G.to(tokens_GD)[:, None]


def img2img_start_index(num_steps: int, strength: float) -> int:
    """First sigma index of an img2img run of num_steps with strength in (0, 1]: diffusers'
    FluxImg2ImgPipeline rule t_start = int(max(N - min(N * strength, N), 0)); strength 1 starts
    from pure noise (0) and any strength > 0 runs at least one step (index <= N - 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < strength <= 1.0 or math.isnan(strength):
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    init_steps = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_steps, 0))


def repaint_mask(mask_HW: torch.Tensor, *, vae_scale_factor: int = 8) -> torch.Tensor:
    """Pixel mask [H, W] (True = repaint) -> latent mask [H / f, W / f] bool: a latent pixel is
    repainted when ANY pixel of its f x f cell is, so everything the user marked is repainted and
    only wholly-kept cells are held to the init latent."""
    if (
        mask_HW.ndim != 2
        or mask_HW.shape[0] % vae_scale_factor
        or mask_HW.shape[1] % vae_scale_factor
    ):
        raise ValueError(
            f"mask of shape {tuple(mask_HW.shape)} does not tile by {vae_scale_factor}"
        )
    pooled = torch.nn.functional.max_pool2d(
        mask_HW.to(torch.float32)[None, None], kernel_size=vae_scale_factor
    )
    return pooled[0, 0] > 0


def pack_mask(mask_hw: torch.Tensor, *, num_channels: int) -> torch.Tensor:
    """Latent mask [h, w] -> [1, L, C] bool in FLUX's packed layout (same for every channel)."""
    expanded = mask_hw[None, None].expand(1, num_channels, *mask_hw.shape)
    return pack_latents(expanded.contiguous())


def inpaint_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noised_BLC: torch.Tensor,
    *,
    sigmas_N1: torch.Tensor,
    start_index: int,
    init_BLC: torch.Tensor,
    noise_BLC: torch.Tensor,
    repaint_BLC: torch.Tensor,
) -> torch.Tensor:
    """Euler from sigmas_N1[start_index] to 0 (model.rectified_flow.euler_sample, one step at a
    time); after each step the kept entries (repaint_BLC False) are replaced by the init latent
    noised to the next sigma with the same noise, so the last step leaves them equal to
    init_BLC."""
    sample_BLC = noised_BLC
    batch_size = noised_BLC.shape[0]
    for index in range(start_index, len(sigmas_N1) - 1):
        sample_BLC = euler_sample(velocity, sample_BLC, sigmas_N1=sigmas_N1[index : index + 2])
        next_sigma_B = sigmas_N1[index + 1].expand(batch_size)
        kept_BLC = add_noise(init_BLC, noise_BLP=noise_BLC, sigmas_B=next_sigma_B)
        sample_BLC = torch.where(repaint_BLC, sample_BLC, kept_BLC)
    return sample_BLC
