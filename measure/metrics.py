"""Evaluation metrics shared by the training engine's validation and `evaluate.py`.

Everything here is a plain tensor function or a small accumulator, so that the engine's
per-epoch validation and the offline report compute the same numbers the same way.

Shapes used throughout: waveforms `[N, C, T]`, codes `[N, n_q, F]`, per-codebook embeddings
`list[Tensor [N, D, F]]`. Batches of paired items add a view axis after the batch axis:
`[B, V, ...]`.

Groups of metrics:
- reconstruction: `si_snr`, `mel_distance`, `stft_distance` (per item), `nominal_bitrate_kbps`;
- codebook health: `codebook_histogram` and `histogram_entropy` (perplexity, dead codes);
- disentanglement (does codebook 1 carry what the channels share and codebook 2 what
  differs?): cross-channel code agreement against its chance level (different segments)
  and ceiling (`ceiling_copy`), embedding cosine, `centered_pooled_cosine`;
- paired-channel cues, every decode of a pair at the pair's one scale (`pair_cues`,
  `separated_pairs`): swap gain, ILD / ITD fidelity (modules/spatial_cues.py), and probes trained
  fresh on frozen embeddings with folds grouped by file (measure/probes.py).
`MetricAccumulator` collects all of them over a validation set and returns one dict;
`flatten_metrics` turns that dict into the flat scalars that are logged, and
`CheckpointReport` holds one checkpoint's results for the evaluation report.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torchaudio
from torch import Tensor
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

from modules import spatial_cues

MEL_FFTS = (512, 1024, 2048)
MEL_BINS = 64
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)
LOG_EPS = 1e-5


# ----------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------

def _check_pair(x: Tensor, y: Tensor, min_length: int = 1) -> None:
    if x.shape != y.shape:
        raise ValueError(f"reference and estimate shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"expected waveforms [N, T] or [N, C, T], got shape {tuple(x.shape)}")
    if x.shape[-1] < min_length:
        raise ValueError(f"signals of {x.shape[-1]} samples are too short for this metric "
                         f"(need at least {min_length}); evaluate longer segments")


def _per_item(values: Tensor) -> Tensor:
    """Average everything but the leading (item) dimension."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def si_snr(x: Tensor, y: Tensor) -> Tensor:
    """Scale-invariant SNR in dB of estimate `y` against reference `x`, one value per item.

    `x`, `y`: `[N, T]` or `[N, C, T]` (channels averaged). Identical signals give about
    +100 dB (torchmetrics' epsilon), so higher is better with no fixed ceiling.
    """
    _check_pair(x, y)
    return _per_item(scale_invariant_signal_noise_ratio(y.float(), x.float()))


@functools.lru_cache(maxsize=32)
def _mel_transform(sample_rate: int, n_fft: int, device: torch.device) -> torchaudio.transforms.MelSpectrogram:
    # Cached so that the filterbanks are built once per (rate, size, device), not per batch.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=MEL_BINS,
        power=1.0).to(device)


@functools.lru_cache(maxsize=32)
def _magnitude_transform(n_fft: int, hop: int, device: torch.device) -> torchaudio.transforms.Spectrogram:
    return torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop, power=1.0).to(device)


