"""Mono source material from a folder of recordings: scan, read channel 0, resample, excerpt.

Any WAV / FLAC / OGG file, any rate, any channel count. Only channel 0 is used: for a mono
file that is the signal, for first-order B-format (FuMa W X Y Z) and for Ambisonics in ACN
order it is the omnidirectional W / ACN 0 signal, and for a multichannel array recording it
is one capsule. (The mean over channels would comb-filter an array recording and cancel
the directional Ambisonics components into something that is no one signal.)

Excerpts are read lazily (only the frames needed, at a random offset drawn from the caller's
generator), so a folder of hours costs nothing until a scene asks for a few seconds of it.
numpy / scipy / soundfile only: the synthetic-data generator runs without torch.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MIN_SECONDS = 0.1     # shorter files are skipped (with a counted warning)
LOOP_FADE_S = 0.05    # cross-fade that joins a looped excerpt's end to its start
EDGE_FADE_S = 0.01    # fade in / out at the ends of a non-looped excerpt (resampler edges)


@dataclass(frozen=True)
class SourceFile:
    """One usable recording: where it is, its length in frames, rate and channel count."""
    path: Path
    frames: int
    sample_rate: int
    channels: int


def scan_sources(folder: str | os.PathLike, min_seconds: float = MIN_SECONDS) -> list[SourceFile]:
    """Readable audio files under `folder` (recursive, sorted by relative path).

    Files shorter than `min_seconds` or unreadable are skipped with one warning that counts
    them. Raises FileNotFoundError when `folder` is not a folder, ValueError when nothing
    usable is left.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a folder of WAV / FLAC / OGG "
                                "recordings")
    paths = sorted((p for p in root.rglob("*")
                    if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    found, short, unreadable = [], 0, 0
    for path in paths:
        try:
            info = sf.info(str(path))
        except Exception:  # soundfile raises several types for non-audio content
            unreadable += 1
            continue
        if info.frames < min_seconds * info.samplerate:
            short += 1
            continue
        found.append(SourceFile(path, info.frames, info.samplerate, info.channels))
    if short or unreadable:
        warnings.warn(f"skipped {short} file(s) under {root} shorter than {min_seconds:g} s and "
                      f"{unreadable} unreadable file(s)", stacklevel=2)
    if not found:
        raise ValueError(f"no readable audio of at least {min_seconds:g} s in it ({len(paths)} "
                         f"{'/'.join(AUDIO_SUFFIXES)} file(s): {short} shorter, {unreadable} "
                         "unreadable); give a folder of WAV / FLAC / OGG recordings")
    return found


def read_channel0(file: SourceFile, start: int = 0, frames: int = -1) -> np.ndarray:
    """Channel 0 of `frames` frames from `start` (all of the rest for -1), float64."""
    with sf.SoundFile(str(file.path)) as f:
        f.seek(start)
        return f.read(frames, dtype="float64", always_2d=True)[:, 0]


def resample(x: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy's default Kaiser anti-alias filter); unchanged when equal."""
    if source_rate == target_rate:
        return x
    g = math.gcd(source_rate, target_rate)
    return signal.resample_poly(x, target_rate // g, source_rate // g)


def make_circular(x: np.ndarray, fade: int) -> np.ndarray:
    """`x` shortened by `fade` samples whose end runs on into its start without a jump.

    The last `fade` samples are cross-faded (equal power: the two ends are unrelated sound)
    into the first ones, so that tiling the result loops seamlessly.
    """
    fade = min(fade, len(x) // 2)
    if fade == 0:
        return x.copy()
    ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade)
    out = x[:len(x) - fade].copy()
    out[:fade] = x[:fade] * ramp + x[len(x) - fade:] * ramp[::-1]
    return out


def excerpt(rng: np.random.Generator, file: SourceFile, n: int, rate: int,
            circular: bool = False) -> np.ndarray:
    """`n` samples at `rate` of `file`'s channel 0 from a random offset (drawn from `rng`).

    A file long enough is read from the offset only; a shorter one is looped with a
    cross-fade. `circular` returns an excerpt whose end runs on into its start (for
    signals read cyclically); otherwise its ends fade in and out over 10 ms.
    """
    loop_fade = int(LOOP_FADE_S * rate)
    need = n + (loop_fade if circular else 0)
    need_source = math.ceil(need * file.sample_rate / rate) + 1
    if file.frames >= need_source:
        start = int(rng.integers(0, file.frames - need_source + 1))
        x = resample(read_channel0(file, start, need_source), file.sample_rate, rate)[:need]
    else:
        loop = make_circular(resample(read_channel0(file), file.sample_rate, rate), loop_fade)
        start = int(rng.integers(0, len(loop)))
        x = np.take(loop, np.arange(start, start + need) % len(loop))
    if circular:
        return make_circular(x, loop_fade)
    edge = min(int(EDGE_FADE_S * rate), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / max(edge, 1))
    x = x.copy()
    x[:edge] *= ramp
    x[n - edge:] *= ramp[::-1]
    return x
