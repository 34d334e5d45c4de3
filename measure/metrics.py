"""Reconstruction and code metrics shared by the training engine's validation and `evaluate.py`.

Every function here is a plain tensor function, so that the engine's per-epoch validation
and the offline report compute the same numbers the same way.

Shapes used throughout: waveforms `[N, C, T]`, codes `[N, n_q, F]`, per-codebook embeddings
`list[Tensor [N, D, F]]`.

Groups of metrics:
- reconstruction: `si_snr`, `mel_distance`, `stft_distance` (per item), `nominal_bitrate_kbps`;
- codebook health: `codebook_histogram` and `histogram_entropy` (perplexity, dead codes);
- disentanglement (does codebook 1 carry what the channels share and codebook 2 what
  differs?): cross-channel code agreement against its chance level (different segments)
  and ceiling (`ceiling_copy`), embedding cosine, `centered_pooled_cosine`.
The paired-channel cues (swap gain, ILD / ITD fidelity) are in measure/pair_cues.py, the
accumulator that collects everything over a validation set in measure/accumulator.py and
the logged / reported form of its results in measure/results.py.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch
import torchaudio
from torch import Tensor
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

MEL_FFTS = (512, 1024, 2048)
MEL_BINS = 64
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)
LOG_EPS = 1e-5
CEILING_SHIFT_SAMPLES = 1       # the agreement ceiling's copy: 1 sample later ...
CEILING_GAIN_DB = 0.5           # ... and 0.5 dB louder


# ----------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------

def _check_pair(x: Tensor, y: Tensor, min_length: int = 1) -> None:
    if x.shape != y.shape:
        raise ValueError(f"reference and estimate shapes differ: "
                         f"{tuple(x.shape)} vs {tuple(y.shape)}")
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
def _mel_transform(sample_rate: int, n_fft: int,
                   device: torch.device) -> torchaudio.transforms.MelSpectrogram:
    # Cached so that the filterbanks are built once per (rate, size, device), not per batch.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=MEL_BINS,
        power=1.0).to(device)


@functools.lru_cache(maxsize=32)
def _magnitude_transform(n_fft: int, hop: int,
                         device: torch.device) -> torchaudio.transforms.Spectrogram:
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
def log_mel_l1(x: Tensor, y: Tensor, sample_rate: int = 24000) -> Tensor:
    """Single-scale log-mel L1, `[N]`: mean |ln(mel(x) + 1e-5) - ln(mel(y) + 1e-5)| with
    torchaudio's power mel spectrogram (n_fft 1024, hop 256, 64 mels). The metric of the
    EnCodec quality anchor's scores (not `mel_distance`, whose scales and logarithm differ)."""
    _check_pair(x, y, min_length=1024 // 2 + 1)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=int(sample_rate), n_fft=1024,
                                               hop_length=256, n_mels=64).to(x.device)
    return _per_item((torch.log(mel(x.float()) + 1e-5) - torch.log(mel(y.float()) + 1e-5)).abs())


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

def per_item_agreement(codes_a: Tensor, codes_b: Tensor) -> Tensor:
    """Fraction of frames with equal codes, `[N, n_q]`."""
    _check_codes(codes_a)
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"codes shapes differ: "
                         f"{tuple(codes_a.shape)} vs {tuple(codes_b.shape)}")
    return (codes_a == codes_b).float().mean(dim=2)


def per_item_cosine(emb_a: Sequence[Tensor], emb_b: Sequence[Tensor]) -> Tensor:
    """Frame-wise cosine similarity of the embeddings, averaged over frames, `[N, n_q]`."""
    if len(emb_a) != len(emb_b):
        raise ValueError(f"embedding lists differ in length: {len(emb_a)} vs {len(emb_b)}")
    cosine = torch.nn.functional.cosine_similarity
    return torch.stack([cosine(a.float(), b.float(), dim=1).mean(dim=1)
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
    against view j of item n + 1. Raw cosines of codebook vectors are often all near 1,
    because the vectors in use share a large common offset; centring removes it, so that
    what remains is whether the two channels move together (about 0 for unrelated
    segments).
    """
    if pooled.dim() != 4 or pooled.shape[1] < 2:
        raise ValueError(f"expected pooled embeddings [N, V >= 2, n_q, D], "
                         f"got {tuple(pooled.shape)}")
    centered = pooled - pooled.mean(dim=(0, 1), keepdim=True)
    following = _rolled(centered)
    pairs = list(itertools.combinations(range(pooled.shape[1]), 2))
    cosine = torch.nn.functional.cosine_similarity
    same = torch.stack([cosine(centered[:, i], centered[:, j], dim=-1)
                        for i, j in pairs]).mean(dim=(0, 1))
    chance = torch.stack([cosine(centered[:, i], following[:, j], dim=-1)
                          for i, j in pairs]).mean(dim=(0, 1))
    return same, chance


def ceiling_copy(x: Tensor, shift: int = CEILING_SHIFT_SAMPLES,
                 gain_db: float = CEILING_GAIN_DB) -> Tensor:
    """The same channel a hair away: `shift` samples later (zeros in front) and `gain_db`
    louder, same length. Its codes against the original's are the ceiling of cross-channel
    agreement: no two channels of a segment can be closer than this."""
    if not 0 < shift < x.shape[-1]:
        raise ValueError(f"shift {shift} must be within the segment of {x.shape[-1]} samples")
    delayed = torch.nn.functional.pad(x[..., : x.shape[-1] - shift], (shift, 0))
    return delayed * 10 ** (gain_db / 20)
