"""Per-band level side information: each channel's band levels sent beside its codes.

The parametric complement of shared-content coding, as parametric stereo sends the level
differences between channels per band: the encoder decodes each channel, measures in blocks
of `block_ms` the level of `bands` log-spaced bands (100 Hz - 11 kHz, the cue bands) of the
input and of the decode, and sends their difference in dB, rounded to `step_db` and clipped
to the `2^bits` steps of its range per band and block; the decoder multiplies its decode's
STFT by those gains (linear in dB between block centres, constant across a band; below the
first band the first band's gain, above the last the last's). It restores the level shape
that the autoencoder smooths away, outside the autoencoder, at `bands x bits x 1000 /
block_ms` bit/s per channel.

Sent at the cue bands, it corrects the very band levels the ILD measures read: those rows
then score the side information by construction, and only the measures it does not send
(mel distance on 64 mel bands per frame, SI-SNR, fewer bands than measured) tell what it is
worth.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.spatial_cues import CUE_BAND_RANGE_HZ, LEVEL_FLOOR, band_edges, band_matrix

HOP_SECONDS = 0.01          # STFT hop of the measurement and of the gains
WINDOW_HOPS = 4             # Hann window of 4 hops: 75% overlap, a clean overlap-add


@dataclass(frozen=True)
class LevelSideInfo:
    """How the band levels are sent.

    Attributes:
        bands: log-spaced bands between 100 Hz and 11 kHz (8: the cue bands).
        bits: bits per band and block: `2^bits` gains, `step_db` apart (`step_range`).
        step_db: quantisation step of the gains, dB.
        block_ms: one gain per band every `block_ms` milliseconds (a multiple of 10 ms).
        max_boost_db: the largest gain, rounded down to a step and at most the symmetric
            range's top, (2^(bits-1) - 1) x step_db; the steps above it go to deeper cuts.
            On real recordings a decode errs loud (it leaves a floor in quiet bands), and
            where it errs quiet a large boost raises its errors in the band along with its
            content, so the range leans to cuts: at 1.5 dB steps, 3 bits span -6 .. +4.5 dB either way,
            4 bits -18 .. +4.5. None: the symmetric range, -2^(bits-1) .. 2^(bits-1) - 1
            steps (what files and checkpoints without the setting were made with). Stored
            as the top step's gain in dB.
    """
    bands: int = 8
    bits: int = 3
    step_db: float = 1.5
    block_ms: float = 40.0
    max_boost_db: float | None = 4.5

    def __post_init__(self) -> None:
        hops = self.block_ms / (1000 * HOP_SECONDS)
        boost = self.max_boost_db
        if self.bands < 1 or self.bits < 1 or self.step_db <= 0 or hops < 1 \
                or abs(hops - round(hops)) > 1e-9 \
                or (boost is not None and not 0 <= boost < math.inf):
            raise ValueError(f"level side information needs bands >= 1, bits >= 1, step_db > 0, "
                             f"block_ms a multiple of {1000 * HOP_SECONDS:g} and max_boost_db "
                             f">= 0, got {self}")
        symmetric_top = 2 ** (self.bits - 1) - 1
        top = symmetric_top if boost is None else min(
            math.floor(boost / self.step_db + 1e-9), symmetric_top)
        object.__setattr__(self, "max_boost_db", top * self.step_db)

    @classmethod
    def from_config(cls, group: Any, key: str) -> "LevelSideInfo | None":
        """The settings of config group `group` (`bands`, `bits`, `step_db`, `block_ms`,
        `max_boost_db`), named `key` in errors; None when it is absent or has 0 bands (off)."""
        if not group or not group.bands:
            return None
        boost = group.get("max_boost_db")   # absent from configs older than the setting
        try:
            return cls(bands=int(group.bands), bits=int(group.bits),
                       step_db=float(group.step_db), block_ms=float(group.block_ms),
                       max_boost_db=None if boost is None else float(boost))
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from error

    @property
    def kbps_per_channel(self) -> float:
        """Nominal side-information bitrate of one channel (bits per millisecond = kbit/s)."""
        return self.bands * self.bits / self.block_ms

    @property
    def hops_per_block(self) -> int:
        return round(self.block_ms / (1000 * HOP_SECONDS))

    @property
    def step_range(self) -> tuple[int, int]:
        """The lowest and the highest step sent: `2^bits` steps ending at `max_boost_db`."""
        top = round(self.max_boost_db / self.step_db)
        return top - 2 ** self.bits + 1, top


def trained_level_side(cfg: Any) -> LevelSideInfo | None:
    """The band levels a checkpoint's training losses scored its decode after
    (`losses.level_side_info` of its config `cfg`): the side information it is meant to be
    decoded with; None for a codec trained without (every checkpoint before the setting)."""
    losses = cfg.get("losses") or {}
    return LevelSideInfo.from_config(losses.get("level_side_info"), "losses.level_side_info")


def side_blocks(samples: int, sample_rate: int, side: LevelSideInfo) -> int:
    """Blocks of side information per channel of `samples` samples at `sample_rate`: the
    centred STFT's frames, `block_ms / 10` to a block (the last one partial)."""
    frames = samples // round(sample_rate * HOP_SECONDS) + 1
    return math.ceil(frames / side.hops_per_block)


def check_level_bands(sample_rate: int, side: LevelSideInfo) -> None:
    """ValueError unless every band of `side` holds an STFT bin at `sample_rate` (at 24 kHz,
    10 Hz hops and 25 Hz bins, at most 33 bands; the bands reach 11 kHz, so rates below
    22 kHz have none up there)."""
    if round(sample_rate * HOP_SECONDS) < 1:
        raise ValueError(f"level side information needs a sample rate of at least "
                         f"{0.5 / HOP_SECONDS:g} Hz, got {sample_rate}")
    try:
        _stft_setup(sample_rate, side.bands, torch.device("cpu"))
    except ValueError as error:
        raise ValueError(f"level side information of {side.bands} bands at {sample_rate} Hz: "
                         f"{error}") from error


