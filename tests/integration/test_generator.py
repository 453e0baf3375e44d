"""The generator on tiny random models: every mode, determinism, focus, img2img, inpaint, errors.

The Generator is built once for the module from the tiny base checkpoints (untrained tail and a
seeded connector), so images are noise-like but every path is real. Latents are compared where
the tiny VAE makes pixels meaningless: its mid-block attention spreads each latent over the whole
image (an inpaint's kept half decodes 18-28/255 away from the round trip on average), so kept
regions are checked on the sampled latent, and pixels only where the whole latent is kept.
"""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from components.inference.generator import Generator
from components.inference.request_schema import (
    MODES,
    FocusCircle,
    FocusGrid,
    GenerationRequest,
    validate_request,
)
from components.training.loader import collate_samples
from components.training.model_loading import empty_prompt_pooled
from components.training.objective import (
    GRID_SAMPLING_STEPS,
    GRID_SEED,
    LatentConvention,
    ObjectiveConfig,
    QwenFluxModel,
    condition_tokens,
    validation_samples,
)

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 32, 48
STEPS = 4
CAPTION = "a red cat on a chair"


def _smooth_image(width: int, height: int, phase: float) -> Image.Image:
    rows, columns = np.mgrid[0:height, 0:width]
    channels = [
        127 + 100 * np.sin(columns / 5 + phase),
        127 + 100 * np.cos(rows / 7 - phase),
        127 + 80 * np.sin((columns + rows) / 9),
    ]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def generator(tiny_models_dir, make_untrained_parts) -> Generator:
    threads = torch.get_num_threads()
    # Tiny ops on a shared 2-core box: one thread avoids OpenMP contention (10x faster here).
    torch.set_num_threads(1)
    yield Generator(make_untrained_parts(tiny_models_dir))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> Image.Image:
    return _smooth_image(WIDTH, HEIGHT, phase=1.0)


