"""FLUX forward on padded conditioning: the padding bar, timestep scale, guidance, checkpointing."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from model.conditioning import empty_conditioning, pad_tokens
from model.flux_forward import (
    FluxConditioning,
    joint_attention_mask,
    predict_velocity,
    set_gradient_checkpointing,
)
from model.latent_codec import latent_image_ids, pack_latents
from model.presets import (
    TINY_FLUX_JOINT_ATTENTION_DIM,
    TINY_FLUX_POOLED_PROJECTION_DIM,
    tiny_flux_transformer_kwargs,
)

pytestmark = pytest.mark.unit

WIDTH = TINY_FLUX_JOINT_ATTENTION_DIM


@pytest.fixture(scope="module")
def transformer():
    # One thread: on 2 shared cores, intra-op threads make these tiny ops ~20x slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield FluxTransformer2DModel(**tiny_flux_transformer_kwargs()).eval()
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def two_block_transformer(transformer):
    """The tiny FLUX cut to one double + one single block, so two backward passes stay under a
    second (depends on `transformer` for its one-thread setting)."""
    torch.manual_seed(0)
    kwargs = {**tiny_flux_transformer_kwargs(), "num_layers": 1, "num_single_layers": 1}
    return FluxTransformer2DModel(**kwargs)


def _inputs(text_lengths, seed=0):
    """Packed latents of a 4x6 latent grid (6 tokens), per-sample text, pooled, sigmas."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(text_lengths)
    latents_BLC = pack_latents(torch.randn(batch, 16, 4, 6, generator=generator))
    text_LD = [torch.randn(length, WIDTH, generator=generator) for length in text_lengths]
    pooled_BP = torch.randn(batch, TINY_FLUX_POOLED_PROJECTION_DIM, generator=generator)
    sigmas_B = torch.rand(batch, generator=generator)
    return latents_BLC, text_LD, pooled_BP, sigmas_B


def _predict(transformer, latents_BLC, hidden_BTD, mask_BT, pooled_BP, sigmas_B, guidance=3.5):
    conditioning = FluxConditioning(
        hidden_BTD=hidden_BTD,
        mask_BT=mask_BT,
        pooled_BP=pooled_BP,
        guidance_B=torch.full((latents_BLC.shape[0],), guidance),
    )
    return predict_velocity(
        transformer,
        latents_BLC,
        image_ids_L3=latent_image_ids(4, width_latent=6),
        sigmas_B=sigmas_B,
        conditioning=conditioning,
    )


