"""Request rows -> GenerationRequest -> result row, the same on every inference path (batch
inference, `qwenflux generate`, the MLflow pyfunc model).

A row (REQUEST_FIELDS of request_schema.py): id, mode, prompt, image / mask, strength, focus
(JSON text or an object: {"center_x", "center_y", "radius"} or {"rows", "columns", "cells":
[[row, column], ...]}), control (a list, or JSON text of a list, of {"kind": "depth" | "line",
"image", "strength": 0..2 (default depth 0.2, line 0.4), "preprocessed": true when the image
already is the control map}), aspect ("16:9", one of the report's ratios, or "WxH"), seed, steps,
guidance, cfg_scale (true classifier-free guidance, 1 = off). An image is encoded bytes, an
http(s) URL checked by the URL policy, or a local path: relative to the requests file's folder,
and (unless the caller trusts its paths) inside that folder or `allowed_roots` once symlinks and
'..' are resolved. Missing optional fields take the defaults.

`parse_request` raises nothing but RequestError; `generate_row` never raises for a row: it
returns RESULT_COLUMNS with status "error" and the field, so one bad request cannot stop a batch.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from components.data.buckets import nearest_bucket
from components.data.url_policy import check_url
from components.inference.control import ControlInput
from components.inference.request_schema import (
    REQUEST_FIELDS,
    FocusCircle,
    FocusGrid,
    GenerationRequest,
    RequestDefaults,
    RequestError,
    check_limits,
    check_prompt_characters,
    check_prompt_tokens,
    validate_request,
)

PARSE_ERROR_KEY = "_parse_error"
"""Set on a row that could not even be read (a malformed JSONL line)."""
RESULT_COLUMNS = (
    "id",
    "status",
    "error_field",
    "error",
    "mode",
    "seed",
    "steps",
    "width",
    "height",
)
"""What every path reports per request row (batch inference adds its files and timings, the
pyfunc model the PNG bytes). status: "ok" or "error"; error_field: the request field at fault,
or GENERATION_FIELD; error: "field: reason". mode .. height are the parsed request's values."""
GENERATION_FIELD = "generation"
"""error_field of a request that parsed but failed inside the model."""
CONTROL_KEYS = ("kind", "image", "strength", "preprocessed")


@dataclass(frozen=True, kw_only=True, slots=True)
class RowOutcome:
    """One request row's answer."""

    result: dict[str, Any]
    """RESULT_COLUMNS values."""
    image: Image.Image | None
    """The generated image; None unless result["status"] is "ok"."""
    generate_seconds: float | None
    """Time in Generator.generate; None when it did not run."""


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


def empty_result(identifier: str) -> dict[str, Any]:
    """RESULT_COLUMNS of a row that has not succeeded (yet): status "error", no field."""
    result = dict.fromkeys(RESULT_COLUMNS)
    result.update(id=identifier, status="error", error_field="", error="", mode="")
    return result


