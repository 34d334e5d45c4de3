"""Training a codec to leave band levels to the side information (`losses.level_side_info`):
the losses score the decode after the band gains sent beside the codes, the codec encodes
with them by default, and the evaluation says when it reads the codes alone."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

import evaluate
from coding import token_file
from conftest import make_config
from modules.losses import hinge_real
from modules.level_side_info import LevelSideInfo, trained_level_side, with_level_side
from step_setup import init_codebooks, make_batch, tiny_setup
from test_codec import _write_wav, save_tiny_checkpoint
from test_level_side_file import _encode
from training.configuration import ConfigError, prepare_config
from training.step import train_step
from training.validation import measure_batch, validation_losses

RATE = 24000
LEVELS = ["losses.level_side_info.bands=4"]
SIDE = LevelSideInfo(bands=4)


def test_gains_the_side_information_restores_cost_the_decode_nothing():
    gen = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(2, 1, RATE // 2, generator=gen)
    decode = x + 0.02 * torch.randn(x.shape, generator=gen)
    played = with_level_side(x, decode, RATE, SIDE)
    # Two steps (3 dB) too loud in every band and block: the gains take both steps back.
    louder = with_level_side(x, decode * 10 ** (2 * SIDE.step_db / 20), RATE, SIDE)
    torch.testing.assert_close(louder, played, atol=1e-6, rtol=1e-5)
    # Without the side information the same error costs what it costs.
    assert (decode * 10 ** (3 / 20) - x).abs().mean() > 2 * (played - x).abs().mean()


def test_the_level_gains_pass_the_gradient_to_the_decode():
    gen = torch.Generator().manual_seed(1)
    x = 0.1 * torch.randn(1, 1, RATE // 4, generator=gen)
    decode = (x + 0.05 * torch.randn(x.shape, generator=gen)).requires_grad_()
    (with_level_side(x, decode, RATE, SIDE) - x).abs().mean().backward()
    assert decode.grad is not None and decode.grad.abs().sum() > 0


@pytest.mark.parametrize("views", [1, 2])
def test_the_step_scores_the_decode_after_the_gains_sent(views):
    overrides = [f"datasets.views={views}", "model.kmeans_buffer=0", "pairwise.start_step=0"]
    cfg, runtime, parts = tiny_setup([*overrides, *LEVELS])
    assert parts.level_side == SIDE
    wavs, metas = make_batch(cfg, seed=3, views=views)
    init_codebooks(parts, wavs)
    before = copy.deepcopy(parts)
    x = wavs.flatten(0, 1)
    result = train_step(parts, runtime, wavs, metas, step=0, adversarial=True,
                        update_disc=False, grad_clip=0.0, bins=cfg.model.bins)
    assert result.ok
    paired = views > 1
    scale = (before.raw_model.shared_scale(x, views) if paired else None)
    with torch.no_grad():
        out = before.raw_model.train()(x, scale=scale, content_views=views if paired else 1)
        played = with_level_side(x, out.audio, RATE, SIDE)
        want = before.generator_loss(x, played)
        codes_only = before.generator_loss(x, out.audio)
        # The discriminator judges the decode as played, too.
        scales = before.raw_disc.discriminators
        for name, audio in (("l_g", played), ("codes_only", out.audio)):
            hinge = sum(hinge_real(scale(audio)[0]) for scale in scales) / len(scales)
            (want if name == "l_g" else codes_only)["l_g"] = hinge
    for name in ("l_t", "l_f", "l_g"):
        got = result.scalars[f"{name}_ch1"]
        played, alone = (values[name].view(-1, views)[:, 0].mean().item()
                         for values in (want, codes_only))
        # (An untrained discriminator hardly tells the two apart: 4e-6 of its hinge.)
        assert abs(got - played) < 0.1 * abs(got - alone), name


def test_validation_scores_the_decode_after_the_gains_sent_and_measures_the_codes():
    cfg, runtime, parts = tiny_setup(["model.kmeans_buffer=0", *LEVELS])
    wavs, metas = make_batch(cfg, seed=4)
    init_codebooks(parts, wavs)
    parts.raw_model.eval()
    measured, out = measure_batch(parts.raw_model, wavs, metas, 0)
    x = wavs.flatten(0, 1)
    sums = validation_losses(parts, x, out, measured, step=0)
    want = parts.generator_loss(x, with_level_side(x, out.audio, RATE, SIDE))["l_t"]
    assert sums["l_t_ch1"] == pytest.approx(want.view(-1, 2)[:, 0].sum().item(), rel=1e-5)
    # The metrics read the codes' own decode.
    torch.testing.assert_close(measured.audio.flatten(0, 1), out.audio)


@pytest.mark.parametrize("override, named", [
    ("losses.level_side_info.block_ms=45", "multiple of 10"),
    ("losses.level_side_info.bands=40", "losses.level_side_info.bands=40"),
    ("losses.level_side_info.bits=0", "losses.level_side_info.bits"),
    ("losses.level_side_info.max_boost_db=-1.5", "losses.level_side_info.max_boost_db"),
])
def test_level_side_settings_it_cannot_send_are_one_config_error(override, named):
    overrides = ["datasets.data_root=unused", *LEVELS, override]
    with pytest.raises(ConfigError, match=named) as error:
        prepare_config(make_config("config_paired_nq2", overrides))
    assert "\n" not in str(error.value)


def test_encode_sends_the_levels_the_checkpoint_was_trained_with(cfg_factory, tmp_path):
    cfg = cfg_factory(overrides=["losses.level_side_info.bands=4",
                                 "losses.level_side_info.bits=5"])
    ckpt = tmp_path / "levels.pt"
    save_tiny_checkpoint(cfg, ckpt)
    _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=0.3)
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "trained.tok") == 0
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "none.tok", "--level-bands", "0") == 0
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "two.tok", "--level-bands", "2") == 0
    trained = token_file.read_token_file(tmp_path / "trained.tok").metadata
    assert (trained["version"], trained["level_side"]["bands"], trained["level_side"]["bits"]) \
        == (3, 4, 5)
    assert trained["level_side"]["max_boost_db"] == 4.5        # the range it was trained with
    assert token_file.read_token_file(tmp_path / "none.tok").level_steps is None
    assert token_file.read_token_file(tmp_path / "two.tok").metadata["level_side"]["bands"] == 2


def test_a_codec_trained_before_the_range_setting_is_sent_the_symmetric_range(cfg_factory,
                                                                              tmp_path):
    cfg = OmegaConf.to_container(cfg_factory(overrides=["losses.level_side_info.bands=4",
                                                        "losses.level_side_info.bits=5"]))
    del cfg["losses"]["level_side_info"]["max_boost_db"]
    ckpt = tmp_path / "older.pt"
    save_tiny_checkpoint(OmegaConf.create(cfg), ckpt)
    _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=0.3)
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "older.tok") == 0
    side = token_file.read_token_file(tmp_path / "older.tok").metadata["level_side"]
    assert side["bits"] == 5 and "max_boost_db" not in side     # -24 .. +22.5 dB, as trained


def test_encode_of_a_codec_trained_without_levels_sends_none(cfg_factory, tmp_path):
    ckpt = tmp_path / "plain.pt"
    save_tiny_checkpoint(cfg_factory(), ckpt)
    _write_wav(tmp_path / "in.wav", channels=1, rate=RATE, seconds=0.3)
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "out.tok") == 0
    assert token_file.read_token_file(tmp_path / "out.tok").metadata["version"] == 2


def test_evaluation_notes_a_codec_read_without_the_levels_it_was_trained_for(cfg_factory):
    trained_cfg = cfg_factory(overrides=LEVELS)
    assert trained_level_side(trained_cfg) == SIDE
    note = evaluate.level_side_note(trained_cfg, None)
    assert "shared_content.level_side_info.bands=4" in note
    assert evaluate.level_side_note(trained_cfg, SIDE) == ""
    assert evaluate.level_side_note(cfg_factory(), None) == ""
    old = OmegaConf.to_container(cfg_factory())
    del old["losses"]["level_side_info"]  # a checkpoint from before the setting
    old = OmegaConf.create(old)
    assert trained_level_side(old) is None
