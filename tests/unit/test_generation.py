"""Generation maths: focus weights (hand-computed), sizes, img2img start, inpaint blending."""

import math

import pytest
import torch

from model.generation import (
    apply_focus,
    circle_focus_weights,
    grid_focus_weights,
    img2img_start_index,
    inpaint_sample,
    latent_size,
    merged_grid,
    num_packed_tokens,
    pack_mask,
    repaint_mask,
)
from model.latent_codec import pack_latents
from model.rectified_flow import add_noise, euler_sample, flux_sigmas

pytestmark = pytest.mark.unit

# Circle at the centre of a 4 x 6 token grid, radius 0.5 -> 0.5 * min(4, 6) = 2 tokens.
# Offsets of token centres from (3, 2) are +-0.5, +-1.5, +-2.5 (columns) and +-0.5, +-1.5 (rows).
NEAR = 1 - math.sqrt(0.5) / 2  # |offset| (0.5, 0.5)
MID = 1 - math.sqrt(2.5) / 2  # |offset| (0.5, 1.5) or (1.5, 0.5); (1.5, 1.5) gives < 0 -> 0
CENTRE_CIRCLE_4x6 = [
    [0, 0, MID, MID, 0, 0],
    [0, MID, NEAR, NEAR, MID, 0],
    [0, MID, NEAR, NEAR, MID, 0],
    [0, 0, MID, MID, 0, 0],
]


def test_circle_weights_on_a_4x6_grid_match_hand_computed_values():
    weights_G = circle_focus_weights(4, 6, center_x=0.5, center_y=0.5, radius=0.5)
    assert weights_G.dtype == torch.float32 and weights_G.shape == (24,)
    expected = torch.tensor(CENTRE_CIRCLE_4x6, dtype=torch.float32).flatten()
    torch.testing.assert_close(weights_G, expected, rtol=0, atol=1e-7)


def test_circle_weights_off_centre_are_row_major():
    # Centre at the top-left corner, radius 1 -> 4 tokens; token (row, col) centre (c+.5, r+.5).
    weights_HW = circle_focus_weights(4, 6, center_x=0.0, center_y=0.0, radius=1.0).view(4, 6)
    assert weights_HW[0, 0].item() == pytest.approx(1 - math.sqrt(0.5) / 4)
    assert weights_HW[0, 1].item() == pytest.approx(1 - math.sqrt(2.5) / 4)
    assert weights_HW[1, 0].item() == pytest.approx(1 - math.sqrt(2.5) / 4)
    assert weights_HW[2, 1].item() == pytest.approx(1 - math.sqrt(1.5**2 + 2.5**2) / 4)
    assert weights_HW[3, 5].item() == 0.0 and weights_HW[0, 4].item() == 0.0
    with pytest.raises(ValueError, match="radius"):
        circle_focus_weights(4, 6, center_x=0.5, center_y=0.5, radius=0.0)


def test_grid_weights_mark_tokens_whose_centre_lies_in_a_marked_cell():
    weights = grid_focus_weights(4, 6, rows=2, columns=3, cells=((0, 0), (1, 2)))
    expected = [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
    ]
    assert torch.equal(weights, torch.tensor(expected, dtype=torch.float32).flatten())


def test_grid_weights_put_a_centre_on_a_border_in_the_lower_cell():
    # 3 x 2 tokens under a 2 x 2 grid: token row 1's centre (y = 0.5) sits on the border.
    weights = grid_focus_weights(3, 2, rows=2, columns=2, cells=((0, 0),))
    assert weights.tolist() == [1, 0, 0, 0, 0, 0]
    weights = grid_focus_weights(3, 2, rows=2, columns=2, cells=((1, 1),))
    assert weights.tolist() == [0, 0, 0, 1, 0, 1]


def test_apply_focus_scales_each_token_row():
    tokens_GD = torch.arange(12, dtype=torch.float32).view(3, 4)
    weights_G = torch.tensor([1.0, 0.5, 0.0])
    expected = torch.stack([tokens_GD[0], tokens_GD[1] * 0.5, torch.zeros(4)])
    assert torch.equal(apply_focus(tokens_GD, weights_G), expected)
    with pytest.raises(ValueError, match="3 image tokens but 2 focus weights"):
        apply_focus(tokens_GD, weights_G[:2])


