"""The one training loop of the three progressive stages (framework-free; Ray Train adapts it).

A step: every worker replays Qwen2-VL's last layer on the cached prefix states of its micro-batches,
picks image tokens / caption tokens / both / nothing per sample, projects them through the
connector into FLUX, and regresses FLUX's velocity (rectified flow, FLUX's resolution shift).
Gradients are averaged across workers by the `all_reduce_mean` hook, clipped, checked by the
guard, and AdamW steps on the stage's trainable set: its FLUX blocks + connector + encoder tail.

Every random draw of a step comes from a generator seeded by (seed, stage, step, rank, micro
index), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from model.conditioning import (
    CAPTION_ONLY,
    IMAGE_AND_CAPTION,
    Connector,
    assemble_conditioning,
    image_token_states,
    pad_tokens,
    real_token_states,
    unconditional_states,
)
from model.flow_matching import (
    add_noise,
    fixed_sigmas,
    flow_matching_loss,
    latent_image_ids,
    pack_latents,
    resolution_shift_mu,
    sample_sigmas,
    scale_latents,
    unpack_latents,
    unscale_latents,
    velocity_target,
)
from model.flux_forward import FluxConditioning, predict_velocity
from model.lr_schedule import trapezoid_factor
from model.qwen2vl_tail import Qwen2VLTail
from model.sampling import euler_sample, flux_sigmas, guided_velocity


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

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if not self.flux_blocks or len(set(self.flux_blocks)) != len(self.flux_blocks):
            raise ValueError("flux_blocks must list distinct block indices")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > self.num_steps:
            raise ValueError("warmup_steps + decay_steps must not exceed num_steps")


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


@dataclass(frozen=True, slots=True)
class LatentConvention:
    """Constants of the data and model the loss needs (from the manifest and the base model)."""

    scaling_factor: float
    shift_factor: float
    empty_pooled_P: torch.Tensor
    """CLIP-L pooled vector of the empty prompt: what the released inference code feeds FLUX, and
    what image-only and unconditional samples get here."""


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or a gradient-norm spike."""


class QwenFluxModel(nn.Module):
    """The trained parts together: encoder tail, connector, FLUX transformer."""

    def __init__(self, tail: Qwen2VLTail, connector: Connector, transformer: nn.Module) -> None:
        super().__init__()
        self.tail = tail
        self.connector = connector
        self.transformer = transformer


def condition_tokens(model: QwenFluxModel, batch: dict[str, Any]) -> tuple[list, list]:
    """Replay the last layer on both cached prompts: per-sample image and caption token states."""
    image_BLD = model.tail(
        batch["image_prompt_hidden"],
        batch["image_prompt_position_ids"],
        batch["image_prompt_attention_mask"],
    )
    caption_BLD = model.tail(
        batch["caption_prompt_hidden"],
        batch["caption_prompt_position_ids"],
        batch["caption_prompt_attention_mask"],
    )
    image_tokens = image_token_states(image_BLD, image_mask_BL=batch["image_prompt_image_mask"])
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
        latents = scale_latents(
            raw_BCHW,
            scaling_factor=convention.scaling_factor,
            shift_factor=convention.shift_factor,
        )
        height, width = latents.shape[-2:]
        image_ids_L3 = latent_image_ids(height, width_latent=width).to(latents.device)
        return cls(pack_latents(latents), image_ids_L3)


def flow_matching_step_loss(
    model: QwenFluxModel,
    batch: dict[str, Any],
    *,
    objective: ObjectiveConfig,
    convention: LatentConvention,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch (one bucket), all draws from `generator`."""
    image_tokens, caption_tokens = condition_tokens(model, batch)
    conditioning = assemble_conditioning(
        image_tokens,
        caption_tokens_LD=caption_tokens,
        probabilities=objective.probabilities,
        drop_rate=objective.drop_rate,
        generator=generator,
    )
    device = batch["vae_latent"].device
    # Draws happen on the CPU generator (identical on any device), then move.
    uses_caption = (
        (conditioning.choice_B == CAPTION_ONLY) | (conditioning.choice_B == IMAGE_AND_CAPTION)
    ).to(device)
    pooled_BP = torch.where(
        uses_caption[:, None], batch["clip_pooled"], convention.empty_pooled_P[None, :]
    )
    packed = PackedLatents.from_raw(batch["vae_latent"], convention)
    batch_size, num_tokens = packed.data_BLC.shape[:2]
    sigmas_B = sample_sigmas(
        batch_size,
        mu=resolution_shift_mu(num_tokens),
        generator=generator,
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
    )
    sigmas_B = sigmas_B.to(device)
    noise_BLC = torch.randn(packed.data_BLC.shape, generator=generator).to(device)
    flux_conditioning = FluxConditioning(
        hidden_BTD=model.connector(conditioning.hidden_BLD),
        mask_BT=conditioning.mask_BL,
        pooled_BP=pooled_BP,
        guidance_B=torch.full((batch_size,), objective.guidance, device=device),
    )
    return velocity_loss(
        model, packed, noise_BLC=noise_BLC, sigmas_B=sigmas_B, conditioning=flux_conditioning
    )


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
        hidden_BLD, mask_BL = pad_tokens(image_tokens)
        packed = PackedLatents.from_raw(batch["vae_latent"], convention)
        batch_size, num_tokens = packed.data_BLC.shape[:2]
        device = packed.data_BLC.device
        noise_BLC = torch.randn(packed.data_BLC.shape, generator=generator).to(device)
        conditioning = FluxConditioning(
            hidden_BTD=model.connector(hidden_BLD),
            mask_BT=mask_BL,
            pooled_BP=convention.empty_pooled_P[None, :].expand(batch_size, -1),
            guidance_B=torch.full((batch_size,), objective.guidance, device=device),
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
    noise = pack_latents(torch.randn(raw.shape, generator=generator)).to(raw.device)
    with torch.no_grad():
        image_tokens, _ = condition_tokens(model, batch)
        hidden, mask = pad_tokens(image_tokens)
        conditioning = FluxConditioning(
            model.connector(hidden),
            mask,
            convention.empty_pooled_P[None, :].expand(raw.shape[0], -1),
            torch.full((raw.shape[0],), objective.guidance, device=raw.device),
        )
        ids = latent_image_ids(height, width_latent=width).to(raw.device)
        sigmas = flux_sigmas(GRID_SAMPLING_STEPS, mu=resolution_shift_mu(noise.shape[1]))

        def predictor(conditioning: FluxConditioning):
            return lambda x, s: predict_velocity(
                model.transformer, x, image_ids_L3=ids, sigmas_B=s, conditioning=conditioning
            )

        velocity = predictor(conditioning)
        if cfg_scale != 1.0:
            empty_BTD, empty_BT = unconditional_states(model.connector, raw.shape[0], like=hidden)
            unconditional = replace(conditioning, hidden_BTD=empty_BTD, mask_BT=empty_BT)
            velocity = partial(
                guided_velocity,
                conditional=velocity,
                unconditional=predictor(unconditional),
                scale=float(cfg_scale),
            )
        packed = euler_sample(velocity, noise, sigmas_N1=sigmas.to(raw.device))
        generated = unpack_latents(packed, height=height, width=width)
        return unscale_latents(
            generated.float(),
            scaling_factor=convention.scaling_factor,
            shift_factor=convention.shift_factor,
        )
