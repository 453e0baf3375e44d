"""Conditioning assembly: choice statistics, drop rate, padding, mask, determinism, connector."""

import pytest
import torch

from model.conditioning import (
    CAPTION_ONLY,
    IMAGE_AND_CAPTION,
    IMAGE_ONLY,
    UNCONDITIONAL,
    Connector,
    assemble_conditioning,
    draw_condition_choices,
    empty_conditioning,
    image_token_states,
    real_token_states,
)

pytestmark = pytest.mark.unit


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _samples(image_lengths, caption_lengths, width=4):
    generator = _generator(0)
    image_LD = [torch.randn(length, width, generator=generator) for length in image_lengths]
    caption_LD = [torch.randn(length, width, generator=generator) for length in caption_lengths]
    return image_LD, caption_LD


def test_choice_frequencies_follow_probabilities_and_drop_rate():
    choice_B = draw_condition_choices(
        40_000, probabilities=(0.5, 0.3, 0.2), drop_rate=0.1, generator=_generator(1)
    )
    frequencies = torch.bincount(choice_B, minlength=4).double() / choice_B.numel()
    expected = torch.tensor([0.45, 0.27, 0.18, 0.10], dtype=torch.float64)
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


def test_zero_probability_choices_never_happen():
    choice_B = draw_condition_choices(
        2_000, probabilities=(0.0, 1.0, 0.0), drop_rate=0.0, generator=_generator(2)
    )
    assert bool((choice_B == CAPTION_ONLY).all())


def test_same_seed_same_choices_and_different_seed_different():
    image_LD, caption_LD = _samples([3] * 64, [2] * 64)
    options = {"probabilities": (0.4, 0.4, 0.2), "drop_rate": 0.2}
    first = assemble_conditioning(
        image_LD, caption_tokens_LD=caption_LD, generator=_generator(3), **options
    )
    again = assemble_conditioning(
        image_LD, caption_tokens_LD=caption_LD, generator=_generator(3), **options
    )
    other = assemble_conditioning(
        image_LD, caption_tokens_LD=caption_LD, generator=_generator(4), **options
    )
    assert torch.equal(first.choice_B, again.choice_B)
    assert torch.equal(first.hidden_BLD, again.hidden_BLD)
    assert not torch.equal(first.choice_B, other.choice_B)


@pytest.mark.parametrize(
    ("probabilities", "choice", "lengths"),
    [
        ((1.0, 0.0, 0.0), IMAGE_ONLY, [3, 5]),
        ((0.0, 1.0, 0.0), CAPTION_ONLY, [2, 4]),
        ((0.0, 0.0, 1.0), IMAGE_AND_CAPTION, [5, 9]),
    ],
)
def test_chosen_tokens_are_padded_right_with_mask(probabilities, choice, lengths):
    image_LD, caption_LD = _samples([3, 5], [2, 4])
    result = assemble_conditioning(
        image_LD,
        caption_tokens_LD=caption_LD,
        probabilities=probabilities,
        drop_rate=0.0,
        generator=_generator(5),
    )
    assert result.choice_B.tolist() == [choice, choice]
    assert result.hidden_BLD.shape == (2, max(lengths), 4)
    assert result.mask_BL.dtype == torch.bool
    assert result.mask_BL.sum(dim=1).tolist() == lengths
    for index in range(2):
        expected_LD = {
            IMAGE_ONLY: image_LD[index],
            CAPTION_ONLY: caption_LD[index],
            IMAGE_AND_CAPTION: torch.cat([image_LD[index], caption_LD[index]]),
        }[choice]
        assert torch.equal(result.hidden_BLD[index, : lengths[index]], expected_LD)
        assert bool((result.hidden_BLD[index, lengths[index] :] == 0).all())


def test_dropped_samples_carry_no_tokens_like_empty_conditioning():
    image_LD, caption_LD = _samples([3, 5, 2], [2, 4, 1])
    result = assemble_conditioning(
        image_LD,
        caption_tokens_LD=caption_LD,
        probabilities=(1.0, 0.0, 0.0),
        drop_rate=1.0,
        generator=_generator(6),
    )
    assert result.choice_B.tolist() == [UNCONDITIONAL] * 3
    hidden_BLD, mask_BL = empty_conditioning(3, hidden_size=4, like=image_LD[0])
    assert torch.equal(result.hidden_BLD, hidden_BLD) and torch.equal(result.mask_BL, mask_BL)


def test_bad_probabilities_and_drop_rate_are_rejected():
    image_LD, caption_LD = _samples([3], [2])
    with pytest.raises(ValueError, match="probabilities"):
        draw_condition_choices(
            4, probabilities=(0.5, 0.5, 0.5), drop_rate=0.0, generator=_generator(0)
        )
    with pytest.raises(ValueError, match="drop_rate"):
        draw_condition_choices(
            4, probabilities=(1.0, 0.0, 0.0), drop_rate=1.5, generator=_generator(0)
        )
    with pytest.raises(ValueError, match="same nonzero count"):
        assemble_conditioning(
            image_LD,
            caption_tokens_LD=[],
            probabilities=(1.0, 0.0, 0.0),
            drop_rate=0.0,
            generator=_generator(0),
        )


def test_token_selection_keeps_image_positions_and_real_tokens():
    hidden_BLD = torch.arange(24.0).reshape(2, 4, 3)
    image_mask_BL = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.int8)
    attention_mask_BL = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    image_LD = image_token_states(hidden_BLD, image_mask_BL=image_mask_BL)
    real_LD = real_token_states(hidden_BLD, attention_mask_BL=attention_mask_BL)
    assert torch.equal(image_LD[0], hidden_BLD[0, 1:3]) and torch.equal(
        image_LD[1], hidden_BLD[1, :1]
    )
    assert torch.equal(real_LD[0], hidden_BLD[0]) and torch.equal(real_LD[1], hidden_BLD[1, :2])


def test_connector_maps_encoder_width_to_flux_width_and_trains():
    connector = Connector(16, 32)
    assert connector(torch.zeros(2, 5, 16)).shape == (2, 5, 32)
    assert all(parameter.requires_grad for parameter in connector.parameters())
    assert [name for name, _ in connector.named_parameters()] == ["weight", "bias"]
