"""scripts/level_gain_direction.py: the gains it reports are the unclipped ones a decode wants,
and each range is scored with its own clipping."""
from __future__ import annotations

import sys

import numpy as np
import soundfile as sf
import torch

from conftest import ROOT
from test_codec import tiny  # noqa: F401 (fixture)

sys.path.insert(0, str(ROOT / "scripts"))
import level_gain_direction  # noqa: E402

RATE = 24000


def test_a_silent_band_wants_cuts_beyond_every_range_and_deeper_cuts_score_better(tiny, tmp_path):  # noqa: F811
    _, ckpt, _ = tiny
    # A 200 Hz tone: its upper band is silent at the input, not in an untrained decode.
    t = np.arange(2 * RATE) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 200 * t)[:, None] * np.array([[1.0, 0.5]])
    sf.write(tmp_path / "tone.wav", tone.astype(np.float32), RATE, subtype="FLOAT")
    ranges = [level_gain_direction.parse_range(r) for r in ("4:sym", "4:4.5")]
    result = level_gain_direction.measure(str(ckpt), [str(tmp_path / "tone.wav")], bands=2,
                                          count=2, seconds=1.0, ranges=ranges)
    upper = result["wanted"].view(2, 2, 2, -1)[:, :, 1]      # [segment, channel, block]
    assert upper.median() < -18, upper                         # beyond -18 dB: unclipped
    assert result["mel"]["4:4.5"] < result["mel"]["4:sym"] < result["mel"]["codes alone"]


def test_segments_spread_over_the_file(tmp_path):
    sf.write(tmp_path / "ramp.wav", np.arange(10 * 100, dtype=np.float32)[:, None] / 1e4, 100,
             subtype="FLOAT")
    segments = level_gain_direction.segments_of(str(tmp_path / "ramp.wav"), 100, 3, 1.0)
    starts = [round(float(s[0, 0, 0]) * 1e4) for s in segments]
    assert starts == [0, 450, 900] and all(s.shape == (1, 1, 100) for s in segments)
