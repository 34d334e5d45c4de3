"""Channel-style changes of a waveform: what differs between two capsules of one array.

Two capsules of a microphone array hear the same scene with a direction-dependent level per
frequency band (the sphere's shadow, capsule coloration) and a small delay. The content
codebook should not see those differences; the channel codebook should. `random_channel_change`
applies a random one to a segment, so that the content codebook can be taught to ignore it
directly (`PairwiseLoss.invariance_loss`), beside the real second channel, which differs by
such a change AND by what is not content at all (diffuse noise, capsule noise).

The change is one zero-phase gain curve times one linear phase (a fractional delay), applied
to the whole segment in the frequency domain: smooth gains over log-frequency have a short
impulse response, so the circular wrap of a segment is negligible.
"""
from __future__ import annotations

import math

import torch

from modules.spatial_cues import CUE_BAND_RANGE_HZ


def gain_curve(gains_db: torch.Tensor, frequencies: torch.Tensor,
               low_hz: float = CUE_BAND_RANGE_HZ[0],
               high_hz: float = CUE_BAND_RANGE_HZ[1]) -> torch.Tensor:
    """Linear gains `[B, n_freq]` at `frequencies` `[n_freq]` Hz from per-band gains
    `gains_db` `[B, n_bands]`, placed at log-spaced band centres between `low_hz` and
    `high_hz` and interpolated linearly in log-frequency (held constant beyond the ends)."""
    n_bands = gains_db.shape[1]
    log_lo, log_hi = math.log(low_hz), math.log(high_hz)
    step = (log_hi - log_lo) / n_bands
    centres = log_lo + step * (torch.arange(n_bands, dtype=torch.float64) + 0.5)
    position = (frequencies.double().clamp_min(1e-3).log() - centres[0]) / step
    position = position.clamp(0, n_bands - 1)
    below = position.floor().long().clamp(max=n_bands - 1)
    above = (below + 1).clamp(max=n_bands - 1)
    frac = (position - below).to(gains_db)
    db = gains_db[:, below] * (1 - frac) + gains_db[:, above] * frac
    return 10 ** (db / 20)


def channel_change(x: torch.Tensor, sample_rate: int, gains_db: torch.Tensor,
                   delays: torch.Tensor) -> torch.Tensor:
    """`x` `[B, 1, T]` with per-band gains `gains_db` `[B, n_bands]` (dB) and a delay of
    `delays` `[B]` samples (fractional, positive: later) applied to each item."""
    length = x.shape[-1]
    spectrum = torch.fft.rfft(x.float(), dim=-1)
    frequencies = torch.fft.rfftfreq(length, d=1.0 / sample_rate).to(x.device)
    gains = gain_curve(gains_db.to(x.device).float(), frequencies)
    phase = torch.exp(-2j * math.pi * frequencies[None, :] / sample_rate
                      * delays.to(x.device).float()[:, None])
    changed = torch.fft.irfft(spectrum * (gains * phase)[:, None, :], n=length, dim=-1)
    return changed.to(x.dtype)


def random_channel_change(x: torch.Tensor, sample_rate: int, band_gain_db: float,
                          max_delay: float, n_bands: int = 8) -> torch.Tensor:
    """`channel_change` with per-band gains uniform in +-`band_gain_db` and a delay uniform in
    +-`max_delay` samples, drawn independently per item from the CPU generator (so that a
    resumed run draws what an uninterrupted one would)."""
    batch = x.shape[0]
    gains_db = (2 * torch.rand(batch, n_bands) - 1) * band_gain_db
    delays = (2 * torch.rand(batch) - 1) * max_delay
    return channel_change(x, sample_rate, gains_db, delays)
