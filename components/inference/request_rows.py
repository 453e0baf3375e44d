"""Batch-inference requests: read rows from Parquet or JSONL and turn each into a
GenerationRequest, or into a RequestError naming the field that is wrong.

A row: id, mode, prompt, image / mask (a path relative to the requests file, or an http(s) URL
checked by the URL policy), strength, focus (JSON: {"center_x", "center_y", "radius"} or
{"rows", "columns", "cells": [[row, column], ...]}), control (a list, or JSON text of a list, of
{"kind": "depth" | "line", "image": path or URL, "strength": 0..2 (default depth 0.2, line
0.4), "preprocessed": true when the image already is the control map}), aspect ("16:9", one of
the report's ratios, or "WxH"), seed, steps, guidance, cfg_scale (true classifier-free
guidance, 1 = off). Missing optional fields take the defaults. A broken row never raises out of
`parse_request` as anything but RequestError, so one bad request cannot stop a batch.
"""

from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from components.data.buckets import BucketConfig, build_buckets, nearest_bucket
from components.data.url_policy import UrlPolicyConfig, check_url
from components.inference.control import ControlInput
from components.inference.request_schema import (
    FocusCircle,
    FocusGrid,
    GenerationRequest,
    validate_request,
)

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
PARSE_ERROR_KEY = "_parse_error"
"""Set on a row that could not even be read (a malformed JSONL line)."""