@torch.no_grad()
def mel_distance(x: Tensor, y: Tensor, sample_rate: int = 24000) -> Tensor:
    """Multi-scale log-mel L1 distance (lower is better; 0 for identical signals), `[N]`.

    Mean absolute difference of log10 mel magnitudes (64 bands) at FFT sizes 512, 1024 and
    2048 (hop n_fft / 4), averaged over scales. Computed in float32.
    """
    _check_pair(x, y, min_length=max(MEL_FFTS) // 2 + 1)
    x, y = x.float(), y.float()
    total = torch.zeros(x.shape[0], device=x.device)
    for n_fft in MEL_FFTS:
        mel = _mel_transform(int(sample_rate), n_fft, x.device)
        diff = torch.log10(mel(x) + LOG_EPS) - torch.log10(mel(y) + LOG_EPS)
        total += _per_item(diff.abs())
    return total / len(MEL_FFTS)


@torch.no_grad()
def stft_distance(x: Tensor, y: Tensor) -> Tensor:
    """Multi-resolution STFT distance, `[N]`: spectral convergence + log-magnitude L1.

    Averaged over (n_fft, hop) in (512, 128), (1024, 256), (2048, 512); 0 for identical
    signals. Spectral convergence is ||Y| - |X||_F / ||X||_F per item.
    """
    _check_pair(x, y, min_length=max(n for n, _ in STFT_RESOLUTIONS) // 2 + 1)
    x, y = x.float(), y.float()
    total = torch.zeros(x.shape[0], device=x.device)
    for n_fft, hop in STFT_RESOLUTIONS:
        spec = _magnitude_transform(n_fft, hop, x.device)
        mag_x, mag_y = spec(x).flatten(1), spec(y).flatten(1)
        convergence = (mag_y - mag_x).norm(dim=1) / mag_x.norm(dim=1).clamp_min(LOG_EPS)
        log_l1 = (torch.log(mag_x + LOG_EPS) - torch.log(mag_y + LOG_EPS)).abs().mean(dim=1)
        total += convergence + log_l1
    return total / len(STFT_RESOLUTIONS)


def nominal_bitrate_kbps(n_q: int, bins: int, frame_rate: float) -> float:
    """Bitrate of the token stream if every code costs log2(bins) bits, per channel."""
    return n_q * math.log2(bins) * frame_rate / 1000.0


# ----------------------------------------------------------------------------------------
# Codebook health
# ----------------------------------------------------------------------------------------

def _check_codes(codes: Tensor, bins: int | None = None) -> None:
    if codes.dim() != 3:
        raise ValueError(f"expected codes [N, n_q, F], got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise ValueError("codes must be an integer tensor (indices into the codebooks)")
    if bins is not None and codes.numel() and (codes.min() < 0 or codes.max() >= bins):
        raise ValueError(f"codes out of range [0, {bins}): min {int(codes.min())}, "
                         f"max {int(codes.max())}; is `bins` the model's codebook size?")


def codebook_histogram(codes: Tensor, bins: int) -> Tensor:
    """Usage counts of each code, `[n_q, bins]` (int64), from codes `[N, n_q, F]`."""
    _check_codes(codes, bins)
    return code_counts(codes, bins)


def code_counts(codes: Tensor, bins: int) -> Tensor:
    """`codebook_histogram` without the range check (which costs a host sync): for codes
    straight from the model, e.g. in the training step."""
    per_codebook = codes.transpose(0, 1).reshape(codes.shape[1], -1).long()
    hist = torch.zeros(codes.shape[1], bins, dtype=torch.long, device=codes.device)
    return hist.scatter_add_(1, per_codebook, torch.ones_like(per_codebook))


def histogram_entropy(hist: Tensor) -> Tensor:
    """Entropy in nats of each row of a usage histogram `[n_q, bins]` -> `[n_q]`."""
    probs = hist.double() / hist.sum(dim=1, keepdim=True).clamp_min(1)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)


# ----------------------------------------------------------------------------------------
# Disentanglement: agreement and similarity across channels of the same segment
# ----------------------------------------------------------------------------------------

def _per_item_agreement(codes_a: Tensor, codes_b: Tensor) -> Tensor:
    """Fraction of frames with equal codes, `[N, n_q]`."""
    _check_codes(codes_a)
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"codes shapes differ: {tuple(codes_a.shape)} vs {tuple(codes_b.shape)}")
    return (codes_a == codes_b).float().mean(dim=2)


def _per_item_cosine(emb_a: Sequence[Tensor], emb_b: Sequence[Tensor]) -> Tensor:
    """Frame-wise cosine similarity of the embeddings, averaged over frames, `[N, n_q]`."""
    if len(emb_a) != len(emb_b):
        raise ValueError(f"embedding lists differ in length: {len(emb_a)} vs {len(emb_b)}")
    return torch.stack([torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).mean(dim=1)
                        for a, b in zip(emb_a, emb_b)], dim=1)


def _rolled(items: Tensor) -> Tensor:
    """Shift the items by one so that item i meets item i + 1 (a different segment)."""
    if items.shape[0] < 2:
        raise ValueError("chance level needs at least 2 items (different segments)")
    return items.roll(-1, dims=0)


