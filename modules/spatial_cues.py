"""Inter-channel (spatial) cues and the fair swap measure for paired-channel evaluation.

Does codebook 2 carry what distinguishes two channels of one segment? The answer is read
from cues a 1.5 kbps codec can actually keep and that survive the physics of a small
array (em32: 4.2 cm radius, inter-capsule delays of at most ~0.25 ms, level differences
that grow above ~1.3 kHz):

- coarse per-band levels over the whole segment (`band_levels`);
- `swap_gain`: how far decoding codebook 1 of A with codebook 2 of B moves the band levels
  from A's decode toward B's decode (a projection, so a bias common to every decode of the
  codec cannot fake it), with `swap_gain_summary` / `bootstrap_ci` for its uncertainty;
- fidelity of the inter-channel level difference (`ild_fidelity`) and of the
  inter-channel delay below ~1.5 kHz (`gcc_phat_delay`, `delay_error`, `itd_fidelity`) of
  a decoded pair against the original pair, each beside the error of predicting "no
  difference at all", the reference a codec has to beat.

Conventions: waveforms are `[N, T]` or `[N, 1, T]` (one channel per item; item i of the
"a" and "b" tensors is the same segment seen by two channels), levels are in dB,
ILD = L_a - L_b (positive when A is louder), delay > 0 when B lags A. All functions are
pure and vectorised over items; they run on whatever device the inputs are on.
"""
from __future__ import annotations

import functools
import math
import typing as tp

import torch
import torchaudio
from torch import Tensor

LEVEL_FLOOR = 1e-10   # power floor (-100 dB re full-scale mean square): silence stays finite
LEVEL_N_FFT = 2048    # 11.7 Hz bins at 24 kHz: a few bins even in the lowest 100 Hz band
CUE_BANDS = 8         # log-spaced level bands of the cues (losses, metrics)
CUE_BAND_RANGE_HZ = (100.0, 11_000.0)  # the level bands' range, below a 24 kHz Nyquist
GCC_N_FFT = 1024      # 43 ms frames: >> the 0.5 ms lags searched, so frames stay aligned


# ----------------------------------------------------------------------------------------
# Per-band levels
# ----------------------------------------------------------------------------------------

def _as_mono(wav: Tensor, name: str = "wav") -> Tensor:
    """`[N, T]` or `[N, 1, T]` -> `[N, T]` (float); anything else is an error."""
    if wav.dim() == 3:
        if wav.shape[1] != 1:
            # Averaging channels here would silently mix the very cues being measured.
            raise ValueError(f"{name}: expected one channel per item [N, 1, T], got "
                             f"{tuple(wav.shape)}; "
                             "pass each channel of a pair as its own tensor")
        wav = wav[:, 0]
    if wav.dim() != 2:
        raise ValueError(f"{name}: expected waveforms [N, T] or [N, 1, T], got {tuple(wav.shape)}")
    return wav if wav.is_floating_point() else wav.float()


@functools.lru_cache(maxsize=16)
def _spectrogram(n_fft: int, hop: int, power: float | None,
                 device: torch.device) -> torchaudio.transforms.Spectrogram:
    # Built once per (size, device), not per batch (the window is a buffer). No centring:
    # reflect-padded edge frames hold a mirrored copy of the signal, whose inter-channel
    # delay has the opposite sign and would pull delay estimates toward zero.
    return torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop, power=power,
                                             center=False).to(device)


def band_edges(n_bands: int = CUE_BANDS, f_min: float = CUE_BAND_RANGE_HZ[0],
               f_max: float = CUE_BAND_RANGE_HZ[1]) -> Tensor:
    """Log-spaced band edges in Hz, `[n_bands + 1]` (float64), from `f_min` to `f_max`."""
    if n_bands < 1 or not 0 < f_min < f_max:
        raise ValueError(f"need n_bands >= 1 and 0 < f_min < f_max, got {n_bands}, {f_min}, "
                         f"{f_max}")
    return torch.logspace(math.log10(f_min), math.log10(f_max), n_bands + 1, dtype=torch.float64)


