"""Model presets: facts about the real checkpoints and builders for the tiny ones.

Pure config builders, no I/O. Inputs: nothing (or a seed-free size choice). Outputs: transformers
config objects (Qwen2-VL, CLIP text) and diffusers constructor kwargs (FLUX transformer, VAE,
scheduler). The tiny models mirror the real layouts (16 latent channels, /8 VAE, 2x2 merge, 14 px
patches, 3-D mrope) with dims small enough for CPU tests (< 1M params excluding vocab embeddings).
"""

from transformers import (
    CLIPTextConfig,
    DepthAnythingConfig,
    Dinov2Config,
    Qwen2VLConfig,
    T5Config,
)

QWEN2VL_REAL_ID = "Qwen/Qwen2-VL-7B-Instruct"
QWEN2VL_REAL_HIDDEN_SIZE = 3584
QWEN2VL_REAL_NUM_LAYERS = 28
FLUX_REAL_ID = "black-forest-labs/FLUX.1-dev"
FLUX_REAL_JOINT_ATTENTION_DIM = 4096
FLUX_REAL_POOLED_PROJECTION_DIM = 768
FLUX_REAL_NUM_DOUBLE_BLOCKS = 19
FLUX_REAL_NUM_SINGLE_BLOCKS = 38
CLIP_REAL_ID = "openai/clip-vit-large-patch14"
VAE_LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
QWEN2VL_PATCH_SIZE = 14
QWEN2VL_MERGE_SIZE = 2
QWEN2VL_PIXELS_PER_TOKEN = (QWEN2VL_PATCH_SIZE * QWEN2VL_MERGE_SIZE) ** 2

# Special tokens in the order Qwen2-VL numbers them (151643 upwards in the real vocabulary); the
# tiny tokenizer gives them ids 0.. in this order so configs can name ids without reading files.
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

TINY_QWEN2VL_VOCAB_SIZE = 512
TINY_QWEN2VL_HIDDEN_SIZE = 16
TINY_QWEN2VL_NUM_LAYERS = 2
TINY_CLIP_VOCAB_SIZE = 768
TINY_FLUX_JOINT_ATTENTION_DIM = 32
TINY_FLUX_POOLED_PROJECTION_DIM = 32

# The released model's T5 text branch (FLUX.1-dev's text_encoder_2: T5 v1.1 XXL encoder).
T5_REAL_D_MODEL = 4096
"""T5-XXL's width: equal to FLUX's joint_attention_dim; t5_embedder maps it to the inner 3072."""
T5_MAX_TOKENS = 256
"""Prompt tokens the released code gives T5 (padded to this length)."""
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
"""T5's special tokens with the ids the real vocabulary gives them (0, 1, 2)."""


def tiny_qwen2vl_token_id(token: str) -> int:
    """Id of a Qwen2-VL special token in the tiny tokenizer (index in QWEN2VL_SPECIAL_TOKENS)."""
    return QWEN2VL_SPECIAL_TOKENS.index(token)


