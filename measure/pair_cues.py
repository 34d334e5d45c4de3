"""Paired-channel cues: every decode of a pair at the pair's one scale.

The two channels of a segment are compared through cues a 1.5 kbps codec can carry and a
small array produces (see modules/spatial_cues.py): per-band levels over the segment, the
inter-channel level difference (ILD) and, below 1.5 kHz, the inter-channel delay (ITD).
Every decode that is compared across the channels is restored at ONE scale per pair (the
pair's common RMS): a per-channel scale would put the broadband level difference back
from outside the codes, so a codec that carries nothing would look faithful and a swap
restored at B's level would move toward x_B by loudness alone.

- which pairs count (`separated_pairs`) and how the swap is built (`swap_sources`,
  `mix_embeddings`: codebook 1 of A with codebook 2 of B);
- the cues of one batch (`pair_cues` -> `PairCues`: band levels, delays, log-mel distances);
- the set-level results over all batches' cues: `swap_results` (swap gain),
  `fidelity_results` (ILD / ITD fidelity) and `per_pair_values` (for plots).

Shapes: waveforms `[B, 1, T]`, band levels `[B, n_bands]` dB, delays `[B]` seconds.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from measure.metrics import MEL_FFTS, mel_distance
from modules import spatial_cues

MIN_CUE_SAMPLES = max(MEL_FFTS) // 2 + 1  # shortest segment the cues are measured on (mel's)
MIN_SEPARATION_DEG = 90.0       # "well separated" capsules: at least this angle apart
MIN_RESOLVED_SEPARATION = 0.1   # decodes of A and B differing by less than this share of
                                # the inputs' separation: the codec does not resolve the
                                # channels, the gain is noise


def cue_fft_size(length: int, preferred: int) -> int:
    """`preferred` FFT size, halved until it fits a segment of `length` samples."""
    size = int(preferred)
    while size > length and size > 2:
        size //= 2
    return size


def segment_band_levels(wav: Tensor, sample_rate: int) -> Tensor:
    """`spatial_cues.band_levels` with the cue bands, `[N, spatial_cues.CUE_BANDS]` dB.

    `wav` `[N, T]` or `[N, 1, T]`; the FFT is the largest of `spatial_cues.LEVEL_N_FFT`,
    halved, that fits the segment (levels are Parseval-normalised, so they do not depend
    on it), and the bands stop at the Nyquist frequency of low sample rates.
    """
    low_hz, high_hz = spatial_cues.CUE_BAND_RANGE_HZ
    return spatial_cues.band_levels(wav, int(sample_rate), n_bands=spatial_cues.CUE_BANDS,
                                    f_min=low_hz, f_max=min(high_hz, sample_rate / 2),
                                    n_fft=cue_fft_size(wav.shape[-1], spatial_cues.LEVEL_N_FFT))


def separated_pairs(channels: Tensor, capsules: Any = None,
                    min_angle_deg: float = MIN_SEPARATION_DEG) -> tuple[Tensor, str]:
    """Which pairs are well separated: `(mask [N] bool, description)`.

    `channels` `[N, 2]` channel (capsule) indices of each pair; `capsules` `[C, 3]`
    directions of the array's capsules (e.g. `eigenscape.CAPSULES` for em32), or None
    when the files' geometry is unknown. A pair counts when its capsules are at least
    `min_angle_deg` apart (em32: about half of all pairs at 90 degrees). The angle between
    two capsules of a rigid array does not depend on how the array was turned in a
    recording, so the selection holds for real recordings too. Without a geometry, or with
    a channel the geometry does not have, every pair counts, and the description says so.
    """
    channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1, 2)
    every = torch.ones(channels.shape[0], dtype=torch.bool)
    if capsules is None:
        return every, "all pairs (no array geometry known for these files)"
    directions = torch.as_tensor(capsules, dtype=torch.float64)
    if channels.numel() and int(channels.max()) >= directions.shape[0]:
        return every, (f"all pairs (channels beyond the {directions.shape[0]} capsules "
                       f"of the array geometry)")
    directions = directions / directions.norm(dim=1, keepdim=True)
    cosine = (directions[channels[:, 0]] * directions[channels[:, 1]]).sum(dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.arccos(cosine))
    return angle >= min_angle_deg - 1e-9, f"pairs of capsules >= {min_angle_deg:g} deg apart"


# ----------------------------------------------------------------------------------------
# The swap: codebook 1 of A with the other codebooks of B
# ----------------------------------------------------------------------------------------

def swap_sources(n_q: int, content_codebook: int = 0) -> tuple[str, ...]:
    """Which view feeds each codebook in the swap: 'a' for the content codebook, 'b' for
    every other one (codebook 1 of A with codebook 2 of B at n_q = 2)."""
    if n_q < 2:
        raise ValueError("the swap needs at least 2 codebooks")
    if not 0 <= content_codebook < n_q:
        raise ValueError(f"content_codebook {content_codebook} out of range for n_q={n_q}")
    return tuple("a" if k == content_codebook else "b" for k in range(n_q))


def mix_embeddings(sources: Sequence[str | None], emb_a: Sequence[Tensor],
                   emb_b: Sequence[Tensor]) -> Tensor:
    """Latent `[N, D, F]` = sum of the chosen codebooks' embeddings (left-out ones add 0)."""
    if len(sources) != len(emb_a) or len(emb_a) != len(emb_b):
        raise ValueError(f"need one source per codebook: {len(sources)} sources, "
                         f"{len(emb_a)} and {len(emb_b)} codebooks")
    latent = torch.zeros_like(emb_a[0])
    for source, a, b in zip(sources, emb_a, emb_b):
        if source == "a":
            latent = latent + a
        elif source == "b":
            latent = latent + b
        elif source is not None:
            raise ValueError(f"source must be 'a', 'b' or None, got {source!r}")
    return latent


