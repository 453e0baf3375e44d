"""The training objective of one micro-batch, and the fixed validation measurements.

A step's loss: replay Qwen2-VL's last layer on the cached prefix states of the micro-batch, pick
image tokens / caption tokens / both / nothing per sample, project them through the connector
into FLUX, and regress FLUX's velocity (rectified flow, FLUX's resolution shift). Every random
draw comes from a generator seeded by (seed, stage, step, rank, micro index) (`step_generator`),
so a resumed run draws exactly what an uninterrupted one would. Validation: losses at fixed
sigmas with fixed noise, and fixed-seed generations, on the held-out batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.conditioning import (
    CAPTION_ONLY,
    IMAGE_AND_CAPTION,
    Connector,
    assemble_conditioning,
    flux_conditioning,
    image_only_conditioning,
    image_token_states,
    real_token_states,
    unconditional_conditioning,
)
from model.flux_forward import FluxConditioning, predict_velocity
from model.latent_codec import LatentCodec, latent_image_ids, pack_latents
from model.qwen2vl_tail import Qwen2VLTail
from model.rectified_flow import (
    add_noise,
    fixed_sigmas,
    flow_matching_loss,
    resolution_shift_mu,
    sample,
    sample_sigmas,
    velocity_target,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectiveConfig:
    """What each sample is conditioned on and how FLUX is asked to denoise it."""

    guidance: float = 3.5
    """Guidance value fed to FLUX.1-dev's guidance embedding during training. 3.5 is FLUX-dev's
    default at inference and what diffusers' FLUX training scripts feed; feeding 1.0 is known to
    make fine-tunes of the guidance-distilled model drift."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density (before FLUX's resolution shift)."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep density."""
    image_only_probability: float = 0.6
    """Share of samples conditioned on the reference image's tokens alone (variation mode)."""
    caption_only_probability: float = 0.2
    """Share conditioned on the caption prompt's tokens alone (text-to-image)."""
    image_and_caption_probability: float = 0.2
    """Share conditioned on both (image + text guidance)."""
    drop_rate: float = 0.1
    """Probability a sample gets no conditioning tokens (classifier-free guidance)."""
    validation_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Fixed noise levels of the deterministic validation loss."""

    def __post_init__(self) -> None:
        shares = (
            self.image_only_probability,
            self.caption_only_probability,
            self.image_and_caption_probability,
        )
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError("the three conditioning probabilities must be >= 0 and sum to 1")
        if not 0 <= self.drop_rate <= 1:
            raise ValueError("drop_rate must lie in [0, 1]")
        if not self.validation_sigmas or not all(0 < s < 1 for s in self.validation_sigmas):
            raise ValueError("validation_sigmas must be values in (0, 1)")

    @property
    def probabilities(self) -> tuple[float, float, float]:
        return (
            self.image_only_probability,
            self.caption_only_probability,
            self.image_and_caption_probability,
        )


@dataclass(frozen=True, slots=True)
class LatentConvention:
    """Constants of the data and model the loss needs (from the manifest and the base model)."""

    codec: LatentCodec
    """The dataset's VAE shift/scale (its manifest) and FLUX's packing."""
    empty_pooled_P: torch.Tensor
    """CLIP-L pooled vector of the empty prompt: what the released inference code feeds FLUX, and
    what image-only and unconditional samples get here."""


class QwenFluxModel(nn.Module):
    """The trained parts together: encoder tail, connector, FLUX transformer, and for the
    released model's T5 text branch the t5_embedder (T5 width -> FLUX's inner width), which
    makes the caption's FLUX tokens from its cached T5 states instead of the connector."""

    def __init__(
        self,
        tail: Qwen2VLTail,
        connector: Connector,
        transformer: nn.Module,
        t5_embedder: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.tail = tail
        self.connector = connector
        self.transformer = transformer
        self.t5_embedder = t5_embedder

    @property
    def text_branch(self) -> str:
        return "qwen2vl" if self.t5_embedder is None else "t5"


def condition_tokens(model: QwenFluxModel, batch: dict[str, Any]) -> tuple[list, list]:
    """Replay the last layer on the cached prompts: per-sample image and caption token states
    (the T5 branch reads its caption from T5 states, so its caption tokens are empty here)."""
    image_BLD = model.tail(
        batch["image_prompt_hidden"],
        batch["image_prompt_position_ids"],
        batch["image_prompt_attention_mask"],
    )
    image_tokens = image_token_states(image_BLD, image_mask_BL=batch["image_prompt_image_mask"])
    if model.t5_embedder is not None:
        return image_tokens, [tokens[:0] for tokens in image_tokens]
    caption_BLD = model.tail(
        batch["caption_prompt_hidden"],
        batch["caption_prompt_position_ids"],
        batch["caption_prompt_attention_mask"],
    )
    caption_tokens = real_token_states(
        caption_BLD, attention_mask_BL=batch["caption_prompt_attention_mask"]
    )
    return image_tokens, caption_tokens


@dataclass(frozen=True, slots=True)
class PackedLatents:
    """A micro-batch's clean latents in FLUX's packed layout, with their rope ids."""

    data_BLC: torch.Tensor
    image_ids_L3: torch.Tensor

    @classmethod
    def from_raw(cls, raw_BCHW: torch.Tensor, convention: LatentConvention) -> PackedLatents:
        height, width = raw_BCHW.shape[-2:]
        image_ids_L3 = latent_image_ids(height, width_latent=width).to(raw_BCHW.device)
        return cls(convention.codec.encode(raw_BCHW), image_ids_L3)


def flow_matching_step_loss(
    model: QwenFluxModel,
    batch: dict[str, Any],
    *,
    objective: ObjectiveConfig,
    convention: LatentConvention,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch (one bucket), all draws from `generator`."""
    chosen = step_conditioning(
        model, batch, objective=objective, convention=convention, generator=generator
    )
    device = batch["vae_latent"].device
    packed = PackedLatents.from_raw(batch["vae_latent"], convention)
    batch_size, num_tokens = packed.data_BLC.shape[:2]
    # Draws happen on the CPU generator (identical on any device), then move.
    sigmas_B = sample_sigmas(
        batch_size,
        mu=resolution_shift_mu(num_tokens),
        generator=generator,
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
    )
    sigmas_B = sigmas_B.to(device)
    noise_BLC = torch.randn(packed.data_BLC.shape, generator=generator).to(device)
    return velocity_loss(model, packed, noise_BLC=noise_BLC, sigmas_B=sigmas_B, conditioning=chosen)


def step_conditioning(
    model: QwenFluxModel,
    batch: dict[str, Any],
    *,
    objective: ObjectiveConfig,
    convention: LatentConvention,
    generator: torch.Generator,
) -> FluxConditioning:
    """What each sample of a micro-batch is conditioned on (drawn from `generator` first):
    image tokens, caption tokens, both or nothing, through the connector, with the caption's CLIP
    pooled vector where the caption conditions. On the T5 branch the caption comes as
    t5_embedder(its T5 states) after the image tokens, and the pooled vector is always the empty
    prompt's, as the released model reads a prompt."""
    image_tokens, caption_tokens = condition_tokens(model, batch)
    conditioning = assemble_conditioning(
        image_tokens,
        caption_tokens_LD=caption_tokens,
        probabilities=objective.probabilities,
        drop_rate=objective.drop_rate,
        generator=generator,
    )
    device = batch["vae_latent"].device
    uses_caption = (
        (conditioning.choice_B == CAPTION_ONLY) | (conditioning.choice_B == IMAGE_AND_CAPTION)
    ).to(device)
    embedded_BUE, embedded_mask_BU = t5_caption_tokens(model, batch, uses_caption_B=uses_caption)
    pooled_BP = torch.where(
        uses_caption[:, None] & (embedded_BUE is None),
        batch["clip_pooled"],
        convention.empty_pooled_P[None, :],
    )
    return flux_conditioning(
        model.connector,
        conditioning.hidden_BLD,
        conditioning.mask_BL,
        pooled_BP=pooled_BP,
        guidance=objective.guidance,
        embedded_BUE=embedded_BUE,
        embedded_mask_BU=embedded_mask_BU,
    )


def t5_caption_tokens(
    model: QwenFluxModel, batch: dict[str, Any], *, uses_caption_B: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The T5 branch's caption tokens: t5_embedder(cached T5 states) [B, U, E] in FLUX's inner
    width, attended only in samples conditioned on their caption (mask [B, U]); (None, None) on
    the Qwen2-VL branch."""
    if model.t5_embedder is None:
        return None, None
    if "caption_t5_hidden" not in batch:
        raise KeyError(
            "the T5 text branch trains on T5 caption states, and this batch has none "
            "(encode the dataset with data.encode.t5_caption = true)"
        )
    states_BUD = batch["caption_t5_hidden"]
    embedded_BUE = model.t5_embedder(states_BUD.to(model.t5_embedder.weight.dtype))
    mask_BU = uses_caption_B[:, None].expand(states_BUD.shape[:2])
    return embedded_BUE, mask_BU


def velocity_loss(
    model: QwenFluxModel,
    packed: PackedLatents,
    *,
    noise_BLC: torch.Tensor,
    sigmas_B: torch.Tensor,
    conditioning: FluxConditioning,
) -> torch.Tensor:
    """MSE between FLUX's velocity at x_sigma and noise - x0."""
    noisy_BLC = add_noise(packed.data_BLC, noise_BLP=noise_BLC, sigmas_B=sigmas_B)
    prediction = predict_velocity(
        model.transformer,
        noisy_BLC,
        image_ids_L3=packed.image_ids_L3,
        sigmas_B=sigmas_B,
        conditioning=conditioning,
    )
    return flow_matching_loss(
        prediction, target_BLP=velocity_target(packed.data_BLC, noise_BLP=noise_BLC)
    )


def step_generator(*, seed: int, stage_index: int, step: int, rank: int, micro: int):
    """The generator of one micro-batch's draws: a pure function of its coordinates."""
    mixed = (((seed * 1_000_003 + stage_index) * 1_000_003 + step) * 1_000_003 + rank) * 101
    return torch.Generator().manual_seed((mixed + micro) % (2**63 - 1))


def validation_losses(
    model: QwenFluxModel,
    batch: dict[str, Any],
    *,
    objective: ObjectiveConfig,
    convention: LatentConvention,
) -> dict[float, float]:
    """Loss at each fixed sigma on a fixed batch: image-only conditioning, fixed noise."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        image_tokens, _ = condition_tokens(model, batch)
        packed = PackedLatents.from_raw(batch["vae_latent"], convention)
        batch_size, num_tokens = packed.data_BLC.shape[:2]
        device = packed.data_BLC.device
        noise_BLC = torch.randn(packed.data_BLC.shape, generator=generator).to(device)
        conditioning = image_only_conditioning(
            model.connector,
            image_tokens,
            empty_pooled_P=convention.empty_pooled_P,
            guidance=objective.guidance,
        )
        mu = resolution_shift_mu(num_tokens)
        losses = {}
        for sigma in objective.validation_sigmas:
            sigmas_B = fixed_sigmas([sigma], mu=mu).expand(batch_size).to(device)
            losses[sigma] = float(
                velocity_loss(
                    model,
                    packed,
                    noise_BLC=noise_BLC,
                    sigmas_B=sigmas_B,
                    conditioning=conditioning,
                )
            )
    return losses


GRID_SAMPLING_STEPS = 8
GRID_SEED = 7


def validation_samples(
    model: QwenFluxModel,
    batch: dict[str, Any],
    *,
    objective: ObjectiveConfig,
    convention: LatentConvention,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Fixed-seed generations from the held-out references (image-only conditioning), as raw
    VAE latents shaped like batch["vae_latent"]: FLUX's Euler sampler, GRID_SAMPLING_STEPS;
    cfg_scale != 1 guides against the dropped-sample input (as the Generator does)."""
    raw = batch["vae_latent"]
    height, width = raw.shape[-2:]
    generator = torch.Generator().manual_seed(GRID_SEED)
    codec = convention.codec
    noise_BLC = codec.encode(torch.randn(raw.shape, generator=generator)).to(raw.device)
    # The noise is a standard normal in FLUX's space: pack it without the VAE's shift/scale.
    noise_BLC = pack_latents(
        torch.randn(raw.shape, generator=torch.Generator().manual_seed(GRID_SEED))
    ).to(raw.device)
    with torch.no_grad():
        image_tokens, _ = condition_tokens(model, batch)
        conditioning = image_only_conditioning(
            model.connector,
            image_tokens,
            empty_pooled_P=convention.empty_pooled_P,
            guidance=objective.guidance,
        )
        ids_L3 = latent_image_ids(height, width_latent=width).to(raw.device)

        def velocity(given: FluxConditioning):
            return lambda x, s: predict_velocity(
                model.transformer, x, image_ids_L3=ids_L3, sigmas_B=s, conditioning=given
            )

        unconditional = None
        if cfg_scale != 1.0:
            unconditional = velocity(
                unconditional_conditioning(
                    model.connector, conditioning, empty_pooled_P=convention.empty_pooled_P
                )
            )
        packed = sample(
            velocity(conditioning),
            noise_BLC,
            num_steps=GRID_SAMPLING_STEPS,
            unconditional=unconditional,
            cfg_scale=cfg_scale,
        )
        return convention.codec.decode(packed, height=height, width=width)
