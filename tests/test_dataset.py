"""EigenScape datasets: finding files, exact segments, randomness, validation plan, bad files."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader

from paired_channel_dataset import MonoChannelDataset, PairedChannelDataset, collate_fn
from utils.audio_read import ReadError, read_frames, read_wav_segment
from utils.eigenscape_files import DataWarning, class_from_name, find_audio_files

TRAIN = ["Beach", "Busy Street", "Park", "Pedestrian Zone", "Quiet Street", "Shopping Centre"]


def write_wav(path: Path, data: np.ndarray, sr: int = 48000, subtype: str = "PCM_24") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def noise(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((frames, channels))
            * 0.1).astype(np.float32)


def config(cfg_factory, root: Path, *overrides: str, name: str = "config_paired_nq2"):
    return cfg_factory(name, [f"datasets.data_root={root}", *overrides])


# ----------------------------------------------------------------------------- finding files


@pytest.mark.parametrize("name, expected", [
    ("Beach-01-Raw.wav", "Beach"), ("BusyStreet-03-Raw.wav", "Busy Street"),
    ("Beach.1.wav", "Beach"), ("Park.6.wav", "Park"),
    ("PedestrianZone-08-Raw.wav", "Pedestrian Zone"),
    ("ShoppingCentre-02-Raw.wav", "Shopping Centre"), ("TrainStation.4.wav", "Train Station"),
    ("Busy Street", "Busy Street"), ("quiet_street", "Quiet Street"),
    ("Beach-01-Raw_excerpt.wav", "Beach"),
    ("Forest-01-Raw.wav", None), ("metadata.csv", None), ("01-Beach.wav", None),
])
def test_class_from_name(name, expected):
    assert class_from_name(name) == expected


def test_flat_downloaded_layout(tmp_path):
    for name in ["Beach-01-Raw.wav", "BusyStreet-03-Raw.wav", "Park.6.wav", "Beach.1.wav",
                 "Woodland-01-Raw.wav", "Forest-01-Raw.wav"]:
        write_wav(tmp_path / name, noise(100, 4))
    (tmp_path / "metadata.csv").write_text("path,class\n")
    files = find_audio_files(tmp_path, TRAIN)
    assert [(f.rel, f.scene_class) for f in files] == [
        ("Beach-01-Raw.wav", "Beach"), ("Beach.1.wav", "Beach"),
        ("BusyStreet-03-Raw.wav", "Busy Street"), ("Park.6.wav", "Park")]
    assert {(f.channels, f.frames, f.sample_rate) for f in files} == {(4, 100, 48000)}


def test_class_folders_with_spaces(tmp_path):
    write_wav(tmp_path / "Busy Street" / "take 1.wav", noise(100, 3))
    write_wav(tmp_path / "Shopping Centre" / "ShoppingCentre-02-Raw.wav", noise(100, 3))
    write_wav(tmp_path / "Woodland" / "w.wav", noise(100, 3))
    files = find_audio_files(tmp_path, TRAIN)
    assert [(f.rel, f.scene_class) for f in files] == [
        ("Busy Street/take 1.wav", "Busy Street"),
        ("Shopping Centre/ShoppingCentre-02-Raw.wav", "Shopping Centre")]
    assert [f.rel for f in find_audio_files(tmp_path, ["Woodland"])] == ["Woodland/w.wav"]


def test_real_fixtures_read(fixtures_dir):
    files = find_audio_files(fixtures_dir, ["Beach"], min_channels=2)
    assert (sorted((f.channels, f.sample_rate, f.frames) for f in files)
            == [(25, 48000, 14400), (32, 48000, 14400)])
    for f in files:
        last = f.channels - 1
        seg = read_wav_segment(f, [0, last], 2000, 4800, 24000)
        full, _ = sf.read(str(f.path), dtype="float32", always_2d=True)
        expected = torchaudio.functional.resample(torch.from_numpy(full[:, [0, last]].T), 48000,
                                                  24000)
        assert seg.shape == (2, 4800)
        torch.testing.assert_close(seg, expected[:, 1000:5800], atol=1e-6, rtol=0)
        assert seg.abs().max() > 0


def test_real_fixtures_items(fixtures_dir, cfg_factory):
    cfg = config(cfg_factory, fixtures_dir, "datasets.train_classes=[Beach]",
                 "datasets.fixed_length=40")
    with pytest.warns(DataWarning, match="different channel counts"):
        ds = PairedChannelDataset(cfg, "train")
    items = [ds[i] for i in range(len(ds))]
    assert {sf.info(m["path"]).channels for _, m in items} == {25, 32}
    # the 32-capsule file's upper half is used
    assert max(max(m["channels"]) for _, m in items) > 24
    for wavs, meta in items[:5]:
        assert (wavs.shape == (2, 1, ds.length) and torch.isfinite(wavs).all()
                and wavs.abs().max() > 0)


# ----------------------------------------------------------------------------- content


def chirp_file(path: Path, seconds: float = 1.6, channels: int = 4,
               subtype: str = "FLOAT") -> np.ndarray:
    """Channel c: a linear chirp 100 Hz -> 6 kHz (scaled by c+1) starting at 0.2 s, noise
    elsewhere."""
    t = np.arange(int(seconds * 48000)) / 48000
    chirp = np.where(t >= 0.2,
                     0.5 * np.sin(2 * np.pi * (100 * (t - 0.2) + 0.5 * 4000 * (t - 0.2) ** 2)), 0.0)
    data = np.stack([chirp * (c + 1) / channels for c in range(channels)], 1).astype(np.float32)
    write_wav(path, data, subtype=subtype)
    return data


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_24"])
def test_item_is_the_resampled_source_span(tmp_path, cfg_factory, subtype):
    data = chirp_file(tmp_path / "Beach-01-Raw.wav", subtype=subtype)
    cfg = config(cfg_factory, tmp_path, "datasets.tensor_cut=24000", "datasets.fixed_length=6")
    ds = PairedChannelDataset(cfg, "train")
    full = torchaudio.functional.resample(
        torch.from_numpy(sf.read(str(tmp_path / "Beach-01-Raw.wav"), dtype="float32")[0].T),
        48000, 24000)
    for i in range(len(ds)):
        wavs, meta = ds[i]
        # a full second, not 0.5 s
        assert wavs.shape == (2, 1, 24000) and wavs.dtype == torch.float32
        o = meta["start"] // 2
        torch.testing.assert_close(wavs[:, 0], full[meta["channels"], o:o + 24000], atol=2e-6,
                                   rtol=0)
        # and it is the chirp itself at that position (within the resampler's passband)
        src = data[meta["start"]:meta["start"] + 48000:2, meta["channels"]].T
        assert np.abs(wavs[:, 0].numpy() - src).max() < 5e-3


def test_mono_items_and_collate(synth_root, cfg_factory):
    cfg = config(cfg_factory, synth_root, name="config_mono_nq2")
    ds = MonoChannelDataset(cfg, "train")
    batch = [ds[i] for i in range(3)]
    wavs, metas = collate_fn(batch)
    assert wavs.shape == (3, 1, 1, cfg.datasets.tensor_cut)
    assert len(metas) == 3 and all(len(m["channels"]) == 1 for m in metas)
    paired = PairedChannelDataset(config(cfg_factory, synth_root), "train")
    wavs, metas = collate_fn([paired[i] for i in range(2)])
    assert wavs.shape == (2, 2, 1, cfg.datasets.tensor_cut)
    assert set(metas[0]) == {"path", "class", "channels", "start"}
    assert metas[0]["class"] in TRAIN and Path(metas[0]["path"]).is_file()


def test_all_channels_reachable_never_equal(synth_root, cfg_factory):
    ds = PairedChannelDataset(config(cfg_factory, synth_root, "datasets.fixed_length=300"), "train")
    pairs = [ds.draw(i)[1] for i in range(len(ds))]
    assert all(a != b for a, b in pairs)
    assert set(np.ravel(pairs)) == set(range(32))  # the reference only ever drew 0-15
    assert len({f for f, _, _ in (ds.draw(i) for i in range(60))}) == len(ds.files) == 6
    restricted = PairedChannelDataset(config(cfg_factory, synth_root, "datasets.channels=[3,7,30]"),
                                      "train")
    assert set(np.ravel([restricted.draw(i)[1] for i in range(50)])) == {3, 7, 30}
    three = PairedChannelDataset(config(cfg_factory, synth_root, "datasets.views=3"), "train")
    wavs, meta = three[0]
    assert wavs.shape[0] == 3 and len(set(meta["channels"])) == 3


def test_train_items_pure_in_seed_epoch_index_rank(synth_root, cfg_factory):
    cfg = config(cfg_factory, synth_root)
    a, b = PairedChannelDataset(cfg, "train"), PairedChannelDataset(cfg, "train")
    b.set_epoch(3)
    later = b[2]
    b.set_epoch(0)
    for i in (2, 0, 1):  # order of access does not matter
        wa, ma = a[i]
        wb, mb = b[i]
        assert ma == mb and torch.equal(wa, wb)
    epoch0 = [a.draw(i) for i in range(4)]
    assert [m for _, m in DataLoader(a, batch_size=2, num_workers=0,
                                     collate_fn=collate_fn)][0][0]["start"] \
        == epoch0[0][2]
    a.set_epoch(3)
    assert [a.draw(i) for i in range(4)] != epoch0
    assert torch.equal(a[2][0], later[0])
    rank1 = PairedChannelDataset(cfg, "train", rank=1)
    assert [rank1.draw(i) for i in range(4)] != epoch0
    other_seed = PairedChannelDataset(config(cfg_factory, synth_root, "common.seed=1"), "train")
    assert [other_seed.draw(i) for i in range(4)] != epoch0


def test_the_rank_is_given_not_read_from_torch_distributed(synth_root, cfg_factory, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    cfg = config(cfg_factory, synth_root)
    assert PairedChannelDataset(cfg, "train").rank == 0
    assert PairedChannelDataset(cfg, "train", rank=1).rank == 1


def test_set_epoch_reaches_persistent_workers(synth_root, cfg_factory):
    ds = PairedChannelDataset(config(cfg_factory, synth_root, "datasets.fixed_length=4"), "train")
    loader = DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True,
                        collate_fn=collate_fn)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        starts = [m["start"] for _, metas in loader for m in metas]
        assert starts == [ds.draw(i)[2] for i in range(4)]
        assert ([m["channels"] for _, metas in loader for m in metas]
                == [list(ds.draw(i)[1]) for i in range(4)])


def test_validation_pairs_fixed_and_spread(synth_root, cfg_factory):
    cfg = config(cfg_factory, synth_root, "datasets.val_pairs=12")
    one, two = PairedChannelDataset(cfg, "val"), PairedChannelDataset(cfg, "val")
    assert len(one) == 12 and one.plan == two.plan
    assert {one.files[f].scene_class for f, _, _ in one.plan} == {"Woodland", "Train Station"}
    assert len({tuple(sorted(c)) for _, c, _ in one.plan}) == 12  # 12 different channel pairs
    assert len({s for _, _, s in one.plan}) == 12
    one.set_epoch(5)
    serial = list(DataLoader(one, batch_size=4, num_workers=0, collate_fn=collate_fn))
    parallel = list(DataLoader(two, batch_size=4, num_workers=2, collate_fn=collate_fn))
    for (wa, ma), (wb, mb) in zip(serial, parallel):
        assert ma == mb and torch.equal(wa, wb)


# ----------------------------------------------------------------------------- bad files


def test_bad_files_skipped_with_one_warning(tmp_path, cfg_factory):
    write_wav(tmp_path / "Beach-01-Raw.wav", noise(9600, 4))
    (tmp_path / "Beach-02-Raw.wav").write_text("this is not audio")
    write_wav(tmp_path / "Beach-03-Raw.wav", np.zeros((0, 4), np.float32))
    write_wav(tmp_path / "Beach-04-Raw.wav", noise(9600, 1))
    with pytest.warns(DataWarning) as record:
        ds = PairedChannelDataset(config(cfg_factory, tmp_path), "train")
    assert [f.rel for f in ds.files] == ["Beach-01-Raw.wav"]
    skips = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(skips) == 1
    assert "Beach-02-Raw.wav: unreadable or not audio" in skips[0]
    assert "Beach-03-Raw.wav: empty" in skips[0]
    assert "Beach-04-Raw.wav: 1 channel(s)" in skips[0]
    with pytest.warns(DataWarning):  # mono mode keeps the mono file
        mono = MonoChannelDataset(config(cfg_factory, tmp_path), "train")
    assert [f.rel for f in mono.files] == ["Beach-01-Raw.wav", "Beach-04-Raw.wav"]


def test_nothing_usable_is_a_clear_error(tmp_path, cfg_factory):
    write_wav(tmp_path / "Beach-01-Raw.wav", noise(9600, 1))
    write_wav(tmp_path / "Woodland-01-Raw.wav", noise(9600, 4))
    with pytest.warns(DataWarning), pytest.raises(RuntimeError) as err:
        PairedChannelDataset(config(cfg_factory, tmp_path), "train")
    message = str(err.value)
    assert str(tmp_path) in message and "Busy Street" in message and "'Woodland': 1" in message
    with pytest.raises(FileNotFoundError, match="datasets.data_root"):
        PairedChannelDataset(config(cfg_factory, tmp_path / "missing"), "train")


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "deleted"])
def test_file_unreadable_during_training_is_redrawn_then_bounded(tmp_path, cfg_factory, corruption):
    good = write_wav(tmp_path / "Beach-01-Raw.wav", noise(9600, 4))
    bad = write_wav(tmp_path / "Beach-02-Raw.wav", noise(9600, 4, seed=1))
    cfg = config(cfg_factory, tmp_path, "datasets.fixed_length=40", "datasets.max_read_retries=30")
    ds = PairedChannelDataset(cfg, "train")
    if corruption == "garbage":
        bad.write_bytes(b"RIFF garbage")
    elif corruption == "truncated":
        bad.write_bytes(bad.read_bytes()[:3000])
    else:
        bad.unlink()
    with pytest.warns(DataWarning, match="read failed") as record:
        metas = [ds[i][1] for i in range(len(ds))]
    assert {m["path"] for m in metas} == {str(good)}
    assert ds.stats["read_failures"] > 0
    assert len([w for w in record if "read failed" in str(w.message)]) == 1  # reported once
    good.unlink()
    ds.max_retries = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="max_read_retries=3"):
            ds[0]


def test_nonfinite_segments_redrawn_and_counted(tmp_path, cfg_factory):
    write_wav(tmp_path / "Beach-01-Raw.wav", noise(9600, 4), subtype="FLOAT")
    broken = noise(9600, 4, seed=2)
    broken[:, 1] = np.nan
    write_wav(tmp_path / "Beach-02-Raw.wav", broken, subtype="FLOAT")
    ds = PairedChannelDataset(config(cfg_factory, tmp_path, "datasets.fixed_length=30"), "train")
    with pytest.warns(DataWarning, match="NaN"):
        items = [ds[i] for i in range(len(ds))]
    assert all(torch.isfinite(w).all() for w, _ in items)
    drawn_nan = sum(ds.draw(i)[0] == 1 and 1 in ds.draw(i)[1] for i in range(len(ds)))
    assert ds.stats["nonfinite_segments"] >= drawn_nan > 0
    assert any(m["path"].endswith("02-Raw.wav") for _, m in items)  # its other channels still used


def test_short_file_zero_padded_with_warning(tmp_path, cfg_factory):
    data = noise(1000, 3) + 0.5  # 1000 frames at 48 kHz = 500 samples at 24 kHz < tensor_cut
    write_wav(tmp_path / "Park.6.wav", data)
    with pytest.warns(DataWarning, match="zero-padded"):
        ds = PairedChannelDataset(config(cfg_factory, tmp_path), "train")
    wavs, meta = ds[0]
    t = ds.length
    assert wavs.shape == (2, 1, t) and meta["start"] == 0 and ds.stats["short_files"] == 1
    assert wavs[:, 0, 100:480].abs().min() > 0.1 and wavs[:, 0, 520:].abs().max() < 1e-6


def test_read_frames_selects_channels_of_the_real_wavex_span(fixtures_dir):
    for f in find_audio_files(fixtures_dir, ["Beach"]):
        expected = sf.read(str(f.path), start=100, stop=9000, dtype="float32", always_2d=True)[0]
        got = read_frames(f, 100, 9000, [f.channels - 1, 0, 3])
        assert got.dtype == np.float32 and np.array_equal(got, expected[:, [f.channels - 1, 0, 3]])


def test_validation_read_failure_is_an_error_not_a_redraw(tmp_path, cfg_factory):
    write_wav(tmp_path / "Woodland-01-Raw.wav", noise(9600, 4))
    bad = write_wav(tmp_path / "TrainStation-01-Raw.wav", noise(9600, 4))
    ds = PairedChannelDataset(config(cfg_factory, tmp_path), "val")
    first = [ds[i][1] for i in range(len(ds))]
    bad.write_bytes(b"not audio any more")
    failing = next(i for i, m in enumerate(first) if m["path"] == str(bad))
    with pytest.raises(ReadError, match="TrainStation-01-Raw.wav"):
        ds[failing]


def test_monitor_and_held_out_validation_files_are_disjoint_and_cover_each_class():
    from paired_channel_dataset import validation_files
    from utils.eigenscape_files import AudioFile

    files = [AudioFile(Path(f"/d/{c}-{i:02d}.wav"), f"{c}-{i:02d}.wav", c, 32, 48000, 48000)
             for c in ("Woodland", "Train Station") for i in (5, 1, 3, 2, 4, 6, 7, 8)]
    monitor = validation_files(files, "monitor")
    held_out = validation_files(files, "held_out")
    assert validation_files(files, "all") == files
    assert {f.rel for f in monitor}.isdisjoint({f.rel for f in held_out})
    assert len(monitor) + len(held_out) == len(files)
    # Every 4th file of each class in name order, from the first: 01 and 05.
    assert sorted(f.rel for f in monitor) == ["Train Station-01.wav", "Train Station-05.wav",
                                              "Woodland-01.wav", "Woodland-05.wav"]
    with pytest.raises(ValueError,
                       match="at least 2 files of each validation class, Woodland has 1"):
        validation_files(files[:1], "held_out")
    with pytest.raises(ValueError, match="datasets.val_files must be one of"):
        validation_files(files, "odd")