class RequestError(ValueError):
    """A request that cannot be generated; `field` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestDefaults:
    """What a request gets for the fields it leaves out, and the limits it must respect."""

    aspect: str = "1:1"
    """Aspect when the request names none and has no reference image."""
    aspect_ratios: tuple[str, ...] = ("16:9", "2:1", "2.35:1", "1:1", "1:2")
    """Aspect names a request may use (the report's buckets)."""
    max_side_px: int = 1024
    """Longest side of the generated image."""
    steps: int = 28
    """Sampling steps."""
    max_steps: int = 200
    """Upper limit on a request's steps (a typo must not book a GPU for hours)."""
    strength: float = 0.8
    """img2img / inpaint strength."""
    max_image_bytes: int = 32 * 2**20
    """Largest reference image or mask file fetched or read."""
    fetch_timeout_s: float = 15.0
    """Timeout of one URL fetch."""
    url_policy: UrlPolicyConfig = field(default_factory=UrlPolicyConfig)
    """Which URLs may be fetched (loopback/private refused unless allowed)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_steps < self.steps:
            raise ValueError("steps must be >= 1 and <= max_steps")
        if self.max_image_bytes < 1 or self.fetch_timeout_s <= 0:
            raise ValueError("max_image_bytes and fetch_timeout_s must be > 0")
        self.buckets()  # validates the ratios and side

    def buckets(self):
        return build_buckets(
            BucketConfig(aspect_ratios=self.aspect_ratios, max_side_px=self.max_side_px)
        )


def read_request_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .parquet or .jsonl file. A JSONL line that is not a JSON object becomes a row
    {"id": "line-<n>", "_parse_error": ...} so it is reported, not lost."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requests file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"requests file {path}: expected .parquet or .jsonl")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as error:
            row = {"id": f"line-{number}", PARSE_ERROR_KEY: f"line {number}: {error}"}
        rows.append(row)
    return rows


def request_id(row: dict[str, Any], position: int) -> str:
    """The row's id as text; rows without one are named by position."""
    value = row.get("id")
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == "":
        return f"row-{position}"
    return str(value)


def parse_request(
    row: dict[str, Any], *, base_dir: Path, defaults: RequestDefaults
) -> GenerationRequest:
    """A validated GenerationRequest (images loaded), or RequestError naming the field."""
    if row.get(PARSE_ERROR_KEY):
        raise RequestError("row", row[PARSE_ERROR_KEY])
    unknown = sorted(set(row) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field (known: {', '.join(REQUEST_FIELDS)})")
    mode = _text(row, "mode", "")
    image = _load_image(row.get("image"), "image", base_dir=base_dir, defaults=defaults)
    mask = _load_image(row.get("mask"), "mask", base_dir=base_dir, defaults=defaults)
    width, height = _size(row.get("aspect"), image, defaults)
    request = GenerationRequest(
        mode=mode,
        width=width,
        height=height,
        prompt=_text(row, "prompt", ""),
        image=image.convert("RGB") if image is not None else None,
        mask=mask.convert("L") if mask is not None else None,
        strength=_number(row, "strength", defaults.strength, float),
        focus=_focus(row.get("focus")),
        control=_controls(row.get("control"), base_dir=base_dir, defaults=defaults),
        seed=_number(row, "seed", 0, int),
        steps=_number(row, "steps", defaults.steps, int),
        guidance=_number(row, "guidance", None, float),
        cfg_scale=_number(row, "cfg_scale", 1.0, float),
    )
    if request.steps > defaults.max_steps:
        raise RequestError("steps", f"{request.steps} exceeds the limit {defaults.max_steps}")
    try:
        validate_request(request)
    except ValueError as error:
        field_name = _field_of(str(error))
        # The message starts with the field already ("seed: must be ..."): say it once.
        raise RequestError(field_name, str(error).removeprefix(f"{field_name}: ")) from None
    return request


def _present(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value not in ("", {}, [])


def _text(row: dict[str, Any], name: str, default: str) -> str:
    value = row.get(name)
    if not _present(value):
        return default
    if not isinstance(value, str):
        raise RequestError(name, f"expected text, got {type(value).__name__}")
    return value


def _number(row: dict[str, Any], name: str, default, kind):
    value = row.get(name)
    if not _present(value):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"expected a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise RequestError(name, f"expected a whole number, got {value!r}")
    if not math.isfinite(float(value)):
        raise RequestError(name, f"expected a finite number, got {value!r}")
    return kind(value)


def _size(aspect: Any, image: Image.Image | None, defaults: RequestDefaults) -> tuple[int, int]:
    buckets = defaults.buckets()
    if not _present(aspect):
        if image is not None:
            bucket = nearest_bucket(image.width, image.height, buckets)
            return bucket.width_px, bucket.height_px
        aspect = defaults.aspect
    if not isinstance(aspect, str):
        raise RequestError("aspect", f"expected text such as '16:9' or '512x768', got {aspect!r}")
    for bucket in buckets:
        if bucket.aspect_name == aspect:
            return bucket.width_px, bucket.height_px
    if "x" in aspect:
        width, _, height = aspect.partition("x")
        if width.isdigit() and height.isdigit():
            if max(int(width), int(height)) > defaults.max_side_px:
                raise RequestError(
                    "aspect", f"{aspect} exceeds the longest side {defaults.max_side_px}"
                )
            return int(width), int(height)
    names = ", ".join(bucket.aspect_name for bucket in buckets)
    raise RequestError("aspect", f"{aspect!r} is not one of {names} or WxH")


def _focus(value: Any) -> FocusCircle | FocusGrid | None:
    if not _present(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise RequestError("focus", f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RequestError("focus", "expected an object")
    circle_keys, grid_keys = {"center_x", "center_y", "radius"}, {"rows", "columns", "cells"}
    try:
        if set(value) == circle_keys:
            return FocusCircle(**{key: float(value[key]) for key in circle_keys})
        if set(value) == grid_keys:
            cells = tuple((int(row), int(column)) for row, column in value["cells"])
            return FocusGrid(rows=int(value["rows"]), columns=int(value["columns"]), cells=cells)
    except (TypeError, ValueError) as error:
        raise RequestError("focus", f"bad values: {error}") from None
    raise RequestError("focus", "expected {center_x, center_y, radius} or {rows, columns, cells}")


CONTROL_KEYS = ("kind", "image", "strength", "preprocessed")


def _controls(value: Any, *, base_dir: Path, defaults: RequestDefaults) -> tuple[ControlInput, ...]:
    """The row's controls; kind, strength and preprocessed are checked by validate_request."""
    if not _present(value):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise RequestError("control", f"not valid JSON: {error}") from None
    if isinstance(value, tuple) or type(value).__name__ == "ndarray":
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RequestError(
            "control", 'expected a list of {"kind", "image", "strength", "preprocessed"} objects'
        )
    controls = []
    for index, item in enumerate(value):
        item = {key: entry for key, entry in item.items() if _present(entry) or entry is False}
        unknown = sorted(set(item) - set(CONTROL_KEYS))
        if unknown:
            raise RequestError(
                "control",
                f"control {index}: unknown key {unknown[0]!r} (known: {', '.join(CONTROL_KEYS)})",
            )
        for key in ("kind", "image"):
            if key not in item:
                raise RequestError("control", f"control {index}: {key!r} is required")
        image = _load_image(item["image"], "control", base_dir=base_dir, defaults=defaults)
        strength = item.get("strength")
        if strength is not None and (
            isinstance(strength, bool) or not isinstance(strength, (int, float))
        ):
            raise RequestError("control", f"control {index}: strength must be a number")
        controls.append(
            ControlInput(
                kind=item["kind"],
                image=image.convert("RGB"),
                strength=None if strength is None else float(strength),
                preprocessed=item.get("preprocessed", False),
            )
        )
    return tuple(controls)


def _load_image(
    reference: Any, name: str, *, base_dir: Path, defaults: RequestDefaults
) -> Image.Image | None:
    if not _present(reference):
        return None
    if not isinstance(reference, str):
        raise RequestError(name, f"expected a path or URL, got {type(reference).__name__}")
    if "://" in reference:
        data = _fetch(reference, name, defaults)
    else:
        path = Path(reference) if Path(reference).is_absolute() else base_dir / reference
        if not path.is_file():
            raise RequestError(name, f"file {path} does not exist")
        if path.stat().st_size > defaults.max_image_bytes:
            raise RequestError(name, f"file {path} is larger than {defaults.max_image_bytes} B")
        data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.copy()
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise RequestError(name, f"{reference} is not a readable image: {error}") from None


def _fetch(url: str, name: str, defaults: RequestDefaults) -> bytes:
    refused = check_url(url, defaults.url_policy)
    if refused is not None:
        raise RequestError(name, f"URL {url} refused by the URL policy ({refused})")
    try:
        with _OPENER.open(url, timeout=defaults.fetch_timeout_s) as response:
            data = response.read(defaults.max_image_bytes + 1)
    except OSError as error:
        raise RequestError(name, f"could not fetch {url}: {error}") from None
    if len(data) > defaults.max_image_bytes:
        raise RequestError(name, f"{url} is larger than {defaults.max_image_bytes} B")
    return data


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: a redirect could lead past the URL policy."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(newurl, code, "redirect refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


def _field_of(message: str) -> str:
    """The field a generator validation message starts with ("mask: ...", "focus.radius: ..."),
    else "request"."""
    head = message.split(":", 1)[0].strip().split(".")[0]
    return head if head in REQUEST_FIELDS or head in ("width", "height") else "request"