# ----------------------------------------------------------------------------------------
# The cues of one batch
# ----------------------------------------------------------------------------------------

@dataclass
class PairCues:
    """Cues of the first two views (A, B) of each item of a batch, all at the pair's scale.

    Attributes:
        levels: `segment_band_levels` `[B, CUE_BANDS]` dB of `in_a`, `in_b` (the raw
            inputs), `rec_a`, `rec_b` (the decodes of all codebooks of A, of B) and `swap`
            (the content codebook of A with the other codebooks of B; absent with one
            codebook).
        delays: GCC-PHAT inter-channel delay `[B]` seconds (> 0 when B lags A, NaN when
            silent below 1.5 kHz) of the inputs (`in`) and of the decoded pair (`rec`).
        mel: log-mel distances `[B]`: `swap_to_a`, `swap_to_b` (the swap against x_A, x_B),
            `rec_a_to_b` (A's decode against x_B: what the swap scores if codebook 2 of B
            changes nothing) and `rec_b_to_b` (B's decode against x_B: what it scores if it
            decodes like B); the swap's absent with one codebook.
    """
    levels: dict[str, Tensor]
    delays: dict[str, Tensor]
    mel: dict[str, Tensor]

    def cpu(self) -> "PairCues":
        move = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return PairCues(move(self.levels), move(self.delays), move(self.mel))

    @staticmethod
    def cat(parts: Sequence["PairCues"]) -> "PairCues":
        """The cues of several batches joined along the item axis."""
        join = lambda field_: {k: torch.cat([getattr(c, field_)[k] for c in parts])  # noqa: E731
                               for k in getattr(parts[0], field_)}
        return PairCues(join("levels"), join("delays"), join("mel"))


@torch.no_grad()
def pair_cues(x_a: Tensor, x_b: Tensor, rec_a: Tensor, rec_b: Tensor, swap: Tensor | None,
              sample_rate: int, null: Sequence[Tensor] | None = None) -> PairCues | None:
    """`PairCues` of a batch: inputs `x_a`, `x_b` and decodes `rec_a`, `rec_b`, `swap`, each
    `[B, 1, T]` (decodes trimmed to T and restored at the pair's one scale; `swap` None for
    a single-codebook model: no swap entries). `null`: the decodes of A, B and their swap by
    a model never trained with a split (`null_swap_decodes`), levelled as `null_rec_a`,
    `null_rec_b`, `null_swap`. None for segments shorter than `MIN_CUE_SAMPLES`."""
    length = x_a.shape[-1]
    if length < MIN_CUE_SAMPLES:
        return None
    waves = {"in_a": x_a, "in_b": x_b, "rec_a": rec_a, "rec_b": rec_b}
    if swap is not None:
        waves["swap"] = swap
    if null is not None:
        waves.update(zip(("null_rec_a", "null_rec_b", "null_swap"), null))
    waves = {name: w[..., :length].float() for name, w in waves.items()}
    levels = segment_band_levels(torch.cat(list(waves.values())), sample_rate).chunk(len(waves))
    n_fft = cue_fft_size(length, spatial_cues.GCC_N_FFT)
    delay = functools.partial(spatial_cues.gcc_phat_delay, sample_rate=int(sample_rate),
                              n_fft=n_fft)
    mel = {"rec_a_to_b": mel_distance(waves["in_b"], waves["rec_a"], sample_rate),
           "rec_b_to_b": mel_distance(waves["in_b"], waves["rec_b"], sample_rate)}
    if swap is not None:
        mel.update(swap_to_a=mel_distance(waves["in_a"], waves["swap"], sample_rate),
                   swap_to_b=mel_distance(waves["in_b"], waves["swap"], sample_rate))
    return PairCues(levels=dict(zip(waves, levels)),
                    delays={"in": delay(waves["in_a"], waves["in_b"]),
                            "rec": delay(waves["rec_a"], waves["rec_b"])},
                    mel=mel)


