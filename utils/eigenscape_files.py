"""EigenScape recordings on disk: which files there are, of which scene class, and where.

Files are found in either layout, with no configuration:
- one folder per class under `data_root` (`Beach/`, `Busy Street/`, ...), or
- the layout as downloaded: one flat folder, class from the file name
  (`Beach-01-Raw.wav`, `BusyStreet-03-Raw.wav`, B-format `Beach.1.wav`, `Park.6.wav`).
Only file headers are read while scanning. Unreadable, empty or too-narrow files are skipped
with one warning that names each of them. `prepare_dataset.py`'s index of int16 arrays at
the model rate (`<data_root>/.prepared/index.json`) lists the same files (`prepared_files`).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import soundfile as sf

from utils.eigenscape import SCENE_CLASSES

AUDIO_EXTENSIONS = {".wav", ".wave", ".flac", ".w64", ".rf64", ".aif", ".aiff", ".caf", ".ogg"}
PREPARED_DIRNAME = ".prepared"
PREPARED_INDEX = "index.json"


class DataWarning(UserWarning):
    """Skipped files, padded or redrawn segments: the data is usable but not as expected."""


def _compact(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


_CLASS_BY_KEY = {_compact(c): c for c in SCENE_CLASSES}


def class_from_name(name: str) -> str | None:
    """Scene class named by a file or folder name, or None.

    The class is the leading run of letters, spaces and underscores, compared without
    spaces or case: `BusyStreet-03-Raw.wav`, `Busy Street`, `Beach.1.wav`, `Park.6.wav`.
    """
    match = re.match(r"[A-Za-z][A-Za-z _]*", Path(name).name)
    return _CLASS_BY_KEY.get(_compact(match.group(0))) if match else None


def canonical_classes(classes: Sequence[str], setting: str = "classes") -> list[str]:
    """Map user-written class names ('BusyStreet', 'busy street') to SCENE_CLASSES names."""
    out = []
    for name in classes:
        canonical = _CLASS_BY_KEY.get(_compact(str(name)))
        if canonical is None:
            raise ValueError(f"{setting}: unknown scene class {name!r}; "
                             f"known classes: {SCENE_CLASSES}")
        out.append(canonical)
    return out


@dataclass(frozen=True)
class AudioFile:
    """One recording that passed the scan. `rel` is its path relative to data_root (POSIX)."""
    path: Path
    rel: str
    scene_class: str
    channels: int
    frames: int
    sample_rate: int
    array: Path | None = None  # prepared int16 [C, T] at the model rate, when used


def _class_of(path: Path, root: Path) -> str | None:
    """Class folder (deepest first) wins over the file name."""
    for folder in reversed(path.relative_to(root).parts[:-1]):
        found = class_from_name(folder)
        if found is not None and _compact(folder) == _compact(found):
            return found
    return class_from_name(path.name)


def walk_audio(root: Path) -> list[Path]:
    """Audio-extension files under root, sorted; hidden folders (e.g. .prepared) skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files
                  if Path(f).suffix.lower() in AUDIO_EXTENSIONS and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def usable_channels(n_channels: int, channels: Sequence[int] | None) -> list[int]:
    return ([c for c in channels if c < n_channels] if channels is not None
            else list(range(n_channels)))


def unusable_reason(info_channels: int, info_frames: int, min_channels: int,
                    channels: Sequence[int] | None) -> str | None:
    """Why a file cannot give an item of `min_channels` distinct channels (of `channels`,
    None: all), or None."""
    if info_frames <= 0:
        return "empty (0 frames)"
    if info_channels < min_channels:
        return (f"{info_channels} channel(s), need at least {min_channels} distinct channels "
                f"per item" + (": a one-channel file has no pair" if info_channels == 1 else ""))
    usable = usable_channels(info_channels, channels)
    if len(usable) < min_channels:
        return (f"only {len(usable)} of datasets.channels={list(channels)} exist in this "
                f"{info_channels}-channel file, need {min_channels}")
    return None


def _warn_skipped(skipped: list[tuple[str, str]], root: Path) -> None:
    if skipped:
        lines = "\n".join(f"  {name}: {why}" for name, why in skipped)
        warnings.warn(f"skipped {len(skipped)} file(s) under {root}:\n{lines}", DataWarning,
                      stacklevel=3)


