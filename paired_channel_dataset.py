"""EigenScape datasets: paired (two channels of one segment) and mono items.

Files are found in either layout, with no configuration:
- one folder per class under `data_root` (`Beach/`, `Busy Street/`, ...), or
- the layout as downloaded: one flat folder, class from the file name
  (`Beach-01-Raw.wav`, `BusyStreet-03-Raw.wav`, B-format `Beach.1.wav`, `Park.6.wav`).
Only file headers are read while scanning. Unreadable, empty or too-narrow files are skipped
with one warning that names each of them.

Train items are a pure function of (seed, epoch, index, rank, attempt): each draws a file,
distinct channels and a start from its own `np.random.SeedSequence`, so a resumed run is
bit-identical and DataLoader workers and ranks never repeat each other. Validation items are
a fixed plan derived from the sorted file list and the seed.

A segment of `tensor_cut` samples at the model rate is read from just the source frames it
needs (plus the resampler's margin), as float32, and resampled with a cached resampler; the
result equals the same span of the whole file resampled (read with soundfile). When
`prepare_dataset.py` has
converted the data to int16 arrays at the model rate (`<data_root>/.prepared/` by default,
or `datasets.prepared_root`), items read only their channels' bytes from those arrays and
are the same items up to 16-bit quantisation (`datasets.format`: auto | wav | prepared).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import Dataset

from utils.eigenscape import SCENE_CLASSES

AUDIO_EXTENSIONS = {".wav", ".wave", ".flac", ".w64", ".rf64", ".aif", ".aiff", ".caf", ".ogg"}
PREPARED_DIRNAME = ".prepared"
PREPARED_INDEX = "index.json"
PREPARED_SCALE = 32768.0  # int16 full scale
VALIDATION_STREAM = 7919  # separates the validation plan's random stream from training items

log = logging.getLogger("encodec")


class DataWarning(UserWarning):
    """Skipped files, padded or redrawn segments: the data is usable but not as expected."""


class ReadError(RuntimeError):
    """A segment could not be read from a file that passed the scan."""


class TooManyReadFailures(RuntimeError):
    """Every draw of one training item failed (``datasets.max_read_retries`` + 1 in a row):
    the data is gone or unreadable, and training should stop with this message."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises it as TooManyReadFailures("Caught TooManyReadFailures
        # in DataLoader worker process N.\nOriginal Traceback ...\n<module>.TooManyReadFailures:
        # <message>"): keep only the message, so that the user sees one clear line.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rpartition(marker)[2].strip()
        super().__init__(message)


# ----------------------------------------------------------------------------- finding files


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
            raise ValueError(f"{setting}: unknown scene class {name!r}; known classes: {SCENE_CLASSES}")
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


