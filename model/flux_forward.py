"""One FLUX velocity prediction on padded Qwen2-VL conditioning, plus gradient checkpointing.

Inputs: packed noisy latents [B, L, C] (model.latent_codec.pack_latents), their rope ids [L, 3],
sigmas [B] in [0, 1] and FluxConditioning (connector output, its text mask, CLIP pooled vector,
guidance). Output: the predicted velocity noise - x0, [B, L, C].

Facts of diffusers 0.42.1 this relies on:
- Timestep scale: FluxTransformer2DModel.forward multiplies `timestep` AND `guidance` by 1000
  itself; FluxPipeline passes scheduler_timestep / 1000 = sigma. So timestep = sigma in [0, 1],
  and guidance is the plain scale (3.5, not 3500).
- Mask path: joint_attention_kwargs={"attention_mask": mask} reaches every block's
  FluxAttention.forward (named parameter), then FluxAttnProcessor -> dispatch_attention_fn(
  attn_mask=...) -> torch SDPA on the default "native" backend. The joint sequence is text tokens
  FIRST, then image tokens (double and single blocks alike), so the key mask is
  [text_mask_BT, ones_BL] shaped [B, 1, 1, T + L] (bool, True = attend). Pad queries still see
  real keys (no NaN rows); their outputs are discarded and never reach real tokens, because
  attention is FLUX's only cross-token operation and txt_ids are all zeros (no position shift).
  flash-attn backends reject masks: train with the native backend when padding exists.

Guidance: FLUX.1-dev is guidance-distilled (guidance_embeds=True), so every forward takes a
guidance value. We pass it explicitly from the training config (guidance_B, e.g. 3.5 as diffusers'
FLUX training scripts default to; fine-tunes that feed 1.0 are known to drift); None only for a
transformer built without guidance embeddings.

ControlNet (diffusers FluxControlNetModel, fed as FluxControlNetPipeline feeds it): the control
image's packed VAE latent [B, L, C] is added to the ControlNet's embedded sample; a union
ControlNet also prepends its mode embedding as one extra text token (so a text-key mask gains one
True column in front). Its outputs, one residual per ControlNet block, are scaled by the control's
strength; several controls are summed block by block; FluxTransformer2DModel adds residual
i // ceil(num_blocks / num_residuals) after each of its blocks.

Legend: B batch, L packed image tokens, C packed channels (64), T text tokens, S joint sequence
(T + L), D FLUX joint_attention_dim, P pooled projection width.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

from model.latent_codec import text_ids


@dataclass(frozen=True, slots=True)
class FluxConditioning:
    """What FLUX is conditioned on besides the noise level.

    hidden_BTD: connector output; mask_BT: bool, True at real text tokens; pooled_BP: CLIP-L
    pooled vector; guidance_B: guidance scale per sample (None only without guidance embeds);
    embedded_BUE: text tokens already in FLUX's inner width (the released model's T5 branch:
    t5_embedder(T5 states)), which skip context_embedder and follow context_embedder(hidden_BTD)
    in the joint sequence (None: no such tokens); embedded_mask_BU: bool, True where they are
    attended (None: all of them, as at inference; training masks them out of samples that are
    not conditioned on their caption).
    """

    hidden_BTD: torch.Tensor
    mask_BT: torch.Tensor
    pooled_BP: torch.Tensor
    guidance_B: torch.Tensor | None
    embedded_BUE: torch.Tensor | None = None
    embedded_mask_BU: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class ControlCondition:
    """One control: packed, scaled VAE latent of the control image [B, L, C], the union mode id
    (None for a single-purpose ControlNet) and the strength its residuals are scaled by."""

    image_BLC: torch.Tensor
    mode: int | None
    strength: float


@dataclass(frozen=True, slots=True)
class ControlResiduals:
    """Summed ControlNet residuals: one [B, L, D] per ControlNet double / single block."""

    double_blocks: list[torch.Tensor]
    single_blocks: list[torch.Tensor]


def control_residuals(
    controlnet: torch.nn.Module,
    packed_latents_BLC: torch.Tensor,
    *,
    image_ids_L3: torch.Tensor,
    sigmas_B: torch.Tensor,
    conditioning: FluxConditioning,
    controls: list[ControlCondition],
) -> ControlResiduals:
    """Run the ControlNet once per control (same noisy sample, conditioning and timestep as the
    transformer) and sum the strength-scaled residuals."""
    if not controls:
        raise ValueError("control_residuals needs at least one control")
    union = bool(getattr(controlnet, "union", False))
    mask_BT = conditioning.mask_BT
    if union:
        mask_BT = torch.cat([mask_BT.new_ones(mask_BT.shape[0], 1), mask_BT.bool()], dim=1)
    inputs = flux_inputs(
        packed_latents_BLC,
        image_ids_L3=image_ids_L3,
        sigmas_B=sigmas_B,
        conditioning=conditioning,
        text_mask_BT=mask_BT,
    )
    summed: ControlResiduals | None = None
    for control in controls:
        if union and control.mode is None:
            raise ValueError("a union ControlNet needs a mode id for every control")
        mode_B1 = None
        if union:
            mode_B1 = torch.full(
                (packed_latents_BLC.shape[0], 1), control.mode, device=packed_latents_BLC.device
            )
        with embedded_text_tokens(controlnet, conditioning.embedded_BUE):
            double_blocks, single_blocks = controlnet(
                **inputs,
                controlnet_cond=control.image_BLC.to(packed_latents_BLC),
                controlnet_mode=mode_B1,
                conditioning_scale=float(control.strength),
            )
        current = ControlResiduals(list(double_blocks or []), list(single_blocks or []))
        summed = current if summed is None else _add_residuals(summed, current)
    return summed


def _add_residuals(first: ControlResiduals, second: ControlResiduals) -> ControlResiduals:
    return ControlResiduals(
        [a + b for a, b in zip(first.double_blocks, second.double_blocks, strict=True)],
        [a + b for a, b in zip(first.single_blocks, second.single_blocks, strict=True)],
    )


def joint_attention_mask(
    text_mask_BT: torch.Tensor, *, num_image_tokens: int
) -> torch.Tensor | None:
    """[B, 1, 1, T + L] bool key mask over FLUX's joint sequence (text first), or None when no
    text token is masked (lets SDPA pick its fastest kernel)."""
    text_mask_BT = text_mask_BT.bool()
    if bool(text_mask_BT.all()):
        return None
    image_mask_BL = text_mask_BT.new_ones(text_mask_BT.shape[0], num_image_tokens)
    return torch.cat([text_mask_BT, image_mask_BL], dim=1)[:, None, None, :]


def _check_guidance(transformer: torch.nn.Module, guidance_B: torch.Tensor | None) -> None:
    # DDP wraps the model (config on .module); FSDP2's fully_shard keeps the class.
    config = getattr(transformer, "module", transformer).config
    has_guidance_embeds = bool(config.guidance_embeds)
    if has_guidance_embeds and guidance_B is None:
        raise ValueError("this FLUX transformer has guidance embeddings: pass guidance_B")
    if not has_guidance_embeds and guidance_B is not None:
        raise ValueError(
            "this FLUX transformer has no guidance embeddings: guidance_B must be None"
        )


def predict_velocity(
    transformer: FluxTransformer2DModel,
    packed_latents_BLC: torch.Tensor,
    *,
    image_ids_L3: torch.Tensor,
    sigmas_B: torch.Tensor,
    conditioning: FluxConditioning,
    control: ControlResiduals | None = None,
) -> torch.Tensor:
    """FLUX's velocity prediction [B, L, C] at noise levels sigmas_B (timestep = sigma in [0, 1];
    the transformer scales by 1000), honouring the text padding mask in joint attention; with
    `control`, the ControlNet residuals are added after the transformer's blocks."""
    _check_guidance(transformer, conditioning.guidance_B)
    inputs = flux_inputs(
        packed_latents_BLC,
        image_ids_L3=image_ids_L3,
        sigmas_B=sigmas_B,
        conditioning=conditioning,
        text_mask_BT=conditioning.mask_BT,
    )
    with embedded_text_tokens(transformer, conditioning.embedded_BUE):
        output = transformer(
            **inputs,
            controlnet_block_samples=(control.double_blocks or None) if control else None,
            controlnet_single_block_samples=(control.single_blocks or None) if control else None,
        )
    return output[0]


