"""The one request schema of every inference path (batch inference, `qwenflux generate`, the
MLflow pyfunc model): the row fields (`REQUEST_FIELDS`), what a request gets for the fields it
leaves out and the limits it must respect (`RequestDefaults`), the parsed request
(`GenerationRequest`; images as PIL), its focus types, and the checks that need no model
(`validate_request`, `check_limits`).

Kept apart from the Generator so the row parser (request_rows.py) can build and check requests
without importing the networks. A failed check is a `RequestError` (a ValueError) that carries
its field as data (`field`, `subfield`, `reason`); its message reads "field: reason" or
"field.subfield: reason" ("mask: ...", "focus.radius: ...").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from components.data.buckets import BucketConfig, build_buckets
from components.data.url_policy import UrlPolicyConfig
from components.inference.control import ControlInput, check_controls
from model.generation import LATENT_SIDE_MULTIPLE

MODES = ("text", "variation", "image_text", "img2img", "inpaint")
"""text: prompt through Qwen2-VL; variation: reference image tokens only (no prompt);
image_text: reference image tokens + prompt tokens (as training's IMAGE_AND_CAPTION);
img2img: start from the reference image noised to `strength`; inpaint: img2img that repaints
only where the mask is white."""
REQUEST_FIELDS = (
    "id",
    "mode",
    "prompt",
    "image",
    "mask",
    "strength",
    "focus",
    "control",
    "aspect",
    "seed",
    "steps",
    "guidance",
    "cfg_scale",
)
"""The columns of a request row, the same on every path (request_rows.py documents each)."""
DEFAULT_STEPS = 28
DEFAULT_STRENGTH = 0.8
PROMPT_CHARS_PER_TOKEN = 16
"""A prompt over max_prompt_tokens * PROMPT_CHARS_PER_TOKEN characters is refused before it is
tokenized (a token of natural text averages about 4 characters)."""


class RequestError(ValueError):
    """A request that cannot be generated. `field` is the request field at fault ("focus"),
    `subfield` the part of it when there is one ("radius"), `reason` what is wrong; the message
    is "field: reason" or "field.subfield: reason"."""

    def __init__(self, field: str, reason: str, subfield: str = "") -> None:
        super().__init__(field, reason, subfield)
        self.field = field
        self.reason = reason
        self.subfield = subfield

    def __str__(self) -> str:
        where = f"{self.field}.{self.subfield}" if self.subfield else self.field
        return f"{where}: {self.reason}"


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
    strength: float = DEFAULT_STRENGTH
    """img2img / inpaint: how far to noise the init image (1.0 = pure noise)."""
    focus: FocusCircle | FocusGrid | None = None
    seed: int = 0
    steps: int = DEFAULT_STEPS
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


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestDefaults:
    """What a request gets for the fields it leaves out, and the limits it must respect."""

    aspect: str = "1:1"
    """Aspect when the request names none and has no reference image."""
    aspect_ratios: tuple[str, ...] = ("16:9", "2:1", "2.35:1", "1:1", "1:2")
    """Aspect names a request may use (the report's buckets)."""
    max_side_px: int = 1024
    """Longest side of the generated image."""
    steps: int = DEFAULT_STEPS
    """Sampling steps."""
    max_steps: int = 200
    """Upper limit on a request's steps (a typo must not book a GPU for hours)."""
    strength: float = DEFAULT_STRENGTH
    """img2img / inpaint strength."""
    max_prompt_tokens: int = 512
    """Longest prompt in Qwen2-VL tokens (an overlong prompt would stall its whole batch)."""
    max_guidance: float = 20.0
    """Upper limit on a request's guidance (the lower one is 0)."""
    max_cfg_scale: float = 20.0
    """Upper limit on a request's cfg_scale (the lower one is 0)."""
    max_image_bytes: int = 32 * 2**20
    """Largest reference image or mask file fetched or read."""
    fetch_timeout_s: float = 15.0
    """Timeout of one URL fetch."""
    url_policy: UrlPolicyConfig = field(default_factory=UrlPolicyConfig)
    """Which URLs may be fetched (loopback/private refused unless allowed)."""
    allowed_roots: tuple[str, ...] = ()
    """Folders local image / mask / control files may lie in besides the requests file's own
    (relative ones resolve against the working directory); symlinks and '..' are resolved
    before the check. Empty = only the requests file's folder (the pyfunc model: none)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_steps < self.steps:
            raise ValueError("steps must be >= 1 and <= max_steps")
        if self.max_image_bytes < 1 or self.fetch_timeout_s <= 0:
            raise ValueError("max_image_bytes and fetch_timeout_s must be > 0")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not (_is_real(self.max_guidance) and self.max_guidance >= 0):
            raise ValueError(f"max_guidance must be a finite number >= 0, got {self.max_guidance}")
        if not (_is_real(self.max_cfg_scale) and self.max_cfg_scale >= 1):
            raise ValueError(
                f"max_cfg_scale must be a finite number >= 1 (1 = off), got {self.max_cfg_scale}"
            )
        self.buckets()  # validates the ratios and side

    def buckets(self):
        return build_buckets(
            BucketConfig(aspect_ratios=self.aspect_ratios, max_side_px=self.max_side_px)
        )


def defaults_from_plain(values: Mapping[str, Any]) -> RequestDefaults:
    """RequestDefaults from plain values (an MLflow model_config, JSON): lists become tuples and
    `url_policy` a UrlPolicyConfig. An unknown key is a ValueError naming it."""
    known = [item.name for item in dataclasses.fields(RequestDefaults)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"requests.{unknown[0]}: unknown key (known: {', '.join(known)})")

    def plain(table: Mapping[str, Any]) -> dict[str, Any]:
        return {
            key: tuple(value) if isinstance(value, list) else value for key, value in table.items()
        }

    given = plain(values)
    if isinstance(given.get("url_policy"), Mapping):
        given["url_policy"] = UrlPolicyConfig(**plain(given["url_policy"]))
    return RequestDefaults(**given)


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
    """Field-level checks of one request; RequestError naming the field. Needs no model."""
    if request.mode not in MODES:
        raise RequestError(
            "mode", f"unknown mode {request.mode!r}; valid modes: {', '.join(MODES)}"
        )
    _check_size(request)
    _check_sampling(request)
    _check_inputs(request)
    if request.focus is not None:
        _check_focus(request)
    try:
        check_controls(request.control)
    except ValueError as error:
        # check_controls names no other field: its messages all start "control: ".
        raise RequestError("control", str(error).removeprefix("control: ")) from None


def check_prompt_characters(prompt: str, defaults: RequestDefaults) -> None:
    """The cheap cap before any tokenizer: RequestError("prompt") past
    max_prompt_tokens * PROMPT_CHARS_PER_TOKEN characters."""
    limit = defaults.max_prompt_tokens * PROMPT_CHARS_PER_TOKEN
    if len(prompt) > limit:
        raise RequestError(
            "prompt",
            f"{len(prompt)} characters exceeds the limit {limit} "
            f"({defaults.max_prompt_tokens} tokens)",
        )


def check_prompt_tokens(num_tokens: int, defaults: RequestDefaults) -> None:
    """RequestError("prompt") when the prompt's Qwen2-VL token count exceeds the cap."""
    if num_tokens > defaults.max_prompt_tokens:
        raise RequestError(
            "prompt", f"{num_tokens} tokens exceeds the limit {defaults.max_prompt_tokens}"
        )


def check_limits(request: GenerationRequest, defaults: RequestDefaults) -> None:
    """The configured limits of a validated request (steps, guidance, cfg_scale, prompt
    characters); RequestError naming the field."""
    if request.steps > defaults.max_steps:
        raise RequestError("steps", f"{request.steps} exceeds the limit {defaults.max_steps}")
    if request.guidance is not None and request.guidance > defaults.max_guidance:
        raise RequestError(
            "guidance", f"{request.guidance!r} exceeds the limit {defaults.max_guidance!r}"
        )
    if request.cfg_scale > defaults.max_cfg_scale:
        raise RequestError(
            "cfg_scale", f"{request.cfg_scale!r} exceeds the limit {defaults.max_cfg_scale!r}"
        )
    check_prompt_characters(request.prompt, defaults)


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
            raise RequestError(
                name,
                f"must be a multiple of {LATENT_SIDE_MULTIPLE} and >= {LATENT_SIDE_MULTIPLE} "
                f"(VAE /8, then 2x2 packing), got {value!r}",
            )


def _check_sampling(request: GenerationRequest) -> None:
    if not _is_int(request.steps) or request.steps < 1:
        raise RequestError("steps", f"must be an integer >= 1, got {request.steps!r}")
    if not _is_real(request.strength) or not 0 < request.strength <= 1:
        raise RequestError("strength", f"must lie in (0, 1], got {request.strength!r}")
    if not _is_int(request.seed) or not 0 <= request.seed <= MAX_SEED:
        raise RequestError("seed", f"must be an integer in [0, 2**64 - 1], got {request.seed!r}")
    if request.guidance is not None and (not _is_real(request.guidance) or request.guidance < 0):
        raise RequestError(
            "guidance", f"must be a finite number >= 0 or None, got {request.guidance!r}"
        )
    if not _is_real(request.cfg_scale) or request.cfg_scale < 0:
        raise RequestError("cfg_scale", f"must be a finite number >= 0, got {request.cfg_scale!r}")


def _check_inputs(request: GenerationRequest) -> None:
    mode = request.mode
    if not isinstance(request.prompt, str):
        raise RequestError("prompt", f"must be a string, got {type(request.prompt).__name__}")
    if mode in REFERENCE_MODES and not isinstance(request.image, Image.Image):
        raise RequestError(
            "image", f"mode {mode!r} needs a reference image (PIL), got {request.image!r}"
        )
    has_prompt = bool(request.prompt.strip())
    if mode in ("text", "image_text") and not has_prompt:
        raise RequestError("prompt", f"mode {mode!r} needs a non-empty prompt")
    if mode == "variation" and has_prompt:
        raise RequestError("prompt", "mode 'variation' takes no prompt (use mode 'image_text')")
    if mode != "inpaint":
        if request.mask is not None:
            raise RequestError("mask", f"only mode 'inpaint' takes a mask, not {mode!r}")
        return
    if not isinstance(request.mask, Image.Image):
        raise RequestError("mask", f"mode 'inpaint' needs a mask image (PIL), got {request.mask!r}")
    if request.mask.size != request.image.size:
        raise RequestError(
            "mask",
            f"size {request.mask.size[0]}x{request.mask.size[1]} differs from the image's "
            f"{request.image.size[0]}x{request.image.size[1]}",
        )


def _check_focus(request: GenerationRequest) -> None:
    focus = request.focus
    if not uses_reference_tokens(request):
        with_prompt = " with a prompt" if request.mode in INIT_IMAGE_MODES else ""
        raise RequestError(
            "focus",
            f"mode {request.mode!r}{with_prompt} is conditioned on no reference-image tokens "
            "to focus",
        )
    if isinstance(focus, FocusCircle):
        for name in ("center_x", "center_y"):
            value = getattr(focus, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise RequestError("focus", f"must lie in [0, 1], got {value!r}", name)
        if not _is_real(focus.radius) or focus.radius <= 0:
            raise RequestError(
                "focus", f"must be a finite number > 0, got {focus.radius!r}", "radius"
            )
        return
    if not isinstance(focus, FocusGrid):
        raise RequestError("focus", f"must be FocusCircle, FocusGrid or None, got {focus!r}")
    for name in ("rows", "columns"):
        value = getattr(focus, name)
        if not _is_int(value) or value < 1:
            raise RequestError("focus", f"must be an integer >= 1, got {value!r}", name)
    if not focus.cells:
        raise RequestError("focus", "mark at least one (row, column) cell", "cells")
    for cell in focus.cells:
        if (
            len(cell) != 2
            or not all(_is_int(index) for index in cell)
            or not (0 <= cell[0] < focus.rows and 0 <= cell[1] < focus.columns)
        ):
            raise RequestError(
                "focus",
                f"cell {cell!r} lies outside the {focus.rows} x {focus.columns} grid",
                "cells",
            )
