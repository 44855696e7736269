"""Flow-matching schedule against hand-computed values."""

import pytest
import torch

from histream_core.schedule import renoise, shifted_sigma, warp_timesteps, x0_from_flow


def test_warped_steps_shift_5_match_self_forcing():
    assert warp_timesteps(shift=5.0) == pytest.approx((1000.0, 937.5, 2500 / 3, 625.0))


def test_warped_steps_shift_7_match_hd_setting():
    assert warp_timesteps(shift=7.0) == pytest.approx((1000.0, 10500 / 11, 875.0, 700.0))


def test_shift_one_is_identity():
    assert warp_timesteps(shift=1.0) == pytest.approx((1000.0, 750.0, 500.0, 250.0))
    assert shifted_sigma(0.3, 1.0) == pytest.approx(0.3)


def test_flow_round_trip():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    x_t = renoise(x0, eps, 875.0)
    assert torch.allclose(x_t, 0.125 * x0 + 0.875 * eps)
    assert torch.allclose(x0_from_flow(x_t, eps - x0, 875.0), x0, atol=1e-6)


@pytest.mark.parametrize("bad", [(0.0,), (1200.0,), (-5.0,)])
def test_bad_steps_are_rejected(bad):
    with pytest.raises(ValueError, match="timesteps"):
        warp_timesteps(bad, 5.0)
