"""prepare_dataset.py: chunked int16 conversion, and the dataset reading it gives the same items."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import prepare_dataset
from paired_channel_dataset import PairedChannelDataset
from utils import audio_read
from utils.eigenscape_files import DataWarning

Q = 1 / 32768  # one int16 step


@pytest.fixture
def small_root(tmp_path):
    """Flat and class-folder files, 6 channels, 48 kHz PCM_24 and one 44.1 kHz FLOAT file."""
    rng = np.random.default_rng(0)
    for name, sr, frames, subtype in [("Beach-01-Raw.wav", 48000, 30000, "PCM_24"),
                                      ("Busy Street/take.wav", 48000, 21000, "PCM_24"),
                                      ("Park.6.wav", 44100, 25000, "FLOAT"),
                                      ("Woodland-01-Raw.wav", 48000, 20000, "PCM_24")]:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), (rng.standard_normal((frames, 6)) * 0.2).clip(-0.9, 0.9), sr,
                 subtype=subtype)
    return tmp_path


def test_arrays_equal_whole_file_resampled(small_root, monkeypatch):
    reads = []
    original = audio_read.read_frames
    monkeypatch.setattr(audio_read, "read_frames",
                        lambda f, lo, hi, ch: (reads.append(hi - lo), original(f, lo, hi, ch))[1])
    index_path = prepare_dataset.prepare(small_root, chunk_seconds=0.05)  # many chunks per file
    # chunks of 0.05 s + margins; files are 20000+ frames
    assert len(reads) > 4 * 8 and max(reads) < 3000
    index = json.loads(index_path.read_text())
    assert index_path == small_root / ".prepared" / "index.json" and index["sample_rate"] == 24000
    assert [e["source"] for e in index["files"]] == ["Beach-01-Raw.wav", "Busy Street/take.wav",
                                                      "Park.6.wav", "Woodland-01-Raw.wav"]
    for entry in index["files"]:
        array = np.load(small_root / ".prepared" / entry["array"], mmap_mode="r")
        source, sr = sf.read(str(small_root / entry["source"]), dtype="float32")
        expected = torchaudio.functional.resample(torch.from_numpy(source.T), sr, 24000).numpy()
        assert array.dtype == np.int16 and array.shape == expected.shape == (6, entry["frames"])
        assert np.abs(array / 32768 - expected).max() <= 0.5 * Q + 1e-6


def test_same_items_wav_or_prepared(small_root, cfg_factory):
    overrides = [f"datasets.data_root={small_root}", "datasets.fixed_length=20",
                 "datasets.val_pairs=6"]
    wav = {m: PairedChannelDataset(cfg_factory("config_paired_nq2",
                                               [*overrides, "datasets.format=wav"]), m)
           for m in ("train", "val")}
    prepare_dataset.main(["--data-root", str(small_root), "--workers", "2", "--chunk-seconds",
                          "0.1"])
    for fmt in ("prepared", "auto"):
        cfg = cfg_factory("config_paired_nq2", [*overrides, f"datasets.format={fmt}"])
        for mode in ("train", "val"):
            fast = PairedChannelDataset(cfg, mode)
            assert fast.format == "prepared"
            for i in range(len(fast)):
                (wa, ma), (wb, mb) = wav[mode][i], fast[i]
                assert ma == mb
                torch.testing.assert_close(wb, wa, atol=0.5 * Q + 1e-6, rtol=0)


def test_auto_falls_back_to_wav_when_sources_changed(small_root, cfg_factory):
    prepare_dataset.prepare(small_root)
    cfg = cfg_factory("config_paired_nq2", [f"datasets.data_root={small_root}"])
    os.utime(small_root / "Beach-01-Raw.wav", ns=(1, 1))
    with pytest.warns(DataWarning, match="out of date"):
        assert PairedChannelDataset(cfg, "train").format == "wav"
    prepare_dataset.prepare(small_root)  # reconverts only what changed
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert PairedChannelDataset(cfg, "train").format == "prepared"


def test_prepared_without_index_is_a_clear_error(small_root, cfg_factory):
    cfg = cfg_factory("config_paired_nq2",
                      [f"datasets.data_root={small_root}", "datasets.format=prepared"])
    with pytest.raises(FileNotFoundError, match="prepare_dataset.py --data-root"):
        PairedChannelDataset(cfg, "train")


def test_quantize_clips_and_counts():
    q, clipped = prepare_dataset.quantize(np.array([-1.5, -1.0, 0.0, Q, 0.9999, 1.2], np.float32))
    assert q.tolist() == [-32768, -32768, 0, 1, 32765, 32767] and clipped == 2


def test_index_at_another_rate(small_root, cfg_factory):
    prepare_dataset.prepare(small_root, model_rate=16000)
    base = [f"datasets.data_root={small_root}"]
    with pytest.warns(DataWarning, match="model.sample_rate=24000"):
        assert PairedChannelDataset(cfg_factory("config_paired_nq2", base), "train").format == "wav"
    with pytest.raises(ValueError, match="prepared at 16000 Hz"):
        PairedChannelDataset(cfg_factory("config_paired_nq2", [*base, "datasets.format=prepared"]),
                             "train")


def test_prepared_elsewhere(small_root, tmp_path_factory, cfg_factory):
    out = tmp_path_factory.mktemp("arrays")
    prepare_dataset.main(["--data-root", str(small_root), "--out", str(out)])
    assert (out / "index.json").is_file() and not (small_root / ".prepared").exists()
    cfg = cfg_factory("config_paired_nq2",
                      [f"datasets.data_root={small_root}", f"datasets.prepared_root={out}"])
    ds = PairedChannelDataset(cfg, "train")
    assert ds.format == "prepared" and ds.files[0].array.parent == out