class _AppendEmbedded(torch.nn.Module):
    """context_embedder(x) followed by tokens that are already embedded."""

    def __init__(self, context_embedder: torch.nn.Module, embedded_BUE: torch.Tensor) -> None:
        super().__init__()
        self.context_embedder = context_embedder
        self.embedded_BUE = embedded_BUE

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        embedded = self.context_embedder(hidden_BTD)
        return torch.cat([embedded, self.embedded_BUE.to(embedded)], dim=1)


@contextlib.contextmanager
def embedded_text_tokens(
    network: torch.nn.Module, embedded_BUE: torch.Tensor | None
) -> Iterator[None]:
    """While open, `network`'s context_embedder (FLUX's or a ControlNet's) appends
    `embedded_BUE` to what it embeds: the T5 branch's tokens join the joint sequence without
    passing through it. Nothing changes when embedded_BUE is None."""
    if embedded_BUE is None:
        yield
        return
    inner = getattr(network, "module", network)
    original = inner.context_embedder
    inner.context_embedder = _AppendEmbedded(original, embedded_BUE)
    try:
        yield
    finally:
        inner.context_embedder = original


def flux_inputs(
    packed_latents_BLC: torch.Tensor,
    *,
    image_ids_L3: torch.Tensor,
    sigmas_B: torch.Tensor,
    conditioning: FluxConditioning,
    text_mask_BT: torch.Tensor,
) -> dict:
    """The keyword arguments FluxTransformer2DModel and FluxControlNetModel share: sample,
    conditioning, timestep = sigma, ids and the joint-attention key mask built from
    `text_mask_BT` (a union ControlNet passes its mask with the mode token in front)."""
    num_text = conditioning.hidden_BTD.shape[1]
    if conditioning.embedded_BUE is not None:
        embedded = conditioning.embedded_BUE.shape[1]
        embedded_mask_BU = conditioning.embedded_mask_BU
        if embedded_mask_BU is None:
            embedded_mask_BU = text_mask_BT.new_ones(len(text_mask_BT), embedded)
        text_mask_BT = torch.cat([text_mask_BT.bool(), embedded_mask_BU.bool()], dim=1)
        num_text += embedded
    key_mask_B11S = joint_attention_mask(text_mask_BT, num_image_tokens=packed_latents_BLC.shape[1])
    return {
        "hidden_states": packed_latents_BLC,
        "encoder_hidden_states": conditioning.hidden_BTD,
        "pooled_projections": conditioning.pooled_BP,
        "timestep": sigmas_B,
        "img_ids": image_ids_L3,
        "txt_ids": text_ids(num_text).to(image_ids_L3),
        "guidance": conditioning.guidance_B,
        "joint_attention_kwargs": None
        if key_mask_B11S is None
        else {"attention_mask": key_mask_B11S},
        "return_dict": False,
    }


def set_gradient_checkpointing(transformer: FluxTransformer2DModel, *, enabled: bool) -> None:
    """Switch diffusers' own per-block checkpointing (non-reentrant torch.utils.checkpoint)."""
    if enabled:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
