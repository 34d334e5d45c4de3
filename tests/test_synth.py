"""synth_eigenscape: format, determinism, and channels that are related but not identical."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import coherence

import synth_eigenscape as se
from utils.eigenscape import SCENE_CLASSES
from utils.eigenscape_files import find_audio_files

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Beach-01-Raw.wav", "BusyStreet-01-Raw.wav", "Park-01-Raw.wav", "PedestrianZone-01-Raw.wav",
         "QuietStreet-01-Raw.wav", "ShoppingCentre-01-Raw.wav", "TrainStation-01-Raw.wav", "Woodland-01-Raw.wav"]


def capsule_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(nearest neighbour, opposite) capsule of every capsule."""
    angle = np.degrees(np.arccos(np.clip(se.CAPSULES @ se.CAPSULES.T, -1, 1)))
    return ([(i, int(np.argsort(angle[i])[1])) for i in range(32)],
            [(i, int(np.argmax(angle[i]))) for i in range(32)])


def test_format_names_and_metadata(synth_root):
    assert sorted(p.name for p in synth_root.glob("*.wav")) == sorted(NAMES)
    for name in NAMES:
        info = sf.info(str(synth_root / name))
        assert (info.channels, info.samplerate, info.subtype, info.frames) == (32, 48000, "PCM_24", 96000)
    with open(synth_root / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == SCENE_CLASSES and [r["path"] for r in rows] == NAMES
    files = find_audio_files(synth_root, SCENE_CLASSES, min_channels=2)
    assert sorted(f.scene_class for f in files) == sorted(SCENE_CLASSES)


def test_deterministic_from_seed_and_class_folders(tmp_path):
    se.generate(tmp_path / "a", files_per_class=1, seconds=0.25, seed=7)
    se.generate(tmp_path / "b", files_per_class=1, seconds=0.25, seed=7, class_folders=True, workers=2)
    se.generate(tmp_path / "c", files_per_class=1, seconds=0.25, seed=8)
    for scene_class, name in zip(SCENE_CLASSES, NAMES):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / scene_class / name).read_bytes()
        assert a != (tmp_path / "c" / name).read_bytes()
    files = find_audio_files(tmp_path / "b", ["Busy Street", "Train Station"])
    assert [f.rel for f in files] == ["Busy Street/BusyStreet-01-Raw.wav", "Train Station/TrainStation-01-Raw.wav"]


def test_channels_related_but_not_identical(synth_root):
    near, far = capsule_pairs()
    for name in NAMES:
        x, sr = sf.read(str(synth_root / name), dtype="float32")
        coh = {}
        for label, pairs in (("near", near), ("far", far)):
            f, c = zip(*[coherence(x[:, i], x[:, j], fs=sr, nperseg=1024) for i, j in pairs[::5]])
            c, f = np.mean(c, axis=0), f[0]
            coh[label] = (c[(f > 50) & (f < 500)].mean(), c[(f > 1000) & (f < 4000)].mean(), c[f > 6000].mean())
        low, mid, high = coh["near"]
        assert low > 0.8, (name, coh)                   # neighbours share the low-frequency content
        assert high < 0.5 and high < low - 0.4, (name, coh)  # capsule noise and diffuse field above 6 kHz
        assert coh["far"][1] < mid, (name, coh)         # farther apart, less coherent (direction matters)
        assert coh["far"][0] < low, (name, coh)
        rms_db = 10 * np.log10((x ** 2).mean(0))
        assert rms_db.std() > 0.1, name                 # direction-dependent levels, not copies
        spectrum = np.abs(np.fft.rfft(x[:, 0])) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / sr)
        assert spectrum[freqs < 1000].sum() / spectrum.sum() > 0.6, name  # low-frequency heavy


def test_rigid_sphere_response():
    table = se.sphere_response_table()
    freqs = np.fft.rfftfreq(se.NFFT, 1 / se.SAMPLE_RATE)
    k100, k8k = np.searchsorted(freqs, 100), np.searchsorted(freqs, 8000)
    front, side, back = table[:, -1], table[:, se.COS_GRID // 2], table[:, 0]
    assert abs(abs(front[k100]) - 1) < 0.02 and abs(abs(back[k100]) - 1) < 0.02  # invisible when small
    assert abs(front[k8k]) > 1.7 and abs(side[k8k]) < abs(front[k8k]) - 0.3      # pressure doubling in front
    ka = 2 * np.pi * freqs[k100] * se.SPHERE_RADIUS / se.SPEED_OF_SOUND
    assert np.angle(front[k100]) == pytest.approx(1.5 * ka, rel=0.05)  # facing capsule leads (1.5 ka)


def test_cli_and_no_torch(tmp_path):
    out = tmp_path / "cli"
    code = ("import sys, runpy; sys.argv = ['synth_eigenscape.py', '--out', %r, '--files-per-class', '2', "
            "'--seconds', '0.1', '--seed', '3', '--class-folders', '--workers', '1']; "
            "runpy.run_path('synth_eigenscape.py', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'the generator must not need torch'") % str(out)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert len(list(out.glob("*/*-0[12]-Raw.wav"))) == 16 and (out / "Beach" / "Beach-02-Raw.wav").is_file()
