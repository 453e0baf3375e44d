"""ControlNet inputs: the control kinds, their detectors and the frozen ControlNet checkpoint.

A control is a kind ("depth" or "line"), an image and a strength. The image is either the source
picture, which the kind's detector turns into a control map, or (`preprocessed`) the control map
itself. Maps are RGB at the output size; components/inference/generator.py VAE-encodes and
packs them for the ControlNet (diffusers FluxControlNetModel layout, see model/flux_forward.py).

Detectors, chosen to work offline with weights only from safetensors:
- depth: a transformers depth estimator (`AutoModelForDepthEstimation`, e.g. the Depth Anything
  V2 port `depth-anything/Depth-Anything-V2-Large-hf`; the released code runs Depth Anything V2
  ViT-L). Its relative depth is resized to the image (bicubic), min-max normalised to 0..255 and
  repeated into three channels, as the released code does.
- line: OpenCV Canny on the grayscale image (thresholds 50 / 150, the released code's own
  fallback when its learned line detector, Anyline, is missing). Deterministic and weight-free;
  Anyline ships as a .pth pickle, which this project does not load.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CONTROL_KINDS = ("depth", "line")
UNION_MODES = {"line": 0, "depth": 2}
"""Mode ids of a union FLUX ControlNet (InstantX layout: canny 0, depth 2; the released code
feeds its line maps as mode 0 and its depth maps as mode 2)."""
MAX_CONTROL_STRENGTH = 2.0
DEFAULT_STRENGTHS = {"depth": 0.2, "line": 0.4}
"""Strength of a control that names none: the released inference code's defaults
(depth_strength 0.2, line_strength 0.4); 1.0 for a kind not listed."""
LINE_THRESHOLDS = (50, 150)
DEPTH_DETECTOR_MISSING = (
    "control: kind 'depth' needs a depth detector (infer.depth_detector) unless the image is a "
    "preprocessed depth map"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlInput:
    """One control of a request: kind, image (source picture or, when preprocessed, the control
    map), strength in [0, 2] (the ControlNet residual scale; 0 = no effect)."""

    kind: str
    image: Image.Image = field(compare=False)
    strength: float | None = None
    """None = the kind's default (DEFAULT_STRENGTHS)."""
    preprocessed: bool = False

    def __post_init__(self) -> None:
        if self.strength is None:
            object.__setattr__(self, "strength", DEFAULT_STRENGTHS.get(self.kind, 1.0))


def check_controls(controls: object) -> None:
    """Field-level checks of a request's controls; ValueError starting with "control:"."""
    if not isinstance(controls, tuple):
        raise ValueError(f"control: must be a tuple of ControlInput, got {controls!r}")
    for index, control in enumerate(controls):
        where = f"control: control {index}"
        if not isinstance(control, ControlInput):
            raise ValueError(f"{where} must be a ControlInput, got {control!r}")
        if control.kind not in CONTROL_KINDS:
            raise ValueError(
                f"{where}: unknown kind {control.kind!r}; valid kinds: {', '.join(CONTROL_KINDS)}"
            )
        if not isinstance(control.image, Image.Image):
            raise ValueError(f"{where}: image must be a PIL image, got {control.image!r}")
        strength = control.strength
        if (
            not isinstance(strength, numbers.Real)
            or isinstance(strength, (bool, np.bool_))
            or not math.isfinite(strength)
            or not 0 <= strength <= MAX_CONTROL_STRENGTH
        ):
            raise ValueError(
                f"{where}: strength must lie in [0, {MAX_CONTROL_STRENGTH:g}], got {strength!r}"
            )
        if not isinstance(control.preprocessed, (bool, np.bool_)):
            raise ValueError(f"{where}: preprocessed must be true or false")


class DepthDetector:
    """A depth estimator checkpoint (transformers layout) -> normalised depth maps."""

    def __init__(self, path: Path, *, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.path = Path(path)
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(self.path)
        self.model = AutoModelForDepthEstimation.from_pretrained(
            self.path, dtype=torch.float32, use_safetensors=True
        )
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        """RGB depth map of `image`'s size: near = bright for relative-depth models."""
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        depth_BHW = self.model(**inputs).predicted_depth.float()
        resized_HW = torch.nn.functional.interpolate(
            depth_BHW[:, None], size=(image.height, image.width), mode="bicubic"
        )[0, 0]
        return depth_to_image(resized_HW.cpu().numpy())


def depth_to_image(depth_HW: np.ndarray) -> Image.Image:
    """Min-max normalise a depth array to 0..255 (a flat map gives black) as an RGB image."""
    depth_HW = depth_HW.astype(np.float64)
    low, high = float(depth_HW.min()), float(depth_HW.max())
    scaled_HW = (depth_HW - low) / (high - low) if high > low else np.zeros_like(depth_HW)
    gray_HW = np.clip(np.round(scaled_HW * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray_HW[:, :, None], 3, axis=2))


def line_map(image: Image.Image) -> Image.Image:
    """Canny edges of the grayscale image as an RGB image (white lines on black)."""
    import cv2

    gray_HW = np.asarray(image.convert("L"))
    edges_HW = cv2.Canny(gray_HW, *LINE_THRESHOLDS)
    return Image.fromarray(np.repeat(edges_HW[:, :, None], 3, axis=2))


def control_map(
    control: ControlInput, *, size: tuple[int, int], depth: DepthDetector | None
) -> Image.Image:
    """The RGB control map of `control` at `size` (width, height): the detector runs on the
    source picture at its own size, then the map is resized (a preprocessed map only resized)."""
    if control.preprocessed:
        result = control.image.convert("RGB")
    elif control.kind == "line":
        result = line_map(control.image)
    elif control.kind == "depth":
        if depth is None:
            raise ValueError(DEPTH_DETECTOR_MISSING)
        result = depth(control.image)
    else:
        raise ValueError(f"control: unknown kind {control.kind!r}")
    if result.size != tuple(size):
        result = result.resize(tuple(size), Image.Resampling.BICUBIC)
    return result


def union_mode(controlnet: torch.nn.Module, kind: str) -> int | None:
    """The mode id to feed a union ControlNet for `kind`; None for a single-purpose one."""
    return UNION_MODES[kind] if getattr(controlnet, "union", False) else None


def load_controlnet(name: str):
    """A FLUX ControlNet (diffusers FluxControlNetModel layout) from a local folder or the HF
    cache; a missing or partial checkpoint is an error naming it."""
    from diffusers import FluxControlNetModel

    from components.checkpoints import resolve_checkpoint

    resolved = resolve_checkpoint(
        name, revision=None, root_file="config.json", required=("diffusion_pytorch_model",)
    )
    return FluxControlNetModel.from_pretrained(
        resolved.path, torch_dtype=torch.float32, use_safetensors=True
    )


def load_depth_detector(name: str, *, device: str = "cpu") -> DepthDetector:
    """A DepthDetector from a local folder or the HF cache (config.json + model.safetensors)."""
    from components.checkpoints import resolve_checkpoint

    resolved = resolve_checkpoint(name, revision=None, root_file="config.json", required=("model",))
    return DepthDetector(resolved.path, device=device)