@functools.lru_cache(maxsize=16)
def _stft_setup(sample_rate: int, bands: int, device: torch.device
                ) -> tuple[int, Tensor, Tensor]:
    """Hop, Hann window and each bin's band index `[bins]` (bins outside the range take the
    nearest band) at `sample_rate`; built once per (rate, bands, device), read only."""
    hop = round(sample_rate * HOP_SECONDS)
    n_fft = WINDOW_HOPS * hop
    member = band_matrix(sample_rate, n_fft, band_edges(bands, *CUE_BAND_RANGE_HZ))
    inside = member.sum(dim=1) > 0
    index = member.argmax(dim=1)
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    index[~inside & (freqs >= CUE_BAND_RANGE_HZ[1])] = bands - 1
    return hop, torch.hann_window(n_fft, device=device), index.to(device)


def _stft(wav: Tensor, hop: int, window: Tensor) -> Tensor:
    return torch.stft(wav.reshape(-1, wav.shape[-1]).float(), n_fft=window.numel(),
                      hop_length=hop, window=window, center=True, return_complex=True)


def block_levels(wav: Tensor, sample_rate: int, side: LevelSideInfo) -> Tensor:
    """`[N, bands, blocks]` level in dB of each band in each block of `wav` `[N, 1, T]`
    (mean STFT power of the band's bins over the block's frames; only the differences of
    two such levels are used, so no absolute calibration)."""
    hop, window, index = _stft_setup(sample_rate, side.bands, wav.device)
    power = _stft(wav, hop, window).abs().pow(2)                             # [N, bins, frames]
    member = F.one_hot(index, side.bands).to(power.dtype)                    # [bins, bands]
    band_power = torch.einsum("nkt,kb->nbt", power, member / member.sum(dim=0))
    frames = band_power.shape[-1]
    blocks = math.ceil(frames / side.hops_per_block)
    padded = F.pad(band_power, (0, blocks * side.hops_per_block - frames), mode="replicate")
    block_power = padded.unflatten(-1, (blocks, side.hops_per_block)).mean(dim=-1)
    return 10 * torch.log10(block_power + LEVEL_FLOOR)


def encode_level_side(inputs: Tensor, decodes: Tensor, sample_rate: int,
                      side: LevelSideInfo, passes: int = 3) -> Tensor:
    """Side information `[N, bands, blocks]` (int16 steps) that brings each decode's band
    levels to its input's, by analysis by synthesis: each pass applies the steps so far,
    measures what is still missing, and adds it rounded to `step_db` (clipped to
    `side.step_range`). One pass sends round((L_input - L_decode) / step); more make up for
    the gains' spill into neighbouring blocks and bands."""
    if inputs.shape != decodes.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and decodes {tuple(decodes.shape)} "
                         "must have one shape")
    target = block_levels(inputs, sample_rate, side)
    lowest, highest = side.step_range
    steps = torch.zeros_like(target)
    for done in range(passes):
        # No gains yet on the first pass: the decode itself.
        shaped = apply_level_side(decodes, steps, sample_rate, side) if done else decodes
        missing = target - block_levels(shaped, sample_rate, side)
        steps = (steps + torch.round(missing / side.step_db)).clamp(lowest, highest)
    return steps.to(torch.int16)


def apply_level_side(decodes: Tensor, steps: Tensor, sample_rate: int,
                     side: LevelSideInfo) -> Tensor:
    """`decodes` `[N, 1, T]` with the band gains of `steps` `[N, bands, blocks]` applied."""
    hop, window, index = _stft_setup(sample_rate, side.bands, decodes.device)
    spec = _stft(decodes, hop, window)                                       # [N, bins, frames]
    frames = spec.shape[-1]
    if steps.shape != (spec.shape[0], side.bands, math.ceil(frames / side.hops_per_block)):
        raise ValueError(f"side information of shape {tuple(steps.shape)} does not fit "
                         f"{spec.shape[0]} channels of {decodes.shape[-1]} samples")
    gain_db = steps.to(spec.real.dtype) * side.step_db                        # [N, bands, blocks]
    # Linear in dB between block centres (a block's gain held at its centre).
    per_frame = F.interpolate(gain_db, scale_factor=side.hops_per_block, mode="linear",
                              align_corners=False)[..., :frames]             # [N, bands, frames]
    per_bin = per_frame[:, index]                                            # [N, bins, frames]
    shaped = spec * torch.pow(10.0, per_bin / 20)
    out = torch.istft(shaped, n_fft=window.numel(), hop_length=hop, window=window, center=True,
                      length=decodes.shape[-1])
    return out.reshape(decodes.shape).to(decodes.dtype)


def with_level_side(inputs: Tensor, decodes: Tensor, sample_rate: int,
                    side: LevelSideInfo) -> Tensor:
    """What a receiver of the codes and of their side information plays: `decodes` `[N, 1, T]`
    with the band gains that `encode_level_side` sends for `inputs`. The gains are found
    without a gradient and applied with one, so a loss on the result trains the decode at
    those gains: the levels they restore cost the codec nothing, what they cannot restore
    (finer bands and blocks, beyond `bits` steps) still does."""
    with torch.no_grad():
        steps = encode_level_side(inputs, decodes.detach(), sample_rate, side)
    return apply_level_side(decodes, steps, sample_rate, side)