# ----------------------------------------------------------------------------------------
# Set-level results of the cues of every item
# ----------------------------------------------------------------------------------------

SWAP_KEYS = ("swap_gain", "swap_gain_ci", "swap_gain_median", "swap_separation_db",
             "swap_input_separation_db", "swap_separation_ratio", "swap_n_pairs", "swap_n_used",
             "swap_n_degenerate", "swap_n_groups", "swap_mel_to_a", "swap_mel_to_b",
             "swap_rec_a_mel_to_b", "swap_rec_b_mel_to_b", "swap_pairs",
             "swap_gain_shape", "swap_gain_shape_ci", "swap_gain_loudness_only",
             "swap_gain_null", "swap_gain_shape_null", "swap_gain_normalized",
             "swap_gain_shape_normalized", "swap_null_note")


def swap_results(cues: PairCues | None, separated: Tensor, selection: str,
                 groups: Sequence[str] | None, bootstrap: int, seed: int,
                 split_quantizer: bool = False) -> dict:
    """Swap gain over the well-separated pairs, all decodes at the pair's one scale.

    `cues` of every item (None: all entries None), `separated` `[N]` bool mask of the
    pairs that count and `selection` how they were chosen (`separated_pairs`), `groups`
    the source file of each item (the bootstrap resamples files) or None, `bootstrap`
    resamples of the interval, `seed` of the bootstrap.

    `swap_gain` (`spatial_cues.swap_gain_summary`: the |d|^2-weighted projection of
    L(swap) - L(rec_A) on d = L(rec_B) - L(rec_A), 0: codebook 2 of B moves nothing, 1:
    the swap decodes like B), `swap_gain_ci` [lo, hi] (95%, files resampled),
    `swap_gain_median` (per pair), `swap_separation_db` (RMS of d: does the codec
    resolve the channels at all), `swap_input_separation_db` (the same of the inputs),
    `swap_separation_ratio` (their ratio: below `MIN_RESOLVED_SEPARATION` the gain is
    noise over noise and the report says so),
    `swap_n_pairs`, `swap_n_used`, `swap_n_degenerate`, `swap_n_groups`, the log-mel
    distances `swap_mel_to_a`, `swap_mel_to_b` beside `swap_rec_a_mel_to_b` (score if
    codebook 2 moved nothing) and `swap_rec_b_mel_to_b` (if the swap decoded like B),
    and `swap_pairs` (which pairs).

    Its controls: `swap_gain_shape` (and `_ci`), the same projection with each level
    vector's mean over bands removed (`spatial_cues.band_shape`: the spectral shape of the
    difference, which loudness cannot move); `swap_gain_loudness_only`, what a fake swap
    scores that only plays A's decode at B's broadband level; `swap_gain_null` and
    `swap_gain_shape_null`, both gains of the dimension swap of the continuous latent of a
    model never trained with a split (0 for an unsplit quantizer, where a swap moves nothing
    by construction; None, with `swap_null_note`, when a split model came without one), and
    `swap_gain_normalized` / `swap_gain_shape_normalized` = (gain - null) / (1 - null):
    the share of what the split left to learn that the model learned.
    """
    results = dict.fromkeys(SWAP_KEYS)
    if cues is None or "swap" not in cues.levels:
        return results
    levels = {name: value[separated] for name, value in cues.levels.items()}
    if groups is not None:
        groups = [g for g, keep in zip(groups, separated.tolist()) if keep]
    summary = spatial_cues.swap_gain_summary(levels["swap"], levels["rec_a"], levels["rec_b"],
                                             groups=groups, n_boot=bootstrap, seed=seed)
    mel = {name: value[separated] for name, value in cues.mel.items()}
    mean = lambda t: t.double().mean().item() if t.numel() else math.nan  # noqa: E731
    input_gap = (levels["in_b"] - levels["in_a"]).double().pow(2)
    input_separation = math.sqrt(input_gap.mean().item()) if input_gap.numel() else math.nan
    results.update({
        "swap_gain": summary["mean"], "swap_gain_ci": [summary["ci_low"], summary["ci_high"]],
        "swap_gain_median": summary["median_per_pair"],
        "swap_separation_db": summary["separation_db"],
        "swap_input_separation_db": input_separation,
        "swap_separation_ratio": (summary["separation_db"] / input_separation
                                  if input_separation > 0 else math.nan),
        "swap_n_pairs": summary["n_pairs"], "swap_n_used": summary["n_used"],
        "swap_n_degenerate": summary["n_degenerate"], "swap_n_groups": summary["n_groups"],
        "swap_mel_to_a": mean(mel["swap_to_a"]), "swap_mel_to_b": mean(mel["swap_to_b"]),
        "swap_rec_a_mel_to_b": mean(mel["rec_a_to_b"]),
        "swap_rec_b_mel_to_b": mean(mel["rec_b_to_b"]),
        "swap_pairs": selection,
    })
    results.update(swap_controls(levels, summary["mean"], groups, bootstrap, seed,
                                 split_quantizer))
    return results


