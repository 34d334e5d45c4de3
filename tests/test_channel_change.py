"""Channel-style changes: the per-band gains and the delay they are asked for, nothing else."""
from __future__ import annotations

import pytest
import torch

from modules import spatial_cues
from modules.channel_change import channel_change, random_channel_change

SR = 24_000


def noise(batch: int = 3, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, int(SR * seconds), generator=torch.Generator().manual_seed(seed))


def test_gains_move_the_band_levels_by_the_given_db():
    x = noise()
    gains = torch.tensor([[3.0] * 8, [-2.0, -1, 0, 1, 2, 3, 4, 5], [0.0] * 8])
    shift = spatial_cues.band_levels(channel_change(x, SR, gains, torch.zeros(3)), SR) \
        - spatial_cues.band_levels(x, SR)
    torch.testing.assert_close(shift[0], torch.full((8,), 3.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(shift[2], torch.zeros(8), atol=1e-3, rtol=0)
    # A band's level is its power average over the band: a gain that varies across it is
    # met within a fraction of a dB (at the outer bands the curve is held, not extrapolated).
    torch.testing.assert_close(shift[1, 1:-1], gains[1, 1:-1], atol=0.15, rtol=0)


def test_delay_is_a_shift_of_the_waveform():
    x = noise()
    delayed = channel_change(x, SR, torch.zeros(3, 8), torch.tensor([2.0, -3.0, 0.0]))
    torch.testing.assert_close(delayed[0], torch.roll(x[0], 2, dims=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(delayed[1], torch.roll(x[1], -3, dims=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(delayed[2], x[2], atol=1e-5, rtol=0)
    # A fractional delay moves the cross-correlation peak between the neighbouring lags.
    half = channel_change(x[:1], SR, torch.zeros(1, 8), torch.tensor([0.5]))
    lags = torch.stack([(half * torch.roll(x[:1], k, dims=-1)).sum() for k in (0, 1)])
    assert lags[0] == pytest.approx(lags[1].item(), rel=1e-3)


def test_random_changes_stay_within_their_bounds_and_follow_the_cpu_seed():
    x = noise(batch=16)
    torch.manual_seed(3)
    first = random_channel_change(x, SR, band_gain_db=3.0, max_delay=2.0)
    torch.manual_seed(3)
    again = random_channel_change(x, SR, band_gain_db=3.0, max_delay=2.0)
    torch.testing.assert_close(first, again)
    shift = spatial_cues.band_levels(first, SR) - spatial_cues.band_levels(x, SR)
    assert shift.abs().max() <= 3.0 + 1e-3
    assert shift.abs().max() > 1.0  # items do change
    unchanged = random_channel_change(x, SR, band_gain_db=0.0, max_delay=0.0)
    torch.testing.assert_close(unchanged, x, atol=1e-5, rtol=0)