def _nothing_usable(root: Path, classes: list[str], found: Counter, skipped: list, other: Counter,
                    unnamed: int) -> RuntimeError:
    parts = [f"no usable audio files for classes {classes} under data_root={root}."]
    parts.append(f"Found: {sum(found.values())} file(s) of these classes"
                 + (f" ({len(skipped)} skipped as unusable, listed in the warning above)"
                    if skipped else "")
                 + (f", {dict(other)} of other classes" if other else "")
                 + (f", {unnamed} audio file(s) with no recognisable class" if unnamed else "")
                 + ".")
    parts.append("Check datasets.data_root and datasets.train_classes / datasets.val_classes: "
                 "files must sit in a class folder (`Busy Street/`) or start with the class "
                 "(`BusyStreet-03-Raw.wav`, `Beach.1.wav`). For a synthetic set: "
                 "python synth_eigenscape.py --out DIR.")
    return RuntimeError("\n".join(parts))


def find_audio_files(data_root: str | os.PathLike, classes: Sequence[str], min_channels: int = 1,
                     channels: Sequence[int] | None = None) -> list[AudioFile]:
    """Usable recordings of `classes` under `data_root` (both layouts), sorted by relative path.

    Reads headers only. Unreadable / non-audio, empty and too-narrow files (fewer than
    `min_channels`, counting only `channels` when given) are skipped with one warning.
    Raises a RuntimeError naming data_root, the classes and what was found if none is left.
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} (datasets.data_root / --data-root) is not a "
                                "folder. Point it at the EigenScape recordings (flat as downloaded "
                                "or one folder per class), or generate a synthetic set: "
                                "python synth_eigenscape.py --out DIR")
    classes = canonical_classes(classes)
    files, skipped = [], []
    found, other, unnamed = Counter(), Counter(), 0
    for path in walk_audio(root):
        scene_class = _class_of(path, root)
        if scene_class is None:
            unnamed += 1
            continue
        if scene_class not in classes:
            other[scene_class] += 1
            continue
        found[scene_class] += 1
        rel = path.relative_to(root).as_posix()
        try:
            info = sf.info(str(path))
        except Exception as err:  # soundfile raises several types for non-audio content
            skipped.append((rel, f"unreadable or not audio ({type(err).__name__}: {err})"))
            continue
        why = unusable_reason(info.channels, info.frames, min_channels, channels)
        if why:
            skipped.append((rel, why))
            continue
        files.append(AudioFile(path, rel, scene_class, info.channels, info.frames, info.samplerate))
    _warn_skipped(skipped, root)
    if not files:
        raise _nothing_usable(root, classes, found, skipped, other, unnamed)
    return files


def load_prepared_index(prepared_root: Path) -> dict:
    """The index written by prepare_dataset.py."""
    with open(prepared_root / PREPARED_INDEX) as f:
        return json.load(f)


def prepared_files(data_root: Path, prepared_root: Path, classes: Sequence[str], min_channels: int,
                   channels: Sequence[int] | None, model_rate: int) -> list[AudioFile]:
    """Files of `classes` listed in a prepared index, checked like find_audio_files."""
    index = load_prepared_index(prepared_root)
    if index.get("sample_rate") != model_rate:
        raise ValueError(f"{prepared_root / PREPARED_INDEX} was prepared at "
                         f"{index.get('sample_rate')} Hz "
                         f"but model.sample_rate={model_rate}; rerun prepare_dataset.py "
                         f"--sample-rate {model_rate} or set datasets.format=wav")
    classes = canonical_classes(classes)
    files, skipped = [], []
    for entry in sorted(index["files"], key=lambda e: e["source"]):
        if entry["class"] not in classes:
            continue
        why = unusable_reason(entry["channels"], entry["source_frames"], min_channels, channels)
        if why:
            skipped.append((entry["source"], why))
            continue
        files.append(AudioFile(data_root / entry["source"], entry["source"], entry["class"],
                               entry["channels"], entry["source_frames"], entry["source_rate"],
                               prepared_root / entry["array"]))
    _warn_skipped(skipped, prepared_root)
    if not files:
        raise RuntimeError(f"no usable prepared files for classes {classes} in {prepared_root} "
                           f"(index lists {len(index['files'])} file(s)); rerun prepare_dataset.py "
                           "or set datasets.format=wav")
    return files


def prepared_is_current(prepared_root: Path, wav_files: list[AudioFile]) -> str | None:
    """Why a prepared index does not match the WAV files (missing, changed), or None."""
    entries = {e["source"]: e for e in load_prepared_index(prepared_root)["files"]}
    for f in wav_files:
        entry = entries.get(f.rel)
        if entry is None:
            return f"{f.rel} is not in the prepared index"
        stat = f.path.stat()
        if (entry.get("source_size") != stat.st_size
                or entry.get("source_mtime_ns") != stat.st_mtime_ns):
            return f"{f.rel} changed after it was prepared"
    return None