def centered_pooled_cosine(pooled: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-view cosine of time-pooled embeddings after removing their mean over the set.

    `pooled`: `[N, V, n_q, D]`, per-codebook embeddings averaged over frames. Returns
    `(same, chance)`, each `[n_q]`: views i < j of the same item, and view i of item n
    against view j of item n + 1. Raw cosines of codebook vectors are often all near 1, because the vectors in use
    share a large common offset; centring removes it, so that what remains is whether the
    two channels move together (about 0 for unrelated segments).
    """
    if pooled.dim() != 4 or pooled.shape[1] < 2:
        raise ValueError(f"expected pooled embeddings [N, V >= 2, n_q, D], got {tuple(pooled.shape)}")
    centered = pooled - pooled.mean(dim=(0, 1), keepdim=True)
    following = _rolled(centered)
    pairs = list(itertools.combinations(range(pooled.shape[1]), 2))
    cosine = torch.nn.functional.cosine_similarity
    same = torch.stack([cosine(centered[:, i], centered[:, j], dim=-1) for i, j in pairs]).mean(dim=(0, 1))
    chance = torch.stack([cosine(centered[:, i], following[:, j], dim=-1) for i, j in pairs]).mean(dim=(0, 1))
    return same, chance


# ----------------------------------------------------------------------------------------
# Paired-channel cues: every decode of a pair at the pair's one scale
# ----------------------------------------------------------------------------------------
#
# The two channels of a segment are compared through cues a 1.5 kbps codec can carry and a
# small array produces (see modules/spatial_cues.py): per-band levels over the segment, the
# inter-channel level difference (ILD) and, below 1.5 kHz, the inter-channel delay (ITD).
# Every decode that is compared across the channels is restored at ONE scale per pair (the
# pair's common RMS): a per-channel scale would put the broadband level difference back
# from outside the codes, so a codec that carries nothing would look faithful and a swap
# restored at B's level would move toward x_B by loudness alone.

N_BANDS = 8                     # log-spaced bands of the level cues (issue 9: 8 bands, 100 Hz - 11 kHz)
BAND_F_MIN, BAND_F_MAX = 100.0, 11000.0
MIN_CUE_SAMPLES = max(MEL_FFTS) // 2 + 1  # shortest segment the cues are measured on (mel distance's)
MIN_SEPARATION_DEG = 90.0       # "well separated" capsules: at least this angle apart on the sphere
CEILING_SHIFT_SAMPLES = 1       # the agreement ceiling's copy: 1 sample later ...
CEILING_GAIN_DB = 0.5           # ... and 0.5 dB louder
MIN_RESOLVED_SEPARATION = 0.1   # decodes of A and B differing by less than this share of the inputs'
                                # separation: the codec does not resolve the channels, the gain is noise


def cue_fft_size(length: int, preferred: int) -> int:
    """`preferred` FFT size, halved until it fits a segment of `length` samples."""
    size = int(preferred)
    while size > length and size > 2:
        size //= 2
    return size


def segment_band_levels(wav: Tensor, sample_rate: int) -> Tensor:
    """`spatial_cues.band_levels` with the instrument's bands, `[N, N_BANDS]` dB.

    `wav` `[N, T]` or `[N, 1, T]`; the FFT is the largest of `spatial_cues.LEVEL_N_FFT`,
    halved, that fits the segment (levels are Parseval-normalised, so they do not depend
    on it), and the bands stop at the Nyquist frequency of low sample rates.
    """
    return spatial_cues.band_levels(wav, int(sample_rate), n_bands=N_BANDS, f_min=BAND_F_MIN,
                                    f_max=min(BAND_F_MAX, sample_rate / 2),
                                    n_fft=cue_fft_size(wav.shape[-1], spatial_cues.LEVEL_N_FFT))


def ceiling_copy(x: Tensor, shift: int = CEILING_SHIFT_SAMPLES, gain_db: float = CEILING_GAIN_DB) -> Tensor:
    """The same channel a hair away: `shift` samples later (zeros in front) and `gain_db`
    louder, same length. Its codes against the original's are the ceiling of cross-channel
    agreement: no two channels of a segment can be closer than this."""
    if not 0 < shift < x.shape[-1]:
        raise ValueError(f"shift {shift} must be within the segment of {x.shape[-1]} samples")
    delayed = torch.nn.functional.pad(x[..., : x.shape[-1] - shift], (shift, 0))
    return delayed * 10 ** (gain_db / 20)


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
        return every, f"all pairs (channels beyond the {directions.shape[0]} capsules of the array geometry)"
    directions = directions / directions.norm(dim=1, keepdim=True)
    cosine = (directions[channels[:, 0]] * directions[channels[:, 1]]).sum(dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.arccos(cosine))
    return angle >= min_angle_deg - 1e-9, f"pairs of capsules >= {min_angle_deg:g} deg apart"


@dataclass
class PairCues:
    """Cues of the first two views (A, B) of each item of a batch, all at the pair's scale.

    Attributes:
        levels: `segment_band_levels` `[B, N_BANDS]` dB of `in_a`, `in_b` (the raw inputs),
            `rec_a`, `rec_b` (the decodes of all codebooks of A, of B) and `swap` (the
            content codebook of A with the other codebooks of B; absent with one codebook).
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


@torch.no_grad()
def pair_cues(x_a: Tensor, x_b: Tensor, rec_a: Tensor, rec_b: Tensor, swap: Tensor | None,
              sample_rate: int) -> PairCues | None:
    """`PairCues` of a batch: inputs `x_a`, `x_b` and decodes `rec_a`, `rec_b`, `swap`, each
    `[B, 1, T]` (decodes trimmed to T and restored at the pair's one scale; `swap` None for
    a single-codebook model: no swap entries). None for segments shorter than
    `MIN_CUE_SAMPLES`."""
    length = x_a.shape[-1]
    if length < MIN_CUE_SAMPLES:
        return None
    waves = {"in_a": x_a, "in_b": x_b, "rec_a": rec_a, "rec_b": rec_b}
    if swap is not None:
        waves["swap"] = swap
    waves = {name: w[..., :length].float() for name, w in waves.items()}
    levels = segment_band_levels(torch.cat(list(waves.values())), sample_rate).chunk(len(waves))
    n_fft = cue_fft_size(length, spatial_cues.GCC_N_FFT)
    delay = functools.partial(spatial_cues.gcc_phat_delay, sample_rate=int(sample_rate), n_fft=n_fft)
    mel = {"rec_a_to_b": mel_distance(waves["in_b"], waves["rec_a"], sample_rate),
           "rec_b_to_b": mel_distance(waves["in_b"], waves["rec_b"], sample_rate)}
    if swap is not None:
        mel.update(swap_to_a=mel_distance(waves["in_a"], waves["swap"], sample_rate),
                   swap_to_b=mel_distance(waves["in_b"], waves["swap"], sample_rate))
    return PairCues(levels=dict(zip(waves, levels)),
                    delays={"in": delay(waves["in_a"], waves["in_b"]), "rec": delay(waves["rec_a"], waves["rec_b"])},
                    mel=mel)


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
# Accumulator
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstrumentSettings:
    """How much work the set-level statistics do. The defaults are the per-epoch
    validation's light settings; `evaluate.py` passes the full ones (config/evaluate.yaml).

    Attributes:
        probe_folds: outer folds of the probes (grouped by file; fewer files, fewer folds).
        probe_shuffles: label permutations of the shuffled-label baseline.
        ild_probe_alpha: ridge strength of the ILD probe; None: chosen by nested grouped CV
            over `probes.RIDGE_ALPHAS` inside each training fold.
        channel_probe_c: inverse penalty of the channel-index probe; None: nested CV over
            `probes.LOGISTIC_CS`.
        bootstrap: resamples of the swap gain's confidence interval (files resampled).
        seed: seed of the folds, permutations and bootstrap.
    """
    probe_folds: int = 5
    probe_shuffles: int = 1
    ild_probe_alpha: float | None = 10.0
    channel_probe_c: float | None = 0.1
    bootstrap: int = 1000
    seed: int = 0


class MetricAccumulator:
    """Collects per-batch statistics over a validation set; `compute()` returns one dict.

    Fed by `validation.accumulate` for both the engine's validation and `evaluate.py`; by
    hand, batches of V views go in like this (all decodes at the pair's common scale):

        acc = MetricAccumulator(n_q=model.n_q, bins=cfg.model.bins,
                                sample_rate=model.sample_rate, frame_rate=model.frame_rate)
        for wavs, metas in loader:                      # wavs [B, V, 1, T]
            x = wavs.flatten(0, 1)
            scale = EncodecModel.shared_scale(x, wavs.shape[1])
            out = model(x, return_embeddings=True, scale=scale)
            acc.update(wavs, out.audio, out.codes, out.embeddings,
                       torch.tensor([m["channels"] for m in metas]),
                       groups=[m["path"] for m in metas])
        results = acc.compute()

    (`validation.measure_batch` adds the swap, the cues and the ceiling codes.) Memory
    stays small: per-item scalars and band levels, code histograms and time-pooled
    embeddings (for the probes). The chance levels pair view i of item n with view j of
    item n + 1 across the whole stream (wrapping around at the end), so they do not depend
    on the batch size.

    Args:
        n_q, bins: the model's codebooks and their size.
        sample_rate, frame_rate: the model's.
        settings: `InstrumentSettings` (default: the light per-epoch ones).
        capsules: `[C, 3]` capsule directions of the files' array (`separated_pairs`), or
            None: the swap gain then uses every pair and says so.
    """

    def __init__(self, n_q: int, bins: int, sample_rate: int, frame_rate: float,
                 settings: InstrumentSettings | None = None, capsules: Any = None):
        self.n_q, self.bins = int(n_q), int(bins)
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)
        self.settings = settings or InstrumentSettings()
        self.capsules = capsules
        self.reset()

    def reset(self) -> None:
        """Forget everything collected so far."""
        self._recon: dict[str, list[Tensor]] = {"si_snr": [], "mel_distance": [], "stft_distance": []}
        self._recon_own: dict[str, list[Tensor]] = {"si_snr": [], "mel_distance": []}
        self._hist = torch.zeros(self.n_q, self.bins, dtype=torch.long)
        self._agreement: list[Tensor] = []
        self._cosine: list[Tensor] = []
        self._chance_agreement: list[Tensor] = []
        self._chance_cosine: list[Tensor] = []
        self._ceiling: list[Tensor] = []
        self._pooled: list[Tensor] = []
        self._channels: list[Tensor] = []
        self._groups: list[str] = []
        self._cues: list[PairCues] = []
        self._first_item = None    # (codes [V, n_q, F], embeddings) of the very first item
        self._pending_item = None  # last item seen, waiting for its successor
        self.num_items = 0
        self.views = None

    # -- collection ------------------------------------------------------------------

    @torch.no_grad()
    def update(self, wavs: Tensor, audio: Tensor, codes: Tensor,
               embeddings: Sequence[Tensor] | None = None, channels: Tensor | None = None, *,
               groups: Sequence[str] | None = None, ceiling_codes: Tensor | None = None,
               cues: PairCues | None = None, audio_own_scale: Tensor | None = None) -> None:
        """Add one batch.

        `wavs`: `[B, V, C, T]` inputs. `audio`, `codes`, `ceiling_codes` and each of
        `embeddings` either shaped `[B, V, ...]` or flattened view-major `[B * V, ...]` (the
        model's output on `wavs.flatten(0, 1)`). `audio` is the reconstruction the
        reconstruction metrics score (validation: at the pair's common scale);
        `audio_own_scale` optionally the same with each channel at its own RMS.
        `channels`: `[B, V]` microphone indices (pair selection, channel probe). `groups`:
        `[B]` source file of each item (probe folds, bootstrap). `ceiling_codes`: codes of
        `ceiling_copy` of each view at the same scale. `cues`: `pair_cues` of the batch.
        """
        if wavs.dim() != 4:
            raise ValueError(f"expected wavs [B, V, C, T], got shape {tuple(wavs.shape)}")
        batch_size, views = wavs.shape[:2]
        if self.views is None:
            self.views = views
        elif views != self.views:
            raise ValueError(f"number of views changed from {self.views} to {views} between batches")
        unflat = lambda t: t.reshape(batch_size, views, *t.shape[-2:]) if t.dim() == 3 else t  # noqa: E731
        audio, codes = unflat(audio), unflat(codes).detach().cpu()
        if codes.shape[2] != self.n_q:
            raise ValueError(f"codes have {codes.shape[2]} codebooks, the accumulator expects {self.n_q}")
        embeddings = None if embeddings is None else [unflat(e).detach().float().cpu() for e in embeddings]
        if groups is not None and len(groups) != batch_size:
            raise ValueError(f"groups has {len(groups)} entries for a batch of {batch_size} items")

        reference = wavs.to(audio.device).flatten(0, 1)  # inputs often stay on the CPU
        self._update_reconstruction(self._recon, reference, audio[..., : wavs.shape[-1]].flatten(0, 1),
                                    batch_size, views)
        if audio_own_scale is not None:
            own = unflat(audio_own_scale)[..., : wavs.shape[-1]].flatten(0, 1)
            self._update_reconstruction(self._recon_own, reference.to(own.device), own, batch_size, views)
        self._hist += codebook_histogram(codes.flatten(0, 1), self.bins)
        if embeddings is not None:
            self._pooled.append(torch.stack([e.mean(dim=-1) for e in embeddings], dim=2))
        if channels is not None:
            self._channels.append(torch.as_tensor(channels, dtype=torch.long).reshape(batch_size, views).cpu())
        if groups is not None:
            self._groups.extend(str(g) for g in groups)
        if ceiling_codes is not None:
            ceiling = unflat(ceiling_codes).detach().cpu()
            if ceiling.shape != codes.shape:
                raise ValueError(f"ceiling codes {tuple(ceiling.shape)} differ in shape from codes {tuple(codes.shape)}")
            self._ceiling.append((ceiling == codes).double().mean(dim=(1, 3)))  # [B, n_q], views averaged
        if cues is not None:
            self._cues.append(cues.cpu())
        if views >= 2:
            self._update_pairs(codes, embeddings)
        self.num_items += batch_size

    def _update_reconstruction(self, store: dict[str, list[Tensor]], x: Tensor, y: Tensor, batch_size: int,
                               views: int) -> None:
        functions = {"si_snr": si_snr, "mel_distance": lambda a, b: mel_distance(a, b, self.sample_rate),
                     "stft_distance": stft_distance}
        for name in store:
            store[name].append(functions[name](x, y).detach().cpu().reshape(batch_size, views))

    def _update_pairs(self, codes: Tensor, embeddings: list[Tensor] | None) -> None:
        same_agree, same_cos = self._pair_stats(codes, embeddings, codes, embeddings)
        self._agreement.append(same_agree)
        self._cosine.append(same_cos)
        # Chance: views of item n against views of item n + 1, carried across batches.
        items = [(codes[n], None if embeddings is None else [e[n] for e in embeddings])
                 for n in range(codes.shape[0])]
        if self._first_item is None:
            self._first_item = items[0]
        else:
            items = [self._pending_item, *items]
        for current, following in zip(items[:-1], items[1:]):
            self._add_chance_pair(current, following)
        self._pending_item = items[-1]

    def _add_chance_pair(self, current, following) -> None:
        agree, cos = self._pair_stats(current[0][None], self._wrap(current[1]),
                                      following[0][None], self._wrap(following[1]))
        self._chance_agreement.append(agree)
        self._chance_cosine.append(cos)

    @staticmethod
    def _pair_stats(codes_a: Tensor, emb_a, codes_b: Tensor, emb_b) -> tuple[Tensor, Tensor | None]:
        """Agreement and cosine `[N, pairs, n_q]` of view i of `*_a` with view j of `*_b`, i < j."""
        pairs = list(itertools.combinations(range(codes_a.shape[1]), 2))
        agree = torch.stack([_per_item_agreement(codes_a[:, i], codes_b[:, j]) for i, j in pairs], dim=1)
        if emb_a is None or emb_b is None:
            return agree, None
        cos = torch.stack([_per_item_cosine([e[:, i] for e in emb_a], [e[:, j] for e in emb_b])
                           for i, j in pairs], dim=1)
        return agree, cos

    # -- results ---------------------------------------------------------------------

    def compute(self) -> dict:
        """All metrics as plain Python numbers, lists and dicts (JSON-ready but for NaN).

        Reconstruction (of `audio` as given: validation gives the pair's common scale):
        `si_snr`, `mel_distance`, `stft_distance` and `*_per_view`; `si_snr_own_scale`,
        `mel_distance_own_scale` (+ `_per_view`) when `audio_own_scale` was given.
        `bitrate_kbps` (nominal), `effective_bitrate_kbps` (from the code entropies),
        `num_items`, `views`.
        Per codebook (lists): `perplexity`, `entropy` (nats), `effective_bits`, `dead_codes`,
        `code_histogram`; `codebook_agreement` across the channels of a segment beside
        `chance_agreement` (different segments) and `ceiling_agreement` (a channel against
        its `ceiling_copy`); `embedding_cosine`, `chance_cosine`, `centered_cosine`,
        `chance_centered_cosine`.
        Swap (`_swap_results`), cue fidelity (`ild_fidelity`, `itd_fidelity`), probes
        (`_probe_results`) and `per_pair` values. Entries whose inputs are missing (one
        view, no cues, no embeddings, no labels, one file) are None.
        """
        if self.num_items == 0:
            raise RuntimeError("MetricAccumulator.compute() called before any update()")
        results: dict = {"num_items": self.num_items, "views": self.views}
        for suffix, store in (("", self._recon), ("_own_scale", self._recon_own)):
            for name, values in store.items():
                per_item = torch.cat(values) if values else None
                results[f"{name}{suffix}"] = None if per_item is None else per_item.mean().item()
                results[f"{name}{suffix}_per_view"] = None if per_item is None else per_item.mean(dim=0).tolist()
        results.update(self._codebook_results())
        results.update(self._pair_results())
        cues = self._joined_cues()
        separated, selection = self._separated()
        results.update(self._swap_results(cues, separated, selection))
        results.update(self._fidelity_results(cues))
        results.update(self._probe_results(cues))
        results["per_pair"] = self._per_pair(cues, separated)
        return results

    def _codebook_results(self) -> dict:
        entropy = histogram_entropy(self._hist)
        return {
            "bitrate_kbps": nominal_bitrate_kbps(self.n_q, self.bins, self.frame_rate),
            "effective_bitrate_kbps": (entropy / math.log(2)).sum().item() * self.frame_rate / 1000.0,
            "perplexity": entropy.exp().tolist(),
            "entropy": entropy.tolist(),
            "effective_bits": (entropy / math.log(2)).tolist(),
            "dead_codes": (self._hist == 0).sum(dim=1).tolist(),
            "code_histogram": self._hist.tolist(),
        }

    def _pair_results(self) -> dict:
        results = dict.fromkeys(["codebook_agreement", "chance_agreement", "ceiling_agreement", "embedding_cosine",
                                 "chance_cosine", "centered_cosine", "chance_centered_cosine"])
        if self._ceiling and sum(len(c) for c in self._ceiling) == self.num_items:
            results["ceiling_agreement"] = torch.cat(self._ceiling).mean(dim=0).tolist()
        if not self._agreement:
            return results
        chance_agree, chance_cos = list(self._chance_agreement), list(self._chance_cosine)
        if self.num_items >= 2:  # close the ring: the last item meets the first one
            agree, cos = self._pair_stats(self._pending_item[0][None], self._wrap(self._pending_item[1]),
                                          self._first_item[0][None], self._wrap(self._first_item[1]))
            chance_agree.append(agree)
            chance_cos.append(cos)
        mean = lambda parts: torch.cat(parts).mean(dim=(0, 1)).tolist()  # noqa: E731
        results["codebook_agreement"] = mean(self._agreement)
        if len(chance_agree):
            results["chance_agreement"] = mean(chance_agree)
        if self._cosine[0] is not None:
            results["embedding_cosine"] = mean(self._cosine)
            if chance_cos and chance_cos[0] is not None:
                results["chance_cosine"] = mean(chance_cos)
        if self._pooled and self.num_items >= 2:
            same, chance = centered_pooled_cosine(torch.cat(self._pooled))
            results["centered_cosine"], results["chance_centered_cosine"] = same.tolist(), chance.tolist()
        return results

    @staticmethod
    def _wrap(embeddings):
        return None if embeddings is None else [e[None] for e in embeddings]

    # -- pair cues: swap gain, ILD / ITD fidelity --------------------------------------

    def _joined_cues(self) -> PairCues | None:
        """All batches' cues concatenated, or None unless every item has them."""
        if not self._cues or sum(len(c.delays["in"]) for c in self._cues) != self.num_items:
            return None
        join = lambda field_: {k: torch.cat([getattr(c, field_)[k] for c in self._cues])  # noqa: E731
                               for k in getattr(self._cues[0], field_)}
        return PairCues(join("levels"), join("delays"), join("mel"))

    def _item_groups(self) -> list[str] | None:
        return self._groups if len(self._groups) == self.num_items else None

    def _item_channels(self) -> Tensor | None:
        channels = torch.cat(self._channels) if self._channels else None
        return channels if channels is not None and len(channels) == self.num_items else None

    def _separated(self) -> tuple[Tensor, str]:
        """Mask of the well-separated pairs (views 1 and 2) and how they were chosen."""
        channels = self._item_channels()
        if channels is None or channels.shape[1] < 2:
            return torch.ones(self.num_items, dtype=torch.bool), "all pairs (no channel labels)"
        return separated_pairs(channels[:, :2], self.capsules)

    def _swap_results(self, cues: PairCues | None, separated: Tensor, selection: str) -> dict:
        """Swap gain over the well-separated pairs, all decodes at the pair's one scale.

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
        """
        keys = ["swap_gain", "swap_gain_ci", "swap_gain_median", "swap_separation_db", "swap_input_separation_db",
                "swap_separation_ratio", "swap_n_pairs", "swap_n_used", "swap_n_degenerate", "swap_n_groups", "swap_mel_to_a",
                "swap_mel_to_b", "swap_rec_a_mel_to_b", "swap_rec_b_mel_to_b", "swap_pairs"]
        results = dict.fromkeys(keys)
        if cues is None or "swap" not in cues.levels:
            return results
        levels = {name: value[separated] for name, value in cues.levels.items()}
        groups = self._item_groups()
        groups = None if groups is None else [g for g, keep in zip(groups, separated.tolist()) if keep]
        summary = spatial_cues.swap_gain_summary(levels["swap"], levels["rec_a"], levels["rec_b"], groups=groups,
                                                 n_boot=self.settings.bootstrap, seed=self.settings.seed)
        mel = {name: value[separated] for name, value in cues.mel.items()}
        mean = lambda t: t.double().mean().item() if t.numel() else math.nan  # noqa: E731
        input_gap = (levels["in_b"] - levels["in_a"]).double().pow(2)
        input_separation = math.sqrt(input_gap.mean().item()) if input_gap.numel() else math.nan
        results.update({
            "swap_gain": summary["mean"], "swap_gain_ci": [summary["ci_low"], summary["ci_high"]],
            "swap_gain_median": summary["median_per_pair"], "swap_separation_db": summary["separation_db"],
            "swap_input_separation_db": input_separation,
            "swap_separation_ratio": (summary["separation_db"] / input_separation
                                      if input_separation > 0 else math.nan),
            "swap_n_pairs": summary["n_pairs"], "swap_n_used": summary["n_used"],
            "swap_n_degenerate": summary["n_degenerate"], "swap_n_groups": summary["n_groups"],
            "swap_mel_to_a": mean(mel["swap_to_a"]), "swap_mel_to_b": mean(mel["swap_to_b"]),
            "swap_rec_a_mel_to_b": mean(mel["rec_a_to_b"]), "swap_rec_b_mel_to_b": mean(mel["rec_b_to_b"]),
            "swap_pairs": selection,
        })
        return results

    @staticmethod
    def _fidelity_results(cues: PairCues | None) -> dict:
        """`ild_fidelity` (`spatial_cues.ild_fidelity` of the decoded pair against the raw
        input pair, all pairs) and `itd_fidelity` (`spatial_cues.delay_error`, GCC-PHAT below
        1.5 kHz)."""
        if cues is None:
            return {"ild_fidelity": None, "itd_fidelity": None}
        levels = cues.levels
        return {"ild_fidelity": spatial_cues.ild_fidelity(levels["in_a"], levels["in_b"], levels["rec_a"],
                                                          levels["rec_b"]),
                "itd_fidelity": spatial_cues.delay_error(cues.delays["in"], cues.delays["rec"])}

    def _per_pair(self, cues: PairCues | None, separated: Tensor) -> dict | None:
        """Per-pair values for plots and for anyone's own statistics."""
        if cues is None:
            return None
        channels = self._item_channels()
        levels = cues.levels
        return {
            "file": self._item_groups(),
            "channels": None if channels is None else channels[:, :2].tolist(),
            "separated": separated.tolist(),
            "ild_true_db": (levels["in_a"] - levels["in_b"]).tolist(),
            "ild_decoded_db": (levels["rec_a"] - levels["rec_b"]).tolist(),
            "swap_gain": (spatial_cues.swap_gain(levels["swap"], levels["rec_a"], levels["rec_b"]).tolist()
                          if "swap" in levels else None),
            "delay_true_us": (cues.delays["in"] * 1e6).tolist(),
            "delay_decoded_us": (cues.delays["rec"] * 1e6).tolist(),
        }

    # -- probes ----------------------------------------------------------------------

    PROBE_KEYS = ("ild_probe_r2", "ild_probe_r2_std", "ild_probe_r2_shuffled", "ild_probe_r2_shuffled_std",
                  "channel_probe_accuracy", "channel_probe_accuracy_std", "channel_probe_accuracy_shuffled",
                  "channel_probe_accuracy_shuffled_std", "channel_probe_chance", "probe_folds", "probe_groups",
                  "probe_note")

    def _probe_results(self, cues: PairCues | None) -> dict:
        """Linear probes trained fresh on the frozen, time-pooled embeddings, cross-validated
        with folds grouped by file (`probes.cross_validated_probe`), per codebook: mean and
        std over folds beside the shuffled-label baseline.

        - `ild_probe_r2`: R^2 of the per-band input ILD (raw pair) from codebook k's pooled
          embeddings of both channels concatenated (`_std`, `_shuffled`, `_shuffled_std`).
        - `channel_probe_accuracy`: accuracy of the channel index from one channel's pooled
          embedding, beside `channel_probe_chance` (the majority class of the test folds)
          and `_shuffled`. It measures only capsule fingerprints (a capsule's own
          coloration and noise): on real recordings the capsule-to-direction map changes
          with every recording, so no spatial meaning can be read from it.
        `probe_folds`, `probe_groups` (files) and `probe_note` (why a probe is missing).
        """
        results = dict.fromkeys(self.PROBE_KEYS)
        groups, channels = self._item_groups(), self._item_channels()
        if not self._pooled or len(torch.cat(self._pooled)) != self.num_items:
            results["probe_note"] = "no embeddings"
            return results
        if groups is None or len(set(groups)) < 2:
            results["probe_note"] = "fewer than 2 files: no grouped folds"
            return results
        from measure import probes  # scikit-learn, only when probes run

        pooled = torch.cat(self._pooled).double()  # [N, V, n_q, D]
        settings = self.settings
        folds = min(settings.probe_folds, len(set(groups)))
        results.update(probe_folds=folds, probe_groups=len(set(groups)))
        run = functools.partial(probes.cross_validated_probe, folds=folds, seed=settings.seed,
                                shuffles=settings.probe_shuffles)
        notes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of tiny folds, every epoch
            if cues is not None and self.views >= 2:
                ild = (cues.levels["in_a"] - cues.levels["in_b"]).double()
                fits = [run(pooled[:, :2, k].flatten(1), ild, groups, kind="regression",
                            regularization=settings.ild_probe_alpha) for k in range(self.n_q)]
                results.update(self._probe_lists("ild_probe_r2", fits))
            else:
                notes.append("ILD probe: no pair cues")
            if channels is not None and len(torch.unique(channels)) >= 2:
                views = pooled.shape[1]
                fits = [run(pooled[:, :, k].flatten(0, 1), channels.flatten(), [g for g in groups for _ in range(views)],
                            kind="classification", regularization=settings.channel_probe_c) for k in range(self.n_q)]
                results.update(self._probe_lists("channel_probe_accuracy", fits))
                results["channel_probe_chance"] = fits[0]["chance"]
            else:
                notes.append("channel probe: fewer than 2 channels")
        results["probe_note"] = "; ".join(notes) or None
        return results

    @staticmethod
    def _probe_lists(name: str, fits: list[dict]) -> dict:
        return {name: [f["mean"] for f in fits], f"{name}_std": [f["std"] for f in fits],
                f"{name}_shuffled": [f["shuffled_mean"] for f in fits],
                f"{name}_shuffled_std": [f["shuffled_std"] for f in fits]}


