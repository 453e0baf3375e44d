"""FLUX's text-stream conditioning from replayed Qwen2-VL states: token choice, padding, connector.

Inputs: per sample, the FINAL hidden states (after replaying Qwen2-VL's last layer + norm) of the
reference-image prompt and of the caption prompt, un-padded. `image_token_states` keeps only the
states at <|image_pad|> positions (what the released inference code feeds FLUX);
`real_token_states` keeps a caption prompt's real tokens. `assemble_conditioning` picks per sample
image tokens, caption tokens or both (image first, then caption), or nothing at all, and pads the
batch on the right with a boolean mask. Output: Conditioning(hidden_BLD, mask_BL, choice_B) in the
ENCODER width; the Connector (one Linear, encoder width -> FLUX joint_attention_dim) runs after
assembly on the padded batch (it is per token, so before or after gives the same real tokens;
pad slots get the bias but are masked out of FLUX's attention).

Unconditional samples (drop_rate) carry NO tokens: every slot of their row is masked out (a batch
whose longest row is empty still has one slot, masked). Since a masked key changes nothing, this
equals FLUX run with zero text tokens; inference's unconditional branch for classifier-free
guidance must use the same thing: `empty_conditioning` (or zero text tokens).

Legend: B batch, L tokens, D hidden size (Qwen2-VL's before the connector, FLUX's after).
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from model.flux_forward import FluxConditioning

IMAGE_ONLY = 0
CAPTION_ONLY = 1
IMAGE_AND_CAPTION = 2
UNCONDITIONAL = 3
"""Values of Conditioning.choice_B."""

TEXT_BRANCHES = ("qwen2vl", "t5")
"""How a model reads a caption or prompt: through Qwen2-VL and the connector, or (the released
model's way) through FLUX's T5 and a t5_embedder into FLUX's inner width."""


class Connector(nn.Linear):
    """Qwen2-VL hidden states -> FLUX encoder_hidden_states (3584 -> 4096; tiny 16 -> 32).

    Always trainable; parameters are `weight` [out, in] and `bias` [out].
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)


@dataclass(frozen=True, slots=True)
class Conditioning:
    """A padded batch of chosen tokens; mask_BL True at real tokens, choice_B one of the
    IMAGE_ONLY / CAPTION_ONLY / IMAGE_AND_CAPTION / UNCONDITIONAL codes (int64)."""

    hidden_BLD: torch.Tensor
    mask_BL: torch.Tensor
    choice_B: torch.Tensor


def image_token_states(
    hidden_BLD: torch.Tensor, *, image_mask_BL: torch.Tensor
) -> list[torch.Tensor]:
    """Per sample, the [L_i, D] states at image-token positions (image_mask_BL nonzero)."""
    return [
        hidden_LD[mask_L.bool()]
        for hidden_LD, mask_L in zip(hidden_BLD, image_mask_BL, strict=True)
    ]


def real_token_states(
    hidden_BLD: torch.Tensor, *, attention_mask_BL: torch.Tensor
) -> list[torch.Tensor]:
    """Per sample, the [L_i, D] states of real (not padding) tokens."""
    return [
        hidden_LD[mask_L.bool()]
        for hidden_LD, mask_L in zip(hidden_BLD, attention_mask_BL, strict=True)
    ]


def draw_condition_choices(
    batch_size: int,
    *,
    probabilities: tuple[float, float, float],
    drop_rate: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """[B] int64 choice codes on the CPU: IMAGE_ONLY / CAPTION_ONLY / IMAGE_AND_CAPTION with
    `probabilities`, then each sample independently UNCONDITIONAL with probability drop_rate.
    Deterministic given the generator's state (two draws: categories, then drops)."""
    if len(probabilities) != 3 or min(probabilities) < 0 or abs(sum(probabilities) - 1) > 1e-6:
        raise ValueError(
            f"probabilities must be 3 non-negative values summing to 1: {probabilities}"
        )
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1], got {drop_rate}")
    weights_3 = torch.tensor(probabilities, dtype=torch.float64, device=generator.device)
    choice_B = torch.multinomial(weights_3, batch_size, replacement=True, generator=generator)
    drop_B = torch.rand(batch_size, generator=generator, device=generator.device) < drop_rate
    return torch.where(drop_B, UNCONDITIONAL, choice_B).cpu()


def _chosen_tokens(image_LD: torch.Tensor, caption_LD: torch.Tensor, choice: int) -> torch.Tensor:
    if choice == IMAGE_ONLY:
        return image_LD
    if choice == CAPTION_ONLY:
        return caption_LD
    if choice == IMAGE_AND_CAPTION:
        return torch.cat([image_LD, caption_LD.to(image_LD.dtype)])
    return image_LD[:0]


