"""scripts/level_readout.py: the fresh twin-shaped head it trains reads a level difference
that the content carries, and nothing from content that carries none."""
from __future__ import annotations

import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import level_readout  # noqa: E402


def pairs_with_levels(carried: bool, n: int = 256, dim: int = 8, frames: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randn(n, 2, 4, generator=gen) * 2.0  # per view, 4 bands, dB
    content = torch.randn(n, 2, dim, frames, generator=gen)
    if carried:  # each view's content holds its own band levels on 4 of its dimensions
        content[:, :, :4] += levels[..., None]
    return content, levels[:, 0] - levels[:, 1]


def test_a_fresh_head_reads_a_carried_level_difference_on_held_out_pairs_and_no_other():
    train = torch.arange(256) < 128
    content, target = pairs_with_levels(carried=True)
    assert level_readout.fresh_head_error(content, target, train, steps=600) < 0.3
    content, target = pairs_with_levels(carried=False)
    assert level_readout.fresh_head_error(content, target, train, steps=600) > 0.9
