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
NAMES = ["Beach-01-Raw.wav", "BusyStreet-01-Raw.wav", "Park-01-Raw.wav",
         "PedestrianZone-01-Raw.wav", "QuietStreet-01-Raw.wav", "ShoppingCentre-01-Raw.wav",
         "TrainStation-01-Raw.wav", "Woodland-01-Raw.wav"]


def capsule_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(nearest neighbour, opposite) capsule of every capsule."""
    angle = np.degrees(np.arccos(np.clip(se.CAPSULES @ se.CAPSULES.T, -1, 1)))
    return ([(i, int(np.argsort(angle[i])[1])) for i in range(32)],
            [(i, int(np.argmax(angle[i]))) for i in range(32)])


def test_format_names_and_metadata(synth_root):
    assert sorted(p.name for p in synth_root.glob("*.wav")) == sorted(NAMES)
    for name in NAMES:
        info = sf.info(str(synth_root / name))
        assert ((info.channels, info.samplerate, info.subtype, info.frames)
                == (32, 48000, "PCM_24", 96000))
    with open(synth_root / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == SCENE_CLASSES and [r["path"] for r in rows] == NAMES
    files = find_audio_files(synth_root, SCENE_CLASSES, min_channels=2)
    assert sorted(f.scene_class for f in files) == sorted(SCENE_CLASSES)


def test_deterministic_from_seed_and_class_folders(tmp_path):
    se.generate(tmp_path / "a", files_per_class=1, seconds=0.25, seed=7)
    se.generate(tmp_path / "b", files_per_class=1, seconds=0.25, seed=7, class_folders=True,
                workers=2)
    se.generate(tmp_path / "c", files_per_class=1, seconds=0.25, seed=8)
    for scene_class, name in zip(SCENE_CLASSES, NAMES):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / scene_class / name).read_bytes()
        assert a != (tmp_path / "c" / name).read_bytes()
    files = find_audio_files(tmp_path / "b", ["Busy Street", "Train Station"])
    assert ([f.rel for f in files] == ["Busy Street/BusyStreet-01-Raw.wav",
                                       "Train Station/TrainStation-01-Raw.wav"])


def test_channels_related_but_not_identical(synth_root):
    near, far = capsule_pairs()
    for name in NAMES:
        x, sr = sf.read(str(synth_root / name), dtype="float32")
        coh = {}
        for label, pairs in (("near", near), ("far", far)):
            f, c = zip(*[coherence(x[:, i], x[:, j], fs=sr, nperseg=1024) for i, j in pairs[::5]])
            c, f = np.mean(c, axis=0), f[0]
            coh[label] = (c[(f > 50) & (f < 500)].mean(), c[(f > 1000) & (f < 4000)].mean(),
                          c[f > 6000].mean())
        low, mid, high = coh["near"]
        assert low > 0.8, (name, coh)                   # neighbours share the low-frequency content
        # capsule noise and diffuse field above 6 kHz
        assert high < 0.5 and high < low - 0.4, (name, coh)
        # farther apart, less coherent (direction matters)
        assert coh["far"][1] < mid, (name, coh)
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
    # invisible when small
    assert abs(abs(front[k100]) - 1) < 0.02 and abs(abs(back[k100]) - 1) < 0.02
    # pressure doubling in front
    assert abs(front[k8k]) > 1.7 and abs(side[k8k]) < abs(front[k8k]) - 0.3
    ka = 2 * np.pi * freqs[k100] * se.SPHERE_RADIUS / se.SPEED_OF_SOUND
    # facing capsule leads (1.5 ka)
    assert np.angle(front[k100]) == pytest.approx(1.5 * ka, rel=0.05)


def test_cli_and_no_torch(tmp_path):
    out = tmp_path / "cli"
    code = ("import sys, runpy; sys.argv = ['synth_eigenscape.py', '--out', %r, "
            "'--files-per-class', '2', "
            "'--seconds', '0.1', '--seed', '3', '--class-folders', '--workers', '1']; "
            "runpy.run_path('synth_eigenscape.py', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'the generator must not need torch'") % str(out)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert (len(list(out.glob("*/*-0[12]-Raw.wav"))) == 16
            and (out / "Beach" / "Beach-02-Raw.wav").is_file())


# ----------------------------------------------------------------------------- real material

PROCEDURAL_DIGEST = "a556b93483a587d0a7a11921cba58c7d0ee11f347374ebbcad42602bbb81aa98"
DIGEST_TAKEN_ON = ("2.4.6", "x86_64")  # numpy, machine: BLAS kernels may round otherwise elsewhere


def make_sources(folder: Path) -> Path:
    """Two usable recordings (2-channel filtered noise at 44.1 kHz, a 22.05 kHz chirp), one too
    short and one that is not audio."""
    from scipy.signal import butter, chirp, sosfilt
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    band = butter(4, [200, 8000], btype="band", fs=44100, output="sos")
    noise = sosfilt(band, rng.normal(size=3 * 44100))
    stereo = np.stack([noise, rng.normal(size=len(noise))], axis=1) * 0.1
    sf.write(str(folder / "noise.flac"), stereo, 44100)
    t = np.arange(int(1.5 * 22050)) / 22050
    sweep = 0.3 * chirp(t, 100, t[-1], 8000, method="log")
    sf.write(str(folder / "sub" / "chirp.wav"), sweep, 22050)
    sf.write(str(folder / "short.wav"), np.zeros(800), 16000)  # 0.05 s
    (folder / "broken.ogg").write_text("not audio")
    return folder


def digest(paths: list[Path]) -> str:
    import hashlib
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_procedural_output_unchanged(tmp_path):
    """Without --sources the generator writes the bytes it wrote before real material existed."""
    import platform
    if (np.__version__, platform.machine()) != DIGEST_TAKEN_ON:
        pytest.skip(f"digest taken with numpy {DIGEST_TAKEN_ON[0]} on {DIGEST_TAKEN_ON[1]}")
    paths = se.generate(tmp_path, files_per_class=1, seconds=0.25, seed=11)
    assert digest(paths + [tmp_path / "metadata.csv"]) == PROCEDURAL_DIGEST


def test_scan_sources_skips_and_errors(tmp_path):
    from utils.source_audio import scan_sources
    folder = make_sources(tmp_path / "src")
    with pytest.warns(UserWarning, match="skipped 1 file.* shorter than 0.1 s and 1 unreadable"):
        files = scan_sources(folder)
    assert [f.path.name for f in files] == ["noise.flac", "chirp.wav"]
    assert [(f.sample_rate, f.channels) for f in files] == [(44100, 2), (22050, 1)]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        scan_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable audio"):
        scan_sources(tmp_path / "empty")


def test_excerpt_channel0_resampled_looped(tmp_path):
    from utils.source_audio import SourceFile, excerpt, make_circular
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)  # 1 s, 1 kHz at 16 kHz
    sf.write(str(tmp_path / "two.wav"), np.stack([0.5 * tone, np.zeros_like(tone)], 1), 16000)
    file = SourceFile(tmp_path / "two.wav", 16000, 16000, 2)
    a = excerpt(np.random.default_rng(1), file, 3 * 48000, 48000)  # longer than the file: looped
    assert len(a) == 3 * 48000
    assert np.array_equal(a, excerpt(np.random.default_rng(1), file, 3 * 48000, 48000))
    spectrum = np.abs(np.fft.rfft(a))
    assert np.fft.rfftfreq(len(a), 1 / 48000)[np.argmax(spectrum)] == pytest.approx(1000, abs=1)
    rms = np.sqrt(np.mean(a[48000:96000] ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)  # channel 0, not the mean
    ramp = np.random.default_rng(2).normal(size=4000).cumsum()  # a loop's jump would show as a step
    loop = make_circular(ramp, 500)
    assert abs(loop[0] - loop[-1]) < 4 * np.abs(np.diff(ramp)).max() < abs(ramp[0] - ramp[-1])


def test_real_sources_deterministic_and_share(tmp_path):
    from utils.source_audio import scan_sources
    with pytest.warns(UserWarning):
        files = scan_sources(make_sources(tmp_path / "src"))
    a = se.generate(tmp_path / "a", 1, 0.25, seed=4, sources=files)
    b = se.generate(tmp_path / "b", 1, 0.25, seed=4, sources=files, workers=2)
    c = se.generate(tmp_path / "c", 1, 0.25, seed=5, sources=files)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(a, c))
    with open(tmp_path / "a" / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    names = ";".join(r["sources"] + ";" + r["beds"] for r in rows).split(";")
    assert {n for n in names if n} <= {"real:noise.flac", "real:chirp.wav"}
    # Share 0: the procedural scenes; share 0.5: both kinds.
    zero = se.generate(tmp_path / "zero", 1, 0.25, seed=4, sources=files, real_share=0.0)
    plain = se.generate(tmp_path / "plain", 1, 0.25, seed=4)
    assert digest(zero) == digest(plain)
    se.generate(tmp_path / "half", 1, 0.25, seed=4, sources=files, real_share=0.5)
    with open(tmp_path / "half" / "metadata.csv") as f:
        names = ";".join(r["sources"] + ";" + r["beds"] for r in csv.DictReader(f)).split(";")
    assert any(n.startswith("real:") for n in names) and any(n and ":" not in n for n in names)


def test_real_source_keeps_rigid_sphere_physics(tmp_path):
    """One real source from a fixed direction: the capsule facing it is louder than the opposite."""
    from utils.source_audio import scan_sources
    with pytest.warns(UserWarning):
        files = scan_sources(make_sources(tmp_path / "src"))
    n = 48000
    material = se.Material(files[:1], 1.0, np.random.default_rng(0))
    _, sig = se.real_excerpt(material, n)
    for facing in (0, 13, 20):
        u = se.CAPSULES[facing]
        opposite = int(np.argmin(se.CAPSULES @ u))
        fixed = lambda times, u=u: np.broadcast_to(u, (len(times), 3))  # noqa: E731
        scene = se.Scene(points=[se.PointSource("real", sig, fixed, -20.0)])
        blocks = []
        se.render(scene, n, np.random.default_rng(1), blocks.append)
        x = np.concatenate(blocks)
        spectrum = np.abs(np.fft.rfft(x, axis=0)) ** 2
        freqs = np.fft.rfftfreq(n, 1 / se.SAMPLE_RATE)
        # 2-6 kHz: well above ka = 1, below the capsule noise's crossover. The point opposite
        # the source is a bright spot (+1 dB), so front / back differ by ~3 dB, not more.
        level_db = 10 * np.log10(spectrum[(freqs > 2000) & (freqs < 6000)].sum(0))
        assert level_db[facing] > level_db[opposite] + 1, (facing, level_db)
        by_angle = np.argsort(se.CAPSULES @ u)  # farthest first
        assert level_db[by_angle[-8:]].mean() > level_db[by_angle[:8]].mean() + 3


def noise_db(path: Path, silent: Path) -> float:
    """Level in dB of what a file adds to the same scene rendered without a part of it."""
    x, y = sf.read(str(path))[0], sf.read(str(silent))[0]
    return float(20 * np.log10(np.std(x - y)))


def test_self_noise_offset_moves_the_noise_floor_and_nothing_else(tmp_path):
    """The offset scales the self-noise alone: the same scene (same random draws) underneath."""
    silent = se.generate(tmp_path / "silent", 2, 0.25, seed=3, self_noise_db=(-300.0, -300.0))
    plain = se.generate(tmp_path / "plain", 2, 0.25, seed=3)
    quiet = se.generate(tmp_path / "quiet", 2, 0.25, seed=3, self_noise_db=(-20.0, -20.0))
    drawn = se.generate(tmp_path / "drawn", 2, 0.25, seed=3, self_noise_db=(-40.0, 0.0))
    assert digest(drawn) == digest(se.generate(tmp_path / "again", 2, 0.25, seed=3,
                                               self_noise_db=(-40.0, 0.0)))
    offsets = []
    for s, p, q, d in zip(silent, plain, quiet, drawn):
        assert noise_db(p, s) - noise_db(q, s) == pytest.approx(20, abs=0.2), p.name
        offsets.append(noise_db(d, s) - noise_db(p, s))
    assert all(-40.2 < o < 0.2 for o in offsets) and np.std(offsets) > 3  # one draw per file
    with pytest.raises(ValueError, match="low <= high"):
        se.generate(tmp_path / "bad", 1, 0.25, seed=3, self_noise_db=(0.0, -10.0))


def test_bed_offset_moves_the_beds_and_nothing_else(tmp_path):
    """Without self-noise: the points alone, the beds at 0 dB and at -20 dB over the same points."""
    quiet = (-300.0, -300.0)
    points = se.generate(tmp_path / "points", 1, 0.25, seed=3, self_noise_db=quiet,
                         bed_db=quiet)
    beds = se.generate(tmp_path / "beds", 1, 0.25, seed=3, self_noise_db=quiet)
    lower = se.generate(tmp_path / "lower", 1, 0.25, seed=3, self_noise_db=quiet,
                        bed_db=(-20.0, -20.0))
    for o, b, q in zip(points, beds, lower):
        assert noise_db(b, o) - noise_db(q, o) == pytest.approx(20, abs=0.3), b.name
    with pytest.raises(ValueError, match="bed_db"):
        se.generate(tmp_path / "bad", 1, 0.25, seed=3, bed_db=(0.0, -10.0))


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "synth_eigenscape.py", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_sources_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, expected in (
            (["--sources", str(tmp_path / "missing")], "--sources=" + str(tmp_path / "missing")),
            (["--sources", str(tmp_path / "empty")], "no readable audio"),
            (["--real-share", "0.5"], "needs --sources"),
            (["--sources", str(tmp_path / "empty"), "--real-share", "1.5"], "--real-share=1.5"),
            (["--self-noise-db", "0", "-10"], "--self-noise-db=0.0 -10.0"),
            (["--self-noise-db", "-1", "0", "1"], "LOW HIGH"),
            (["--bed-db", "nan"], "--bed-db=nan")):
        result = run_cli(["--out", str(tmp_path / "out"), *args])
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("config error")


def test_cli_sources_warns_in_one_line(tmp_path):
    result = run_cli(["--out", str(tmp_path / "out"), "--files-per-class", "1", "--seconds", "0.1",
                      "--workers", "1", "--sources", str(make_sources(tmp_path / "src")),
                      "--real-share", "0.5"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"warning: skipped 1 file(s) under {tmp_path / 'src'} shorter "
                                     "than 0.1 s and 1 unreadable file(s)")
    assert "real material: 2 file(s)" in result.stdout
    assert len(list((tmp_path / "out").glob("*.wav"))) == 8