def pad_tokens(tokens_LD: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [L_i, D] tensors to hidden_BLD (zeros at padding, at least one slot) and a
    bool mask_BL (True at real tokens)."""
    length = max(1, max(tokens.shape[0] for tokens in tokens_LD))
    first = tokens_LD[0]
    hidden_BLD = first.new_zeros(len(tokens_LD), length, first.shape[-1])
    mask_BL = torch.zeros(len(tokens_LD), length, dtype=torch.bool, device=first.device)
    for index, tokens in enumerate(tokens_LD):
        hidden_BLD[index, : tokens.shape[0]] = tokens
        mask_BL[index, : tokens.shape[0]] = True
    return hidden_BLD, mask_BL


def assemble_conditioning(
    image_tokens_LD: list[torch.Tensor],
    *,
    caption_tokens_LD: list[torch.Tensor],
    probabilities: tuple[float, float, float],
    drop_rate: float,
    generator: torch.Generator,
) -> Conditioning:
    """Choose per sample (see draw_condition_choices) and pad: Conditioning in encoder width.

    image_tokens_LD[i]: image-token states of sample i's reference-image prompt [L_i, D];
    caption_tokens_LD[i]: its caption prompt's real-token states [L'_i, D].
    """
    if len(image_tokens_LD) != len(caption_tokens_LD) or not image_tokens_LD:
        raise ValueError(
            f"assemble_conditioning: {len(image_tokens_LD)} image and "
            f"{len(caption_tokens_LD)} caption samples (need the same nonzero count)"
        )
    choice_B = draw_condition_choices(
        len(image_tokens_LD), probabilities=probabilities, drop_rate=drop_rate, generator=generator
    )
    chosen_LD = [
        _chosen_tokens(image_LD, caption_LD, int(choice))
        for image_LD, caption_LD, choice in zip(
            image_tokens_LD, caption_tokens_LD, choice_B, strict=True
        )
    ]
    hidden_BLD, mask_BL = pad_tokens(chosen_LD)
    return Conditioning(hidden_BLD=hidden_BLD, mask_BL=mask_BL, choice_B=choice_B)


def empty_conditioning(
    batch_size: int, *, hidden_size: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional input for classifier-free guidance, identical to a dropped training
    sample: hidden_BLD zeros [B, 1, hidden_size] (dtype/device of `like`), mask_BL all False."""
    hidden_BLD = like.new_zeros(batch_size, 1, hidden_size)
    mask_BL = torch.zeros(batch_size, 1, dtype=torch.bool, device=like.device)
    return hidden_BLD, mask_BL


def unconditional_states(
    connector: Connector, batch_size: int, *, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`empty_conditioning` through the connector: FLUX's encoder states [B, 1, D] and mask
    [B, 1] (all False) for the unconditional branch of classifier-free guidance."""
    hidden_BLD, mask_BL = empty_conditioning(
        batch_size, hidden_size=connector.in_features, like=like
    )
    return connector(hidden_BLD), mask_BL


def flux_conditioning(
    connector: Connector,
    hidden_BLD: torch.Tensor,
    mask_BL: torch.Tensor,
    *,
    pooled_BP: torch.Tensor,
    guidance: float | None,
    embedded_BUE: torch.Tensor | None = None,
    embedded_mask_BU: torch.Tensor | None = None,
) -> FluxConditioning:
    """The one conditioning builder: padded chosen tokens (encoder width) through the connector,
    with their mask, the CLIP pooled vectors and the guidance value (None: a FLUX without
    guidance embeds); `embedded_BUE`, tokens already in FLUX's inner width (the T5 branch),
    follow them where `embedded_mask_BU` (None: everywhere) says (see FluxConditioning)."""
    hidden_BTD = connector(hidden_BLD)
    guidance_B = None
    if guidance is not None:
        guidance_B = torch.full((hidden_BTD.shape[0],), float(guidance), device=hidden_BTD.device)
    return FluxConditioning(
        hidden_BTD=hidden_BTD,
        mask_BT=mask_BL,
        pooled_BP=pooled_BP,
        guidance_B=guidance_B,
        embedded_BUE=embedded_BUE,
        embedded_mask_BU=embedded_mask_BU,
    )


def image_only_conditioning(
    connector: Connector,
    image_tokens_LD: list[torch.Tensor],
    *,
    empty_pooled_P: torch.Tensor,
    guidance: float | None,
) -> FluxConditioning:
    """Variation-mode conditioning of a batch: each sample's reference-image tokens alone and
    the empty prompt's pooled vector (what the released model feeds without a prompt)."""
    hidden_BLD, mask_BL = pad_tokens(image_tokens_LD)
    pooled_BP = empty_pooled_P[None, :].expand(len(image_tokens_LD), -1)
    return flux_conditioning(connector, hidden_BLD, mask_BL, pooled_BP=pooled_BP, guidance=guidance)


def unconditional_conditioning(
    connector: Connector, conditioning: FluxConditioning, *, empty_pooled_P: torch.Tensor
) -> FluxConditioning:
    """The classifier-free-guidance branch of `conditioning`: what a dropped training sample
    gets (no tokens, the empty prompt's pooled vector), same guidance."""
    batch_size = conditioning.hidden_BTD.shape[0]
    hidden_BTD, mask_BT = unconditional_states(connector, batch_size, like=conditioning.hidden_BTD)
    pooled_BP = empty_pooled_P[None, :].expand(batch_size, -1).to(conditioning.pooled_BP)
    return replace(
        conditioning, hidden_BTD=hidden_BTD, mask_BT=mask_BT, pooled_BP=pooled_BP, embedded_BUE=None
    )