def test_sizes_and_grids():
    assert latent_size(32, 48) == (6, 4)
    assert num_packed_tokens(6, 4) == 6
    assert merged_grid((1, 6, 4), merge_size=2) == (3, 2)
    for width, height in ((40, 48), (32, 8), (0, 16)):
        with pytest.raises(ValueError, match="multiples of 16"):
            latent_size(width, height)
    with pytest.raises(ValueError, match="single image"):
        merged_grid((2, 6, 4), merge_size=2)


@pytest.mark.parametrize(
    ("num_steps", "strength", "expected"),
    [(4, 1.0, 0), (4, 0.5, 2), (4, 0.25, 3), (4, 0.01, 3), (28, 0.8, 5), (1, 0.3, 0)],
)
def test_img2img_start_index_follows_diffusers_rule(num_steps, strength, expected):
    assert img2img_start_index(num_steps, strength) == expected


@pytest.mark.parametrize(("num_steps", "strength"), [(4, 0.0), (4, 1.5), (0, 0.5), (4, math.nan)])
def test_img2img_start_index_rejects_bad_values(num_steps, strength):
    with pytest.raises(ValueError):
        img2img_start_index(num_steps, strength)


def test_repaint_mask_marks_a_latent_cell_if_any_of_its_pixels_is_white():
    mask_HW = torch.zeros(16, 24, dtype=torch.bool)
    mask_HW[9, 3] = True
    mask_HW[0, 23] = True
    latent_hw = repaint_mask(mask_HW, vae_scale_factor=8)
    assert latent_hw.tolist() == [[False, False, True], [True, False, False]]
    with pytest.raises(ValueError, match="does not tile"):
        repaint_mask(torch.zeros(12, 16, dtype=torch.bool), vae_scale_factor=8)


def test_pack_mask_uses_the_latent_packing_layout():
    mask_hw = torch.tensor([[True, False, False, True], [False, False, True, True]])
    packed_BLC = pack_mask(mask_hw, num_channels=3)
    expected = pack_latents(mask_hw.float()[None, None].expand(1, 3, 2, 4)) > 0
    assert packed_BLC.shape == (1, 2, 12) and torch.equal(packed_BLC, expected)


def test_inpaint_sample_keeps_unmasked_entries_and_equals_euler_where_repainted():
    generator = torch.Generator().manual_seed(0)
    init_BLC, noise_BLC = torch.randn(2, 1, 3, 8, generator=generator)
    repaint_BLC = torch.zeros(1, 3, 8, dtype=torch.bool)
    repaint_BLC[:, 1] = True
    sigmas_N1 = flux_sigmas(5, mu=0.5)
    start = 2
    noised_BLC = add_noise(init_BLC, noise_BLP=noise_BLC, sigmas_B=sigmas_N1[start : start + 1])

    def velocity(sample_BLC, sigmas_B):  # a field that depends on x: keeping must feed back
        return sample_BLC * 0.3 + sigmas_B[:, None, None]

    result = inpaint_sample(
        velocity,
        noised_BLC,
        sigmas_N1=sigmas_N1,
        start_index=start,
        init_BLC=init_BLC,
        noise_BLC=noise_BLC,
        repaint_BLC=repaint_BLC,
    )
    assert torch.equal(result[~repaint_BLC], init_BLC[~repaint_BLC])
    # Tokens are independent under this velocity, so the repainted token equals plain Euler.
    plain = euler_sample(velocity, noised_BLC, sigmas_N1=sigmas_N1, start_index=start)
    assert torch.equal(result[:, 1], plain[:, 1])
    assert not torch.equal(result[:, 1], init_BLC[:, 1])
    # Everything repainted: exactly plain Euler.
    everywhere = inpaint_sample(
        velocity,
        noised_BLC,
        sigmas_N1=sigmas_N1,
        start_index=start,
        init_BLC=init_BLC,
        noise_BLC=noise_BLC,
        repaint_BLC=torch.ones_like(repaint_BLC),
    )
    assert torch.equal(everywhere, plain)