def generate_row(
    generator,
    row: dict[str, Any],
    *,
    base_dir: Path | None,
    defaults: RequestDefaults,
    trust_local_paths: bool = False,
) -> RowOutcome:
    """Parse, check and generate one request row (its id set, see request_id) with a loaded
    Generator. A bad row or a model failure becomes status "error" with its field; nothing but
    BaseExceptions escape. base_dir and trust_local_paths are parse_request's."""
    result = empty_result(request_id(row, 0))
    image, seconds = None, None
    try:
        request = parse_request(
            row, base_dir=base_dir, defaults=defaults, trust_local_paths=trust_local_paths
        )
        result.update(
            mode=request.mode,
            seed=request.seed,
            steps=request.steps,
            width=request.width,
            height=request.height,
        )
        check_with_generator(request, generator, defaults)
        started = time.perf_counter()
        image = generator.generate(request)
        seconds = time.perf_counter() - started
        result["status"] = "ok"
    except RequestError as error:
        result.update(error_field=error.field, error=str(error))
    except Exception as error:  # a model failure on one request must not end the batch
        failure = RequestError(GENERATION_FIELD, f"{type(error).__name__}: {error}")
        result.update(error_field=failure.field, error=str(failure))
    return RowOutcome(result=result, image=image, generate_seconds=seconds)


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (what batch inference writes and the pyfunc model returns)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_with_generator(request: GenerationRequest, generator, defaults: RequestDefaults) -> None:
    """The checks that need the loaded model: RequestError("control") for controls its parts
    cannot run, RequestError("prompt") past max_prompt_tokens of its Qwen2-VL tokenizer."""
    try:
        generator.check_supported(request)
    except RequestError:
        raise
    except ValueError as error:
        # check_supported's messages all start "control: " (components/inference/generator.py).
        raise RequestError("control", str(error).removeprefix("control: ")) from None
    if request.prompt.strip():
        tokenizer = generator.encoder.tokenizer
        num_tokens = len(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        check_prompt_tokens(num_tokens, defaults)


def parse_request(
    row: dict[str, Any],
    *,
    base_dir: Path | None,
    defaults: RequestDefaults,
    trust_local_paths: bool = False,
) -> GenerationRequest:
    """A validated GenerationRequest within the limits of `defaults` (images loaded), or
    RequestError naming the field.

    base_dir: the requests file's folder; relative paths resolve against it. None (the pyfunc
    model) refuses relative paths. Local files must lie in base_dir or defaults.allowed_roots
    unless trust_local_paths (`qwenflux generate`: its user named the files)."""
    if row.get(PARSE_ERROR_KEY):
        raise RequestError("row", row[PARSE_ERROR_KEY])
    unknown = sorted(set(row) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field (known: {', '.join(REQUEST_FIELDS)})")
    prompt = _text(row, "prompt", "")
    check_prompt_characters(prompt, defaults)  # before any image is read or the tokenizer runs
    mode = _text(row, "mode", "")
    images = _ImageSource(base_dir=base_dir, defaults=defaults, is_trusted=trust_local_paths)
    image = images.load(row.get("image"), "image")
    mask = images.load(row.get("mask"), "mask")
    width, height = _size(row.get("aspect"), image, defaults)
    optional = {
        name: _number(row, name, kind)
        for name, kind in (("seed", int), ("guidance", float), ("cfg_scale", float))
        if _present(row.get(name))
    }
    request = GenerationRequest(
        mode=mode,
        width=width,
        height=height,
        prompt=prompt,
        image=image.convert("RGB") if image is not None else None,
        mask=mask.convert("L") if mask is not None else None,
        strength=_number(row, "strength", float, defaults.strength),
        focus=_focus(row.get("focus")),
        control=_controls(row.get("control"), images),
        steps=_number(row, "steps", int, defaults.steps),
        **optional,
    )
    validate_request(request)
    check_limits(request, defaults)
    return request


def _present(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return len(value) > 0
    return True


def _text(row: dict[str, Any], name: str, default: str) -> str:
    value = row.get(name)
    if not _present(value):
        return default
    if not isinstance(value, str):
        raise RequestError(name, f"expected text, got {type(value).__name__}")
    return value


def _number(row: dict[str, Any], name: str, kind, default=None):
    """The row's number `name` as `kind` (int or float); default when absent."""
    value = row.get(name)
    if not _present(value):
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(name, f"expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise RequestError(name, f"expected a finite number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise RequestError(name, f"expected a whole number, got {value!r}")
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


def _json_value(value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise RequestError(name, f"not valid JSON: {error}") from None


def _focus(value: Any) -> FocusCircle | FocusGrid | None:
    if not _present(value):
        return None
    value = _json_value(value, "focus")
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


def _controls(value: Any, images: _ImageSource) -> tuple[ControlInput, ...]:
    """The row's controls; kind, strength and preprocessed are checked by validate_request."""
    if not _present(value):
        return ()
    value = _json_value(value, "control")
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
        if not isinstance(item["kind"], str):
            raise RequestError("control", f"control {index}: kind must be text")
        image = images.load(item["image"], "control")
        strength = item.get("strength")
        if strength is not None and (
            isinstance(strength, bool) or not isinstance(strength, numbers.Real)
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


@dataclass(frozen=True, kw_only=True, slots=True)
class _ImageSource:
    """Where a row's images may come from (see parse_request)."""

    base_dir: Path | None
    defaults: RequestDefaults
    is_trusted: bool

    def load(self, reference: Any, name: str) -> Image.Image | None:
        if not _present(reference):
            return None
        if isinstance(reference, (bytes, bytearray, memoryview)):
            data, label = bytes(reference), f"the {name} bytes"
            if len(data) > self.defaults.max_image_bytes:
                raise RequestError(name, f"{label} exceed {self.defaults.max_image_bytes} B")
        elif isinstance(reference, str):
            label = reference
            data = (
                self._fetch(reference, name) if "://" in reference else self._read(reference, name)
            )
        else:
            raise RequestError(
                name, f"expected a path, URL or image bytes, got {type(reference).__name__}"
            )
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                return opened.copy()
        except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
            raise RequestError(name, f"{label} is not a readable image: {error}") from None

    def _read(self, reference: str, name: str) -> bytes:
        path = Path(reference)
        if not path.is_absolute():
            if self.base_dir is None:
                raise RequestError(name, f"relative path {reference!r} has no requests folder")
            path = self.base_dir / path
        try:
            if not self.is_trusted:
                path = self._confined(path, reference, name)
            if not path.is_file():
                raise RequestError(name, f"file {path} does not exist")
            if path.stat().st_size > self.defaults.max_image_bytes:
                limit = self.defaults.max_image_bytes
                raise RequestError(name, f"file {path} is larger than {limit} B")
            return path.read_bytes()
        except (OSError, RuntimeError, ValueError) as error:  # unreadable, symlink loop, NUL
            if isinstance(error, RequestError):
                raise
            raise RequestError(name, f"cannot read {reference!r}: {error}") from None

    def _confined(self, path: Path, reference: str, name: str) -> Path:
        """path with symlinks and '..' resolved, if it lies in base_dir or an allowed root."""
        resolved = path.resolve()
        roots = [Path(root) for root in self.defaults.allowed_roots]
        roots += [self.base_dir] if self.base_dir is not None else []
        if not any(resolved.is_relative_to(root.resolve()) for root in roots):
            raise RequestError(
                name, f"file {reference} lies outside the requests folder and allowed_roots"
            )
        return resolved

    def _fetch(self, url: str, name: str) -> bytes:
        defaults = self.defaults
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