def swap_controls(levels: dict[str, Tensor], gain: float, groups: Sequence[str] | None,
                  bootstrap: int, seed: int, split_quantizer: bool) -> dict:
    """The shape, loudness-only, null and normalised swap gains of `swap_results`."""
    shape = {name: spatial_cues.band_shape(value) for name, value in levels.items()}
    shaped = spatial_cues.swap_gain_summary(shape["swap"], shape["rec_a"], shape["rec_b"],
                                            groups=groups, n_boot=bootstrap, seed=seed)
    fake = spatial_cues.loudness_only_swap(levels["rec_a"], levels["rec_b"])
    results = {
        "swap_gain_shape": shaped["mean"],
        "swap_gain_shape_ci": [shaped["ci_low"], shaped["ci_high"]],
        "swap_gain_loudness_only": spatial_cues.swap_gain_summary(
            fake, levels["rec_a"], levels["rec_b"], n_boot=1)["mean"],
        "swap_null_note": None}
    if not split_quantizer:
        null, null_shape = 0.0, 0.0
    elif "null_swap" in levels:
        null = spatial_cues.swap_gain_summary(levels["null_swap"], levels["null_rec_a"],
                                              levels["null_rec_b"], n_boot=1)["mean"]
        null_shape = spatial_cues.swap_gain_summary(shape["null_swap"], shape["null_rec_a"],
                                                    shape["null_rec_b"], n_boot=1)["mean"]
    else:
        null, null_shape = None, None
        results["swap_null_note"] = ("split quantizer without a null model: its swap gain "
                                     "counts latent dimensions too")
    results.update(swap_gain_null=null, swap_gain_shape_null=null_shape,
                   swap_gain_normalized=normalized_gain(gain, null),
                   swap_gain_shape_normalized=normalized_gain(shaped["mean"], null_shape))
    return results


def normalized_gain(gain: float, null: float | None) -> float | None:
    """(gain - null) / (1 - null): 0 at the null, 1 at a swap that decodes like B; None
    without a null, NaN when the null leaves nothing to learn (null >= 1)."""
    if null is None:
        return None
    if not null < 1.0 or math.isnan(null):
        return math.nan
    return (gain - null) / (1.0 - null)


def fidelity_results(cues: PairCues | None) -> dict:
    """`ild_fidelity` (`spatial_cues.ild_fidelity` of the decoded pair against the raw
    input pair, all pairs: one scale per pair, the full difference), `ild_fidelity_shape`
    (the same with each pair's level difference less its band mean: its spectral shape,
    which tells two capsules apart where a gain cannot) and `itd_fidelity`
    (`spatial_cues.delay_error`, GCC-PHAT below 1.5 kHz); both None without cues."""
    if cues is None:
        return {"ild_fidelity": None, "ild_fidelity_shape": None, "itd_fidelity": None}
    names = ("in_a", "in_b", "rec_a", "rec_b")
    levels = [cues.levels[name] for name in names]
    return {"ild_fidelity": spatial_cues.ild_fidelity(*levels),
            "ild_fidelity_shape": spatial_cues.ild_fidelity(
                *[spatial_cues.band_shape(value) for value in levels]),
            "itd_fidelity": spatial_cues.delay_error(cues.delays["in"], cues.delays["rec"])}


def per_pair_values(cues: PairCues | None, separated: Tensor, groups: Sequence[str] | None,
                    channels: Tensor | None) -> dict | None:
    """Per-pair values for plots and for anyone's own statistics: source `file`,
    `channels` (views 1 and 2), `separated`, true and decoded ILD (dB) and delay (us), and
    the per-pair `swap_gain`. None without cues."""
    if cues is None:
        return None
    levels = cues.levels
    swap_gain = (spatial_cues.swap_gain(levels["swap"], levels["rec_a"], levels["rec_b"]).tolist()
                 if "swap" in levels else None)
    return {
        "file": groups,
        "channels": None if channels is None else channels[:, :2].tolist(),
        "separated": separated.tolist(),
        "ild_true_db": (levels["in_a"] - levels["in_b"]).tolist(),
        "ild_decoded_db": (levels["rec_a"] - levels["rec_b"]).tolist(),
        "swap_gain": swap_gain,
        "delay_true_us": (cues.delays["in"] * 1e6).tolist(),
        "delay_decoded_us": (cues.delays["rec"] * 1e6).tolist(),
    }
