"""The imported tiny release in every mode through the T5 branch, and the branch's facts checked
on hand-built tensors: T5 tokens follow the connector's image tokens, skipping context_embedder;
text ids are zeros; 256 image tokens next to a prompt, 512 without; the prompt padded to 256 T5
tokens; the empty prompt's CLIP pooled vector even with a prompt."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from release_fixture import build_tiny_release

from components.inference.control import ControlInput, load_controlnet
from components.inference.generator import Generator
from components.inference.package import load_package
from components.inference.release_package import import_release
from components.inference.request_schema import MODES, FocusCircle, GenerationRequest
from model.flux_forward import FluxConditioning, embedded_text_tokens, flux_inputs
from model.presets import T5_MAX_TOKENS

pytestmark = [pytest.mark.integration]

WIDTH, HEIGHT, STEPS = 32, 48, 3
PROMPT = "a red circle in the center on a blue background"


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("release_generation")
    source = build_tiny_release(root / "release", tiny_models_dir)
    package = import_release(source, root / "package")
    parts = load_package(package)
    parts = replace(parts, controlnet=load_controlnet(str(source / "controlnet")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core box: one thread is fastest
    yield Generator(parts)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> Image.Image:
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    channels = [127 + 100 * np.sin(columns / 5), 127 + 100 * np.cos(rows / 7), 90 + 0 * rows]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def _request(mode: str, reference: Image.Image, **fields) -> GenerationRequest:
    pixels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    pixels[:, WIDTH // 2 :] = 255
    mask = Image.fromarray(pixels)
    inputs = {
        "text": {"prompt": PROMPT},
        "variation": {"image": reference},
        "image_text": {"image": reference, "prompt": PROMPT},
        "img2img": {"image": reference, "prompt": PROMPT},
        "inpaint": {"image": reference, "mask": mask},
    }[mode]
    values = {"width": WIDTH, "height": HEIGHT, "steps": STEPS} | inputs | fields
    return GenerationRequest(mode=mode, **values)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_on_the_imported_release(generator, reference, mode):
    image = generator.generate(_request(mode, reference))
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    assert np.asarray(image).std() > 0


def test_focus_and_control_run_on_the_imported_release(generator, reference):
    focused = _request(
        "image_text", reference, focus=FocusCircle(center_x=0.5, center_y=0.5, radius=0.3)
    )
    plain = generator.generate_latents(_request("image_text", reference))
    assert not torch.equal(generator.generate_latents(focused), plain)
    control = ControlInput(kind="line", image=reference, strength=0.8)
    controlled = generator.generate_latents(_request("image_text", reference, control=(control,)))
    assert not torch.equal(controlled, plain)


def test_t5_tokens_follow_the_image_tokens_and_the_budgets_follow_the_prompt(generator, reference):
    with_prompt = generator.conditioning(_request("image_text", reference))
    without = generator.conditioning(_request("variation", reference))
    text_only = generator.conditioning(_request("text", reference))
    settings = generator.parts.settings
    assert (settings.image_tokens, settings.prompt_image_tokens) == (512, 256)
    image_with, image_without = with_prompt.hidden_BTD.shape[1], without.hidden_BTD.shape[1]
    # The processor rounds each side to whole 28-px tokens: close to the budget either way.
    assert abs(image_with - 256) <= 0.15 * 256 and abs(image_without - 512) <= 0.15 * 512
    assert image_without > 1.7 * image_with
    assert with_prompt.embedded_BUE.shape[1] == T5_MAX_TOKENS and without.embedded_BUE is None
    assert text_only.hidden_BTD.shape[1] == 0 and text_only.embedded_BUE.shape[1] == T5_MAX_TOKENS
    # The T5 part is t5_embedder(T5(prompt)): FLUX's inner width, not the connector's.
    expected = generator.parts.t5_embedder(generator.t5(PROMPT).to(generator.dtype))
    assert torch.equal(with_prompt.embedded_BUE[0], expected)
    empty = generator._empty_pooled_P.to(with_prompt.pooled_BP)
    assert torch.equal(with_prompt.pooled_BP[0], empty) and torch.equal(
        text_only.pooled_BP[0], empty
    )
    ids = generator.t5.token_ids(PROMPT)[0]
    assert ids.shape == (T5_MAX_TOKENS,) and ids[-1] == generator.t5.tokenizer.pad_token_id


def test_the_joint_text_sequence_is_image_tokens_then_t5_tokens_with_zero_ids():
    """Hand-built tensors through a real (tiny-width) FLUX context_embedder swap."""
    torch.manual_seed(0)
    context_embedder = torch.nn.Linear(8, 6)
    network = torch.nn.Module()
    network.context_embedder = context_embedder
    hidden_1TD, embedded_1UE = torch.randn(1, 3, 8), torch.randn(1, 5, 6)
    with embedded_text_tokens(network, embedded_1UE):
        joint = network.context_embedder(hidden_1TD)
    assert network.context_embedder is context_embedder  # restored
    assert torch.equal(joint[:, :3], context_embedder(hidden_1TD))
    assert torch.equal(joint[:, 3:], embedded_1UE)  # not through context_embedder
    conditioning = FluxConditioning(
        hidden_BTD=hidden_1TD,
        mask_BT=torch.tensor([[True, True, False]]),
        pooled_BP=torch.zeros(1, 4),
        guidance_B=None,
        embedded_BUE=embedded_1UE,
    )
    inputs = flux_inputs(
        torch.zeros(1, 7, 64),
        image_ids_L3=torch.ones(7, 3),
        sigmas_B=torch.ones(1),
        conditioning=conditioning,
        text_mask_BT=conditioning.mask_BT,
    )
    assert inputs["txt_ids"].shape == (8, 3) and not inputs["txt_ids"].any()
    mask = inputs["joint_attention_kwargs"]["attention_mask"][0, 0, 0]
    # Text keys: the 3 image tokens' mask, then the 5 T5 tokens (all attended), then 7 latents.
    assert mask.tolist() == [True, True, False] + [True] * 5 + [True] * 7
