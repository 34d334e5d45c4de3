"""Per-band levels, swap gain, bootstrap, ILD and GCC-PHAT delay (modules/spatial_cues.py)."""
from __future__ import annotations

import math

import pytest
import torch

from modules import spatial_cues as sc

SR = 24000


def noise(n: int, length: int = SR, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, length, generator=torch.Generator().manual_seed(seed))


def delayed_pair(delay: float, n: int = 3, length: int = SR,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """White noise and a copy delayed by `delay` samples (b lags a for delay > 0).

    Fractional delays are exact linear phase on a longer circular signal, cropped in the
    middle so that the wrap-around never shows.
    """
    pad = 64
    base = noise(n, length + 2 * pad, seed).double()
    freqs = torch.fft.rfftfreq(base.shape[-1]).double()
    shifted = torch.fft.irfft(torch.fft.rfft(base) * torch.exp(-2j * math.pi * freqs * delay),
                              n=base.shape[-1])
    return base[:, pad:pad + length].float(), shifted[:, pad:pad + length].float()


# ----------------------------------------------------------------------------------------
# band_levels
# ----------------------------------------------------------------------------------------

def test_band_levels_puts_a_1khz_sine_in_its_band_at_its_level():
    t = torch.arange(SR) / SR
    sine = torch.sin(2 * math.pi * 1000.0 * t)[None]
    levels = sc.band_levels(sine, SR)
    edges = sc.band_edges()
    expected_band = int(((edges[:-1] <= 1000.0) & (edges[1:] > 1000.0)).nonzero())
    assert levels.shape == (1, 8)
    assert int(levels.argmax()) == expected_band
    # A unit sine has mean square 1/2: -3 dB; leakage into other bands is far below.
    assert levels[0, expected_band].item() == pytest.approx(-3.01, abs=0.2)
    others = torch.cat([levels[0, :expected_band], levels[0, expected_band + 1:]])
    assert (others < levels[0, expected_band] - 30).all()


def test_band_levels_shift_by_the_gain_in_every_band():
    x = noise(3)
    shift = sc.band_levels(x * 10 ** (6 / 20), SR) - sc.band_levels(x, SR)
    assert torch.allclose(shift, torch.full_like(shift, 6.0), atol=1e-3)


def test_band_levels_of_white_noise_add_up_to_its_mean_square():
    # Parseval: the bands' powers are shares of the mean square (1 for unit white noise),
    # each proportional to its bandwidth.
    levels = sc.band_levels(noise(2, 4 * SR), SR).double()
    edges = sc.band_edges()
    expected = 10 * torch.log10((edges[1:] - edges[:-1]) / (SR / 2))
    assert torch.allclose(levels, expected.expand_as(levels), atol=0.6)


def test_band_levels_of_silence_are_finite_and_shapes_are_checked():
    levels = sc.band_levels(torch.zeros(2, 1, SR), SR)
    assert torch.isfinite(levels).all() and levels.shape == (2, 8)
    x = noise(2)
    assert torch.equal(sc.band_levels(x[:, None], SR), sc.band_levels(x, SR))
    assert sc.band_levels(torch.zeros(0, SR), SR).shape == (0, 8)
    with pytest.raises(ValueError, match="one channel per item"):
        sc.band_levels(torch.zeros(2, 2, SR), SR)
    with pytest.raises(ValueError, match="too short"):
        sc.band_levels(torch.zeros(2, 1000), SR)
    with pytest.raises(ValueError, match="no STFT bin"):
        sc.band_levels(x, SR, n_bands=64, f_min=20.0)


# ----------------------------------------------------------------------------------------
# swap_gain and the bootstrap
# ----------------------------------------------------------------------------------------

def random_levels(n: int = 50, bands: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rec_a = -30 + 5 * torch.randn(n, bands, generator=g)
    rec_b = rec_a + torch.randn(n, bands, generator=g)
    return rec_a, rec_b


def test_swap_gain_is_one_at_b_zero_at_a_and_half_way_in_between():
    rec_a, rec_b = random_levels()
    assert torch.allclose(sc.swap_gain(rec_b, rec_a, rec_b), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(sc.swap_gain(rec_a, rec_a, rec_b), torch.zeros(50, dtype=torch.float64))
    assert torch.allclose(sc.swap_gain((rec_a + rec_b) / 2, rec_a, rec_b),
                          torch.full((50,), 0.5, dtype=torch.float64))
    # Only the component along A -> B counts: a move orthogonal to it leaves the gain at 0.
    direction = rec_b - rec_a
    orthogonal = torch.randn(50, 8)
    orthogonal -= ((orthogonal * direction).sum(1, keepdim=True)
                   / direction.pow(2).sum(1, keepdim=True) * direction)
    assert torch.allclose(sc.swap_gain(rec_a + orthogonal, rec_a, rec_b),
                          torch.zeros(50, dtype=torch.float64), atol=1e-5)


def test_swap_gain_cannot_be_faked_by_a_bias_common_to_all_decodes():
    rec_a, rec_b = random_levels()
    swap = rec_a + 0.3 * (rec_b - rec_a)
    bias = torch.linspace(-4, 4, 8)  # e.g. a codec that tilts every decode's spectrum
    assert torch.allclose(sc.swap_gain(swap + bias, rec_a + bias, rec_b + bias),
                          torch.full((50,), 0.3, dtype=torch.float64), atol=1e-5)


def test_swap_gain_flags_degenerate_pairs_and_the_summary_counts_them():
    rec_a, rec_b = random_levels()
    rec_b[:3] = rec_a[:3]                      # decodes of A and B identical: 0 / 0
    swap = rec_a + 0.25 * (rec_b - rec_a)
    swap[:3] += 5.0                            # whatever the swap does there must not count
    gain = sc.swap_gain(swap, rec_a, rec_b)
    assert (torch.isnan(gain[:3]).all()
            and torch.allclose(gain[3:], torch.full((47,), 0.25, dtype=torch.float64)))
    summary = sc.swap_gain_summary(swap, rec_a, rec_b)
    assert (summary["n_degenerate"], summary["n_used"], summary["n_pairs"]) == (3, 47, 50)
    assert (summary["mean"] == pytest.approx(0.25)
            and summary["median_per_pair"] == pytest.approx(0.25))
    assert summary["ci_low"] == pytest.approx(0.25) and summary["ci_high"] == pytest.approx(0.25)
    assert summary["separation_db"] == pytest.approx(
        math.sqrt((rec_b - rec_a).pow(2).mean().item()), rel=1e-5)


def test_swap_gain_summary_is_the_ratio_of_sums_not_the_mean_of_ratios():
    rec_a, rec_b = random_levels(n=4)
    rec_b[0] = rec_a[0] + 0.05                 # barely separated: its ratio is noise / noise
    swap = rec_a + torch.tensor([20.0, 0.5, 0.5, 0.5])[:, None] * (rec_b - rec_a)
    numerator = ((swap - rec_a) * (rec_b - rec_a)).sum(1)
    denominator = (rec_b - rec_a).pow(2).sum(1)
    summary = sc.swap_gain_summary(swap, rec_a, rec_b, n_boot=200)
    assert summary["mean"] == pytest.approx((numerator.sum() / denominator.sum()).item(), rel=1e-6)
    assert summary["mean"] < 0.6               # the mean of ratios would be ~5.4
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]


def test_a_loudness_only_swap_scores_its_broadband_share_and_zero_on_the_shape():
    # Decodes of A and B that differ by a broadband offset and a spectral shape: a swap that
    # only takes B's loudness moves the broadband part all the way and the shape not at all.
    rng = torch.Generator().manual_seed(3)
    rec_a = torch.randn(64, 8, generator=rng, dtype=torch.float64) * 3
    broadband = torch.randn(64, 1, generator=rng, dtype=torch.float64) * 2
    shape = sc.band_shape(torch.randn(64, 8, generator=rng, dtype=torch.float64))
    rec_b = rec_a + broadband + shape
    fake = sc.loudness_only_swap(rec_a, rec_b)
    share = ((8 * broadband.pow(2)).sum()
             / (8 * broadband.pow(2) + shape.pow(2).sum(1, keepdim=True)).sum())
    assert sc.swap_gain_summary(fake, rec_a, rec_b)["mean"] == pytest.approx(share.item())
    shaped = [sc.band_shape(v) for v in (fake, rec_a, rec_b)]
    assert sc.swap_gain_summary(*shaped)["mean"] == pytest.approx(0.0, abs=1e-12)
    # ...while a swap that moves the shape to B's scores 1 on it, whatever its loudness.
    assert (sc.swap_gain_summary(sc.band_shape(rec_a + shape + 5.0),
                                 *shaped[1:])["mean"] == pytest.approx(1.0))


def test_band_shape_does_not_see_a_gain():
    x = noise(3)
    torch.testing.assert_close(sc.band_shape(sc.band_levels(x * 4.0, SR)),
                               sc.band_shape(sc.band_levels(x, SR)), atol=1e-3, rtol=0)
    assert sc.band_shape(sc.band_levels(x, SR)).mean(dim=1).abs().max() < 1e-4


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(1)
    trials, covered, widths = 150, 0, []
    for trial in range(trials):
        values = 3.0 + torch.randn(100, generator=g)
        mean, lo, hi = sc.bootstrap_ci(values, n_boot=400, seed=trial)
        assert lo <= mean <= hi and mean == pytest.approx(values.mean().item())
        covered += lo <= 3.0 <= hi
        widths.append(hi - lo)
    assert 0.88 <= covered / trials <= 0.99
    # Normal theory: 2 * 1.96 / sqrt(100) = 0.39.
    assert sum(widths) / trials == pytest.approx(0.39, rel=0.15)


def test_bootstrap_ci_resamples_whole_groups_when_given():
    # Segments of one file share its offset: only the file-level bootstrap is honest.
    g = torch.Generator().manual_seed(2)
    files, per_file = 20, 10
    groups = torch.arange(files).repeat_interleave(per_file)
    covered = {"pairs": 0, "files": 0}
    for trial in range(60):
        values = (torch.randn(files, generator=g)[groups]
                  + 0.1 * torch.randn(files * per_file, generator=g))
        for unit, grouping in (("pairs", None), ("files", [f"file{int(k)}.wav" for k in groups])):
            _, lo, hi = sc.bootstrap_ci(values, n_boot=300, seed=trial, groups=grouping)
            covered[unit] += lo <= 0.0 <= hi
    assert covered["files"] / 60 >= 0.85
    assert covered["pairs"] / 60 <= 0.6


def test_bootstrap_ci_is_deterministic_and_handles_nothing_usable():
    values = torch.randn(30)
    assert sc.bootstrap_ci(values, seed=3) == sc.bootstrap_ci(values, seed=3)
    assert all(math.isnan(v) for v in sc.bootstrap_ci(torch.full((4,), math.nan)))


# ----------------------------------------------------------------------------------------
# ild_fidelity
# ----------------------------------------------------------------------------------------

def ild_inputs(n: int = 40, bands: int = 8):
    g = torch.Generator().manual_seed(3)
    in_a = -30 + 5 * torch.randn(n, bands, generator=g)
    in_b = in_a - 2 * torch.randn(n, bands, generator=g)   # ILD = in_a - in_b
    return in_a, in_b, in_a - in_b


def test_ild_fidelity_of_a_decode_without_difference_equals_predicting_zero():
    in_a, in_b, true = ild_inputs()
    dec = in_a + 1.0
    result = sc.ild_fidelity(in_a, in_b, dec, dec)
    assert math.isnan(result["correlation"])
    assert result["error_db"] == pytest.approx(result["zero_error_db"])
    assert result["zero_error_db"] == pytest.approx(true.abs().mean().item())
    assert result["mean_abs_ild_dec_db"] == 0.0 and result["slope"] == pytest.approx(0.0)
    assert all(math.isnan(c) for c in result["correlation_per_band"])


def test_ild_fidelity_of_a_decode_that_differs_by_rounding_only_is_not_a_correlation():
    # Two decodes that differ by float32 rounding (1e-6 dB): a correlation of that noise with
    # the true ILD would change with the batching of the same model.
    in_a, in_b, _ = ild_inputs()
    dec = in_a + 1.0
    noisy = dec + 1e-6 * torch.randn_like(dec)
    result = sc.ild_fidelity(in_a, in_b, dec, noisy)
    assert math.isnan(result["correlation"]) and result["slope"] == 0.0
    assert all(math.isnan(c) for c in result["correlation_per_band"])
    assert result["slope_per_band"] == [0.0] * dec.shape[1]
    assert result["error_db"] == pytest.approx(result["zero_error_db"], abs=1e-5)
    carried = sc.ild_fidelity(in_a, in_b, dec, dec - 0.01 * (in_a - in_b))  # 1% of the ILD: a cue
    assert carried["correlation"] == pytest.approx(1.0) and carried["slope"] == pytest.approx(0.01)


def test_ild_fidelity_of_a_perfect_decode():
    in_a, in_b, true = ild_inputs()
    result = sc.ild_fidelity(in_a, in_b, in_a - 3.0, in_b - 3.0)   # any common level is fine
    assert result["correlation"] == pytest.approx(1.0)
    assert result["error_db"] == pytest.approx(0.0, abs=1e-5)
    assert result["slope"] == pytest.approx(1.0)
    assert result["mean_abs_ild_in_db"] == pytest.approx(result["mean_abs_ild_dec_db"], rel=1e-5)
    assert len(result["error_db_per_band"]) == 8 and result["n_pairs"] == 40


def test_ild_fidelity_of_a_decode_that_halves_the_ild():
    in_a, in_b, true = ild_inputs()
    result = sc.ild_fidelity(in_a, in_b, in_b + true / 2, in_b)
    assert result["correlation"] == pytest.approx(1.0)
    assert result["error_db"] == pytest.approx(result["zero_error_db"] / 2, rel=1e-5)
    assert result["slope"] == pytest.approx(0.5, rel=1e-5)
    for error, zero in zip(result["error_db_per_band"], result["zero_error_db_per_band"]):
        assert error == pytest.approx(zero / 2, rel=1e-5)


def test_ild_sign_is_a_minus_b():
    in_a, in_b, _ = ild_inputs()
    swapped = sc.ild_fidelity(in_a, in_b, in_b, in_a)   # decoded channels exchanged
    assert swapped["correlation"] == pytest.approx(-1.0) and swapped["slope"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------
# gcc_phat_delay and itd_fidelity
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [3.0, 2.5, -2.5, 0.3, 1.37])
def test_gcc_phat_recovers_integer_and_fractional_delays_with_sign(delay):
    a, b = delayed_pair(delay)
    estimate = sc.gcc_phat_delay(a, b, SR) * SR
    assert torch.allclose(estimate, torch.full_like(estimate, delay), atol=0.02)
    # b lags a -> positive; exchanging the channels flips the sign.
    assert torch.allclose(sc.gcc_phat_delay(b, a, SR) * SR, -estimate, atol=0.02)


def test_gcc_phat_ignores_a_level_difference_and_survives_noise():
    a, b = delayed_pair(2.5)
    b = 0.1 * b + 0.01 * noise(3, seed=9)       # -20 dB and 20 dB SNR on channel b
    estimate = sc.gcc_phat_delay(a[:, None], b[:, None], SR) * SR
    assert torch.allclose(estimate, torch.full_like(estimate, 2.5), atol=0.15)


def test_gcc_phat_is_not_pulled_by_a_loud_common_undelayed_tone():
    # PHAT whitens the cross-spectrum: a strong narrow-band component (hum reaching both
    # capsules at once) weighs one bin, not most of the correlation.
    a, b = delayed_pair(4.0)
    hum = 30 * torch.sin(2 * math.pi * 300.0 * torch.arange(SR) / SR)
    estimate = sc.gcc_phat_delay(a + hum, b + hum, SR) * SR
    assert torch.allclose(estimate, torch.full_like(estimate, 4.0), atol=0.3)


def test_gcc_phat_uses_only_frequencies_below_f_max():
    # Above ~1.5 kHz the phase of an em32 delay is unreliable; content there that suggests
    # another delay must not move the estimate.
    low_a, low_b = delayed_pair(3.0, seed=1)
    high_a, high_b = delayed_pair(-5.0, seed=2)
    spectrum = torch.fft.rfftfreq(SR, 1 / SR)
    highpass = lambda x: torch.fft.irfft(torch.fft.rfft(x) * (spectrum > 3000), n=SR)  # noqa: E731
    lowpass = lambda x: torch.fft.irfft(torch.fft.rfft(x) * (spectrum < 1500), n=SR)  # noqa: E731
    a, b = lowpass(low_a) + highpass(high_a), lowpass(low_b) + highpass(high_b)
    estimate = sc.gcc_phat_delay(a, b, SR) * SR
    assert torch.allclose(estimate, torch.full_like(estimate, 3.0), atol=0.1)
    assert torch.allclose(sc.gcc_phat_delay(a, b, SR, f_min=3000.0, f_max=12000.0) * SR,
                          torch.full_like(estimate, -5.0), atol=0.1)


def test_gcc_phat_marks_silent_channels_and_checks_its_arguments():
    a, _ = delayed_pair(1.0)
    assert torch.isnan(sc.gcc_phat_delay(a, torch.zeros_like(a), SR)).all()
    assert sc.gcc_phat_delay(a[:0], a[:0], SR).shape == (0,)
    with pytest.raises(ValueError, match="differ in shape"):
        sc.gcc_phat_delay(a, a[:2], SR)
    with pytest.raises(ValueError, match="f_min < f_max"):
        sc.gcc_phat_delay(a, a, SR, f_max=20000.0)


def test_itd_fidelity_against_predicting_zero_delay():
    a, b = delayed_pair(4.0)
    perfect = sc.itd_fidelity(a, b, a, b, SR)
    assert perfect["error_us"] == pytest.approx(0.0, abs=1e-3)
    assert perfect["zero_error_us"] == pytest.approx(4.0 / SR * 1e6, rel=0.02)   # ~167 us
    aligned = sc.itd_fidelity(a, b, a, a, SR)   # a decode that lost the delay
    assert aligned["error_us"] == pytest.approx(aligned["zero_error_us"], rel=1e-3)
    assert aligned["mean_abs_delay_dec_us"] == pytest.approx(0.0, abs=1e-3)
    partial = sc.delay_error(torch.tensor([1e-4, -2e-4, math.nan]), torch.tensor([1e-4, 0.0, 0.0]))
    assert partial["n_valid"] == 2 and partial["n_pairs"] == 3
    assert (partial["error_us"] == pytest.approx(100.0)
            and partial["zero_error_us"] == pytest.approx(150.0))
