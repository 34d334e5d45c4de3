"""Reading a segment of an EigenScape recording at the model rate.

A segment of `length` samples at the model rate is read from just the source frames it
needs (plus the resampler's margin), as float32, and resampled with a cached resampler; the
result equals the same span of the whole file resampled (read with soundfile). When
`prepare_dataset.py` has converted the data to int16 arrays at the model rate, a segment
reads only its channels' bytes from those arrays (`read_prepared_segment`): the same
segment up to 16-bit quantisation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio

from utils.eigenscape_files import AudioFile

PREPARED_SCALE = 32768.0  # int16 full scale


class ReadError(RuntimeError):
    """A segment could not be read from a file that passed the scan."""


@dataclass(frozen=True)
class Span:
    """Source frames behind `length` model-rate samples: rates reduced to `down` -> `up`."""
    down: int        # source frames per block
    up: int          # model samples per block
    frames: int      # source frames covering the segment
    margin: int      # extra source frames each side for the resampling kernel (multiple of down)


@functools.lru_cache(maxsize=64)
def span_for(source_rate: int, model_rate: int, length: int) -> Span:
    """How many source frames a segment needs; starts must be multiples of `down`."""
    g = math.gcd(source_rate, model_rate)
    down, up = source_rate // g, model_rate // g
    if down == up:
        return Span(1, 1, length, 0)
    # torchaudio's sinc kernel reaches `width` source frames either side (lowpass_filter_width=6,
    # rolloff=0.99); its last output of a block also looks `down` frames ahead.
    width = math.ceil(6 * down / (min(down, up) * 0.99))
    margin = math.ceil((width + down) / down) * down
    return Span(down, up, math.ceil(length * down / up), margin)


@functools.lru_cache(maxsize=8)
def resampler(source_rate: int, model_rate: int) -> torchaudio.transforms.Resample:
    """One resampler per rate pair and process (a few pairs at most); it caches its kernel."""
    return torchaudio.transforms.Resample(source_rate, model_rate)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[-1] >= length else torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def read_frames(file: AudioFile, lo: int, hi: int, channels: Sequence[int]) -> np.ndarray:
    """Source frames [lo, hi) of `channels` as float32 [hi - lo, V] (soundfile seek + read).

    WAV interleaves channels, so the selected frames of all channels are read and the wanted
    ones kept; `prepare_dataset.py` arrays are the fast path that reads only their bytes.
    """
    path = str(file.path)
    try:
        with sf.SoundFile(path) as f:
            f.seek(lo)
            data = f.read(hi - lo, dtype="float32", always_2d=True)
    except Exception as err:
        raise ReadError(f"{path}: {type(err).__name__}: {err}") from err
    if data.shape[0] != hi - lo or data.shape[1] != file.channels:
        raise ReadError(f"{path}: got {data.shape[0]} frames x {data.shape[1]} channels where the "
                        f"header promised {hi - lo} x {file.channels} (file changed or truncated?)")
    return data[:, list(channels)]


def read_wav_segment(file: AudioFile, channels: Sequence[int], start: int, length: int,
                     model_rate: int) -> torch.Tensor:
    """`length` samples at model_rate of `channels`, from source frame `start` on: [V, length].

    Reads only the frames the segment needs plus the resampler's margin; outside the file
    is zeros, so the result equals the same span of the whole file resampled.
    """
    span = span_for(file.sample_rate, model_rate, length)
    first, last = start - span.margin, start + span.frames + span.margin
    lo, hi = max(first, 0), min(last, file.frames)
    data = read_frames(file, lo, hi, channels).T
    if (lo, hi) != (first, last):
        data = np.pad(data, ((0, 0), (lo - first, last - hi)))
    segment = torch.from_numpy(np.ascontiguousarray(data))
    if span.down == span.up:
        return segment[:, :length]
    out = resampler(file.sample_rate, model_rate)(segment)
    offset = span.margin // span.down * span.up
    return _pad_to(out[:, offset:offset + length], length)


@functools.lru_cache(maxsize=64)
def _open_array(path: Path) -> np.ndarray:
    # Read-only memory maps are safe to share with forked DataLoader workers. Each holds a
    # file descriptor: 64 covers EigenScape's 64 recordings and keeps workers x maps far
    # below the usual limit of 1024 open files.
    return np.load(path, mmap_mode="r")


def read_prepared_segment(file: AudioFile, channels: Sequence[int], start: int, length: int,
                          model_rate: int) -> torch.Tensor:
    """Same segment as read_wav_segment, from the prepared int16 array (only its channels'
    bytes)."""
    span = span_for(file.sample_rate, model_rate, length)
    first = start // span.down * span.up
    try:
        array = _open_array(file.array)
        data = np.stack([np.asarray(array[c, first:first + length]) for c in channels])
    except Exception as err:
        raise ReadError(f"{file.array} (prepared from {file.path}): "
                        f"{type(err).__name__}: {err}") from err
    return _pad_to(torch.from_numpy(data.astype(np.float32) / PREPARED_SCALE), length)
