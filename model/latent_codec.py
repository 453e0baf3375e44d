"""The one latent codec: FLUX's view of RAW VAE latents, and the rope ids of its tokens.

RAW latents [B, 16, H, W] (what the data pipeline stores, before FLUX's shift and scale) become
the tokens FLUX denoises in two moves: scale, (raw - shift) * scaling, with the VAE's factors,
then 2x2 packing into [B, H/2 * W/2, 64]. `LatentCodec` holds one VAE's factors (read from a
dataset manifest or a model package) and does both moves and their inverse; the free functions
are the single moves.

Legend: B batch, C latent channels, H/W latent height/width (pixels / 8), L packed tokens
(H/2 * W/2), P packed channels (C * 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LatentCodec:
    """RAW VAE latents <-> FLUX's packed, scaled tokens, for one VAE's shift/scale factors."""

    scaling_factor: float
    shift_factor: float

    def scale(self, raw_BCHW: torch.Tensor) -> torch.Tensor:
        return scale_latents(
            raw_BCHW, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor
        )

    def unscale(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return unscale_latents(
            latents_BCHW, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor
        )

    def encode(self, raw_BCHW: torch.Tensor) -> torch.Tensor:
        """RAW [B, C, H, W] -> scaled, packed [B, L, P]."""
        return pack_latents(self.scale(raw_BCHW))

    def decode(self, packed_BLP: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
        """Packed [B, L, P] at LATENT size height x width -> RAW float32 [B, C, H, W]."""
        return self.unscale(unpack_latents(packed_BLP, height=height, width=width).float())


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