# ----------------------------------------------------------------------------------------
# Results as logged and reported
# ----------------------------------------------------------------------------------------

# Accumulator result -> logged name prefix, for the per-codebook lists.
PER_CODEBOOK = {"perplexity": "perplexity", "dead_codes": "dead_codes",
                "codebook_agreement": "agreement", "chance_agreement": "chance_agreement",
                "ceiling_agreement": "ceiling_agreement",
                "embedding_cosine": "cosine", "chance_cosine": "chance_cosine",
                "ild_probe_r2": "ild_probe_r2", "ild_probe_r2_std": "ild_probe_r2_std",
                "ild_probe_r2_shuffled": "ild_probe_r2_shuffled",
                "channel_probe_accuracy": "channel_probe_accuracy",
                "channel_probe_accuracy_shuffled": "channel_probe_accuracy_shuffled"}
SCALARS = ("si_snr", "mel_distance", "stft_distance", "si_snr_own_scale", "mel_distance_own_scale",
           "effective_bitrate_kbps", "swap_gain", "swap_separation_db", "swap_input_separation_db",
           "swap_separation_ratio",
           "swap_mel_to_a", "swap_mel_to_b", "swap_rec_a_mel_to_b", "swap_rec_b_mel_to_b", "channel_probe_chance")
PER_VIEW = ("si_snr", "mel_distance")
# Nested results -> logged names.
NESTED = {("swap_gain_ci", 0): "swap_gain_ci_low", ("swap_gain_ci", 1): "swap_gain_ci_high",
          ("ild_fidelity", "correlation"): "ild_corr", ("ild_fidelity", "error_db"): "ild_error_db",
          ("ild_fidelity", "zero_error_db"): "ild_zero_error_db", ("ild_fidelity", "slope"): "ild_slope",
          ("itd_fidelity", "error_us"): "itd_error_us", ("itd_fidelity", "zero_error_us"): "itd_zero_error_us"}


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`MetricAccumulator.compute()` results -> flat scalars for logging.

    Scalars keep their names; per-codebook lists become `<name>_cbK`, per-view lists
    `<name>_chV` (K, V from 1); the swap gain's interval `swap_gain_ci_low` / `_high`, the
    cue fidelities `ild_corr`, `ild_error_db`, `ild_zero_error_db`, `ild_slope`,
    `itd_error_us`, `itd_zero_error_us`. Entries that are None or NaN (not measurable on
    this set, e.g. a swap gain without a well-separated pair) are left out.
    """
    flat: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if value is not None and not math.isnan(float(value)):
            flat[name] = float(value)

    for key in SCALARS:
        put(key, results.get(key))
    for key in PER_VIEW:
        for v, value in enumerate(results.get(f"{key}_per_view") or []):
            put(f"{key}_ch{v + 1}", value)
    for key, name in PER_CODEBOOK.items():
        for k, value in enumerate(results.get(key) or []):
            put(f"{name}_cb{k + 1}", value)
    for (key, inner), name in NESTED.items():
        container = results.get(key)
        if container is not None:
            put(name, container[inner])
    return flat


def per_codebook(results: dict[str, Any], key: str, k: int) -> Any:
    """Codebook k's entry of the per-codebook list `results[key]`, or None."""
    values = results.get(key)
    return values[k] if values is not None and k < len(values) else None


@dataclass
class CheckpointReport:
    """Everything measured for one checkpoint: its metrics and a few waveforms to plot.

    Attributes:
        label: column name in the report.
        path: the checkpoint file.
        mode: 'mono' or 'paired' (how it was trained).
        results: `MetricAccumulator.compute()` results plus `step` and `sample_rate`.
        examples: waveform name ('input_a', 'recon_b', 'swap', ...) -> `[items, T]`.
    """
    label: str
    path: str
    mode: str
    results: dict[str, Any]
    examples: dict[str, Tensor] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        """The checkpoint's metrics.json entry."""
        return {"checkpoint": self.path, "mode": self.mode, **self.results}
