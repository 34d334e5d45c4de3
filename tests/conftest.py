"""Shared fixtures: Hydra configs with the tiny preset and a small synthetic EigenScape set."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "eigenscape"
sys.path.insert(0, str(ROOT))


def make_config(name: str = "config_paired_nq2", overrides: list[str] | None = None,
                tiny: bool = True) -> DictConfig:
    """Compose a training config as the entry points would (tiny preset by default)."""
    overrides = list(overrides or [])
    if tiny:
        overrides = ["+preset=tiny", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def cfg_factory():
    return make_config


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real EigenScape fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small EigenScape-shaped set: 8 classes x 1 file x 2 s, 32 channels, 48 kHz."""
    import synth_eigenscape

    out = tmp_path_factory.mktemp("synth")
    synth_eigenscape.generate(out, files_per_class=1, seconds=2.0, seed=0)
    return out


@pytest.fixture
def float64():
    """Build and run in float64 (the quantizer stays float32), so that two ways of computing
    the same step agree to ~1e-12 and any larger difference is a difference in the maths."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
