"""scripts/anchor_check.py: one line beside the official EnCodec decodes, or nothing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT
from measure.metrics import log_mel_l1
from test_codec import save_tiny_checkpoint

sys.path.insert(0, str(ROOT / "scripts"))
import anchor_check  # noqa: E402


def anchor_set(folder, seed: int = 0):
    rng = np.random.default_rng(seed)
    clip = (0.1 * rng.standard_normal(12_000)).astype(np.float32)
    folder.mkdir()
    sf.write(folder / "clip.wav", clip, 24000)
    for k, name in enumerate(anchor_check.OFFICIAL.values()):
        noisy = clip + (0.05 / (k + 1)) * rng.standard_normal(clip.shape).astype(np.float32)
        sf.write(folder / name, noisy, 24000, subtype="FLOAT")
    return clip


def test_log_mel_l1_is_zero_for_identical_signals_and_grows_with_noise():
    x = torch.randn(1, 12_000)
    assert log_mel_l1(x, x).item() == 0.0
    loud, quiet = (x + scale * torch.randn_like(x) for scale in (0.5, 0.05))
    assert log_mel_l1(x, loud) > log_mel_l1(x, quiet)


def test_one_line_with_the_checkpoint_and_every_official_decode(cfg_factory, tmp_path):
    save_tiny_checkpoint(cfg_factory(), tmp_path / "tiny.pt")
    anchor_set(tmp_path / "anchor")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "anchor_check.py"),
                             "--checkpoint", str(tmp_path / "tiny.pt"),
                             "--anchor", str(tmp_path / "anchor")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anchor clip (clip.wav, 0.50 s): tiny.pt")
    assert all(f"official {rate} kbps" in lines[0] for rate in ("1.5", "3.0", "6.0"))
    assert "seed system" not in lines[0]  # not in this folder


def test_the_official_scores_are_measured_not_copied(tmp_path):
    clip = anchor_set(tmp_path / "anchor")
    decode = anchor_check.read_mono(tmp_path / "anchor" / anchor_check.OFFICIAL["6.0"])
    mel, snr = anchor_check.scores(torch.from_numpy(clip), decode)
    assert mel == pytest.approx(log_mel_l1(torch.from_numpy(clip)[None], decode[None]).item())
    assert snr == pytest.approx(15.6, abs=0.5)  # noise at 0.05 / 3 against 0.1: 15.6 dB


def test_without_an_anchor_folder_it_prints_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("ENCODEC_ANCHOR", raising=False)
    monkeypatch.setattr(anchor_check, "ROOT", tmp_path / "repo")
    assert anchor_check.anchor_folder(str(tmp_path / "nowhere")) is None
    anchor_set(tmp_path / "env")
    monkeypatch.setenv("ENCODEC_ANCHOR", str(tmp_path / "env"))
    assert anchor_check.anchor_folder(None) == tmp_path / "env"