def _walk_audio(root: Path) -> list[Path]:
    """Audio-extension files under root, sorted; hidden folders (e.g. .prepared) skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files
                  if Path(f).suffix.lower() in AUDIO_EXTENSIONS and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _usable_channels(n_channels: int, channels: Sequence[int] | None) -> list[int]:
    return [c for c in channels if c < n_channels] if channels is not None else list(range(n_channels))


def _check_file(info_channels: int, info_frames: int, min_channels: int,
                channels: Sequence[int] | None) -> str | None:
    """Why a file cannot be used, or None."""
    if info_frames <= 0:
        return "empty (0 frames)"
    if info_channels < min_channels:
        return f"{info_channels} channel(s), need at least {min_channels} distinct channels per item"
    usable = _usable_channels(info_channels, channels)
    if len(usable) < min_channels:
        return (f"only {len(usable)} of datasets.channels={list(channels)} exist in this "
                f"{info_channels}-channel file, need {min_channels}")
    return None


def _warn_skipped(skipped: list[tuple[str, str]], root: Path) -> None:
    if skipped:
        lines = "\n".join(f"  {name}: {why}" for name, why in skipped)
        warnings.warn(f"skipped {len(skipped)} file(s) under {root}:\n{lines}", DataWarning, stacklevel=3)


def _nothing_usable(root: Path, classes: list[str], found: Counter, skipped: list, other: Counter,
                    unnamed: int) -> RuntimeError:
    parts = [f"no usable audio files for classes {classes} under data_root={root}."]
    parts.append(f"Found: {sum(found.values())} file(s) of these classes"
                 + (f" ({len(skipped)} skipped as unusable, listed in the warning above)" if skipped else "")
                 + (f", {dict(other)} of other classes" if other else "")
                 + (f", {unnamed} audio file(s) with no recognisable class" if unnamed else "") + ".")
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
        raise FileNotFoundError(f"data_root {root} (datasets.data_root / --data-root) is not a folder. "
                                "Point it at the EigenScape recordings (flat as downloaded or one folder "
                                "per class), or generate a synthetic set: python synth_eigenscape.py --out DIR")
    classes = canonical_classes(classes)
    files, skipped = [], []
    found, other, unnamed = Counter(), Counter(), 0
    for path in _walk_audio(root):
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
        why = _check_file(info.channels, info.frames, min_channels, channels)
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
        raise ValueError(f"{prepared_root / PREPARED_INDEX} was prepared at {index.get('sample_rate')} Hz "
                         f"but model.sample_rate={model_rate}; rerun prepare_dataset.py "
                         f"--sample-rate {model_rate} or set datasets.format=wav")
    classes = canonical_classes(classes)
    files, skipped = [], []
    for entry in sorted(index["files"], key=lambda e: e["source"]):
        if entry["class"] not in classes:
            continue
        why = _check_file(entry["channels"], entry["source_frames"], min_channels, channels)
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
        if entry.get("source_size") != stat.st_size or entry.get("source_mtime_ns") != stat.st_mtime_ns:
            return f"{f.rel} changed after it was prepared"
    return None


# ----------------------------------------------------------------------------- reading


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
    """Same segment as read_wav_segment, from the prepared int16 array (only its channels' bytes)."""
    span = span_for(file.sample_rate, model_rate, length)
    first = start // span.down * span.up
    try:
        array = _open_array(file.array)
        data = np.stack([np.asarray(array[c, first:first + length]) for c in channels])
    except Exception as err:
        raise ReadError(f"{file.array} (prepared from {file.path}): {type(err).__name__}: {err}") from err
    return _pad_to(torch.from_numpy(data.astype(np.float32) / PREPARED_SCALE), length)


# ----------------------------------------------------------------------------- datasets


def _absolute(path: Any) -> Path:
    """Relative paths are relative to where the command was started, even inside a Hydra run dir."""
    from hydra.utils import to_absolute_path
    return Path(to_absolute_path(str(Path(str(path)).expanduser())))


class ChannelViewsDataset(Dataset):
    """Items of V distinct channels of one segment: (wavs [V, 1, T] float32, meta).

    `mode` 'train': `datasets.fixed_length` random items per epoch (call `set_epoch`), drawn
    for the process of `rank` (under DDP each rank draws its own items).
    `mode` 'val': `datasets.val_pairs` fixed items (the same for every rank).
    """

    def __init__(self, config: Any, mode: str, views: int, rank: int = 0) -> None:
        if mode not in ("train", "val"):
            raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
        ds = config.datasets
        try:
            data_root = _absolute(ds.data_root)
        except Exception as err:  # omegaconf MissingMandatoryValue for '???'
            raise ValueError("datasets.data_root is not set: pass datasets.data_root=/path/to/EigenScape "
                             "(or a synthetic set from synth_eigenscape.py)") from err
        self.mode, self.views, self.data_root = mode, views, data_root
        self.model_rate = int(config.model.sample_rate)
        self.length = int(ds.tensor_cut)
        self.seed = int(config.common.seed)
        if self.seed < 0 or self.length <= 0:
            raise ValueError(f"common.seed must be >= 0 and datasets.tensor_cut > 0, got {self.seed}, {self.length}")
        self.max_retries = int(ds.max_read_retries)
        key = "train_classes" if mode == "train" else "val_classes"
        self.classes = canonical_classes(list(ds[key]), f"datasets.{key}")
        self.channel_choice = self._channel_setting(ds)
        # Shared memory, so that persistent DataLoader workers see set_epoch() too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.rank = int(rank)
        self.stats: Counter = Counter()
        self._reported: set[str] = set()
        self._logged: set[str] = set()  # files whose failed reads the trainer has logged
        self.format = self._resolve_format(ds)
        self.files = self._find_files()
        self._read = read_prepared_segment if self.format == "prepared" else read_wav_segment
        self._allowed = [_usable_channels(f.channels, self.channel_choice) for f in self.files]
        self._warn_short_files()
        self._warn_mixed_channel_counts()
        self.items = int(ds.fixed_length) if mode == "train" else int(ds.val_pairs)
        self.plan = self._validation_plan() if mode == "val" else None

    # -- set-up

    def _channel_setting(self, ds: Any) -> list[int] | None:
        channels = ds.channels
        if channels is None:
            return None
        channels = [int(c) for c in channels]
        if any(c < 0 for c in channels) or len(set(channels)) != len(channels) or len(channels) < self.views:
            raise ValueError(f"datasets.channels={channels} must be distinct non-negative channel indices, "
                             f"at least {self.views} for {self.views} view(s) per item (or null for all)")
        return sorted(channels)

    def _prepared_root(self, ds: Any) -> Path:
        return _absolute(ds.prepared_root) if ds.prepared_root else self.data_root / PREPARED_DIRNAME

    def _resolve_format(self, ds: Any) -> str:
        fmt = str(ds.format)
        if fmt not in ("auto", "wav", "prepared"):
            raise ValueError(f"datasets.format must be auto, wav or prepared, got {fmt!r}")
        self.prepared_root = self._prepared_root(ds)
        has_index = (self.prepared_root / PREPARED_INDEX).is_file()
        if fmt == "prepared" and not has_index:
            raise FileNotFoundError(f"datasets.format=prepared but {self.prepared_root / PREPARED_INDEX} does not "
                                    f"exist: run python prepare_dataset.py --data-root {self.data_root}"
                                    + (f" --out {self.prepared_root}" if ds.prepared_root else ""))
        if fmt == "auto" and not has_index:
            return "wav"
        return fmt

    def _find_files(self) -> list[AudioFile]:
        args = (self.classes, self.views, self.channel_choice)
        if self.format == "wav":
            return find_audio_files(self.data_root, *args)
        if self.format == "prepared":
            return prepared_files(self.data_root, self.prepared_root, *args, self.model_rate)
        # auto with an index: use it unless it is unusable or the WAV files say it is out of date
        try:
            prepared = prepared_files(self.data_root, self.prepared_root, *args, self.model_rate)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            warnings.warn(f"ignoring prepared data in {self.prepared_root} ({err}); reading WAV files",
                          DataWarning, stacklevel=2)
            self.format = "wav"
            return find_audio_files(self.data_root, *args)
        self.format = "prepared"
        if not any(f.path.exists() for f in prepared):
            return prepared  # sources removed after preparation: the arrays are the data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # the same skips were reported by prepared_files
            wav = find_audio_files(self.data_root, *args)
        stale = prepared_is_current(self.prepared_root, wav)
        if stale is None and [f.rel for f in wav] == [f.rel for f in prepared]:
            return prepared
        warnings.warn(f"prepared data in {self.prepared_root} is out of date ({stale or 'file lists differ'}); "
                      f"reading WAV files instead. Rerun python prepare_dataset.py --data-root {self.data_root}",
                      DataWarning, stacklevel=2)
        self.format = "wav"
        return wav

    def _warn_short_files(self) -> None:
        short = [f.rel for f in self.files
                 if f.frames < span_for(f.sample_rate, self.model_rate, self.length).frames]
        self.stats["short_files"] = len(short)
        if short:
            warnings.warn(f"{len(short)} file(s) are shorter than one segment (datasets.tensor_cut={self.length} "
                          f"samples at {self.model_rate} Hz) and will be zero-padded: {short}",
                          DataWarning, stacklevel=3)

    def _warn_mixed_channel_counts(self) -> None:
        counts = Counter(f.channels for f in self.files)
        if len(counts) > 1:
            warnings.warn(f"{mode_files(self)} have different channel counts {dict(counts)} (raw A-format "
                          "and B-format mixed?). Channels of an item always come from one file; keep one "
                          "variant per data_root or restrict datasets.channels.", DataWarning, stacklevel=3)

    def _validation_plan(self) -> list[tuple[int, tuple[int, ...], int]]:
        """(file, channels, start) per validation item: spread over files, channel sets and time.

        Item i uses file i mod n_files; that file's k-th visit takes the k-th entry of a seeded
        permutation of its channel pairs (or single channels) and a start in the k-th of
        equal parts of the file. Depends only on the sorted file list and the seed.
        """
        n_files, plan = len(self.files), []
        for i in range(self.items):
            fi, visit = i % n_files, i // n_files
            visits = len(range(fi, self.items, n_files))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, VALIDATION_STREAM, i]))
            channels = self._validation_channels(fi, visit, rng)
            f = self.files[fi]
            span = span_for(f.sample_rate, self.model_rate, self.length)
            blocks = max(f.frames - span.frames, 0) // span.down + 1
            lo, hi = blocks * visit // visits, max(blocks * (visit + 1) // visits, blocks * visit // visits + 1)
            plan.append((fi, channels, int(rng.integers(lo, hi)) * span.down))
        return plan

    def _validation_channels(self, fi: int, visit: int, rng: np.random.Generator) -> tuple[int, ...]:
        allowed = self._allowed[fi]
        if self.views > 2:
            return tuple(int(c) for c in rng.choice(allowed, self.views, replace=False))
        combos = list(itertools.combinations(allowed, self.views))
        order = np.random.default_rng(np.random.SeedSequence([self.seed, VALIDATION_STREAM, 1 << 20, fi]))
        combo = combos[order.permutation(len(combos))[visit % len(combos)]]
        return tuple(int(c) for c in rng.permutation(combo))

    # -- public

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Training items of a new epoch (items are a function of seed, epoch, index, rank).

        Call it before iterating; it reaches workers that already exist (persistent_workers).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < self.items:
            raise IndexError(index)
        return self._validation_item(index) if self.mode == "val" else self._train_item(index)

    # -- items

    def draw(self, index: int, attempt: int = 0) -> tuple[int, tuple[int, ...], int]:
        """(file index, channels, start frame) of a training item: pure in (seed, epoch, index, rank, attempt)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index, self.rank, attempt]))
        fi = int(rng.integers(len(self.files)))
        channels = tuple(int(c) for c in rng.choice(self._allowed[fi], self.views, replace=False))
        f = self.files[fi]
        span = span_for(f.sample_rate, self.model_rate, self.length)
        start = int(rng.integers(max(f.frames - span.frames, 0) // span.down + 1)) * span.down
        return fi, channels, start

    def _item(self, fi: int, channels: tuple[int, ...], start: int, wavs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        f = self.files[fi]
        meta = {"path": str(f.path), "class": f.scene_class, "channels": list(channels), "start": start}
        return wavs.unsqueeze(1).contiguous(), meta

    def _train_item(self, index: int) -> tuple[torch.Tensor, dict]:
        """A training item; a draw that cannot be read (file vanished, truncated, unreadable)
        or holds NaN/Inf is redrawn, and the item's meta lists those under 'skipped_reads'."""
        failures: list[dict[str, str]] = []
        for attempt in range(self.max_retries + 1):
            fi, channels, start = self.draw(index, attempt)
            f = self.files[fi]
            try:
                wavs = self._read(f, channels, start, self.length, self.model_rate)
            except ReadError as err:
                self.stats["read_failures"] += 1
                failures.append({"path": str(f.path), "reason": str(err)})
                if f.rel not in self._reported:
                    self._reported.add(f.rel)
                    warnings.warn(f"read failed, drawing another item: {err}", DataWarning, stacklevel=2)
                continue
            if self.format == "wav" and not torch.isfinite(wavs).all():  # int16 arrays cannot hold NaN
                self.stats["nonfinite_segments"] += 1
                failures.append({"path": str(f.path),
                                 "reason": f"{f.path}: NaN/Inf in channels {list(channels)} from frame {start}"})
                if self.stats["nonfinite_segments"] == 1:
                    warnings.warn(f"segment with NaN/Inf dropped and redrawn ({f.path}, frame {start}); "
                                  "the count is in dataset.stats['nonfinite_segments']", DataWarning, stacklevel=2)
                continue
            wavs, meta = self._item(fi, channels, start, wavs)
            if failures:  # travels with the item out of DataLoader workers, to the trainer
                meta["skipped_reads"] = failures
            return wavs, meta
        raise TooManyReadFailures(
            f"training data unreadable: item {index} of epoch {self.epoch} (rank {self.rank}) failed all "
            f"{self.max_retries + 1} draws in a row (datasets.max_read_retries={self.max_retries}); last: "
            f"{' '.join(failures[-1]['reason'].splitlines())}. Check that the files under {self.data_root} still exist and are "
            "readable (or remove the broken ones), then rerun with checkpoint.resume=true.")

    def count_skipped_reads(self, metas: Sequence[dict]) -> int:
        """Reads that a batch's items were redrawn around; each failing file is logged once.

        Called by the trainer in the main process: DataLoader workers cannot report
        themselves, so the failures travel in the items' metas.
        """
        count = 0
        for meta in metas:
            for failure in meta.get("skipped_reads", ()):
                count += 1
                if failure["path"] not in self._logged:
                    self._logged.add(failure["path"])
                    log.warning("skipped_reads: %s; the item was redrawn from another file "
                                "(logged once per file, counted in train/skipped_reads)", failure["reason"])
        return count

    def _validation_item(self, index: int) -> tuple[torch.Tensor, dict]:
        fi, channels, start = self.plan[index]
        # Validation items are fixed: a failed read is an error, not a redraw.
        wavs = self._read(self.files[fi], channels, start, self.length, self.model_rate)
        if not torch.isfinite(wavs).all():
            self.stats["nonfinite_segments"] += 1
            warnings.warn(f"validation item {index} ({self.files[fi].path}, frame {start}) has NaN/Inf; "
                          "set to 0 there so the validation set stays fixed", DataWarning, stacklevel=2)
            wavs = torch.nan_to_num(wavs, nan=0.0, posinf=0.0, neginf=0.0)
        return self._item(fi, channels, start, wavs)


class PairedChannelDataset(ChannelViewsDataset):
    """Two (or `datasets.views` > 2) distinct channels of one segment per item."""

    def __init__(self, config: Any, mode: str, rank: int = 0) -> None:
        super().__init__(config, mode, views=max(2, int(config.datasets.views)), rank=rank)


class MonoChannelDataset(ChannelViewsDataset):
    """One random channel of one segment per item (wavs [1, 1, T])."""

    def __init__(self, config: Any, mode: str, rank: int = 0) -> None:
        super().__init__(config, mode, views=1, rank=rank)


def mode_files(dataset: ChannelViewsDataset) -> str:
    return f"the {len(dataset.files)} {dataset.mode} files under {dataset.data_root}"


def collate_fn(items: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack items to wavs [B, V, 1, T] and the list of metas."""
    wavs, metas = zip(*items)
    return torch.stack(wavs), list(metas)
