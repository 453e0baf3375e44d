"""What one generation asks for: `GenerationRequest` (already parsed; images as PIL), its focus
types and `validate_request`, the field-level checks that need no model.

Kept apart from the Generator so the request parser and the registry's row reader can build and
check requests without importing the networks. A failed check is a ValueError whose message
starts with the field's name ("mask: ...", "focus.radius: ...").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.inference.control import ControlInput, check_controls
from model.generation import LATENT_SIDE_MULTIPLE

MODES = ("text", "variation", "image_text", "img2img", "inpaint")
"""text: prompt through Qwen2-VL; variation: reference image tokens only (no prompt);
image_text: reference image tokens + prompt tokens (as training's IMAGE_AND_CAPTION);
img2img: start from the reference image noised to `strength`; inpaint: img2img that repaints
only where the mask is white."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FocusCircle:
    """Weight the reference image's tokens by max(0, 1 - distance / (radius * min side)); centre
    and radius are fractions of the image (centre in [0, 1], radius > 0)."""

    center_x: float
    center_y: float
    radius: float


@dataclass(frozen=True, kw_only=True, slots=True)
class FocusGrid:
    """Weight 1 on the marked cells of a rows x columns grid over the reference image, 0 elsewhere;
    cells are (row, column) pairs, 0-based."""

    rows: int
    columns: int
    cells: tuple[tuple[int, int], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRequest:
    """One image to generate. Sides must be multiples of 16 (latent /8, then 2x2 packing)."""

    mode: str
    width: int
    height: int
    prompt: str = ""
    image: Image.Image | None = field(default=None, compare=False)
    """Reference image (variation, image_text; the init image of img2img and inpaint)."""
    mask: Image.Image | None = field(default=None, compare=False)
    """Inpaint mask, same size as `image`: white (>= 128) = repaint, black = keep."""
    strength: float = 0.8
    """img2img / inpaint: how far to noise the init image (1.0 = pure noise)."""
    focus: FocusCircle | FocusGrid | None = None
    seed: int = 0
    steps: int = 28
    guidance: float | None = None
    """None = the package's default."""
    cfg_scale: float = 1.0
    """True classifier-free guidance: v = v_uncond + cfg_scale * (v_cond - v_uncond), where the
    unconditional input is a dropped training sample (no tokens, the empty prompt's pooled
    vector). 1.0 = off, one FLUX call per step (the released model's way, which relies on the
    guidance embedding alone); any other value costs a second call per step."""
    control: tuple[ControlInput, ...] = ()
    """ControlNet controls (any mode); their residuals are summed at every Euler step."""


REFERENCE_MODES = ("variation", "image_text", "img2img", "inpaint")
"""Modes that need `image` (a reference image or the init image)."""
INIT_IMAGE_MODES = ("img2img", "inpaint")
"""Modes whose sampler starts part-way from the init image's latent."""
MAX_SEED = 2**64 - 1


def uses_reference_tokens(request: GenerationRequest) -> bool:
    """True when the reference image's token states condition FLUX (focus applies to them)."""
    if request.mode in ("variation", "image_text"):
        return True
    return request.mode in INIT_IMAGE_MODES and not request.prompt.strip()


def uses_prompt_tokens(request: GenerationRequest) -> bool:
    """True when the prompt's token states (and its CLIP pooled vector) condition FLUX."""
    if request.mode in ("text", "image_text"):
        return True
    return request.mode in INIT_IMAGE_MODES and bool(request.prompt.strip())


def validate_request(request: GenerationRequest) -> None:
    """Field-level checks of one request; ValueError naming the field. Needs no model."""
    if request.mode not in MODES:
        raise ValueError(f"mode: unknown mode {request.mode!r}; valid modes: {', '.join(MODES)}")
    _check_size(request)
    _check_sampling(request)
    _check_inputs(request)
    if request.focus is not None:
        _check_focus(request)
    check_controls(request.control)


def _is_int(value: object) -> bool:
    # numbers.Integral: numpy integers from a results table count too; bool does not.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def _check_size(request: GenerationRequest) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        if not _is_int(value) or value < LATENT_SIDE_MULTIPLE or value % LATENT_SIDE_MULTIPLE:
            raise ValueError(
                f"{name}: must be a multiple of {LATENT_SIDE_MULTIPLE} and >= "
                f"{LATENT_SIDE_MULTIPLE} (VAE /8, then 2x2 packing), got {value!r}"
            )


def _check_sampling(request: GenerationRequest) -> None:
    if not _is_int(request.steps) or request.steps < 1:
        raise ValueError(f"steps: must be an integer >= 1, got {request.steps!r}")
    if not _is_real(request.strength) or not 0 < request.strength <= 1:
        raise ValueError(f"strength: must lie in (0, 1], got {request.strength!r}")
    if not _is_int(request.seed) or not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed: must be an integer in [0, 2**64 - 1], got {request.seed!r}")
    if request.guidance is not None and (not _is_real(request.guidance) or request.guidance < 0):
        raise ValueError(
            f"guidance: must be a finite number >= 0 or None, got {request.guidance!r}"
        )
    if not _is_real(request.cfg_scale) or request.cfg_scale < 0:
        raise ValueError(f"cfg_scale: must be a finite number >= 0, got {request.cfg_scale!r}")


def _check_inputs(request: GenerationRequest) -> None:
    mode = request.mode
    if not isinstance(request.prompt, str):
        raise ValueError(f"prompt: must be a string, got {type(request.prompt).__name__}")
    if mode in REFERENCE_MODES and not isinstance(request.image, Image.Image):
        raise ValueError(
            f"image: mode {mode!r} needs a reference image (PIL), got {request.image!r}"
        )
    has_prompt = bool(request.prompt.strip())
    if mode in ("text", "image_text") and not has_prompt:
        raise ValueError(f"prompt: mode {mode!r} needs a non-empty prompt")
    if mode == "variation" and has_prompt:
        raise ValueError("prompt: mode 'variation' takes no prompt (use mode 'image_text')")
    if mode != "inpaint":
        if request.mask is not None:
            raise ValueError(f"mask: only mode 'inpaint' takes a mask, not {mode!r}")
        return
    if not isinstance(request.mask, Image.Image):
        raise ValueError(f"mask: mode 'inpaint' needs a mask image (PIL), got {request.mask!r}")
    if request.mask.size != request.image.size:
        raise ValueError(
            f"mask: size {request.mask.size[0]}x{request.mask.size[1]} differs from the image's "
            f"{request.image.size[0]}x{request.image.size[1]}"
        )


def _check_focus(request: GenerationRequest) -> None:
    focus = request.focus
    if not uses_reference_tokens(request):
        raise ValueError(
            f"focus: mode {request.mode!r}"
            + (" with a prompt" if request.mode in INIT_IMAGE_MODES else "")
            + " is conditioned on no reference-image tokens to focus"
        )
    if isinstance(focus, FocusCircle):
        for name in ("center_x", "center_y"):
            value = getattr(focus, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ValueError(f"focus.{name}: must lie in [0, 1], got {value!r}")
        if not _is_real(focus.radius) or focus.radius <= 0:
            raise ValueError(f"focus.radius: must be a finite number > 0, got {focus.radius!r}")
        return
    if not isinstance(focus, FocusGrid):
        raise ValueError(f"focus: must be FocusCircle, FocusGrid or None, got {focus!r}")
    for name in ("rows", "columns"):
        value = getattr(focus, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"focus.{name}: must be an integer >= 1, got {value!r}")
    if not focus.cells:
        raise ValueError("focus.cells: mark at least one (row, column) cell")
    for cell in focus.cells:
        if (
            len(cell) != 2
            or not all(_is_int(index) for index in cell)
            or not (0 <= cell[0] < focus.rows and 0 <= cell[1] < focus.columns)
        ):
            raise ValueError(
                f"focus.cells: cell {cell!r} lies outside the {focus.rows} x {focus.columns} grid"
            )