def band_matrix(sample_rate: int, n_fft: int, edges: Tensor) -> Tensor:
    """0/1 membership of each STFT bin in each band, `[n_fft // 2 + 1, n_bands]` (float64).

    A bin belongs to band b when edges[b] <= f < edges[b + 1] (the last band includes its
    upper edge), so bands do not overlap and every bin is counted at most once.
    """
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    lower, upper = edges[:-1], edges[1:].clone()
    upper[-1] = upper[-1] + 1e-9 * upper[-1]
    member = (freqs[:, None] >= lower[None]) & (freqs[:, None] < upper[None])
    empty = (member.sum(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"bands {empty} contain no STFT bin ({sample_rate / n_fft:.1f} Hz "
                         "resolution): "
                         "use fewer bands or a higher f_min")
    return member.double()


def band_levels(wav: Tensor, sample_rate: int, n_bands: int = CUE_BANDS,
                f_min: float = CUE_BAND_RANGE_HZ[0], f_max: float = CUE_BAND_RANGE_HZ[1],
                n_fft: int = LEVEL_N_FFT) -> Tensor:
    """Level of each frequency band over the whole segment, in dB, `[N, n_bands]`.

    Args:
        wav (Tensor): waveforms `[N, T]` or `[N, 1, T]`, T >= n_fft.
        sample_rate (int): sample rate in Hz; `f_max` must not exceed its Nyquist frequency.
        n_bands (int): number of log-spaced bands between `f_min` and `f_max`.
        f_min (float): lower edge of the first band, Hz.
        f_max (float): upper edge of the last band, Hz.
        n_fft (int): STFT size (Hann window, hop n_fft / 4).
    Returns:
        Tensor: `10 log10(P_b + 1e-10)` per item and band, where P_b is the band's share of
        the mean-square value of the signal: the STFT power of the band's bins averaged
        over frames and divided by n_fft * sum(window^2) (Parseval), so that the bands of
        a full-band signal add up to its mean square and the numbers do not depend on the
        segment length or the FFT size. Unit-variance white noise gives about
        10 log10(band width / Nyquist) per band. A gain of g dB shifts every band by g dB;
        silence gives -100 dB, finite. This is what a 1.5 kbps codec can carry: coarse
        spectral level, no fine structure or phase.
    """
    x = _as_mono(wav)
    if f_max > sample_rate / 2:
        raise ValueError(f"f_max {f_max} Hz is above the Nyquist frequency of {sample_rate} Hz")
    if x.shape[-1] < n_fft:
        raise ValueError(f"segments of {x.shape[-1]} samples are too short for n_fft={n_fft}; "
                         "evaluate longer segments or pass a smaller n_fft")
    if x.shape[0] == 0:  # the FFT backends reject empty batches
        return x.new_zeros(0, n_bands,
                           dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    spec = _spectrogram(n_fft, n_fft // 4, 2.0, x.device)
    power = spec(x.float()).mean(dim=-1).double()            # [N, F], mean over frames
    # One-sided spectrum: every bin but DC and Nyquist stands for two bins of the full one.
    power[:, 1:n_fft // 2] *= 2
    window_energy = spec.window.double().pow(2).sum()
    member = band_matrix(int(sample_rate), n_fft, band_edges(n_bands, f_min, f_max)).to(x.device)
    band_power = power @ member / (n_fft * window_energy)     # [N, n_bands]
    return (10 * torch.log10(band_power + LEVEL_FLOOR)).to(
        x.dtype if x.dtype == torch.float64 else torch.float32)


# ----------------------------------------------------------------------------------------
# Swap gain and bootstrap
# ----------------------------------------------------------------------------------------

def _check_levels(*levels: Tensor) -> None:
    shape = levels[0].shape
    if len(shape) != 2:
        raise ValueError(f"expected levels [N, n_bands], got {tuple(shape)}")
    for other in levels[1:]:
        if other.shape != shape:
            raise ValueError(f"level tensors differ in shape: {tuple(shape)} vs "
                             f"{tuple(other.shape)}")


def _swap_terms(levels_swap: Tensor, levels_rec_a: Tensor,
                levels_rec_b: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair `(<L(swap) - L(rec_A), L(rec_B) - L(rec_A)>, |L(rec_B) - L(rec_A)|^2)`, each
    `[N]`."""
    _check_levels(levels_swap, levels_rec_a, levels_rec_b)
    direction = (levels_rec_b - levels_rec_a).double()
    moved = (levels_swap - levels_rec_a).double()
    return (moved * direction).sum(dim=1), direction.pow(2).sum(dim=1)


def _degenerate(separation: Tensor, n_bands: int, min_separation_db: float) -> Tensor:
    # RMS per-band distance between rec_A and rec_B below the threshold: the projection has
    # no direction to project on (a 0/0 or noise / noise ratio).
    return separation < n_bands * min_separation_db ** 2


def swap_gain(levels_swap: Tensor, levels_rec_a: Tensor, levels_rec_b: Tensor,
              min_separation_db: float = 0.01) -> Tensor:
    """Per pair: how far the swap moved the band levels from A's decode toward B's, `[N]`.

    Args:
        levels_swap (Tensor): `band_levels` of the decode of codebook 1 of A with codebook 2
            of B, `[N, n_bands]`.
        levels_rec_a (Tensor): `band_levels` of the decode of all codebooks of A.
        levels_rec_b (Tensor): `band_levels` of the decode of all codebooks of B.
            All three decoded at the same scale (B's, or the pair's common one), so that
            loudness restored from outside the codes cannot move the result.
        min_separation_db (float): pairs whose decodes of A and B differ by less than this
            RMS over the bands (dB) are degenerate.
    Returns:
        Tensor: `<L(swap) - L(rec_A), L(rec_B) - L(rec_A)> / |L(rec_B) - L(rec_A)|^2`
        (float64): 0 when codebook 2 of B moves nothing toward B's decode, 1 when the swap
        decodes like B, 0.5 half-way; NaN for degenerate pairs. A shift common to all
        decodes cancels in both differences. Per-pair values are heavy-tailed when the
        separation is small: aggregate with `swap_gain_summary`, not a plain mean.
    """
    numerator, separation = _swap_terms(levels_swap, levels_rec_a, levels_rec_b)
    gain = numerator / separation.clamp_min(torch.finfo(torch.float64).tiny)
    return gain.masked_fill(_degenerate(separation, levels_rec_a.shape[1], min_separation_db),
                            math.nan)


def _group_index(groups: tp.Any, n: int) -> Tensor:
    """Any per-item labels (ints, strings, paths) -> dense group ids `[n]` (int64)."""
    labels = groups.tolist() if hasattr(groups, "tolist") else list(groups)
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} entries for {n} values")
    ids: dict = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], dtype=torch.long)


def bootstrap_ci(values: tp.Any, n_boot: int = 1000, seed: int = 0, groups: tp.Any = None,
                 weights: tp.Any = None, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` with a percentile bootstrap confidence interval: `(mean, lo, hi)`.

    Args:
        values (Tensor or array-like): `[N]` per-item values (NaN items are left out).
        n_boot (int): bootstrap resamples.
        seed (int): seed of the resampling (the result is a pure function of the inputs).
        groups (array-like, optional): `[N]` labels (e.g. the source file of each pair). When
            given, whole groups are resampled with replacement (cluster bootstrap), because
            segments of one file are not independent and resampling them one by one would
            give a too narrow interval. Without it each item is its own group.
        weights (Tensor or array-like, optional): `[N]` non-negative weights; the statistic
            is then the weighted mean sum(w v) / sum(w) (a ratio of sums), recomputed on each
            resample.
        level (float): coverage of the interval.
    Returns:
        tuple: `(mean, lo, hi)` as floats: the (weighted) mean over all items and the
        (1 - level) / 2 and (1 + level) / 2 quantiles of its bootstrap distribution. NaN
        everywhere when no item is usable.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    w = (torch.ones_like(v) if weights is None
         else torch.as_tensor(weights, dtype=torch.float64).flatten().cpu())
    if w.shape != v.shape:
        raise ValueError(f"weights has {w.numel()} entries for {v.numel()} values")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    group = torch.arange(v.numel()) if groups is None else _group_index(groups, v.numel())
    usable = ~torch.isnan(v) & (w > 0)
    if not usable.any():
        return math.nan, math.nan, math.nan
    v, w, group = v[usable], w[usable], group[usable]
    # Reduce to per-group sums once; a resample is then a draw of group ids, and its
    # statistic a ratio of sums of the drawn groups' totals (vectorised over resamples).
    group = torch.unique(group, return_inverse=True)[1]
    n_groups = int(group.max()) + 1
    weighted = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, w * v)
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, w)
    mean = (weighted.sum() / total.sum()).item()
    generator = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(n_groups, (int(n_boot), n_groups), generator=generator)
    stats = weighted[draws].sum(dim=1) / total[draws].sum(dim=1)
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(stats, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return mean, lo, hi


def swap_gain_summary(levels_swap: Tensor, levels_rec_a: Tensor, levels_rec_b: Tensor,
                      groups: tp.Any = None, n_boot: int = 1000, seed: int = 0,
                      min_separation_db: float = 0.01) -> dict:
    """Aggregate swap gain over pairs with a bootstrap 95% interval.

    Arguments as in `swap_gain`; `groups` `[N]` (the file of each pair) makes the bootstrap
    resample files instead of pairs.

    The aggregate is a ratio of sums over the non-degenerate pairs,
    `sum_i <L(swap_i) - L(rec_A,i), d_i> / sum_i |d_i|^2` with d_i = L(rec_B,i) - L(rec_A,i):
    the least-squares slope of the swap's movement on the A->B direction pooled over all
    pairs and bands, i.e. the mean of the per-pair gains weighted by |d_i|^2. Unlike the
    plain mean of per-pair ratios it is not dominated by pairs whose decodes barely differ
    (where each ratio is noise over noise), and it needs no tuned threshold: such pairs
    weigh ~0. Pairs below `min_separation_db` (numerically zero separation) are left out
    and counted.

    Returns:
        dict: `mean` (the ratio-of-sums gain), `ci_low`, `ci_high` (percentile bootstrap,
        95%), `median_per_pair` (median of the per-pair gains, for a robustness check),
        `n_used`, `n_degenerate`, `n_pairs`, `n_groups` (resampling units), and
        `separation_db` (RMS over pairs and bands of L(rec_B) - L(rec_A)): how far the codec
        resolves the two channels at all. When it is ~0 the codec does not carry the channel
        difference and no value of the gain means anything.
    """
    numerator, separation = _swap_terms(levels_swap, levels_rec_a, levels_rec_b)
    n_pairs, n_bands = levels_rec_a.shape
    degenerate = _degenerate(separation, n_bands, min_separation_db).cpu()
    numerator, separation = numerator.cpu(), separation.cpu()
    per_pair = (numerator
                / separation.clamp_min(torch.finfo(torch.float64).tiny)).masked_fill(
                    degenerate, math.nan)
    used = ~degenerate
    group = torch.arange(n_pairs) if groups is None else _group_index(groups, n_pairs)
    # The weighted mean of per-pair gains with weights |d|^2 equals the ratio of sums.
    mean, lo, hi = bootstrap_ci(per_pair.masked_fill(degenerate, 0.0), n_boot, seed, group,
                                weights=separation.masked_fill(degenerate, 0.0))
    return {
        "mean": mean, "ci_low": lo, "ci_high": hi,
        "median_per_pair": per_pair[used].median().item() if used.any() else math.nan,
        "n_used": int(used.sum()), "n_degenerate": int(degenerate.sum()), "n_pairs": int(n_pairs),
        "n_groups": int(torch.unique(group[used]).numel()),
        "separation_db": math.sqrt(separation.mean().item() / n_bands) if n_pairs else math.nan,
    }


# ----------------------------------------------------------------------------------------
# Inter-channel level difference
# ----------------------------------------------------------------------------------------

def band_shape(levels: Tensor) -> Tensor:
    """Band levels `[N, n_bands]` less their mean over bands: the spectral shape, with the
    broadband level (all a gain changes) removed. The shape of a difference is the difference
    of the shapes, so swap gain and ILD fidelity on `band_shape` levels see only how two
    channels differ across frequency, which loudness cannot fake."""
    return levels - levels.mean(dim=1, keepdim=True)


def loudness_only_swap(levels_rec_a: Tensor, levels_rec_b: Tensor) -> Tensor:
    """Band levels of a fake swap: A's decode shifted by the broadband level difference of
    the two decodes (the mean over bands of L(rec_B) - L(rec_A)), i.e. rec_A played at
    rec_B's loudness. A gain adds the same dB to every band, so this is exact in the level
    domain. What loudness alone scores on `swap_gain`; on `band_shape` levels it scores 0."""
    _check_levels(levels_rec_a, levels_rec_b)
    return levels_rec_a + (levels_rec_b - levels_rec_a).mean(dim=1, keepdim=True)


def _pearson(x: Tensor, y: Tensor, dim: int | None = None) -> Tensor:
    """Pearson correlation over `dim` (all elements when None); NaN where a side is constant."""
    if dim is None:
        x, y, dim = x.flatten(), y.flatten(), 0
    xc, yc = x - x.mean(dim=dim, keepdim=True), y - y.mean(dim=dim, keepdim=True)
    covariance = (xc * yc).sum(dim=dim)
    scale = (xc.pow(2).sum(dim=dim) * yc.pow(2).sum(dim=dim)).sqrt()
    # Relative test: a constant side leaves only rounding noise in its sum of squares.
    constant = (scale <= 1e-12
                * (x.pow(2).sum(dim=dim) * y.pow(2).sum(dim=dim)).sqrt().clamp_min(1e-300))
    return (covariance / scale.clamp_min(1e-300)).masked_fill(constant, math.nan)


def _slope(reference: Tensor, estimate: Tensor, dim: int | None = None) -> Tensor:
    """Least-squares slope through the origin of `estimate` on `reference`."""
    if dim is None:
        reference, estimate, dim = reference.flatten(), estimate.flatten(), 0
    power = reference.pow(2).sum(dim=dim)
    return ((reference * estimate).sum(dim=dim)
            / power.clamp_min(1e-300)).masked_fill(power <= 1e-300, math.nan)


# Decoded level differences that vary by less than this (dB) are float rounding, not a cue: the
# correlation of such a decode with the true ILD is the correlation of noise, and it changes
# with the batching of the same model.
ILD_RESOLUTION_DB = 1e-3


def ild_fidelity(levels_in_a: Tensor, levels_in_b: Tensor, levels_dec_a: Tensor,
                 levels_dec_b: Tensor) -> dict:
    """How well a decoded pair keeps the per-band inter-channel level difference (ILD).

    Args:
        levels_in_a, levels_in_b (Tensor): `band_levels` of the two input channels,
            `[N, n_bands]`, both measured at one scale (the raw audio, or the pair's common
            scale: never per-channel normalised, which removes the ILD).
        levels_dec_a, levels_dec_b (Tensor): `band_levels` of their decodes, at one scale.
    Returns:
        dict of floats (ILD = L_a - L_b in dB, positive when A is louder):
        - `correlation`: Pearson correlation of decoded vs true ILD over all pairs x bands;
          NaN (undefined) when either side is constant, e.g. a decode with no difference
          (decoded ILDs with a spread under `ILD_RESOLUTION_DB` count as constant);
        - `error_db`: mean |decoded ILD - true ILD|;
        - `zero_error_db`: mean |true ILD|, the error of predicting no difference at all:
          the reference a codec has to beat (`error_db` >= it means no ILD is carried);
        - `slope`: least-squares slope through the origin of decoded on true ILD (1: kept at
          full size, 0.5: halved; correlation alone cannot see a shrunk ILD; 0 for a decode
          whose ILDs vary by less than `ILD_RESOLUTION_DB`);
        - `mean_abs_ild_in_db`, `mean_abs_ild_dec_db`: mean |ILD| of the input and decoded pair;
        - `correlation_per_band`, `error_db_per_band`, `zero_error_db_per_band`,
          `slope_per_band`: lists over bands, the same statistics over pairs only;
        - `n_pairs`.
    """
    _check_levels(levels_in_a, levels_in_b, levels_dec_a, levels_dec_b)
    true = (levels_in_a - levels_in_b).double()
    decoded = (levels_dec_a - levels_dec_b).double()
    error = (decoded - true).abs()
    flat = decoded.std() < ILD_RESOLUTION_DB if decoded.numel() > 1 else True
    flat_per_band = decoded.std(dim=0) < ILD_RESOLUTION_DB if decoded.shape[0] > 1 else None
    per_band = _pearson(true, decoded, dim=0)
    slope_per_band = _slope(true, decoded, dim=0)
    if flat_per_band is not None:
        per_band = per_band.masked_fill(flat_per_band, math.nan)
        slope_per_band = slope_per_band.masked_fill(flat_per_band, 0.0)
    return {
        "correlation": math.nan if flat else _pearson(true, decoded).item(),
        "error_db": error.mean().item(),
        "zero_error_db": true.abs().mean().item(),
        "slope": 0.0 if flat else _slope(true, decoded).item(),
        "mean_abs_ild_in_db": true.abs().mean().item(),
        "mean_abs_ild_dec_db": decoded.abs().mean().item(),
        "correlation_per_band": per_band.tolist(),
        "error_db_per_band": error.mean(dim=0).tolist(),
        "zero_error_db_per_band": true.abs().mean(dim=0).tolist(),
        "slope_per_band": slope_per_band.tolist(),
        "n_pairs": int(true.shape[0]),
    }


# ----------------------------------------------------------------------------------------
# Inter-channel time delay
# ----------------------------------------------------------------------------------------

def gcc_phat_delay(a: Tensor, b: Tensor, sample_rate: int, max_delay_s: float = 0.0005,
                   f_max: float = 1500.0, f_min: float = 50.0, n_fft: int = GCC_N_FFT,
                   upsample: int = 4) -> Tensor:
    """Inter-channel time delay by band-limited GCC-PHAT, in seconds, `[N]`.

    Args:
        a, b (Tensor): the two channels, `[N, T]` or `[N, 1, T]`, T >= n_fft.
        sample_rate (int): sample rate in Hz.
        max_delay_s (float): largest |delay| searched (em32: at most ~0.25 ms between
            capsules; the default leaves margin).
        f_max (float): highest frequency used. Below ~1.5 kHz the phase of a <= 0.5 ms
            delay does not wrap, and this is where an array this small has a delay cue.
        f_min (float): lowest frequency used; the DC region carries no delay information
            and would bias the estimate toward 0.
        n_fft (int): STFT size (Hann window, hop n_fft / 4).
        upsample (int): the correlation is evaluated on a grid `upsample` times finer than
            the sample period (zero-padded inverse FFT) before parabolic interpolation.
    Returns:
        Tensor: delay in seconds (float64), positive when B lags A (b(t) = a(t - delay)),
        NaN where either channel has no energy in the band. Only the phase of the
        cross-spectrum is used (PHAT), so a level difference between the channels does
        not matter.

    The cross-spectrum conj(A) B is averaged over STFT frames before the PHAT weighting
    (one estimate per segment, robust to frames with little energy), restricted to
    f_min <= f <= f_max, turned into a correlation over lags by an inverse real FFT, and
    its peak within +-max_delay_s refined by a parabola through the peak and its two
    neighbours.
    """
    x, y = _as_mono(a, "a"), _as_mono(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[-1] < n_fft:
        raise ValueError(f"segments of {x.shape[-1]} samples are too short for n_fft={n_fft}")
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= Nyquist, got {f_min}, {f_max} at "
                         f"{sample_rate} Hz")
    if x.shape[0] == 0:  # the FFT backends reject empty batches
        return x.new_zeros(0, dtype=torch.float64)
    spec = _spectrogram(n_fft, n_fft // 4, None, x.device)
    both = spec(torch.cat([x, y]).float())                       # [2N, F, frames], complex
    spec_a, spec_b = both.chunk(2)
    cross = (spec_a.conj() * spec_b).mean(dim=-1).to(torch.complex128)   # [N, F]
    freqs = (torch.arange(cross.shape[-1], device=x.device, dtype=torch.float64) * sample_rate
             / n_fft)
    band = (freqs >= f_min) & (freqs <= f_max)
    if not band.any():
        raise ValueError(f"no STFT bin between {f_min} and {f_max} Hz at n_fft={n_fft}")
    magnitude = cross.abs()
    # A channel without energy in the band has no delay: flag it rather than return the
    # arbitrary lag that argmax picks on an all-zero correlation.
    silent = (magnitude * band).sum(dim=-1) <= 1e-20
    phat = torch.where(band, cross / magnitude.clamp_min(1e-30), torch.zeros_like(cross))
    size = n_fft * int(upsample)
    # lag l / upsample samples at index l
    correlation = torch.fft.irfft(phat, n=size, dim=-1)
    max_lag = int(math.ceil(max_delay_s * sample_rate * upsample))
    if max_lag < 1 or 2 * max_lag + 1 > size // 2:
        raise ValueError(f"max_delay_s={max_delay_s} does not fit n_fft={n_fft}")
    lags = torch.arange(-max_lag, max_lag + 1, device=x.device)
    window = correlation[:, lags % size]                        # [N, 2 * max_lag + 1]
    peak = window.argmax(dim=-1)
    # Parabolic refinement; at the edge of the search range the neighbour outside is
    # missing, so the peak stays on the grid there.
    inner = peak.clamp(1, window.shape[-1] - 2)
    left, centre, right = (window.gather(1, (inner + k)[:, None])[:, 0] for k in (-1, 0, 1))
    curvature = left - 2 * centre + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp_max(-1e-300),
                         torch.zeros_like(centre))
    offset = torch.where(peak == inner, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))
    delay_samples = (lags[peak].double() + offset) / upsample
    return (delay_samples / sample_rate).masked_fill(silent, math.nan)


def delay_error(delay_true: Tensor, delay_dec: Tensor) -> dict:
    """Error of decoded inter-channel delays against the true ones, in microseconds.

    Args:
        delay_true (Tensor): `[N]` delays of the input pairs (seconds, `gcc_phat_delay`).
        delay_dec (Tensor): `[N]` delays of the decoded pairs.
    Returns:
        dict of floats over the pairs where both delays are defined: `error_us` (mean
        |decoded - true|), `zero_error_us` (mean |true|, the error of predicting no delay:
        the reference a codec has to beat), `mean_abs_delay_dec_us`, `correlation`
        (Pearson, NaN when undefined), `n_valid`, `n_pairs`.
    """
    true, decoded = (torch.as_tensor(delay_true).double().flatten(),
                     torch.as_tensor(delay_dec).double().flatten())
    if true.shape != decoded.shape:
        raise ValueError(f"delay tensors differ in shape: {tuple(true.shape)} vs "
                         f"{tuple(decoded.shape)}")
    valid = ~(torch.isnan(true) | torch.isnan(decoded))
    true, decoded = true[valid] * 1e6, decoded[valid] * 1e6
    if not valid.any():
        nan = math.nan
        return {"error_us": nan, "zero_error_us": nan, "mean_abs_delay_dec_us": nan,
                "correlation": nan, "n_valid": 0, "n_pairs": int(valid.numel())}
    return {
        "error_us": (decoded - true).abs().mean().item(),
        "zero_error_us": true.abs().mean().item(),
        "mean_abs_delay_dec_us": decoded.abs().mean().item(),
        "correlation": _pearson(true, decoded).item() if true.numel() > 1 else math.nan,
        "n_valid": int(valid.sum()), "n_pairs": int(valid.numel()),
    }


def itd_fidelity(in_a: Tensor, in_b: Tensor, dec_a: Tensor, dec_b: Tensor, sample_rate: int,
                 **gcc_kwargs) -> dict:
    """`delay_error` of the decoded pair's GCC-PHAT delay against the input pair's.

    `in_a`, `in_b`, `dec_a`, `dec_b`: `[N, T]` or `[N, 1, T]` waveforms (a decode trimmed to
    the input length). A latency common to both decoded channels cancels in the inter-channel
    delay, so no alignment is needed. `gcc_kwargs` go to `gcc_phat_delay`.
    """
    return delay_error(gcc_phat_delay(in_a, in_b, sample_rate, **gcc_kwargs),
                       gcc_phat_delay(dec_a, dec_b, sample_rate, **gcc_kwargs))
