"""ControlNet generation on tiny random models: detectors, control maps, strengths, several
controls at once, the residuals actually reaching FLUX, and control errors naming the field.

The tiny ControlNet and depth estimator are loaded from the session's tiny checkpoints through the
same loaders batch inference uses (components.inference.control.load_controlnet /
load_depth_detector).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from components.inference.control import (
    ControlInput,
    line_map,
    load_controlnet,
    load_depth_detector,
)
from components.inference.generator import Generator
from components.inference.request_rows import RequestDefaults, RequestError, parse_request
from components.inference.request_schema import GenerationRequest, validate_request

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 32, 48
STEPS = 2
PROMPT = "a red cat on a chair"


def _shapes_image(width: int, height: int) -> Image.Image:
    """A picture with edges and smooth shading (so both detectors have something to find)."""
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.stack(
        [
            60 + 2 * columns,
            40 + 3 * rows,
            np.full_like(rows, 90),
        ],
        axis=-1,
    ).astype(np.uint8)
    image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (230, 30, 30)
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def generator(tiny_models_dir, make_untrained_parts) -> Generator:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core box: one thread is fastest
    parts = make_untrained_parts(
        tiny_models_dir,
        controlnet=load_controlnet(str(tiny_models_dir.controlnet)),
        depth_detector=load_depth_detector(str(tiny_models_dir.depth)),
    )
    yield Generator(parts)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return _shapes_image(48, 64)


def _text(*controls: ControlInput, seed: int = 3) -> GenerationRequest:
    return GenerationRequest(
        mode="text",
        width=WIDTH,
        height=HEIGHT,
        prompt=PROMPT,
        seed=seed,
        steps=STEPS,
        control=controls,
    )


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_detectors_give_deterministic_maps_of_the_output_size(generator, source):
    depth = ControlInput(kind="depth", image=source, strength=1.0)
    line = ControlInput(kind="line", image=source, strength=1.0)
    request = _text(depth, line)
    first = generator.control_maps(request)
    again = generator.control_maps(request)
    for made, remade in zip(first, again, strict=True):
        assert made.mode == "RGB" and made.size == (WIDTH, HEIGHT)
        assert made.tobytes() == remade.tobytes()
    depth_map = _pixels(generator.parts.depth_detector(source))
    assert depth_map.shape == (64, 48, 3), "the detector's map is not at the source size"
    assert depth_map.min() == 0 and depth_map.max() == 255, "depth map is not normalised"
    assert (depth_map[..., 0] == depth_map[..., 2]).all()
    edges = _pixels(line_map(source))[..., 0]
    assert edges.shape == (64, 48)
    # The red square's border is found, its flat inside is not.
    assert edges[16, 12:36].max() == 255 and edges[30, 20:28].max() == 0


def test_preprocessed_control_skips_the_detector(generator, source):
    control = ControlInput(kind="depth", image=source, strength=1.0, preprocessed=True)
    (made,) = generator.control_maps(_text(control))
    expected = source.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    assert made.tobytes() == expected.tobytes()


def test_text_control_is_deterministic_and_strength_scales_it(generator, source):
    plain = generator.generate_latents(_text())
    depth = ControlInput(kind="depth", image=source, strength=1.0)
    controlled = generator.generate_latents(_text(depth))
    assert controlled.shape == plain.shape == (1, 16, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(controlled, generator.generate_latents(_text(depth)))
    assert not torch.allclose(controlled, plain, atol=1e-4), "the control changed nothing"
    zero = generator.generate_latents(_text(replace(depth, strength=0.0)))
    assert torch.equal(zero, plain), "strength 0 must equal no control exactly"
    other_seed = generator.generate_latents(_text(depth, seed=4))
    assert not torch.equal(other_seed, controlled)
    image = generator.generate(_text(depth))
    assert image.size == (WIDTH, HEIGHT)
    assert image.tobytes() == generator.generate(_text(depth)).tobytes()


def test_two_controls_and_variation_mode(generator, source):
    depth = ControlInput(kind="depth", image=source, strength=0.5)
    line = ControlInput(kind="line", image=source, strength=1.5)
    variation = GenerationRequest(
        mode="variation", width=WIDTH, height=HEIGHT, image=source, seed=5, steps=STEPS
    )
    plain = generator.generate_latents(variation)
    both = generator.generate_latents(replace(variation, control=(depth, line)))
    only_depth = generator.generate_latents(replace(variation, control=(depth,)))
    only_line = generator.generate_latents(replace(variation, control=(line,)))
    assert both.shape == plain.shape
    assert not torch.allclose(both, plain, atol=1e-4)
    assert not torch.allclose(both, only_depth, atol=1e-4), "the line control was dropped"
    assert not torch.allclose(both, only_line, atol=1e-4), "the depth control was dropped"
    assert torch.equal(both, generator.generate_latents(replace(variation, control=(depth, line))))
    image = generator.generate(replace(variation, control=(depth, line)))
    assert image.size == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ({"kind": "segmentation-xyz"}, "unknown kind"),
        ({"strength": 2.5}, "strength must lie in [0, 2]"),
        ({"strength": -0.1}, "strength must lie in [0, 2]"),
        ({"image": "not an image"}, "image must be a PIL image"),
    ],
)
def test_validation_rejects_bad_controls(source, control, message):
    fields = {"kind": "line", "image": source, "strength": 1.0, **control}
    with pytest.raises(ValueError, match=r"^control: ") as error:
        validate_request(_text(ControlInput(**fields)))
    assert message in str(error.value)


def test_generator_without_controlnet_or_depth_detector_refuses(generator, source):
    request = _text(ControlInput(kind="depth", image=source))
    bare = Generator.__new__(Generator)
    bare.parts = replace(generator.parts, controlnet=None)
    with pytest.raises(ValueError, match=r"^control: no ControlNet is configured"):
        bare.check_supported(request)
    bare.parts = replace(generator.parts, depth_detector=None)
    with pytest.raises(ValueError, match=r"^control: kind 'depth' needs a depth detector"):
        bare.check_supported(request)
    preprocessed = _text(ControlInput(kind="depth", image=source, preprocessed=True))
    bare.check_supported(preprocessed)


def test_bad_control_rows_name_the_field(tmp_path, source):
    source.save(tmp_path / "source.png")
    defaults = RequestDefaults(max_side_px=128, steps=STEPS)
    base = {"id": "r", "mode": "text", "prompt": PROMPT, "aspect": "32x48"}
    bad_controls = [
        [{"kind": "segmentation-xyz", "image": "source.png"}],
        [{"kind": "depth", "image": "missing.png"}],
        [{"kind": "line", "image": "source.png", "strength": 3}],
        {"depth": "source.png"},
    ]
    for control in bad_controls:
        with pytest.raises(RequestError) as error:
            parse_request({**base, "control": control}, base_dir=tmp_path, defaults=defaults)
        assert error.value.field == "control", error.value
    good = parse_request(
        {**base, "control": [{"kind": "line", "image": "source.png", "strength": 0.4}]},
        base_dir=tmp_path,
        defaults=defaults,
    )
    assert good.control[0].kind == "line" and good.control[0].strength == 0.4
