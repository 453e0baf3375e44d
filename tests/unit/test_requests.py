"""Request rows -> GenerationRequest or a RequestError naming the field, within the limits of
RequestDefaults, -> a result row (components/inference/request_rows.py, request_schema.py)."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.loopback_server import LoopbackServer
from components.data.url_policy import UrlPolicyConfig
from components.inference.control import ControlInput
from components.inference.request_rows import (
    RESULT_COLUMNS,
    RequestDefaults,
    RequestError,
    generate_row,
    parse_request,
    png_bytes,
    read_request_rows,
    request_id,
)
from components.inference.request_schema import (
    PROMPT_CHARS_PER_TOKEN,
    FocusCircle,
    FocusGrid,
    GenerationRequest,
)
from tests.loopback_routes import RoutedLoopbackServer

DEFAULTS = RequestDefaults(max_side_px=128, steps=4, max_steps=20)
SHORT_PROMPTS = RequestDefaults(max_side_px=128, steps=4, max_prompt_tokens=8)


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (96, 64), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("L", (96, 64), 255).save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small-mask.png")
    (tmp_path / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    return tmp_path


def parse(row, folder, defaults=DEFAULTS):
    return parse_request(row, base_dir=folder, defaults=defaults)


def test_jsonl_keeps_malformed_lines_as_rows_that_fail(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"id": "a", "mode": "text", "prompt": "x"}\n{broken\n\n[1, 2]\n')
    rows = read_request_rows(path)
    assert [request_id(row, i) for i, row in enumerate(rows)] == ["a", "line-2", "line-4"]
    for row in rows[1:]:
        with pytest.raises(RequestError) as caught:
            parse(row, tmp_path)
        assert caught.value.field == "row"


def test_parquet_rows_and_ids_by_position(tmp_path):
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": None, "mode": "text", "prompt": "x"}]), path)
    rows = read_request_rows(path)
    assert request_id(rows[0], 7) == "row-7"
    csv = tmp_path / "requests.csv"
    csv.write_text("id\n")
    with pytest.raises(ValueError, match="expected .parquet or .jsonl"):
        read_request_rows(csv)


def test_sizes_from_aspect_names_explicit_sizes_and_the_reference_image(folder):
    square = parse({"mode": "text", "prompt": "x"}, folder)
    assert (square.width, square.height) == (128, 128)
    wide = parse({"mode": "text", "prompt": "x", "aspect": "2:1"}, folder)
    assert (wide.width, wide.height) == (128, 64)
    explicit = parse({"mode": "text", "prompt": "x", "aspect": "64x32"}, folder)
    assert (explicit.width, explicit.height) == (64, 32)
    from_image = parse({"mode": "variation", "image": "wide.png"}, folder)
    assert from_image.width / from_image.height > 1.3  # nearest bucket of a 3:2 image
    assert from_image.steps == DEFAULTS.steps and from_image.image.mode == "RGB"


def test_focus_json_and_objects(folder):
    circle = parse(
        {
            "mode": "variation",
            "image": "wide.png",
            "focus": '{"center_x": 0.5, "center_y": 0.25, "radius": 0.3}',
        },
        folder,
    )
    assert circle.focus == FocusCircle(center_x=0.5, center_y=0.25, radius=0.3)
    grid = parse(
        {
            "mode": "variation",
            "image": "wide.png",
            "focus": {"rows": 2, "columns": 3, "cells": [[0, 1]]},
        },
        folder,
    )
    assert grid.focus == FocusGrid(rows=2, columns=3, cells=((0, 1),))


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"mode": "text", "prompt": "x", "colour": "red"}, "colour"),
        ({"mode": "sketch", "prompt": "x"}, "mode"),
        ({"mode": "text"}, "prompt"),
        ({"mode": "variation", "image": "missing.png"}, "image"),
        ({"mode": "variation", "image": "not-an-image.png"}, "image"),
        ({"mode": "variation", "image": 3}, "image"),
        ({"mode": "inpaint", "image": "wide.png", "mask": "small-mask.png"}, "mask"),
        ({"mode": "inpaint", "image": "wide.png"}, "mask"),
        ({"mode": "variation", "image": "wide.png", "focus": "{not json"}, "focus"),
        ({"mode": "variation", "image": "wide.png", "focus": {"radius": 1}}, "focus"),
        (
            {
                "mode": "variation",
                "image": "wide.png",
                "focus": {"center_x": 2, "center_y": 0.5, "radius": 0.2},
            },
            "focus",
        ),
        ({"mode": "text", "prompt": "x", "aspect": "3:7"}, "aspect"),
        ({"mode": "text", "prompt": "x", "aspect": "4096x4096"}, "aspect"),
        ({"mode": "text", "prompt": "x", "steps": 500}, "steps"),
        ({"mode": "text", "prompt": "x", "steps": 2.5}, "steps"),
        ({"mode": "text", "prompt": "x", "seed": "seven"}, "seed"),
        ({"mode": "text", "prompt": "x", "cfg_scale": -2.0}, "cfg_scale"),
        ({"mode": "text", "prompt": "x", "cfg_scale": "strong"}, "cfg_scale"),
        ({"mode": "img2img", "image": "wide.png", "strength": 1.5}, "strength"),
        ({"mode": "text", "prompt": "x", "control": {"depth": "d.png"}}, "control"),
        ({"mode": "text", "prompt": "x", "control": "[{not json"}, "control"),
        ({"mode": "text", "prompt": "x", "control": ["wide.png"]}, "control"),
        ({"mode": "text", "prompt": "x", "control": [{"kind": "line"}]}, "control"),
        ({"mode": "text", "prompt": "x", "control": [{"image": "wide.png"}]}, "control"),
        (
            {"mode": "text", "prompt": "x", "control": [{"kind": "line", "image": "missing.png"}]},
            "control",
        ),
        (
            {
                "mode": "text",
                "prompt": "x",
                "control": [{"kind": "line", "image": "mask.png", "x": 1}],
            },
            "control",
        ),
        (
            {"mode": "text", "prompt": "x", "control": [{"kind": "pose", "image": "wide.png"}]},
            "control",
        ),
        (
            {
                "mode": "text",
                "prompt": "x",
                "control": [{"kind": "depth", "image": "wide.png", "strength": 2.5}],
            },
            "control",
        ),
        (
            {
                "mode": "text",
                "prompt": "x",
                "control": [{"kind": "depth", "image": "wide.png", "strength": "high"}],
            },
            "control",
        ),
        (
            {
                "mode": "text",
                "prompt": "x",
                "control": [{"kind": "depth", "image": "wide.png", "preprocessed": "yes"}],
            },
            "control",
        ),
        ({"mode": "variation", "image": "http://169.254.169.254/latest/x.png"}, "image"),
        ({"mode": "variation", "image": "ftp://example.com/x.png"}, "image"),
    ],
)
def test_bad_rows_name_their_field(folder, row, field):
    with pytest.raises(RequestError) as caught:
        parse(row, folder)
    assert caught.value.field == field, str(caught.value)
    assert not str(caught.value).startswith(f"{field}: {field}:"), str(caught.value)


def test_urls_are_fetched_only_where_the_policy_allows(folder):
    with RoutedLoopbackServer(folder) as server:
        row = {"mode": "variation", "image": server.url("wide.png")}
        with pytest.raises(RequestError, match="loopback"):
            parse(row, folder)
        allowed = RequestDefaults(
            max_side_px=128, steps=4, url_policy=UrlPolicyConfig(allow_hosts=("127.0.0.1",))
        )
        request = parse(row, folder, allowed)
        assert request.image.size == (96, 64)
        missing = {"mode": "variation", "image": server.url("nothing-here.png")}
        with pytest.raises(RequestError) as caught:
            parse(missing, folder, allowed)
        assert caught.value.field == "image"
        redirected = {"mode": "variation", "image": f"{server.base_url}/redirect?to=/wide.png"}
        with pytest.raises(RequestError, match="redirect"):
            parse(redirected, folder, allowed)


def test_a_row_read_back_from_jsonl_parses(folder):
    row = {"id": "r1", "mode": "image_text", "image": "wide.png", "prompt": "a cat", "seed": 3}
    (folder / "one.jsonl").write_text(json.dumps(row | {"cfg_scale": 2.5}) + "\n")
    (read,) = read_request_rows(folder / "one.jsonl")
    request = parse(read, folder)
    assert (request.mode, request.prompt, request.seed) == ("image_text", "a cat", 3)
    assert (request.cfg_scale, parse(row, folder).cfg_scale) == (2.5, 1.0)


def test_controls_from_lists_json_text_parquet_and_urls(folder):
    controls = [
        {"kind": "depth", "image": "wide.png", "strength": 0.2},
        {"kind": "line", "image": "mask.png", "strength": 0, "preprocessed": True},
    ]
    listed = parse({"mode": "text", "prompt": "x", "control": controls}, folder)
    assert [(c.kind, c.strength, c.preprocessed) for c in listed.control] == [
        ("depth", 0.2, False),
        ("line", 0.0, True),
    ]
    assert all(isinstance(c, ControlInput) and c.image.mode == "RGB" for c in listed.control)
    assert listed.control[0].image.size == (96, 64)
    text = parse(
        {"mode": "variation", "image": "wide.png", "control": json.dumps(controls)}, folder
    )
    assert [c.kind for c in text.control] == ["depth", "line"]
    unset = [{"kind": "line", "image": "wide.png"}, {"kind": "depth", "image": "wide.png"}]
    defaulted = parse({"mode": "text", "prompt": "x", "control": unset}, folder)
    # The released inference code's defaults: line 0.4, depth 0.2.
    assert [(c.strength, c.preprocessed) for c in defaulted.control] == [(0.4, False), (0.2, False)]
    assert ControlInput(kind="line", image=listed.control[0].image).strength == 0.4
    assert parse({"mode": "text", "prompt": "x", "control": []}, folder).control == ()
    path = folder / "controls.parquet"
    rows = [{"id": "a", "mode": "text", "prompt": "x", "control": controls}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    (read,) = read_request_rows(path)
    from_parquet = parse(read, folder)
    assert [(c.kind, c.preprocessed) for c in from_parquet.control] == [
        ("depth", False),
        ("line", True),
    ]
    with LoopbackServer(folder) as server:
        remote = [{"kind": "line", "image": server.url("wide.png")}]
        row = {"mode": "text", "prompt": "x", "control": remote}
        with pytest.raises(RequestError, match="loopback") as caught:
            parse(row, folder)
        assert caught.value.field == "control"
        allowed = RequestDefaults(
            max_side_px=128, steps=4, url_policy=UrlPolicyConfig(allow_hosts=("127.0.0.1",))
        )
        assert parse(row, folder, allowed).control[0].image.size == (96, 64)


@pytest.mark.parametrize(
    ("row", "defaults", "field"),
    [
        ({"guidance": 20.5}, DEFAULTS, "guidance"),
        (
            {"guidance": 7.0},
            RequestDefaults(max_side_px=128, steps=4, max_guidance=5.0),
            "guidance",
        ),
        ({"cfg_scale": 21.0}, DEFAULTS, "cfg_scale"),
        (
            {"cfg_scale": 3.0},
            RequestDefaults(max_side_px=128, steps=4, max_cfg_scale=2.0),
            "cfg_scale",
        ),
        ({"steps": float("inf")}, DEFAULTS, "steps"),
        ({"seed": np.float64(2.5)}, DEFAULTS, "seed"),
        ({"prompt": "x" * (8 * PROMPT_CHARS_PER_TOKEN + 1)}, SHORT_PROMPTS, "prompt"),
    ],
)
def test_limits_are_per_row_errors_naming_the_field(folder, row, defaults, field):
    with pytest.raises(RequestError) as caught:
        parse({"mode": "text", "prompt": "x"} | row, folder, defaults)
    assert caught.value.field == field, str(caught.value)


def test_values_at_the_limits_and_numpy_numbers_parse(folder):
    row = {"mode": "text", "prompt": "x" * (8 * PROMPT_CHARS_PER_TOKEN), "guidance": 20.0}
    request = parse(
        row | {"cfg_scale": 20.0, "seed": np.int64(2**62), "steps": np.int64(3)},
        folder,
        SHORT_PROMPTS,
    )
    assert (request.guidance, request.cfg_scale, request.seed, request.steps) == (
        20.0,
        20.0,
        2**62,
        3,
    )
    defaulted = parse({"mode": "text", "prompt": "x"}, folder)
    assert (defaulted.seed, defaulted.guidance, defaulted.cfg_scale) == (0, None, 1.0)
    assert (
        defaulted.strength
        == DEFAULTS.strength
        == GenerationRequest(mode="text", width=16, height=16).strength
    )


@pytest.fixture
def confined(folder):
    """A requests folder inside `folder`, a file beside it, and a symlink leading out of it."""
    inside = folder / "requests"
    inside.mkdir()
    Image.new("RGB", (64, 64), (0, 90, 0)).save(inside / "inside.png")
    Image.new("L", (64, 64), 255).save(inside / "mask.png")
    (inside / "sub").mkdir()
    Image.new("RGB", (64, 64), (0, 0, 90)).save(folder / "outside.png")
    Image.new("L", (64, 64), 0).save(folder / "outside-mask.png")
    (inside / "link.png").symlink_to(folder / "outside.png")
    return inside


@pytest.mark.parametrize(
    "row",
    [
        {"mode": "variation", "image": "../outside.png"},
        {"mode": "variation", "image": "link.png"},
        {"mode": "variation", "image": "OUTSIDE"},
        {"mode": "variation", "image": "sub/../../outside.png"},
        {"mode": "inpaint", "image": "inside.png", "mask": "../outside-mask.png"},
        {"mode": "text", "prompt": "x", "control": [{"kind": "line", "image": "../outside.png"}]},
    ],
)
def test_local_paths_stay_inside_the_requests_folder(confined, row):
    row = {
        key: str(confined.parent / "outside.png") if value == "OUTSIDE" else value
        for key, value in row.items()
    }
    with pytest.raises(RequestError, match="outside the requests folder") as caught:
        parse(row, confined)
    field = "control" if "control" in row else "mask" if "mask" in row else "image"
    assert caught.value.field == field
    trusted = parse_request(row, base_dir=confined, defaults=DEFAULTS, trust_local_paths=True)
    assert trusted.mode == row["mode"]


@pytest.mark.parametrize("trusted", [False, True])
def test_unreadable_paths_are_errors_naming_the_field(confined, trusted):
    (confined / "loop.png").symlink_to(confined / "loop.png")
    for reference in ("loop.png", "bad\x00name.png"):
        row = {"mode": "variation", "image": reference}
        with pytest.raises(RequestError) as caught:
            parse_request(row, base_dir=confined, defaults=DEFAULTS, trust_local_paths=trusted)
        assert caught.value.field == "image", str(caught.value)


def test_allowed_roots_absolute_paths_bytes_and_the_pyfunc_without_a_folder(confined):
    absolute = {"mode": "variation", "image": str(confined / "inside.png")}
    assert parse(absolute, confined).image.size == (64, 64)
    outside = {"mode": "variation", "image": "../outside.png"}
    roots = RequestDefaults(max_side_px=128, steps=4, allowed_roots=(str(confined.parent),))
    assert parse(outside, confined, roots).image.getpixel((0, 0)) == (0, 0, 90)
    with pytest.raises(RequestError, match="has no requests folder"):
        parse_request(
            {"mode": "variation", "image": "inside.png"}, base_dir=None, defaults=DEFAULTS
        )
    with pytest.raises(RequestError, match="outside the requests folder"):
        parse_request(absolute, base_dir=None, defaults=DEFAULTS)
    data = (confined / "inside.png").read_bytes()
    from_bytes = parse_request(
        {"mode": "variation", "image": data}, base_dir=None, defaults=DEFAULTS
    )
    assert from_bytes.image.getpixel((0, 0)) == (0, 90, 0)
    tiny = RequestDefaults(max_side_px=128, steps=4, max_image_bytes=16)
    with pytest.raises(RequestError, match="image bytes exceed 16 B") as caught:
        parse_request({"mode": "variation", "image": data}, base_dir=None, defaults=tiny)
    assert caught.value.field == "image"


class _FakeGenerator:
    """What generate_row needs of a Generator: check_supported, encoder.tokenizer, generate.
    Its tokenizer counts words; generation fails for the prompt "explode"."""

    def __init__(self) -> None:
        self.encoder = SimpleNamespace(tokenizer=self._tokenize)
        self.generated = []

    @staticmethod
    def _tokenize(text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": text.split()}

    def check_supported(self, request):
        if request.control:
            raise ValueError("control: no ControlNet is configured (infer.controlnet)")

    def generate(self, request):
        if request.prompt == "explode":
            raise RuntimeError("out of memory")
        self.generated.append(request)
        return Image.new("RGB", (request.width, request.height))


@pytest.mark.parametrize(
    ("row", "status", "field"),
    [
        ({"mode": "text", "prompt": "one two three four"}, "ok", ""),
        ({"mode": "text", "prompt": "one two three four five"}, "error", "prompt"),
        (
            {"mode": "text", "prompt": "x", "control": [{"kind": "line", "image": "wide.png"}]},
            "error",
            "control",
        ),
        ({"mode": "text", "prompt": "explode"}, "error", "generation"),
        ({"mode": "text", "prompt": "x", "seed": "seven"}, "error", "seed"),
    ],
)
def test_generate_row_turns_every_failure_into_a_result_naming_the_field(
    folder, row, status, field
):
    generator = _FakeGenerator()
    defaults = RequestDefaults(max_side_px=128, steps=4, max_prompt_tokens=4)
    outcome = generate_row(generator, row, base_dir=folder, defaults=defaults)
    result = outcome.result
    assert tuple(result) == RESULT_COLUMNS
    assert (result["id"], result["status"], result["error_field"]) == ("row-0", status, field), (
        result
    )
    if status == "ok":
        assert outcome.image.size == (128, 128) and outcome.generate_seconds >= 0
        assert (result["mode"], result["steps"], result["width"]) == ("text", 4, 128)
        assert result["error"] == ""
    else:
        assert outcome.image is None and result["error"].startswith(f"{field}: ")
    assert len(generator.generated) == (status == "ok")


def test_png_bytes_match_a_png_file(tmp_path):
    image = Image.effect_noise((32, 16), 40).convert("RGB")
    image.save(tmp_path / "saved.png", format="PNG")
    assert png_bytes(image) == (tmp_path / "saved.png").read_bytes()
