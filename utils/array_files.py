"""Any array's recordings: the files of an array set and the array's geometry.

An array set (`evaluate.py array_set=DIR`) is any folder of multichannel recordings, found
recursively (WAV / FLAC / OGG), with no scene classes and no geometry assumed: any channel
count of 2 or more, any sample rate. Files that cannot give an item (one channel, shorter
than a segment, unreadable) are skipped with one counted warning; none usable is an error
that names the folder. The geometry is unknown unless given (`array_geometry`): a file of
one line per channel (colatitude and azimuth in degrees), or `em32` for the em32's capsules.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from utils.audio_read import span_for
from utils.eigenscape import CAPSULES, unit_vectors
from utils.eigenscape_files import AudioFile, DataWarning, unusable_reason, walk_audio

ARRAY_EXTENSIONS = {".wav", ".flac", ".ogg"}
ARRAY_CLASS = "array"  # the scene class of every array-set file: there are none
EM32 = "em32"


def find_array_files(root: str | Path, min_channels: int, channels: Sequence[int] | None,
                     segment: int, model_rate: int) -> list[AudioFile]:
    """Usable recordings under `root` (recursive, sorted by relative path), each with at
    least `min_channels` of `channels` (None: all) and one segment of `segment` samples at
    `model_rate`. The others are skipped with one warning that counts and lists them.
    Raises FileNotFoundError / RuntimeError (one line, naming `root`) when none is usable."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"array_set={root} is not a folder; point it at a folder of "
                                "multichannel WAV / FLAC / OGG recordings.")
    files, skipped = [], []
    paths = [p for p in walk_audio(root) if p.suffix.lower() in ARRAY_EXTENSIONS]
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            info = sf.info(str(path))
        except Exception as err:  # soundfile raises several types for non-audio content
            skipped.append((rel, f"unreadable or not audio ({type(err).__name__})"))
            continue
        why = _unusable(info.channels, info.frames, info.samplerate, min_channels, channels,
                        segment, model_rate)
        if why:
            skipped.append((rel, why))
            continue
        files.append(AudioFile(path, rel, ARRAY_CLASS, info.channels, info.frames,
                               info.samplerate))
    if skipped and files:
        lines = "\n".join(f"  {name}: {why}" for name, why in skipped)
        warnings.warn(f"array_set: skipped {len(skipped)} of {len(paths)} file(s) under "
                      f"{root}:\n{lines}", DataWarning, stacklevel=2)
    if not files:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise RuntimeError(
            f"array_set={root}: no usable recording among {len(paths)} WAV/FLAC/OGG file(s)"
            + (f" ({reasons}{more})" if skipped else "")
            + f"; each file needs at least {min_channels} channels and "
            f"{segment / model_rate:g} s (one segment): add such files or lower "
            "datasets.segment_seconds.")
    return files


def _unusable(n_channels: int, frames: int, rate: int, min_channels: int,
              channels: Sequence[int] | None, segment: int, model_rate: int) -> str | None:
    """Why a file cannot give an item of an array set, or None."""
    why = unusable_reason(n_channels, frames, min_channels, channels)
    if why:
        return why
    needed = span_for(rate, model_rate, segment).frames
    if frames < needed:
        return (f"{frames / rate:.3g} s, shorter than one segment "
                f"({segment / model_rate:g} s, datasets.segment_seconds)")
    return None


def read_geometry(spec: str, n_channels: int) -> np.ndarray:
    """Capsule directions `[n_channels, 3]` (unit vectors) of `array_geometry`: `em32` (the
    em32's 32 capsules), or a file of one line per channel, colatitude and azimuth in
    degrees, whitespace- or comma-separated, `#` starting a comment. Raises ValueError (one
    line) on a wrong line count or a value that is not an angle."""
    if str(spec) == EM32:
        if n_channels != len(CAPSULES):
            raise ValueError(f"array_geometry=em32 gives {len(CAPSULES)} capsules but the "
                             f"files have {n_channels} channels")
        return CAPSULES
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"array_geometry={spec}: no such file (one line per channel: "
                                "colatitude azimuth in degrees), or use array_geometry=em32")
    angles = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = [f for f in re.split(r"[\s,]+", line.split("#", 1)[0].strip()) if f]
        if not fields:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != 2 or not all(np.isfinite(values)):
            raise ValueError(f"array_geometry={spec} line {number}: {line.strip()!r} is not "
                             "two angles (colatitude azimuth in degrees)")
        angles.append(values)
    if len(angles) != n_channels:
        raise ValueError(f"array_geometry={spec}: {len(angles)} line(s) of angles for files of "
                         f"{n_channels} channels; give one line per channel")
    return unit_vectors(*np.array(angles, dtype=np.float64).T)


def geometry_channels(files: Sequence[AudioFile], spec: str) -> int:
    """The one channel count of `files` that a geometry must describe; ValueError when the
    files differ (a geometry describes one array)."""
    counts = sorted({f.channels for f in files})
    if len(counts) != 1:
        raise ValueError(f"array_geometry={spec}: the files have different channel counts "
                         f"{counts}; one geometry describes one array")
    return counts[0]
