"""What a loaded model package hands the generator: how the model was trained and encodes
(`GeneratorSettings`, stored in package.json) and the trained networks with the paths of their
verified frozen bases (`GeneratorParts`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from components.inference.control import DepthDetector
from model.conditioning import TEXT_BRANCHES
from model.latent_codec import LatentCodec


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratorSettings:
    """How the model was trained and encodes (from the data manifest / training config)."""

    instruction: str
    """The user-turn instruction next to a reference image ("Describe this image.")."""
    image_tokens: int
    """Qwen2-VL image-token budget of a reference image (512)."""
    vae_scaling_factor: float
    vae_shift_factor: float
    guidance: float = 3.5
    """Default FLUX-dev guidance-embedding value (what training fed)."""
    text_branch: str = "qwen2vl"
    """How a text prompt conditions: "qwen2vl" (the prompt's Qwen2-VL states through the
    connector, as this project trains) or "t5" (the released model's branch: FLUX's T5 states of
    the prompt through the package's t5_embedder, after the image tokens)."""
    prompt_image_tokens: int = 0
    """Image-token budget of a reference image next to a text prompt (0: image_tokens); the
    released model uses 256 there and 512 without a prompt."""

    def __post_init__(self) -> None:
        if self.text_branch not in TEXT_BRANCHES:
            raise ValueError(
                f"text_branch must be one of {TEXT_BRANCHES}, got {self.text_branch!r}"
            )
        if self.prompt_image_tokens < 0 or self.image_tokens < 1:
            raise ValueError("image_tokens must be >= 1 and prompt_image_tokens >= 0")

    @property
    def codec(self) -> LatentCodec:
        """The latent codec of the VAE factors the model was trained under."""
        return LatentCodec(
            scaling_factor=self.vae_scaling_factor, shift_factor=self.vae_shift_factor
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratorParts:
    """A loaded model package: trained networks + verified frozen bases (by path)."""

    qwen2vl_path: Path
    """Base Qwen2-VL checkpoint folder (prefix layers, tokenizer, image processor)."""
    flux_path: Path
    """Base FLUX diffusers folder (vae/, text_encoder/ + tokenizer/ for CLIP-L)."""
    transformer: nn.Module
    """The trained FluxTransformer2DModel."""
    tail: nn.Module
    """The trained Qwen2VLTail (last decoder layer + final norm + rope)."""
    connector: nn.Module
    """The trained Connector (encoder hidden -> joint_attention_dim)."""
    settings: GeneratorSettings
    name: str = ""
    """Registered model name (results carry it); empty outside the registry."""
    version: str = ""
    """Registered model version."""
    t5_embedder: nn.Module | None = None
    """The T5 branch's Linear (T5 width -> FLUX inner width); set iff settings.text_branch is
    "t5"."""
    controlnet: nn.Module | None = None
    """Frozen FLUX ControlNet (FluxControlNetModel); None = control requests are refused."""
    depth_detector: DepthDetector | None = None
    """Depth estimator for 'depth' controls given as source pictures."""