def tiny_qwen2vl_config() -> Qwen2VLConfig:
    """Tiny Qwen2-VL: 2 text layers (hidden 16, 2 heads, mrope [1, 1, 2]), 2 vision blocks."""
    text_config = {
        "vocab_size": TINY_QWEN2VL_VOCAB_SIZE,
        "hidden_size": TINY_QWEN2VL_HIDDEN_SIZE,
        "intermediate_size": 32,
        "num_hidden_layers": TINY_QWEN2VL_NUM_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
        "bos_token_id": tiny_qwen2vl_token_id("<|endoftext|>"),
        "eos_token_id": tiny_qwen2vl_token_id("<|im_end|>"),
        "pad_token_id": tiny_qwen2vl_token_id("<|endoftext|>"),
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 16,
        "hidden_size": TINY_QWEN2VL_HIDDEN_SIZE,
        "num_heads": 2,
        "mlp_ratio": 4,
        "patch_size": QWEN2VL_PATCH_SIZE,
        "spatial_merge_size": QWEN2VL_MERGE_SIZE,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tiny_qwen2vl_token_id("<|image_pad|>"),
        video_token_id=tiny_qwen2vl_token_id("<|video_pad|>"),
        vision_start_token_id=tiny_qwen2vl_token_id("<|vision_start|>"),
        vision_end_token_id=tiny_qwen2vl_token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_flux_transformer_kwargs() -> dict:
    """FluxTransformer2DModel kwargs: FLUX.1-dev's 19 double + 38 single blocks (so the report's
    stage block lists apply unchanged) at width 64; 16 latent channels packed 2x2; 5.3M params.

    The width must be at least in_channels (64), as FLUX.1-dev's 3072 is: x_embedder and proj_out
    never train, so a narrower width would hide part of the noisy latent from every block and
    confine the prediction to a subspace. At width 16 the loss plateaued at 1.02; at 64 it falls
    to 0.44 in the same steps."""
    return {
        "patch_size": 1,
        "in_channels": VAE_LATENT_CHANNELS * 4,
        "num_layers": FLUX_REAL_NUM_DOUBLE_BLOCKS,
        "num_single_layers": FLUX_REAL_NUM_SINGLE_BLOCKS,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": TINY_FLUX_JOINT_ATTENTION_DIM,
        "pooled_projection_dim": TINY_FLUX_POOLED_PROJECTION_DIM,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    }


def flux_dev_transformer_kwargs() -> dict:
    """FluxTransformer2DModel kwargs of FLUX.1-dev (build on the meta device only: 11.9B params)."""
    return {
        "patch_size": 1,
        "in_channels": VAE_LATENT_CHANNELS * 4,
        "num_layers": FLUX_REAL_NUM_DOUBLE_BLOCKS,
        "num_single_layers": FLUX_REAL_NUM_SINGLE_BLOCKS,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": FLUX_REAL_JOINT_ATTENTION_DIM,
        "pooled_projection_dim": FLUX_REAL_POOLED_PROJECTION_DIM,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def tiny_vae_kwargs() -> dict:
    """AutoencoderKL kwargs: 4 blocks (/8), 16 latent channels, FLUX's scaling and shift factors
    (the tiny-model builder replaces both by the tiny VAE's own latent statistics).

    One normalisation group: with 4, GroupNorm removes most of an image's colour (a per-channel
    offset) from a random VAE's latents; with 1 the colour carries about twice the share."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": VAE_LATENT_CHANNELS,
        "norm_num_groups": 1,
        "sample_size": 64,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def tiny_clip_text_config() -> CLIPTextConfig:
    """Tiny CLIP-L-style text encoder; pooled size = the tiny FLUX pooled_projection_dim."""
    return CLIPTextConfig(
        vocab_size=TINY_CLIP_VOCAB_SIZE,
        hidden_size=TINY_FLUX_POOLED_PROJECTION_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TINY_FLUX_POOLED_PROJECTION_DIM,
        bos_token_id=CLIP_SPECIAL_TOKENS.index("<|startoftext|>"),
        eos_token_id=CLIP_SPECIAL_TOKENS.index("<|endoftext|>"),
        pad_token_id=CLIP_SPECIAL_TOKENS.index("<|endoftext|>"),
    )


def tiny_t5_config(vocab_size: int) -> T5Config:
    """Tiny T5 v1.1-style encoder (gated-GELU, no tied embeddings) whose width is the tiny FLUX
    joint_attention_dim, as T5-XXL's 4096 is FLUX.1-dev's."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=TINY_FLUX_JOINT_ATTENTION_DIM,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        pad_token_id=T5_SPECIAL_TOKENS.index("<pad>"),
        eos_token_id=T5_SPECIAL_TOKENS.index("</s>"),
    )


def flux_scheduler_kwargs() -> dict:
    """FlowMatchEulerDiscreteScheduler kwargs of FLUX.1-dev (resolution-dependent shift)."""
    return {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }


# ControlNet and depth estimator (frozen bases configured at inference time, not trained here).
CONTROLNET_UNION_NUM_MODES = 10
"""Mode-embedding rows of the FLUX.1-dev union ControlNets (InstantX layout: canny 0, tile 1,
depth 2, blur 3, pose 4, gray 5, low quality 6; the rest unused)."""
DEPTH_PROCESSOR_SIDE = 518
"""Depth Anything V2's processor side (a multiple of its 14 px patches)."""
TINY_DEPTH_PROCESSOR_SIDE = 56


def tiny_controlnet_kwargs() -> dict:
    """FluxControlNetModel kwargs: the tiny FLUX transformer's dims (so residuals add onto its
    hidden states) with 2 double + 2 single blocks and a union mode embedding."""
    kwargs = tiny_flux_transformer_kwargs()
    kwargs.update(num_layers=2, num_single_layers=2, num_mode=CONTROLNET_UNION_NUM_MODES)
    return kwargs


def tiny_depth_config() -> DepthAnythingConfig:
    """Depth Anything (V2 layout: DINOv2 backbone + DPT neck + relative-depth head), tiny."""
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=14,
        image_size=TINY_DEPTH_PROCESSOR_SIDE,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )


def depth_processor_kwargs(side: int) -> dict:
    """DPTImageProcessor kwargs of Depth Anything V2 at a given side (518 real, 56 tiny)."""
    return {
        "do_resize": True,
        "size": {"height": side, "width": side},
        "keep_aspect_ratio": True,
        "ensure_multiple_of": 14,
        "resample": 3,
        "do_pad": False,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