@torch.no_grad()
def test_padded_sample_equals_sample_alone(transformer):
    latents_BLC, text_LD, pooled_BP, sigmas_B = _inputs([3, 7])
    hidden_BTD, mask_BT = pad_tokens(text_LD)
    batched_BLC = _predict(transformer, latents_BLC, hidden_BTD, mask_BT, pooled_BP, sigmas_B)
    for index in range(2):
        alone_BLC = _predict(
            transformer,
            latents_BLC[index : index + 1],
            text_LD[index][None],
            torch.ones(1, text_LD[index].shape[0], dtype=torch.bool),
            pooled_BP[index : index + 1],
            sigmas_B[index : index + 1],
        )
        torch.testing.assert_close(batched_BLC[index], alone_BLC[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_the_mask_padding_changes_the_result(transformer):
    latents_BLC, text_LD, pooled_BP, sigmas_B = _inputs([3, 7])
    hidden_BTD, mask_BT = pad_tokens(text_LD)
    masked_BLC = _predict(transformer, latents_BLC, hidden_BTD, mask_BT, pooled_BP, sigmas_B)
    unmasked_BLC = _predict(
        transformer, latents_BLC, hidden_BTD, torch.ones_like(mask_BT), pooled_BP, sigmas_B
    )
    assert (masked_BLC[0] - unmasked_BLC[0]).abs().max() > 1e-3
    torch.testing.assert_close(masked_BLC[1], unmasked_BLC[1], atol=1e-6, rtol=0)


@torch.no_grad()
def test_empty_conditioning_equals_zero_text_tokens(transformer):
    latents_BLC, _, pooled_BP, sigmas_B = _inputs([1])
    hidden_BTD, mask_BT = empty_conditioning(1, hidden_size=WIDTH, like=latents_BLC)
    masked_BLC = _predict(transformer, latents_BLC, hidden_BTD, mask_BT, pooled_BP, sigmas_B)
    no_text_BLC = _predict(
        transformer, latents_BLC, hidden_BTD[:, :0], mask_BT[:, :0], pooled_BP, sigmas_B
    )
    torch.testing.assert_close(masked_BLC, no_text_BLC, atol=1e-5, rtol=0)


def test_joint_mask_puts_text_first_and_is_none_without_padding():
    mask_BT = torch.tensor([[True, False], [True, True]])
    joint_B11S = joint_attention_mask(mask_BT, num_image_tokens=3)
    assert joint_B11S.shape == (2, 1, 1, 5)
    assert joint_B11S[:, 0, 0].tolist() == [[True, False, True, True, True], [True] * 5]
    assert joint_attention_mask(torch.ones(2, 4, dtype=torch.bool), num_image_tokens=3) is None


@torch.no_grad()
def test_timestep_and_guidance_reach_the_embedder_times_1000(transformer):
    latents_BLC, text_LD, pooled_BP, _ = _inputs([2])
    seen = {}

    def capture(module, args):
        seen["timestep"], seen["guidance"] = args[0].clone(), args[1].clone()

    hook = transformer.time_text_embed.register_forward_pre_hook(capture)
    try:
        mask_BT = torch.ones(1, 2, dtype=torch.bool)
        _predict(
            transformer, latents_BLC, text_LD[0][None], mask_BT, pooled_BP, torch.tensor([0.25])
        )
    finally:
        hook.remove()
    torch.testing.assert_close(seen["timestep"], torch.tensor([250.0]))
    torch.testing.assert_close(seen["guidance"], torch.tensor([3500.0]))


def test_missing_guidance_is_a_clear_error(transformer):
    latents_BLC, text_LD, pooled_BP, sigmas_B = _inputs([2])
    conditioning = FluxConditioning(
        hidden_BTD=text_LD[0][None],
        mask_BT=torch.ones(1, 2, dtype=torch.bool),
        pooled_BP=pooled_BP,
        guidance_B=None,
    )
    with pytest.raises(ValueError, match="guidance"):
        predict_velocity(
            transformer,
            latents_BLC,
            image_ids_L3=latent_image_ids(4, width_latent=6),
            sigmas_B=sigmas_B,
            conditioning=conditioning,
        )


def _gradients(transformer, *, checkpointing):
    set_gradient_checkpointing(transformer, enabled=checkpointing)
    calls = []
    # A pre-hook: non-reentrant recomputation stops early, so the block's post-hook never reruns.
    hook = transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        transformer.zero_grad(set_to_none=True)
        latents_BLC, text_LD, pooled_BP, sigmas_B = _inputs([3, 5], seed=1)
        hidden_BTD, mask_BT = pad_tokens(text_LD)
        output_BLC = _predict(transformer, latents_BLC, hidden_BTD, mask_BT, pooled_BP, sigmas_B)
        output_BLC.pow(2).mean().backward()
    finally:
        hook.remove()
        set_gradient_checkpointing(transformer, enabled=False)
    gradients = {name: p.grad.clone() for name, p in transformer.named_parameters()}
    return gradients, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(two_block_transformer):
    plain, plain_calls = _gradients(two_block_transformer, checkpointing=False)
    checkpointed, checkpointed_calls = _gradients(two_block_transformer, checkpointing=True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys()
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@torch.no_grad()
def test_masked_embedded_tokens_are_as_if_absent(transformer):
    """The T5 branch's tokens (already in FLUX's inner width) join the joint sequence after the
    connector's; masked out of a sample, that sample's result is the one without them, and a
    sample that attends them all matches inference, where they carry no mask."""
    latents_BLC, text_LD, pooled_BP, sigmas_B = _inputs([3, 3], seed=3)
    hidden_BTD, mask_BT = pad_tokens(text_LD)
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    embedded_BUE = torch.randn(2, 4, inner, generator=torch.Generator().manual_seed(4))
    ids_L3 = latent_image_ids(4, width_latent=6)

    def run(rows, embedded, embedded_mask):
        conditioning = FluxConditioning(
            hidden_BTD=hidden_BTD[rows],
            mask_BT=mask_BT[rows],
            pooled_BP=pooled_BP[rows],
            guidance_B=torch.full((len(rows),), 3.5),
            embedded_BUE=None if embedded is None else embedded[rows],
            embedded_mask_BU=embedded_mask,
        )
        return predict_velocity(
            transformer,
            latents_BLC[rows],
            image_ids_L3=ids_L3,
            sigmas_B=sigmas_B[rows],
            conditioning=conditioning,
        )

    mask_BU = torch.tensor([[True] * 4, [False] * 4])
    batched = run([0, 1], embedded_BUE, mask_BU)
    torch.testing.assert_close(batched[0], run([0], embedded_BUE, None)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], run([1], None, None)[0], atol=1e-5, rtol=0)
    assert (batched[0] - run([0], None, None)[0]).abs().max() > 1e-3
