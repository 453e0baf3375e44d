"""The Euler sampler and FLUX's sigma schedule."""

import pytest
import torch

from model.rectified_flow import add_noise, euler_sample, flux_sigmas, velocity_target

pytestmark = pytest.mark.unit


def test_sigmas_decrease_from_one_to_zero_and_shift_moves_them_up():
    plain = flux_sigmas(4, mu=0.0)
    shifted = flux_sigmas(4, mu=1.15)
    assert plain.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.all(shifted[1:-1] > plain[1:-1]) and shifted[0] == 1.0 and shifted[-1] == 0.0


def test_exact_velocity_recovers_the_data_from_any_start():
    generator = torch.Generator().manual_seed(0)
    data_BLC = torch.randn(2, 6, 4, generator=generator)
    noise_BLC = torch.randn(2, 6, 4, generator=generator)
    sigmas = flux_sigmas(7, mu=0.8)
    exact = lambda x, s: velocity_target(data_BLC, noise_BLP=noise_BLC)  # noqa: E731
    torch.testing.assert_close(euler_sample(exact, noise_BLC, sigmas_N1=sigmas), data_BLC)
    start = add_noise(data_BLC, noise_BLP=noise_BLC, sigmas_B=sigmas[3].expand(2))
    result = euler_sample(exact, start, sigmas_N1=sigmas, start_index=3)
    torch.testing.assert_close(result, data_BLC)