@pytest.fixture(scope="module")
def right_half_mask() -> Image.Image:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[:, WIDTH // 2 :] = 255
    return Image.fromarray(mask)


def _request(mode: str, reference: Image.Image, mask: Image.Image | None = None, **fields):
    inputs = {
        "text": {"prompt": CAPTION},
        "variation": {"image": reference},
        "image_text": {"image": reference, "prompt": CAPTION},
        "img2img": {"image": reference},
        "inpaint": {"image": reference, "mask": mask},
    }[mode]
    values = {"width": WIDTH, "height": HEIGHT, "steps": STEPS} | inputs | fields
    return GenerationRequest(mode=mode, **values)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_returns_an_rgb_image_of_the_requested_size(
    generator, reference, right_half_mask, mode
):
    image = generator.generate(_request(mode, reference, right_half_mask))
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    assert np.asarray(image).std() > 0


def test_sizes_other_than_the_reference_are_honoured(generator):
    # A 40x40 reference (not a multiple of 16: only Qwen2-VL sees it) -> a 48x32 image; img2img
    # resizes its init image to the output size.
    square = _smooth_image(40, 40, phase=2.0)
    for mode in ("variation", "img2img"):
        request = GenerationRequest(mode=mode, width=48, height=32, image=square, steps=2)
        assert generator.generate(request).size == (48, 32)


def test_same_seed_gives_identical_png_and_another_seed_differs(generator, reference):
    request = _request("variation", reference, seed=3)
    first, again = _png(generator.generate(request)), _png(generator.generate(request))
    assert first == again
    other = _png(generator.generate(replace(request, seed=4)))
    assert other != first
    # generate_many gives what generate gives, request by request.
    many = generator.generate_many([replace(request, seed=4), request])
    assert [_png(image) for image in many] == [other, first]


def test_prompt_and_guidance_change_the_image(generator, reference):
    text = _request("text", reference)
    base = _png(generator.generate(text))
    assert _png(generator.generate(replace(text, prompt="mountain lake at dawn"))) != base
    assert _png(generator.generate(replace(text, guidance=1.0))) != base
    variation = _png(generator.generate(_request("variation", reference)))
    assert _png(generator.generate(_request("image_text", reference))) != variation


def test_cfg_scale_zero_ignores_the_prompt_and_the_scale_extrapolates(generator, reference):
    # One Euler step lands on noise - v, linear in v: so the latent at scale s is exactly
    # u + s * (c - u) with u the scale-0 (unconditional) and c the scale-1 (plain) latents.
    text = _request("text", reference, steps=1)
    unconditional = generator.generate_latents(replace(text, cfg_scale=0.0))
    other_prompt = replace(text, prompt="mountain lake at dawn", cfg_scale=0.0)
    assert torch.equal(generator.generate_latents(other_prompt), unconditional)
    # The unconditional input is what a dropped training sample is, whatever the mode.
    dropped_variation = generator.generate_latents(
        replace(_request("variation", reference, steps=1), cfg_scale=0.0)
    )
    assert torch.equal(dropped_variation, unconditional)
    conditional = generator.generate_latents(text)
    assert not torch.allclose(conditional, unconditional)
    guided = generator.generate_latents(replace(text, cfg_scale=3.0))
    torch.testing.assert_close(
        guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4
    )


@pytest.fixture(scope="module")
def training_batch(generator, reference) -> dict:
    """The reference + caption encoded by the data pipeline's encoder and collated by the
    training loader: what training conditions FLUX on for this sample."""
    sample = generator.encoder.encode([reference], [CAPTION])[0]
    return collate_samples([sample | {"bucket_id": "b", "sample_key": "k", "caption": CAPTION}])


@pytest.fixture(scope="module")
def training_model(generator) -> QwenFluxModel:
    parts = generator.parts
    return QwenFluxModel(parts.tail, parts.connector, parts.transformer)


def test_conditioning_matches_the_training_path(
    generator, reference, training_batch, training_model
):
    with torch.no_grad():
        image_tokens, caption_tokens = condition_tokens(training_model, training_batch)
    reference_GD, _ = generator.reference_tokens(reference)
    torch.testing.assert_close(reference_GD, image_tokens[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        generator.prompt_tokens(CAPTION), caption_tokens[0], rtol=0, atol=1e-6
    )
    both = generator.conditioning(_request("image_text", reference, prompt=CAPTION))
    with torch.no_grad():
        expected = training_model.connector(torch.cat([image_tokens[0], caption_tokens[0]]))
    torch.testing.assert_close(both.hidden_BTD[0], expected, rtol=0, atol=1e-6)
    assert both.mask_BT.all() and both.guidance_B.tolist() == [3.5]
    torch.testing.assert_close(both.pooled_BP[0], training_batch["clip_pooled"][0])
    variation = generator.conditioning(_request("variation", reference))
    empty_pooled = empty_prompt_pooled(generator.parts.flux_path)
    torch.testing.assert_close(variation.pooled_BP[0], empty_pooled, rtol=0, atol=1e-6)
    assert variation.hidden_BTD.shape[1] == image_tokens[0].shape[0]


def test_variation_reproduces_the_training_validation_sampler(
    generator, reference, training_batch, training_model
):
    settings = generator.parts.settings
    convention = LatentConvention(
        codec=settings.codec,
        empty_pooled_P=empty_prompt_pooled(generator.parts.flux_path),
    )
    expected = validation_samples(
        training_model, training_batch, objective=ObjectiveConfig(), convention=convention
    )
    request = _request("variation", reference, seed=GRID_SEED, steps=GRID_SAMPLING_STEPS)
    # Same code path on both sides: measured max |diff| 0.0 on CPU; the tolerance is headroom.
    torch.testing.assert_close(generator.generate_latents(request), expected, rtol=0, atol=1e-5)
    # Guided, both sides guide against the same dropped-sample input.
    guided = validation_samples(
        training_model,
        training_batch,
        objective=ObjectiveConfig(),
        convention=convention,
        cfg_scale=2.5,
    )
    assert not torch.allclose(guided, expected)
    guided_request = replace(request, cfg_scale=2.5)
    torch.testing.assert_close(
        generator.generate_latents(guided_request), guided, atol=1e-5, rtol=0
    )


def test_reference_tokens_lie_on_the_merged_grid(generator, reference):
    tokens_GD, (rows, columns) = generator.reference_tokens(reference)
    assert tokens_GD.shape == (rows * columns, generator.parts.tail.norm.weight.shape[0])
    assert rows > columns  # a portrait image keeps its orientation on the grid


def test_focus_changes_the_image_and_a_full_grid_changes_nothing(generator, reference):
    plain = _request("variation", reference)
    base = _png(generator.generate(plain))
    circle = FocusCircle(center_x=0.2, center_y=0.2, radius=0.4)
    assert _png(generator.generate(replace(plain, focus=circle))) != base
    corner = FocusGrid(rows=2, columns=2, cells=((1, 1),))
    assert _png(generator.generate(replace(plain, focus=corner))) != base
    # Weight 1 on every token: the focus is a pure multiplication of the image tokens.
    everything = FocusGrid(rows=1, columns=1, cells=((0, 0),))
    assert _png(generator.generate(replace(plain, focus=everything))) == base


def test_img2img_at_full_strength_is_variation(generator, reference):
    # sigma_0 = 1 exactly, so the noised init is the pure noise of the same seed, and an
    # img2img without prompt is conditioned like a variation.
    variation = generator.generate_latents(_request("variation", reference, seed=5))
    full = generator.generate_latents(_request("img2img", reference, strength=1.0, seed=5))
    assert torch.equal(full, variation)


def test_img2img_with_small_strength_stays_closer_to_the_init(generator, reference):
    init = generator.encoder.encode_latents([reference])[0][None]
    round_trip = np.asarray(generator.decode_latents(init)[0], dtype=np.float64)
    for seed in (0, 1):
        distances = {}
        for strength in (0.25, 1.0):
            request = _request("img2img", reference, strength=strength, seed=seed)
            latents = generator.generate_latents(request)
            pixels = np.asarray(generator.decode_latents(latents)[0], dtype=np.float64)
            distances[strength] = (
                float((latents - init).abs().mean()),
                float(np.abs(pixels - round_trip).mean()),
            )
        # Measured (seed 0): latents 0.79 vs 2.38, pixels 32.7 vs 35.4 (of 255).
        assert distances[0.25][0] < 0.5 * distances[1.0][0]
        assert distances[0.25][1] < distances[1.0][1]


def test_inpaint_keeps_the_unmasked_latents(generator, reference, right_half_mask):
    init = generator.encoder.encode_latents([reference])[0][None]
    request = _request("inpaint", reference, right_half_mask, strength=1.0, seed=2)
    latents = generator.generate_latents(request)
    kept, repainted = latents[..., : init.shape[-1] // 2], latents[..., init.shape[-1] // 2 :]
    # Kept latents equal the init up to the scale/unscale round trip (measured max 6e-8).
    torch.testing.assert_close(kept, init[..., : init.shape[-1] // 2], rtol=0, atol=1e-6)
    # In the model's (scaled) latent units, where the noise has unit variance.
    scale = generator.parts.settings.vae_scaling_factor
    assert float((repainted - init[..., init.shape[-1] // 2 :]).abs().mean()) * scale > 0.5


def test_inpaint_with_a_black_mask_returns_the_round_trip(generator, reference):
    init = generator.encoder.encode_latents([reference])[0][None]
    black = Image.new("L", reference.size, 0)
    image = generator.generate(_request("inpaint", reference, black, strength=0.6))
    round_trip = np.asarray(generator.decode_latents(init)[0], dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - round_trip).max() <= 1


def test_inpaint_with_a_white_mask_is_img2img(generator, reference):
    white = Image.new("L", reference.size, 255)
    inpaint = generator.generate_latents(_request("inpaint", reference, white, strength=0.6))
    img2img = generator.generate_latents(_request("img2img", reference, strength=0.6))
    assert torch.equal(inpaint, img2img)


BAD_REQUESTS = [
    ({"mode": "sketch"}, "mode: unknown mode 'sketch'; valid modes: text, variation"),
    ({"mode": "variation", "image": None}, "image: mode 'variation' needs a reference image"),
    ({"mode": "image_text", "image": None}, "image: mode 'image_text' needs"),
    ({"mode": "img2img", "image": None}, "image: mode 'img2img' needs"),
    ({"mode": "text", "prompt": "  "}, "prompt: mode 'text' needs a non-empty prompt"),
    ({"mode": "image_text", "prompt": ""}, "prompt: mode 'image_text' needs"),
    ({"mode": "variation", "prompt": "a cat"}, "prompt: mode 'variation' takes no prompt"),
    ({"mode": "inpaint", "mask": None}, "mask: mode 'inpaint' needs a mask"),
    ({"mode": "inpaint", "mask": Image.new("L", (16, 48))}, "mask: size 16x48 differs"),
    ({"mode": "variation", "mask": Image.new("L", (32, 48))}, "mask: only mode 'inpaint'"),
    ({"width": 40}, "width: must be a multiple of 16"),
    ({"height": 0}, "height: must be a multiple of 16"),
    ({"height": 8}, "height: must be a multiple of 16 and >= 16"),
    ({"mode": "img2img", "strength": 0.0}, r"strength: must lie in \(0, 1\]"),
    ({"mode": "img2img", "strength": 1.5}, "strength: must lie in"),
    ({"steps": 0}, "steps: must be an integer >= 1"),
    ({"seed": -1}, "seed: must be an integer"),
    ({"guidance": float("nan")}, "guidance: must be a finite number"),
    ({"cfg_scale": -1.0}, "cfg_scale: must be a finite number >= 0"),
    ({"cfg_scale": float("inf")}, "cfg_scale: must be a finite number"),
    ({"focus": FocusCircle(center_x=1.2, center_y=0.5, radius=0.3)}, r"focus.center_x: .*\[0, 1\]"),
    ({"focus": FocusCircle(center_x=0.5, center_y=-0.1, radius=0.3)}, "focus.center_y"),
    ({"focus": FocusCircle(center_x=0.5, center_y=0.5, radius=0.0)}, "focus.radius: must be"),
    ({"focus": FocusGrid(rows=2, columns=2, cells=((2, 0),))}, r"focus.cells: cell \(2, 0\)"),
    ({"focus": FocusGrid(rows=2, columns=2, cells=((0, -1),))}, "focus.cells: cell"),
    ({"focus": FocusGrid(rows=2, columns=2, cells=())}, "focus.cells: mark at least one"),
    ({"focus": FocusGrid(rows=0, columns=2, cells=((0, 0),))}, "focus.rows: must be"),
    (
        {"mode": "text", "focus": FocusCircle(center_x=0.5, center_y=0.5, radius=0.3)},
        "focus: mode 'text' is conditioned on no reference-image tokens",
    ),
    (
        {
            "mode": "img2img",
            "prompt": "a cat",
            "focus": FocusGrid(rows=1, columns=1, cells=((0, 0),)),
        },
        "focus: mode 'img2img' with a prompt",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_REQUESTS)
def test_bad_requests_raise_value_errors_naming_the_field(
    generator, reference, right_half_mask, fields, message
):
    base = {"mode": "variation", "prompt": "", "image": reference, "mask": None}
    if fields.get("mode") == "inpaint":
        base["mask"] = right_half_mask
    if fields.get("mode") in ("text", "image_text"):
        base["prompt"] = "a cat"
    values = {"width": WIDTH, "height": HEIGHT, "steps": STEPS} | base | fields
    request = GenerationRequest(**values)
    with pytest.raises(ValueError, match=message):
        validate_request(request)
    with pytest.raises(ValueError, match=message):
        generator.generate(request)
    good = _request("text", reference)
    with pytest.raises(ValueError, match=message):
        generator.generate_many([good, request])  # all validated before any image is made


def test_numpy_numbers_from_a_results_table_are_accepted(reference):
    request = GenerationRequest(
        mode="variation",
        width=np.int64(WIDTH),
        height=np.int64(HEIGHT),
        image=reference,
        seed=np.int64(7),
        steps=np.int64(2),
        strength=np.float64(0.5),
    )
    validate_request(request)
    with pytest.raises(ValueError, match="steps: must be an integer"):
        validate_request(replace(request, steps=True))
