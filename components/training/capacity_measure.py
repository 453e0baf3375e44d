"""Training-planner shapes measured on (meta-device) modules: a FLUX transformer's blocks, split
by the tokens their weights run on and by part (model/flux_stages.py: FLUX_PARTS), and the
encoder tail. No I/O: `pipelines/plan.py` builds the modules from config files and passes them
in; `components/training/capacity.py` plans with the shapes.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRMSNorm

from components.training.capacity_shapes import (
    BlockShape,
    EncoderTailShape,
    FluxShape,
    PartShape,
    decoder_layer_saved_values,
    flux_double_saved_values,
    flux_single_saved_values,
)
from model.flux_stages import FLUX_PARTS, block_part

# Parameter-name prefixes inside one FLUX block (diffusers 0.42 names): adaLN modulation runs
# once per sample; in a double block the text stream's weights carry "add_" or "_context".
_PER_SAMPLE_PREFIXES = ("norm1.linear.", "norm1_context.linear.", "norm.linear.")
_TEXT_STREAM_MARKERS = ("add_", "_context")


def flux_shape(transformer: FluxTransformer2DModel) -> FluxShape:
    """Block shapes measured on a (meta) FLUX transformer."""
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return FluxShape(
        hidden_size=width,
        num_double_blocks=len(transformer.transformer_blocks),
        num_single_blocks=len(transformer.single_transformer_blocks),
        double_block=block_shape(
            transformer.transformer_blocks[0], flux_double_saved_values(width), is_double=True
        ),
        single_block=block_shape(
            transformer.single_transformer_blocks[0],
            flux_single_saved_values(width),
            is_double=False,
        ),
        num_params=_count(transformer),
    )


def encoder_tail_shape(
    layer: Qwen2VLDecoderLayer,
    norm: Qwen2VLRMSNorm,
    *,
    joint_attention_dim: int,
    t5_embedder_params: int = 0,
) -> EncoderTailShape:
    """Trainable encoder side: the layer, the norm and a Linear(hidden -> joint_attention_dim)."""
    config = layer.self_attn.config
    hidden = config.hidden_size
    return EncoderTailShape(
        hidden_size=hidden,
        attention_width=layer.self_attn.q_proj.out_features,
        layer_params=_count(layer),
        norm_params=_count(norm),
        saved_values_per_token=decoder_layer_saved_values(hidden, config.intermediate_size),
        connector_width=joint_attention_dim,
        t5_embedder_params=t5_embedder_params,
    )


def block_shape(block: torch.nn.Module, saved: int, *, is_double: bool) -> BlockShape:
    """Parameters of one FLUX block split by the tokens they run on (per-sample adaLN left out),
    as a whole and per part (model/flux_stages.py: FLUX_PARTS)."""
    counts = {part: [0, 0, 0] for part in FLUX_PARTS}  # params, image-token, text-token
    for name, parameter in block.named_parameters():
        count = counts[block_part(name)]
        count[0] += parameter.numel()
        if name.startswith(_PER_SAMPLE_PREFIXES):
            continue
        is_text = any(marker in name for marker in _TEXT_STREAM_MARKERS)
        # A single block runs every weight on every token of the joint sequence.
        count[1] += parameter.numel() if not (is_double and is_text) else 0
        count[2] += parameter.numel() if not is_double or is_text else 0
    parts = tuple(
        PartShape(name=part, num_params=n, image_token_params=image, text_token_params=text)
        for part, (n, image, text) in counts.items()
    )
    return BlockShape(
        num_params=_count(block),
        image_token_params=sum(part.image_token_params for part in parts),
        text_token_params=sum(part.text_token_params for part in parts),
        saved_values_per_token=saved,
        parts=parts,
    )


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
