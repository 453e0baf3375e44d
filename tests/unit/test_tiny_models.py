"""Tiny checkpoints: real layouts, reload through from_pretrained, deterministic and idempotent."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2VLForConditionalGeneration,
)

from components.data.demo_corpus import COLOURS, POSITIONS, SHAPES
from components.tiny_models import MARKER_NAME, build_tiny_models
from model import presets

pytestmark = pytest.mark.unit


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _shards(index_path: Path) -> dict[str, str]:
    return json.loads(index_path.read_text())["weight_map"]


def test_qwen2vl_is_sharded_with_legacy_tensor_names(tiny_models_dir):
    weight_map = _shards(tiny_models_dir.qwen2vl / "model.safetensors.index.json")
    assert len(set(weight_map.values())) > 1
    assert {"model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"} <= set(
        weight_map
    )
    assert "visual.patch_embed.proj.weight" in weight_map
    assert not any(name.startswith("model.language_model.") for name in weight_map)


def test_qwen2vl_reloads_with_file_weights(tiny_models_dir):
    root = tiny_models_dir.qwen2vl
    model = Qwen2VLForConditionalGeneration.from_pretrained(root)
    weight_map = _shards(root / "model.safetensors.index.json")
    pairs = {
        "model.norm.weight": model.model.language_model.norm.weight,
        "model.layers.1.mlp.down_proj.weight": model.model.language_model.layers[
            1
        ].mlp.down_proj.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for name, parameter in pairs.items():
        stored = load_file(root / weight_map[name])[name]
        assert torch.equal(stored, parameter.detach())
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (16, presets.TINY_QWEN2VL_NUM_LAYERS)
    assert text.rope_parameters["mrope_section"] == [1, 1, 2]


def test_qwen2vl_tokenizer_and_image_processor_reload(tiny_models_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models_dir.qwen2vl)
    for token in presets.QWEN2VL_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == presets.tiny_qwen2vl_token_id(token)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert ids.count(presets.tiny_qwen2vl_token_id("<|image_pad|>")) == 1
    processor = AutoImageProcessor.from_pretrained(tiny_models_dir.qwen2vl)
    assert (processor.patch_size, processor.merge_size) == (14, 2)


def test_both_tokenizers_keep_the_demo_caption_words_whole(tiny_models_dir):
    # As the real vocabularies do: a colour spelt letter by letter is barely a word to a random
    # encoder (before the tokenizers learnt these words the text check stayed at chance).
    qwen = AutoTokenizer.from_pretrained(tiny_models_dir.qwen2vl)
    clip = CLIPTokenizer.from_pretrained(tiny_models_dir.flux, subfolder="tokenizer")
    words = [*COLOURS, *SHAPES, *" ".join(POSITIONS).split(), "background", "on", "in", "the"]
    for word in words:
        assert qwen.tokenize(f" {word}") == [f"\u0120{word}"], word
        assert clip.tokenize(word) == [f"{word}</w>"], word
    assert clip.tokenize("Cats!") == ["c", "a", "t", "s</w>", "!</w>"]  # unknown words still work


def test_flux_layout_reloads(tiny_models_dir):
    root = tiny_models_dir.flux
    index = json.loads((root / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    weight_map = _shards(root / "transformer/diffusion_pytorch_model.safetensors.index.json")
    assert len(set(weight_map.values())) > 1
    transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer")
    assert transformer.config.in_channels == 4 * presets.VAE_LATENT_CHANNELS
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    # The builder calibrates the factors on this VAE (test_tiny_vae_factors_... checks them).
    assert vae.config.scaling_factor > 0 and vae.config.norm_num_groups == 1
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert latent.shape == (1, 16, 8, 6)
    clip = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    clip_tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    tokens = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = clip(tokens["input_ids"]).pooler_output
    assert pooled.shape == (1, transformer.config.pooled_projection_dim)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15


def test_controlnet_and_depth_layouts_reload(tiny_models_dir):
    from diffusers import FluxControlNetModel
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    controlnet_dir = tiny_models_dir.controlnet
    assert (controlnet_dir / "diffusion_pytorch_model.safetensors").is_file()
    controlnet = FluxControlNetModel.from_pretrained(controlnet_dir)
    flux = FluxTransformer2DModel.load_config(tiny_models_dir.flux, subfolder="transformer")
    assert controlnet.union and controlnet.config.num_mode == presets.CONTROLNET_UNION_NUM_MODES
    for key in ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim"):
        assert controlnet.config[key] == flux[key], key
    # Not the zero-initialised residual projections of a fresh ControlNet: it must act.
    assert controlnet.controlnet_blocks[0].weight.abs().sum() > 0
    depth_dir = tiny_models_dir.depth
    assert (depth_dir / "model.safetensors").is_file()
    config = json.loads((depth_dir / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "DPTImageProcessor"
    model = AutoModelForDepthEstimation.from_pretrained(depth_dir)
    processor = AutoImageProcessor.from_pretrained(depth_dir)
    with torch.no_grad():
        depth = model(**processor(images=Image.new("RGB", (40, 30)), return_tensors="pt"))
    assert depth.predicted_depth.ndim == 3


def test_tiny_models_stay_small_and_flux_is_no_narrower_than_its_input():
    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(presets.tiny_qwen2vl_config())
    vocab = qwen.lm_head.weight.numel() + qwen.model.language_model.embed_tokens.weight.numel()
    assert sum(p.numel() for p in qwen.parameters()) - vocab < 1_000_000
    kwargs = presets.tiny_flux_transformer_kwargs()
    flux = FluxTransformer2DModel(**kwargs)
    # x_embedder and proj_out never train: a width below in_channels would be a bottleneck.
    assert kwargs["num_attention_heads"] * kwargs["attention_head_dim"] >= kwargs["in_channels"]
    assert sum(kwargs["axes_dims_rope"]) == kwargs["attention_head_dim"]
    assert sum(p.numel() for p in flux.parameters()) < 6_000_000


def test_tiny_vae_factors_make_its_latents_unit_scale(tiny_models_dir):
    from components.tiny_models import _calibration_images

    vae = AutoencoderKL.from_pretrained(tiny_models_dir.flux, subfolder="vae")
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert (shift, scale) != (presets.VAE_SHIFT_FACTOR, presets.VAE_SCALING_FACTOR)
    with torch.no_grad():
        latents = vae.encode(_calibration_images(seed=0)).latent_dist.mean
        other = vae.encode(_calibration_images(seed=5)).latent_dist.mean
    for raw in (latents, other):
        scaled = (raw - shift) * scale
        assert abs(float(scaled.mean())) < 0.1
        assert 0.9 < float(scaled.std()) < 1.1
    # Colour must move the latents by a fair share of their scale (it did by ~1% before).
    spatial_means = ((other - shift) * scale).mean(dim=(2, 3))
    assert float(spatial_means.std(dim=0).mean()) > 0.2


def test_rebuild_with_same_seed_is_byte_identical(tiny_models_dir, tmp_path):
    rebuilt = build_tiny_models(tmp_path / "again", seed=0)
    assert _files(rebuilt.root) == _files(tiny_models_dir.root)
    other = build_tiny_models(tmp_path / "other", seed=1)
    first, second = _files(tiny_models_dir.root), _files(other.root)
    assert first["qwen2-vl/config.json"] == second["qwen2-vl/config.json"]
    assert (
        first["flux/vae/diffusion_pytorch_model.safetensors"]
        != (second["flux/vae/diffusion_pytorch_model.safetensors"])
    )


def test_complete_build_is_skipped_and_seed_change_rebuilds(tmp_path):
    paths = build_tiny_models(tmp_path, seed=3)
    shard = paths.qwen2vl / "model-00001-of-00005.safetensors"
    shard.write_bytes(b"sentinel")
    build_tiny_models(tmp_path, seed=3)
    assert shard.read_bytes() == b"sentinel"
    build_tiny_models(tmp_path, seed=4)
    assert shard.read_bytes() != b"sentinel"
    assert json.loads((tmp_path / MARKER_NAME).read_text())["seed"] == 4
    assert not list(tmp_path.glob(".build-*"))
