"""Flow-matching maths: packing, position ids, mu, sigmas, noising, target and loss."""

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from model.latent_codec import (
    latent_image_ids,
    pack_latents,
    scale_latents,
    text_ids,
    unpack_latents,
    unscale_latents,
)
from model.presets import VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from model.rectified_flow import (
    add_noise,
    fixed_sigmas,
    flow_matching_loss,
    resolution_shift_mu,
    sample_sigmas,
    time_shift,
    velocity_target,
)

pytestmark = pytest.mark.unit


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scale_latents_uses_shift_then_scale_and_inverts():
    raw_BCHW = torch.randn(2, 16, 4, 6, generator=_generator(0))
    factors = {"scaling_factor": VAE_SCALING_FACTOR, "shift_factor": VAE_SHIFT_FACTOR}
    scaled_BCHW = scale_latents(raw_BCHW, **factors)
    torch.testing.assert_close(scaled_BCHW, (raw_BCHW - 0.1159) * 0.3611)
    torch.testing.assert_close(unscale_latents(scaled_BCHW, **factors), raw_BCHW)


def test_pack_matches_hand_made_2x2_example():
    latents_BCHW = torch.arange(16.0).reshape(1, 2, 2, 4)
    packed_BLP = pack_latents(latents_BCHW)
    channel0, channel1 = latents_BCHW[0, 0], latents_BCHW[0, 1]
    left = [channel0[0, 0], channel0[0, 1], channel0[1, 0], channel0[1, 1]]
    left += [channel1[0, 0], channel1[0, 1], channel1[1, 0], channel1[1, 1]]
    right = [channel0[0, 2], channel0[0, 3], channel0[1, 2], channel0[1, 3]]
    right += [channel1[0, 2], channel1[0, 3], channel1[1, 2], channel1[1, 3]]
    assert packed_BLP.shape == (1, 2, 8)
    assert torch.equal(packed_BLP[0], torch.stack([torch.stack(left), torch.stack(right)]))


def test_pack_round_trip_is_exact_and_matches_flux_pipeline():
    latents_BCHW = torch.randn(2, 16, 6, 8, generator=_generator(1))
    packed_BLP = pack_latents(latents_BCHW)
    assert packed_BLP.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(packed_BLP, height=6, width=8), latents_BCHW)
    assert torch.equal(packed_BLP, FluxPipeline._pack_latents(latents_BCHW, 2, 16, 6, 8))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 8))


def test_position_ids_follow_the_packed_grid():
    image_ids_L3 = latent_image_ids(6, width_latent=8)
    assert image_ids_L3.shape == (12, 3) and image_ids_L3.dtype == torch.float32
    assert image_ids_L3[5].tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(image_ids_L3, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", None))
    assert torch.equal(text_ids(7), torch.zeros(7, 3))


def test_mu_is_base_and_max_shift_at_the_ends_and_linear():
    assert resolution_shift_mu(256) == pytest.approx(0.5)
    assert resolution_shift_mu(4096) == pytest.approx(1.15)
    assert resolution_shift_mu(1024) == pytest.approx(calculate_shift(1024))
    assert resolution_shift_mu(16) < 0.5


def test_sigmas_lie_in_open_interval_and_are_deterministic():
    sigmas_B = sample_sigmas(4096, mu=1.15, generator=_generator(3))
    assert sigmas_B.shape == (4096,) and sigmas_B.dtype == torch.float32
    assert bool(((sigmas_B > 0) & (sigmas_B < 1)).all())
    assert torch.equal(sigmas_B, sample_sigmas(4096, mu=1.15, generator=_generator(3)))
    assert not torch.equal(sigmas_B, sample_sigmas(4096, mu=1.15, generator=_generator(4)))


def test_shift_moves_the_median_up_for_larger_images():
    small_B = sample_sigmas(4096, mu=resolution_shift_mu(256), generator=_generator(5))
    large_B = sample_sigmas(4096, mu=resolution_shift_mu(4096), generator=_generator(5))
    assert large_B.median() > small_B.median() + 0.1
    unshifted_B = sample_sigmas(4096, mu=0.0, generator=_generator(5))
    assert unshifted_B.median().item() == pytest.approx(0.5, abs=0.03)


def test_sampled_sigmas_equal_flux_time_shift_of_logit_normal():
    logits_B = torch.randn(64, generator=_generator(6)) * 0.8 + 0.2
    expected_B = time_shift(torch.sigmoid(logits_B), mu=0.9)
    sigmas_B = sample_sigmas(64, mu=0.9, generator=_generator(6), logit_mean=0.2, logit_std=0.8)
    torch.testing.assert_close(sigmas_B, expected_B)


def test_fixed_sigmas_are_shifted_timesteps():
    assert torch.equal(fixed_sigmas([0.25, 0.5, 0.75]), torch.tensor([0.25, 0.5, 0.75]))
    shifted_T = fixed_sigmas([0.25, 0.5, 0.75], mu=1.0)
    torch.testing.assert_close(shifted_T[1], torch.tensor(torch.e / (torch.e + 1)))
    with pytest.raises(ValueError, match="timesteps"):
        fixed_sigmas([0.0, 0.5])


def test_add_noise_endpoints_and_velocity_target():
    data_BLP = torch.randn(3, 4, 8, generator=_generator(7))
    noise_BLP = torch.randn(3, 4, 8, generator=_generator(8))
    ends_B = torch.tensor([0.0, 1.0, 0.5])
    noisy_BLP = add_noise(data_BLP, noise_BLP=noise_BLP, sigmas_B=ends_B)
    assert torch.equal(noisy_BLP[0], data_BLP[0]) and torch.equal(noisy_BLP[1], noise_BLP[1])
    torch.testing.assert_close(noisy_BLP[2], (data_BLP[2] + noise_BLP[2]) / 2)
    target_BLP = velocity_target(data_BLP, noise_BLP=noise_BLP)
    assert torch.equal(target_BLP, noise_BLP - data_BLP)
    step_B = torch.full((3,), 0.25)
    moved_BLP = add_noise(data_BLP, noise_BLP=noise_BLP, sigmas_B=ends_B * 0 + step_B)
    start_BLP = add_noise(data_BLP, noise_BLP=noise_BLP, sigmas_B=ends_B * 0)
    torch.testing.assert_close((moved_BLP - start_BLP) / 0.25, target_BLP)


def test_loss_is_per_sample_mean_then_batch_mean():
    target_BLP = torch.randn(2, 4, 8, generator=_generator(9))
    assert flow_matching_loss(target_BLP, target_BLP=target_BLP).item() == 0.0
    prediction_BLP = target_BLP.clone()
    prediction_BLP[0, 0, 0] += 2.0
    expected = (4.0 / 32) / 2
    assert flow_matching_loss(prediction_BLP, target_BLP=target_BLP).item() == pytest.approx(
        expected
    )
    weighted = flow_matching_loss(
        prediction_BLP, target_BLP=target_BLP, weights_B=torch.tensor([3.0, 1.0])
    )
    assert weighted.item() == pytest.approx(3 * expected)
