"""RequestError carrying its field as data, the field checks of validate_request and the
RequestDefaults limits (components/inference/request_schema.py)."""

import pickle

import pytest
from PIL import Image

from components.data.url_policy import UrlPolicyConfig
from components.inference.control import ControlInput
from components.inference.request_schema import (
    FocusCircle,
    FocusGrid,
    GenerationRequest,
    RequestDefaults,
    RequestError,
    defaults_from_plain,
    validate_request,
)

pytestmark = pytest.mark.unit


def test_errors_carry_their_field_as_data_and_survive_pickling():
    error = RequestError("focus", "must be a finite number > 0, got -1", "radius")
    assert (error.field, error.subfield, error.reason) == ("focus", "radius", error.reason)
    assert str(error) == "focus.radius: must be a finite number > 0, got -1"
    assert isinstance(error, ValueError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.field, again.subfield, str(again)) == ("focus", "radius", str(error))
    assert str(RequestError("seed", "expected a number")) == "seed: expected a number"


@pytest.mark.parametrize(
    ("fields", "field", "subfield"),
    [
        ({"mode": "sketch"}, "mode", ""),
        ({"width": 40}, "width", ""),
        ({"seed": -1}, "seed", ""),
        ({"focus": FocusCircle(center_x=0.5, center_y=0.5, radius=0.0)}, "focus", "radius"),
        ({"focus": FocusGrid(rows=2, columns=2, cells=((2, 0),))}, "focus", "cells"),
        ({"control": (ControlInput(kind="pose", image=Image.new("RGB", (8, 8))),)}, "control", ""),
    ],
)
def test_validation_errors_name_the_field_without_parsing_the_message(fields, field, subfield):
    values = {"mode": "variation", "width": 32, "height": 32, "image": Image.new("RGB", (32, 32))}
    with pytest.raises(RequestError) as caught:
        validate_request(GenerationRequest(**(values | fields)))
    assert (caught.value.field, caught.value.subfield) == (field, subfield), str(caught.value)
    where = f"{field}.{subfield}" if subfield else field
    assert str(caught.value) == f"{where}: {caught.value.reason}"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"max_guidance": -1.0}, "max_guidance"),
        ({"max_guidance": float("inf")}, "max_guidance"),
        ({"max_cfg_scale": 0.5}, "max_cfg_scale"),
    ],
)
def test_bad_limits_are_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        RequestDefaults(**fields)


def test_defaults_from_plain_values_are_strict():
    plain = {
        "max_side_px": 128,
        "allowed_roots": ["/data/a", "/data/b"],
        "url_policy": {"allow_hosts": ["127.0.0.1"]},
    }
    defaults = defaults_from_plain(plain)
    assert defaults.allowed_roots == ("/data/a", "/data/b")
    assert defaults.url_policy == UrlPolicyConfig(allow_hosts=("127.0.0.1",))
    assert defaults_from_plain({}) == RequestDefaults()
    with pytest.raises(ValueError, match="requests.max_side: unknown key"):
        defaults_from_plain({"max_side": 64})
