"""Paired-item throughput from 32-channel 48 kHz PCM_24 files: WAV path vs prepared arrays.

Generates its own synthetic EigenScape set in a temporary folder, reads `--items` paired
training items (1 s at 24 kHz by default) through the WAV path (raw PCM decoding, and plain
soundfile reads for comparison), converts the set with prepare_dataset.py and reads the same
items again. Single process, no DataLoader: this is
the per-worker cost.

    python bench/data_speed.py [--seconds 20] [--files-per-class 1] [--items 300] [--tensor-cut 24000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare_dataset  # noqa: E402
import synth_eigenscape  # noqa: E402
from paired_channel_dataset import PairedChannelDataset  # noqa: E402


def items_per_second(dataset: PairedChannelDataset, items: int) -> float:
    dataset[0]  # build the resampler / open the first map outside the timing
    started = time.perf_counter()
    for i in range(items):
        dataset[i]
    return items / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each generated file")
    parser.add_argument("--files-per-class", type=int, default=1)
    parser.add_argument("--items", type=int, default=300, help="paired items read per path")
    parser.add_argument("--tensor-cut", type=int, default=24000, help="segment length at 24 kHz")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a DataLoader worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        synth_eigenscape.generate(tmp, args.files_per_class, args.seconds, seed=0, workers=2)
        print(f"generated 8 x {args.files_per_class} files of {args.seconds:g} s "
              f"(32 ch, 48 kHz, PCM_24) in {time.perf_counter() - started:.1f} s")
        overrides = [f"datasets.data_root={tmp}", f"datasets.tensor_cut={args.tensor_cut}",
                     f"datasets.fixed_length={args.items + 1}"]
        with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
            wav_cfg = compose("config_paired_nq2", [*overrides, "datasets.format=wav"])
            prepared_cfg = compose("config_paired_nq2", [*overrides, "datasets.format=prepared"])
        wav = items_per_second(PairedChannelDataset(wav_cfg, "train"), args.items)
        started = time.perf_counter()
        prepare_dataset.prepare(tmp, workers=2)
        print(f"prepared in {time.perf_counter() - started:.1f} s")
        fast = items_per_second(PairedChannelDataset(prepared_cfg, "train"), args.items)
    print(f"wav (soundfile, 32-ch PCM_24): {wav:8.1f} items/s ({1000 / wav:.2f} ms/item)")
    print(f"prepared (int16 arrays):       {fast:8.1f} items/s ({1000 / fast:.2f} ms/item)")
    print(f"ratio prepared / wav: {fast / wav:.1f}x")


if __name__ == "__main__":
    main()
