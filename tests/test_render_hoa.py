"""scripts/render_hoa_em32.py: real N3D / ACN spherical harmonics, max-rE weights, and beams
that point where the capsules are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import special

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import render_hoa_em32 as rh  # noqa: E402
from utils.eigenscape import CAPSULES, unit_vectors  # noqa: E402


def quadrature(n_polar: int = 8, n_azimuth: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre in cos(polar) x uniform azimuth: exact for products of order-3 harmonics."""
    cos, w = special.roots_legendre(n_polar)
    azimuth = 2 * np.pi * np.arange(n_azimuth) / n_azimuth
    c, a = np.meshgrid(cos, azimuth, indexing="ij")
    s = np.sqrt(1 - c ** 2)
    dirs = np.stack([s * np.cos(a), s * np.sin(a), c], axis=-1).reshape(-1, 3)
    weights = np.repeat(w, n_azimuth) * 2 * np.pi / n_azimuth  # sums to 4 pi
    return dirs, weights


def test_real_sh_n3d_orthonormal_and_acn():
    dirs, weights = quadrature()
    y = rh.real_sh(3, dirs)
    gram = (y * weights[:, None]).T @ y
    assert np.allclose(gram, 4 * np.pi * np.eye(16), atol=1e-10)
    x, yy, z = dirs.T
    r3, r15, r35_8 = np.sqrt(3), np.sqrt(15), np.sqrt(35 / 8)
    expected = {0: np.ones_like(x), 1: r3 * yy, 2: r3 * z, 3: r3 * x, 4: r15 * x * yy,
                6: np.sqrt(5) / 2 * (3 * z ** 2 - 1), 8: r15 / 2 * (x ** 2 - yy ** 2),
                9: r35_8 * yy * (3 * x ** 2 - yy ** 2), 12: np.sqrt(7) / 2 * z * (5 * z ** 2 - 3),
                15: r35_8 * x * (x ** 2 - 3 * yy ** 2)}
    for acn, values in expected.items():  # ACN order, no Condon-Shortley phase (ambiX / N3D)
        assert np.allclose(y[:, acn], values, atol=1e-10), acn


def test_max_re_weights():
    g = rh.max_re_weights(3)
    assert g == pytest.approx([1.0, 0.86114, 0.61233, 0.30475], abs=1e-5)
    theta_e = 2.4068 / (3 + 1.51)  # rad; = 137.9 deg / (N + 1.51)
    approximate = [special.eval_legendre(n, np.cos(theta_e)) for n in range(4)]
    assert g == pytest.approx(approximate, abs=2e-3)
    assert abs(special.eval_legendre(4, g[1])) < 1e-12  # x_E is a root of P_{N+1}


def test_plane_wave_loudest_in_nearest_beam():
    beams = rh.beam_matrix(3, CAPSULES)
    rng = np.random.default_rng(0)
    d = rng.normal(size=(300, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    out = rh.real_sh(3, d) @ beams.T  # [300, 32]: every beam's gain to each plane wave
    assert np.array_equal(np.argmax(out, axis=1), np.argmax(d @ CAPSULES.T, axis=1))
    assert np.allclose(np.diag(rh.real_sh(3, CAPSULES) @ beams.T), 1.0)  # unit gain on axis


def encoded_noise(direction: np.ndarray, seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    """Noise as a plane wave from `direction` in 3rd-order N3D / ACN [T, 16], plus an omni floor."""
    rng = np.random.default_rng(3)
    t = int(seconds * rate)
    hoa = rng.normal(size=(t, 1)) * rh.real_sh(3, direction[None])  # [T, 16]
    hoa[:, 0] += 0.05 * rng.normal(size=t)
    return 0.1 * hoa


def test_cli_halves_and_single_file(tmp_path):
    direction = unit_vectors(60.0, 100.0)
    hoa = encoded_noise(direction)
    (tmp_path / "hoa").mkdir()
    sf.write(str(tmp_path / "hoa" / "rec_01-08ch.wav"), hoa[:, :8], 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "hoa" / "rec_09-16ch.wav"), hoa[:-10, 8:], 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "whole.wav"), hoa, 16000, subtype="FLOAT")
    script = str(ROOT / "scripts" / "render_hoa_em32.py")
    for args, written in ((["--hoa-dir", str(tmp_path / "hoa")], tmp_path / "a" / "rec-em32.wav"),
                          (["--hoa-file", str(tmp_path / "whole.wav"), "--scene-class", "beach"],
                           tmp_path / "b" / "Beach" / "whole-em32.wav")):
        out = written.parents[0] if "--hoa-dir" in args else written.parents[1]
        result = subprocess.run([sys.executable, script, *args, "--out", str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "capsule level spread" in result.stdout
        x, rate = sf.read(str(written))
        assert x.shape[1] == 32 and rate == 16000
        assert len(x) == (len(hoa) - 10 if "--hoa-dir" in args else len(hoa))
        level = 10 * np.log10((x ** 2).mean(0))
        nearest = np.argmax(CAPSULES @ direction)
        assert np.argmax(level) == nearest
        assert level[nearest] > level[np.argmin(CAPSULES @ direction)] + 10


def test_cli_errors(tmp_path):
    script = str(ROOT / "scripts" / "render_hoa_em32.py")
    (tmp_path / "hoa").mkdir()
    sf.write(str(tmp_path / "hoa" / "lonely_01-08ch.wav"), np.zeros((100, 8)), 16000)
    sf.write(str(tmp_path / "eight.wav"), np.zeros((100, 8)), 16000)
    for args, expected in ((["--hoa-dir", str(tmp_path / "missing")], "HOA folder not found"),
                           (["--hoa-dir", str(tmp_path / "hoa")], "half without its partner"),
                           (["--hoa-file", str(tmp_path / "eight.wav")], "8 channels, need 16")):
        result = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "out")],
                                capture_output=True, text=True)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
