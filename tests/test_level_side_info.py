"""Band-level side information: it restores what it sends and costs what it claims."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import coding.shared_content as sc
import coding.shared_content_comparison as comparison
from modules.level_side_info import (LevelSideInfo, apply_level_side, block_levels,
                                    encode_level_side)
from measure.metrics import mel_distance
from test_shared_content import channels_at_levels, tiny  # noqa: F401 (fixture)

RATE = 24000
SIDE = LevelSideInfo()          # 8 bands, 3 bits, 1.5 dB, 40 ms


def noise(channels: int = 3, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(channels, 1, int(seconds * RATE), generator=generator)


def blocks(samples: int, side: LevelSideInfo = SIDE) -> int:
    frames = samples // round(RATE * 0.01) + 1
    return math.ceil(frames / side.hops_per_block)


def test_no_gain_leaves_the_decode_as_it_is():
    x = noise()
    steps = torch.zeros(3, SIDE.bands, blocks(x.shape[-1]), dtype=torch.int8)
    torch.testing.assert_close(apply_level_side(x, steps, RATE, SIDE), x, atol=1e-5, rtol=0)


def test_it_restores_the_band_levels_a_decode_lost():
    x = noise()
    generator = torch.Generator().manual_seed(1)
    lost = torch.randint(-3, 3, (3, SIDE.bands, blocks(x.shape[-1])), generator=generator,
                         dtype=torch.int8)
    decoded = apply_level_side(x, lost, RATE, SIDE)        # band gains that change every 40 ms
    steps = encode_level_side(x, decoded, RATE, SIDE)
    restored = apply_level_side(decoded, steps, RATE, SIDE)
    before = (block_levels(decoded, RATE, SIDE) - block_levels(x, RATE, SIDE)).abs().mean()
    after = (block_levels(restored, RATE, SIDE) - block_levels(x, RATE, SIDE)).abs().mean()
    assert before > 1.0 and after < 0.25 * before


def test_gains_are_clipped_to_the_bits_sent():
    x = noise()
    quiet = 10 ** (-20 / 20) * x                           # 20 dB down in every band
    steps = encode_level_side(x, quiet, RATE, SIDE)
    assert steps.max() == 3 and steps.min() >= -4          # 3 bits: -4 .. +3 steps
    assert (steps == 3).float().mean() > 0.9
    two = LevelSideInfo(bits=2)
    assert encode_level_side(x, quiet, RATE, two).max() == 1


def test_more_bits_buy_deeper_cuts_not_larger_boosts():
    assert SIDE.step_range == (-4, 3)                     # 3 bits: symmetric either way
    assert LevelSideInfo(bits=3, max_boost_db=None).step_range == (-4, 3)
    assert LevelSideInfo(bits=4).step_range == (-12, 3)   # -18 .. +4.5 dB
    assert LevelSideInfo(bits=4, max_boost_db=None).step_range == (-8, 7)
    assert LevelSideInfo(bits=5, max_boost_db=5.0).max_boost_db == 4.5   # down to a step
    assert LevelSideInfo(bits=3, max_boost_db=100.0).step_range == (-4, 3)
    assert LevelSideInfo(bits=3, max_boost_db=0.0).step_range == (-7, 0)
    x = noise()
    for gain_db, side, expected in ((20, LevelSideInfo(bits=4), -12),    # too loud: cut
                                    (20, LevelSideInfo(bits=4, max_boost_db=None), -8),
                                    (-20, LevelSideInfo(bits=4), 3)):    # too quiet: boost
        steps = encode_level_side(x, 10 ** (gain_db / 20) * x, RATE, side)
        assert (steps == expected).float().mean() > 0.9, (gain_db, side, steps.unique())
        assert side.step_range[0] <= steps.min() and steps.max() <= side.step_range[1]


def test_a_config_without_the_range_reads_as_the_symmetric_one():
    legacy = OmegaConf.create({"bands": 4, "bits": 5, "step_db": 1.5, "block_ms": 40})
    assert LevelSideInfo.from_config(legacy, "k").step_range == (-16, 15)
    assert LevelSideInfo.from_config(legacy, "k") == LevelSideInfo(bands=4, bits=5,
                                                                    max_boost_db=22.5)
    legacy.max_boost_db = 4.5
    assert LevelSideInfo.from_config(legacy, "k").step_range == (-28, 3)


def test_the_side_information_is_the_size_its_bitrate_claims():
    x = noise(seconds=2.0)
    steps = encode_level_side(x, 0.5 * x, RATE, SIDE)
    sent_kbps = steps[0].numel() * SIDE.bits / 2.0 / 1000          # one channel's, over 2 s
    assert SIDE.kbps_per_channel == pytest.approx(8 * 3 * 25 / 1000)
    # The last block is partial: at most one block's bits above the nominal rate.
    assert SIDE.kbps_per_channel <= sent_kbps <= SIDE.kbps_per_channel + SIDE.bands * SIDE.bits / 2.0 / 1000


def test_bad_settings_are_refused():
    for bad in ({"bands": 0}, {"bits": 0}, {"step_db": 0.0}, {"block_ms": 25.0},
                {"max_boost_db": -1.5}, {"max_boost_db": math.inf}, {"max_boost_db": math.nan}):
        with pytest.raises(ValueError, match="level side information"):
            LevelSideInfo(**bad)
    with pytest.raises(ValueError, match="does not fit"):
        apply_level_side(noise(), torch.zeros(3, 8, 2, dtype=torch.int8), RATE, SIDE)


def test_the_comparison_sends_it_beside_shared_content_coding_at_its_total_bitrate(tiny):  # noqa: F811
    x = channels_at_levels()
    result = comparison.shared_content_comparison(tiny, x[None], codings=("shared_content",),
                                                  level_side=SIDE)
    shared, level = result["shared_content"], result[comparison.LEVEL_SIDE]
    assert level["side_kbps_per_channel"] == pytest.approx(0.6)
    assert level["kbps_per_channel"] == pytest.approx(shared["kbps_per_channel"] + 0.6)
    assert level["codes_kbps_per_channel"] == shared["codes_kbps_per_channel"]
    # What it measures: the shared-content decode with the side information applied.
    coded = sc.encode_shared_content(tiny, x, reference=0)
    decoded = sc.decode_channels(tiny, coded.codes, coded.scale, x.shape[-1])
    restored = apply_level_side(decoded, encode_level_side(x, decoded, RATE, SIDE), RATE, SIDE)
    assert level["mel_distance_per_channel"] == pytest.approx(
        mel_distance(x, restored, RATE).tolist(), rel=1e-4)
    assert level["mel_distance"] != pytest.approx(shared["mel_distance"], rel=1e-3)
    # Its ceiling: independent coding with the same side information, at the same side bits.
    independent, ceiling = result["independent"], result[comparison.INDEPENDENT_LEVEL]
    assert ceiling["kbps_per_channel"] == pytest.approx(independent["kbps_per_channel"] + 0.6)
    assert ceiling["codes_kbps_per_channel"] == independent["codes_kbps_per_channel"] \
        > shared["codes_kbps_per_channel"]
    own = sc.decode_channels(tiny, tiny.quantizer.encode(sc.encode_latents(tiny, x, coded.scale)),
                             coded.scale, x.shape[-1])
    own_restored = apply_level_side(own, encode_level_side(x, own, RATE, SIDE), RATE, SIDE)
    assert ceiling["mel_distance_per_channel"] == pytest.approx(
        mel_distance(x, own_restored, RATE).tolist(), rel=2e-5)
    # (an untrained decoder barely hears its codes: the two decodes differ by ~3e-4)
    assert ceiling["mel_distance_per_channel"] != pytest.approx(
        level["mel_distance_per_channel"], rel=2e-5)
    with pytest.raises(ValueError, match="keep 'shared_content'"):
        comparison.shared_content_comparison(tiny, x[None], codings=(), level_side=SIDE)


def test_evaluate_turns_it_on_with_bands_and_names_the_setting_it_refuses():
    from omegaconf import OmegaConf

    import evaluate

    def settings(**side):
        return OmegaConf.create({"shared_content": {"level_side_info": {
            "bands": 8, "bits": 3, "step_db": 1.5, "block_ms": 40, **side}}})

    assert evaluate.level_side_info(settings(bands=0)) is None
    assert evaluate.level_side_info(settings()) == SIDE
    with pytest.raises(ValueError, match="shared_content.level_side_info: .*block_ms"):
        evaluate.level_side_info(settings(block_ms=25))


def test_the_report_puts_each_coding_with_levels_beside_independent_coding_with_them():
    import evaluate

    results = [{"shared_content_all": {
        comparison.LEVEL_SIDE: {"mel_distance": 0.16, "kbps_per_channel": 1.07,
                                "side_kbps_per_channel": 0.3},
        comparison.INDEPENDENT_LEVEL: {"mel_distance": 0.15, "kbps_per_channel": 1.8,
                                       "side_kbps_per_channel": 0.3}}}, {}]
    rows = dict(evaluate.level_side_rows(lambda f: [f(r) for r in results], "shared_content_all"))
    mel = next(cells for name, cells in rows.items() if "mel distance" in name)
    kbps = next(cells for name, cells in rows.items() if name.endswith(
        "kbps per channel (independent + level side information)"))
    assert mel[0] == "0.16 (0.15)" and kbps[0] == "1.07 (1.8)"
    assert evaluate.level_side_rows(lambda f: [f(r) for r in [{}]], "shared_content_all") == []
