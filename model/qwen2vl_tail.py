"""Qwen2-VL split into a frozen prefix and a replayable last decoder layer.

The key idea of the data layout: layers 0..N-2 run once in the data pipeline (run_prefix) and we
store the INPUT of the last decoder layer together with the 3-D multimodal rope position ids and
the 2-D attention mask; training replays only layer N-1 + final norm (replay_last_layer), which
equals the full model's final hidden states on the non-pad tokens.

Inputs: a Qwen2VLModel (the `.model` of Qwen2VLForConditionalGeneration) and a PromptBatch as the
processor would give it. Outputs: PrefixOutput tensors; replay gives final hidden_BLD.
Right padding is what the encoder uses: real tokens then keep the positions and causal context
they have un-padded, so stored per-sample slices can be re-batched with any padding.

Legend: B batch, L tokens, D text hidden size, P vision patches (flattened), C patch channels
(3 * temporal_patch * patch * patch), N images, 3 rope axes (temporal, height, width).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLDecoderLayer,
    Qwen2VLModel,
    Qwen2VLRMSNorm,
    Qwen2VLRotaryEmbedding,
)


@dataclass(frozen=True, slots=True)
class PromptBatch:
    """Tokenised chat prompts, padded on the right; image fields None for text-only prompts."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    mm_token_type_ids_BL: torch.Tensor
    pixel_values_PC: torch.Tensor | None = None
    image_grid_thw_N3: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The batch as Qwen2VLModel's keyword arguments."""
        return {
            "input_ids": self.input_ids_BL,
            "attention_mask": self.attention_mask_BL,
            "pixel_values": self.pixel_values_PC,
            "image_grid_thw": self.image_grid_thw_N3,
            "mm_token_type_ids": self.mm_token_type_ids_BL,
        }


@dataclass(frozen=True, slots=True)
class PrefixOutput:
    """What replay needs: the last layer's input, 3-D rope positions and the 2-D mask."""

    hidden_BLD: torch.Tensor
    position_ids_3BL: torch.Tensor
    attention_mask_BL: torch.Tensor


def drop_last_layer(model: Qwen2VLModel) -> None:
    """Remove the last decoder layer and the final norm in place (the prefix never needs them)."""
    language_model = model.language_model
    if len(language_model.layers) != language_model.config.num_hidden_layers:
        raise ValueError("drop_last_layer: model is already truncated")
    language_model.layers = language_model.layers[:-1]
    language_model.norm = nn.Identity()


def is_prefix_only(model: Qwen2VLModel) -> bool:
    """True after drop_last_layer (the model's output is then the last layer's input)."""
    language_model = model.language_model
    return len(language_model.layers) == language_model.config.num_hidden_layers - 1


def multimodal_position_ids(model: Qwen2VLModel, batch: PromptBatch) -> torch.Tensor:
    """3-D rope positions [3, B, L] from the model's get_rope_index (text-only prompts too)."""
    position_ids_3BL, _ = model.get_rope_index(
        batch.input_ids_BL,
        mm_token_type_ids=batch.mm_token_type_ids_BL,
        image_grid_thw=batch.image_grid_thw_N3,
        attention_mask=batch.attention_mask_BL,
    )
    return position_ids_3BL


def run_prefix(model: Qwen2VLModel, batch: PromptBatch) -> PrefixOutput:
    """Run layers 0..N-2 on a batch: the penultimate hidden states plus what replay needs.

    Works on a full model (hidden state selected by index) or one cut by drop_last_layer.
    """
    position_ids_3BL = multimodal_position_ids(model, batch)
    prefix_only = is_prefix_only(model)
    outputs = model(
        **batch.model_inputs(),
        position_ids=position_ids_3BL,
        use_cache=False,
        output_hidden_states=None if prefix_only else [-2],
    )
    hidden_BLD = outputs.last_hidden_state if prefix_only else outputs.hidden_states[-2]
    return PrefixOutput(
        hidden_BLD=hidden_BLD,
        position_ids_3BL=position_ids_3BL,
        attention_mask_BL=batch.attention_mask_BL,
    )


class Qwen2VLTail(nn.Module):
    """The trainable tail: the last decoder layer, the final norm and the (buffer-only) rope."""

    def __init__(self, layer: nn.Module, norm: nn.Module, rotary_emb: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.rotary_emb = rotary_emb

    @classmethod
    def skeleton(cls, text_config) -> "Qwen2VLTail":
        """The tail of `text_config`'s architecture: layer and norm on the meta device (their
        tensors to be assigned from a checkpoint), the rope built for real (its buffers come
        from the config, not from weights). Set text_config._attn_implementation first."""
        with torch.device("meta"):
            layer = Qwen2VLDecoderLayer(text_config, layer_idx=text_config.num_hidden_layers - 1)
            norm = Qwen2VLRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        return cls(layer, norm, Qwen2VLRotaryEmbedding(config=text_config))

    @classmethod
    def from_model(cls, model: Qwen2VLModel) -> "Qwen2VLTail":
        """Share (not copy) the last layer, norm and rotary embedding of a full model."""
        language_model = model.language_model
        return cls(language_model.layers[-1], language_model.norm, language_model.rotary_emb)

    def forward(
        self,
        hidden_BLD: torch.Tensor,
        position_ids_3BL: torch.Tensor,
        attention_mask_BL: torch.Tensor,
    ) -> torch.Tensor:
        return replay_last_layer(
            self, hidden_BLD, position_ids_3BL=position_ids_3BL, attention_mask_BL=attention_mask_BL
        )


def replay_last_layer(
    tail: Qwen2VLTail,
    hidden_BLD: torch.Tensor,
    *,
    position_ids_3BL: torch.Tensor,
    attention_mask_BL: torch.Tensor,
) -> torch.Tensor:
    """Last decoder layer + final norm on stored prefix outputs -> final hidden_BLD.

    The 2-D mask becomes the causal mask the layer's attention implementation expects, built by
    the same transformers function Qwen2VLTextModel.forward uses, so replay is exact.
    """
    causal_mask = create_causal_mask(
        config=tail.layer.self_attn.config,
        inputs_embeds=hidden_BLD,
        attention_mask=attention_mask_BL,
        cache=None,
    )
    position_embeddings = tail.rotary_emb(hidden_BLD, position_ids_3BL)
    hidden_BLD = tail.layer(
        hidden_BLD,
        attention_mask=causal_mask,
        position_embeddings=position_embeddings,
        position_ids=None,
    )
    return tail.norm(hidden_BLD)


def pad_prompt_batch(
    hidden_LD: list[torch.Tensor],
    position_ids_3L: list[torch.Tensor],
    attention_mask_L: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-batch stored per-sample prompts with right padding for replay_last_layer.

    Returns hidden_BLD (zeros at padding), position_ids_3BL (int64) and attention_mask_BL (int64,
    0 at padding); stored slices hold only real tokens, so right padding keeps their positions.
    """
    length = max(hidden.shape[0] for hidden in hidden_LD)
    hidden_BLD = torch.stack(
        [nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[0])) for hidden in hidden_LD]
    )
    position_ids_3BL = torch.stack(
        [nn.functional.pad(ids.long(), (0, length - ids.shape[-1])) for ids in position_ids_3L],
        dim=1,
    )
    attention_mask_BL = torch.stack(
        [nn.functional.pad(mask.long(), (0, length - mask.shape[0])) for mask in attention_mask_L]
    )
    return hidden_BLD, position_ids_3BL, attention_mask_BL
