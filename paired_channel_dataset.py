"""EigenScape datasets: paired (two channels of one segment) and mono items.

The files come from `utils.eigenscape_files` (either layout, found with no configuration),
or, for an array set (`datasets.array_set`, evaluate.py's `array_set=DIR`), from
`utils.array_files` (any folder of multichannel recordings, no classes)
and each segment from `utils.audio_read` (only the source frames it needs, resampled to the
model rate; or, once `prepare_dataset.py` has converted the data to int16 arrays at the
model rate in `<data_root>/.prepared/` by default or `datasets.prepared_root`, only its
channels' bytes from those arrays, the same items up to 16-bit quantisation;
`datasets.format`: auto | wav | prepared).

Train items are a pure function of (seed, epoch, index, rank, attempt): each draws a file,
distinct channels and a start from its own `np.random.SeedSequence`, so a resumed run is
bit-identical and DataLoader workers and ranks never repeat each other. Validation items are
a fixed plan derived from the sorted file list and the seed.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.array_files import find_array_files
from utils.audio_read import ReadError, read_prepared_segment, read_wav_segment, span_for
from utils.eigenscape_files import (PREPARED_DIRNAME, PREPARED_INDEX, AudioFile, DataWarning,
                                    canonical_classes, find_audio_files, prepared_files,
                                    prepared_is_current, usable_channels)

VALIDATION_STREAM = 7919  # separates the validation plan's random stream from training items

log = logging.getLogger("encodec")


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


# ----------------------------------------------------------------------------- datasets


def _absolute(path: Any) -> Path:
    """Relative paths are relative to where the command was started, even inside a Hydra run dir."""
    from hydra.utils import to_absolute_path
    return Path(to_absolute_path(str(Path(str(path)).expanduser())))


VAL_FILE_SETS = ("all", "monitor", "held_out")


def validation_files(files: list[AudioFile], which: str) -> list[AudioFile]:
    """The validation files of `datasets.val_files`: `all`, or two disjoint sets of each
    class's files in name order: `monitor` (every 4th, from the first: what the per-epoch
    validation that picks `best.pt` sees) and `held_out` (the others: what a study evaluates
    on), so that choosing a checkpoint and scoring it never share a recording."""
    if which == "all":
        return files
    if which not in VAL_FILE_SETS:
        raise ValueError(f"datasets.val_files must be one of {VAL_FILE_SETS}, got {which!r}")
    by_class: dict[str, list[AudioFile]] = {}
    for f in sorted(files, key=lambda f: f.rel):
        by_class.setdefault(f.scene_class, []).append(f)
    chosen = []
    for scene_class, members in by_class.items():
        if len(members) < 2:
            raise ValueError(f"datasets.val_files={which} needs at least 2 files of each "
                             f"validation class, {scene_class} has {len(members)}: add files "
                             "or use datasets.val_files=all")
        chosen += [f.rel for i, f in enumerate(members) if (i % 4 == 0) == (which == "monitor")]
    keep = set(chosen)
    return [f for f in files if f.rel in keep]


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
        # Any array's recordings (evaluate.py array_set=DIR): no classes, read from the files.
        self.array_set = bool(ds.get("array_set"))
        try:
            data_root = _absolute(ds.array_set if self.array_set else ds.data_root)
        except Exception as err:  # omegaconf MissingMandatoryValue for '???'
            raise ValueError("datasets.data_root is not set: pass "
                             "datasets.data_root=/path/to/EigenScape "
                             "(or a synthetic set from synth_eigenscape.py)") from err
        self.mode, self.views, self.data_root = mode, views, data_root
        self.model_rate = int(config.model.sample_rate)
        self.length = int(ds.tensor_cut)
        self.seed = int(config.common.seed)
        if self.seed < 0 or self.length <= 0:
            raise ValueError(f"common.seed must be >= 0 and datasets.tensor_cut > 0, "
                             f"got {self.seed}, {self.length}")
        self.max_retries = int(ds.max_read_retries)
        key = "train_classes" if mode == "train" else "val_classes"
        self.classes = [] if self.array_set else canonical_classes(list(ds[key]),
                                                                   f"datasets.{key}")
        self.channel_choice = self._channel_setting(ds)
        # Shared memory, so that persistent DataLoader workers see set_epoch() too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.rank = int(rank)
        self.stats: Counter = Counter()
        self._reported: set[str] = set()
        self._logged: set[str] = set()  # files whose failed reads the trainer has logged
        self.format = "wav" if self.array_set else self._resolve_format(ds)
        self.files = self._find_files()
        if mode == "val" and not self.array_set:
            self.files = validation_files(self.files, str(ds.get("val_files", "all")))
        self._read = read_prepared_segment if self.format == "prepared" else read_wav_segment
        self._allowed = [usable_channels(f.channels, self.channel_choice) for f in self.files]
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
        if (any(c < 0 for c in channels) or len(set(channels)) != len(channels)
                or len(channels) < self.views):
            raise ValueError(f"datasets.channels={channels} must be distinct non-negative channel "
                             f"indices, at least {self.views} for {self.views} view(s) per item "
                             f"(or null for all)")
        return sorted(channels)

    def _prepared_root(self, ds: Any) -> Path:
        return (_absolute(ds.prepared_root) if ds.prepared_root
                else self.data_root / PREPARED_DIRNAME)

    def _resolve_format(self, ds: Any) -> str:
        fmt = str(ds.format)
        if fmt not in ("auto", "wav", "prepared"):
            raise ValueError(f"datasets.format must be auto, wav or prepared, got {fmt!r}")
        self.prepared_root = self._prepared_root(ds)
        has_index = (self.prepared_root / PREPARED_INDEX).is_file()
        if fmt == "prepared" and not has_index:
            raise FileNotFoundError(f"datasets.format=prepared but "
                                    f"{self.prepared_root / PREPARED_INDEX} does not exist: run "
                                    f"python prepare_dataset.py --data-root {self.data_root}"
                                    + (f" --out {self.prepared_root}" if ds.prepared_root else ""))
        if fmt == "auto" and not has_index:
            return "wav"
        return fmt

    def _find_files(self) -> list[AudioFile]:
        if self.array_set:
            return find_array_files(self.data_root, self.views, self.channel_choice,
                                    self.length, self.model_rate)
        args = (self.classes, self.views, self.channel_choice)
        if self.format == "wav":
            return find_audio_files(self.data_root, *args)
        if self.format == "prepared":
            return prepared_files(self.data_root, self.prepared_root, *args, self.model_rate)
        # auto with an index: use it unless it is unusable or the WAV files say it is out of date
        try:
            prepared = prepared_files(self.data_root, self.prepared_root, *args, self.model_rate)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            warnings.warn(f"ignoring prepared data in {self.prepared_root} ({err}); "
                          "reading WAV files", DataWarning, stacklevel=2)
            self.format = "wav"
            return find_audio_files(self.data_root, *args)
        self.format = "prepared"
        if not any(f.path.exists() for f in prepared):
            return prepared  # sources removed after preparation: the arrays are the data
        with warnings.catch_warnings():
            # the same skips were reported by prepared_files
            warnings.simplefilter("ignore", DataWarning)
            wav = find_audio_files(self.data_root, *args)
        stale = prepared_is_current(self.prepared_root, wav)
        if stale is None and [f.rel for f in wav] == [f.rel for f in prepared]:
            return prepared
        warnings.warn(f"prepared data in {self.prepared_root} is out of date "
                      f"({stale or 'file lists differ'}); reading WAV files instead. "
                      f"Rerun python prepare_dataset.py --data-root {self.data_root}",
                      DataWarning, stacklevel=2)
        self.format = "wav"
        return wav

    def _warn_short_files(self) -> None:
        short = [f.rel for f in self.files
                 if f.frames < span_for(f.sample_rate, self.model_rate, self.length).frames]
        self.stats["short_files"] = len(short)
        if short:
            warnings.warn(f"{len(short)} file(s) are shorter than one segment "
                          f"(datasets.tensor_cut={self.length} samples at {self.model_rate} Hz) "
                          f"and will be zero-padded: {short}",
                          DataWarning, stacklevel=3)

    def _warn_mixed_channel_counts(self) -> None:
        counts = Counter(f.channels for f in self.files)
        if len(counts) > 1:
            warnings.warn(f"{mode_files(self)} have different channel counts {dict(counts)} "
                          "(raw A-format and B-format mixed?). Channels of an item always come "
                          "from one file; keep one variant per data_root or restrict "
                          "datasets.channels.", DataWarning, stacklevel=3)

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
            lo, hi = (blocks * visit // visits,
                      max(blocks * (visit + 1) // visits, blocks * visit // visits + 1))
            plan.append((fi, channels, int(rng.integers(lo, hi)) * span.down))
        return plan

    def _validation_channels(self, fi: int, visit: int,
                             rng: np.random.Generator) -> tuple[int, ...]:
        allowed = self._allowed[fi]
        if self.views > 2:
            return tuple(int(c) for c in rng.choice(allowed, self.views, replace=False))
        combos = list(itertools.combinations(allowed, self.views))
        order = np.random.default_rng(
            np.random.SeedSequence([self.seed, VALIDATION_STREAM, 1 << 20, fi]))
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
        """(file index, channels, start frame) of a training item: pure in (seed, epoch, index,
        rank, attempt)."""
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, self.epoch, index, self.rank, attempt]))
        fi = int(rng.integers(len(self.files)))
        channels = tuple(int(c) for c in rng.choice(self._allowed[fi], self.views, replace=False))
        f = self.files[fi]
        span = span_for(f.sample_rate, self.model_rate, self.length)
        start = int(rng.integers(max(f.frames - span.frames, 0) // span.down + 1)) * span.down
        return fi, channels, start

    def _item(self, fi: int, channels: tuple[int, ...], start: int,
              wavs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        f = self.files[fi]
        meta = {"path": str(f.path), "class": f.scene_class, "channels": list(channels),
                "start": start}
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
                    warnings.warn(f"read failed, drawing another item: {err}", DataWarning,
                                  stacklevel=2)
                continue
            # int16 arrays cannot hold NaN
            if self.format == "wav" and not torch.isfinite(wavs).all():
                self.stats["nonfinite_segments"] += 1
                failures.append({"path": str(f.path),
                                 "reason": f"{f.path}: NaN/Inf in channels {list(channels)} "
                                           f"from frame {start}"})
                if self.stats["nonfinite_segments"] == 1:
                    warnings.warn(f"segment with NaN/Inf dropped and redrawn ({f.path}, "
                                  f"frame {start}); the count is in "
                                  "dataset.stats['nonfinite_segments']", DataWarning, stacklevel=2)
                continue
            wavs, meta = self._item(fi, channels, start, wavs)
            if failures:  # travels with the item out of DataLoader workers, to the trainer
                meta["skipped_reads"] = failures
            return wavs, meta
        raise TooManyReadFailures(
            f"training data unreadable: item {index} of epoch {self.epoch} (rank {self.rank}) "
            f"failed all {self.max_retries + 1} draws in a row "
            f"(datasets.max_read_retries={self.max_retries}); last: "
            f"{' '.join(failures[-1]['reason'].splitlines())}. Check that the files under "
            f"{self.data_root} still exist and are "
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
                                "(logged once per file, counted in train/skipped_reads)",
                                failure["reason"])
        return count

    def _validation_item(self, index: int) -> tuple[torch.Tensor, dict]:
        fi, channels, start = self.plan[index]
        # Validation items are fixed: a failed read is an error, not a redraw.
        wavs = self._read(self.files[fi], channels, start, self.length, self.model_rate)
        if not torch.isfinite(wavs).all():
            self.stats["nonfinite_segments"] += 1
            warnings.warn(f"validation item {index} ({self.files[fi].path}, frame {start}) "
                          "has NaN/Inf; set to 0 there so the validation set stays fixed",
                          DataWarning, stacklevel=2)
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
