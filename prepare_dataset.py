"""Convert an EigenScape dataset once into int16 arrays at the model rate (the fast path).

Each recording becomes `<out>/<relative path>.npy`: int16, channel-major [C, T] at the model
rate, memory-mapped, so a dataset item reads only its channels' bytes. `<out>/index.json`
lists the files (class, channels, source rate and length, source size and mtime to detect
changes). The default `<out>` is `<data_root>/.prepared`, where the datasets look for it
(`datasets.format: auto` uses it when present and current; `datasets.prepared_root`
points elsewhere).

Conversion runs in chunks (a 10-minute 32-channel file is never loaded whole), with the same
reading and resampling code as the datasets, so prepared items equal WAV items up to 16-bit
quantisation. Files already converted and unchanged are kept (the command can be resumed).

Usage:
    python prepare_dataset.py --data-root DIR [--out DIR] [--workers N] [--sample-rate 24000]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.checks import AT_LEAST_1, DATA_ROOT, POSITIVE, PathRule, check_flags
from utils.eigenscape import SCENE_CLASSES
from utils.audio_read import PREPARED_SCALE, read_wav_segment
from utils.eigenscape_files import PREPARED_DIRNAME, PREPARED_INDEX, AudioFile, find_audio_files

INDEX_VERSION = 1


def quantize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 in [-1, 1) -> int16; also returns how many samples were clipped."""
    scaled = np.rint(x * PREPARED_SCALE)
    clipped = int(np.count_nonzero((scaled < -32768) | (scaled > 32767)))
    return np.clip(scaled, -32768, 32767).astype(np.int16), clipped


def array_name(rel: str) -> str:
    """Where a source file's array lives, relative to the output folder."""
    return rel + ".npy"


def resampled_length(file: AudioFile, model_rate: int) -> int:
    """Length torchaudio gives the whole file at model_rate: ceil(frames * new / old), in
    integers."""
    return -(-file.frames * model_rate // file.sample_rate)


def convert_file(file: AudioFile, out: Path, model_rate: int, chunk_seconds: float) -> dict:
    """Write one recording as int16 [C, T] at model_rate under `out`, chunk by chunk; return
    its index entry."""
    target = out / array_name(file.rel)
    g = math.gcd(file.sample_rate, model_rate)
    down, up = file.sample_rate // g, model_rate // g
    total = resampled_length(file, model_rate)
    chunk = max(int(chunk_seconds * model_rate) // up, 1) * up  # whole resampling blocks
    channels = list(range(file.channels))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(file.channels, total))
    clipped = nonfinite = 0
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        block = read_wav_segment(file, channels, first // up * down, n, model_rate).numpy()
        bad = ~np.isfinite(block)
        if bad.any():
            nonfinite += int(bad.sum())
            block = np.where(bad, 0.0, block)
        array[:, first:first + n], c = quantize(block)
        clipped += c
    array.flush()
    del array
    os.replace(tmp, target)
    stat = file.path.stat()
    return {"source": file.rel, "class": file.scene_class, "channels": file.channels,
            "source_frames": file.frames, "source_rate": file.sample_rate, "frames": total,
            "array": array_name(file.rel),
            "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
            "clipped": clipped, "nonfinite": nonfinite}


def _convert_job(file: AudioFile, out: Path, model_rate: int, chunk_seconds: float) -> dict:
    torch.set_num_threads(1)  # one file per process; the processes share the cores
    return convert_file(file, out, model_rate, chunk_seconds)


def _unchanged(entry: dict | None, file: AudioFile, out: Path, model_rate: int) -> bool:
    if entry is None:
        return False
    stat = file.path.stat()
    target = out / entry["array"]
    if ((entry["source_size"], entry["source_mtime_ns"]) != (stat.st_size, stat.st_mtime_ns)
            or not target.is_file()):
        return False
    shape = np.load(target, mmap_mode="r").shape
    return shape == (file.channels, resampled_length(file, model_rate))


def prepare(data_root: str | os.PathLike, out: str | os.PathLike | None = None, workers: int = 1,
            model_rate: int = 24000, chunk_seconds: float = 10.0,
            classes: Sequence[str] = SCENE_CLASSES) -> Path:
    """Convert every usable recording of `classes` under data_root; return the index path."""
    data_root = Path(data_root).expanduser()
    out = Path(out).expanduser() if out else data_root / PREPARED_DIRNAME
    files = find_audio_files(data_root, classes)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / PREPARED_INDEX
    old = {}
    if index_path.is_file():
        previous = json.loads(index_path.read_text())
        if previous.get("sample_rate") == model_rate:
            old = {e["source"]: e for e in previous.get("files", [])}
    keep = {f.rel: old[f.rel] for f in files if _unchanged(old.get(f.rel), f, out, model_rate)}
    todo = [f for f in files if f.rel not in keep]
    print(f"{len(files)} file(s) under {data_root}: {len(keep)} already prepared, "
          f"converting {len(todo)} to {model_rate} Hz int16 in {out}", flush=True)
    started = time.time()
    args = (todo, [out] * len(todo), [model_rate] * len(todo), [chunk_seconds] * len(todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            new = list(pool.map(_convert_job, *args))
    else:
        new = [_convert_job(*a) for a in zip(*args)]
    for entry in new:
        if entry["clipped"] or entry["nonfinite"]:
            warnings.warn(f"{entry['source']}: {entry['clipped']} sample(s) clipped to int16, "
                          f"{entry['nonfinite']} NaN/Inf sample(s) set to 0", stacklevel=2)
    entries = sorted([*keep.values(), *new], key=lambda e: e["source"])
    index = {"version": INDEX_VERSION, "sample_rate": model_rate, "dtype": "int16",
             "scale": PREPARED_SCALE, "layout": "channel-major [C, T]", "files": entries}
    tmp = index_path.with_name(index_path.name + ".part")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    print(f"done in {time.time() - started:.1f} s; index: {index_path}", flush=True)
    return index_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True,
                        help="EigenScape folder (flat or one folder per class)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: <data-root>/{PREPARED_DIRNAME}; "
                             "elsewhere needs datasets.prepared_root=OUT)")
    parser.add_argument("--workers", type=int, default=1, help="files converted in parallel")
    parser.add_argument("--sample-rate", type=int, default=24000, help="model.sample_rate")
    parser.add_argument("--chunk-seconds", type=float, default=10.0,
                        help="audio converted per step")
    args = parser.parse_args(argv)
    check_flags(("--data-root", args.data_root, DATA_ROOT),
                ("--out", args.out, PathRule("output folder")),
                ("--workers", args.workers, AT_LEAST_1),
                ("--sample-rate", args.sample_rate, AT_LEAST_1),
                ("--chunk-seconds", args.chunk_seconds, POSITIVE))
    try:
        prepare(args.data_root, args.out, args.workers, args.sample_rate, args.chunk_seconds)
    except (OSError, RuntimeError, ValueError) as err:  # no files, unreadable audio, no room
        sys.exit(f"prepare_dataset.py: {err}")


if __name__ == "__main__":
    main()
