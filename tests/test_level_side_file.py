"""Level side information in token files (version 3): `codec.py encode --level-bands N` sends
each channel's band levels beside its codes, `decode` applies them; the file costs what its
bitrate claims, and a file without them is still version 2."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import soundfile as sf
import torch

import codec
from coding import file_codec, token_file
from modules.level_side_info import LevelSideInfo, apply_level_side, block_levels
from test_codec import _write_wav, tiny  # noqa: F401 (fixture)
from test_token_file import split

RATE = 24000


def _encode(ckpt, wav, tok, *flags: str) -> int:
    return codec.main(["encode", "--checkpoint", str(ckpt), "--device", "cpu", *flags,
                       str(wav), str(tok)])


def _decode(ckpt, tok, wav) -> np.ndarray:
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu", str(tok),
                       str(wav)]) == 0
    return sf.read(wav, dtype="float32", always_2d=True)[0].T


@pytest.mark.parametrize("flags", [[], ["--shared-content"],
                                   ["--shared-content", "--content-stream", "mean"]])
def test_decode_applies_the_band_levels_the_file_sends(tiny, tmp_path, flags):  # noqa: F811
    _, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=3, rate=RATE, seconds=0.5)
    # 6 bits of 1.5 dB, symmetric: -48 .. +46.5 dB, room for an untrained decoder's level errors.
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "plain.tok", *flags) == 0
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "level.tok", *flags, "--level-bands",
                   "4", "--level-bits", "6", "--level-max-boost-db", "46.5") == 0
    plain = token_file.read_token_file(tmp_path / "plain.tok")
    level = token_file.read_token_file(tmp_path / "level.tok")
    assert plain.level_steps is None and plain.metadata["version"] == 2
    assert level.metadata["version"] == 3
    assert torch.equal(level.codes, plain.codes)       # the same codes, and levels beside them
    assert "max_boost_db" not in level.metadata["level_side"]   # symmetric: as before the key
    side = LevelSideInfo(bands=4, bits=6, max_boost_db=None)
    assert level.level_steps.shape == (3, 4, level.metadata["level_side"]["blocks"])

    without = torch.from_numpy(_decode(ckpt, tmp_path / "plain.tok", tmp_path / "plain.wav"))
    with_levels = torch.from_numpy(_decode(ckpt, tmp_path / "level.tok", tmp_path / "level.wav"))
    expected = apply_level_side(without[:, None], level.level_steps, RATE, side)[:, 0]
    torch.testing.assert_close(with_levels, expected, atol=1e-5, rtol=0)
    x = torch.from_numpy(audio.T.copy())[:, None]
    error = {name: (block_levels(wav[:, None], RATE, side) - block_levels(x, RATE, side))
             .abs().mean().item() for name, wav in (("without", without), ("with", with_levels))}
    assert error["without"] > 3 and error["with"] < 0.3 * error["without"], error


def test_the_side_information_costs_the_bits_it_claims(tiny, tmp_path):  # noqa: F811
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=1.0)
    _encode(ckpt, tmp_path / "in.wav", tmp_path / "plain.tok")
    _encode(ckpt, tmp_path / "in.wav", tmp_path / "level.tok", "--level-bands", "5")
    (_, plain), (header, level) = split(tmp_path / "plain.tok"), split(tmp_path / "level.tok")
    side = header["level_side"]
    assert side == {"bands": 5, "bits": 3, "step_db": 1.5, "block_ms": 40.0,
                    "blocks": math.ceil((RATE // 240 + 1) / 4)}
    assert level[:len(plain)] == plain                  # codes first, as in version 2
    sent_bits = 8 * (len(level) - len(plain))
    assert sent_bits == 8 * math.ceil(2 * 5 * side["blocks"] * 3 / 8)
    # 1 s of 2 channels at 5 bands x 3 bits / 40 ms; the last block is partial.
    nominal = 2 * LevelSideInfo(bands=5).kbps_per_channel * 1000
    assert nominal <= sent_bits <= nominal + 2 * 5 * 3 + 8


def test_another_rate_decodes_with_the_levels_applied_at_the_model_rate(tiny, tmp_path):  # noqa: F811
    _, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=2, rate=48000, seconds=0.3)
    _encode(ckpt, tmp_path / "in.wav", tmp_path / "level.tok", "--level-bands", "2")
    meta = token_file.read_tokens(tmp_path / "level.tok")[1]
    assert meta["level_side"]["blocks"] == math.ceil((meta["length"] // 240 + 1) / 4)
    decoded = _decode(ckpt, tmp_path / "level.tok", tmp_path / "out.wav")
    assert decoded.shape == audio.T.shape and np.isfinite(decoded).all()


@pytest.mark.parametrize("max_boost_db", [None, 4.5, 0.0])
def test_packing_round_trips_every_step_value_of_the_range(tmp_path, max_boost_db):
    for bits in (1, 3, 5, 8):
        side = LevelSideInfo(bands=2, bits=bits, max_boost_db=max_boost_db)
        lowest, highest = side.step_range
        values = torch.arange(lowest, highest + 1)                  # every value, in turn
        assert len(values) == 2 ** bits
        steps = values.repeat(66)[:66].reshape(3, 2, 11).to(torch.int16)
        metadata = {"channels": 3, "level_side": {
            "bands": 2, "blocks": 11, "bits": bits, "step_db": 1.5, "block_ms": 40.0,
            "max_boost_db": side.max_boost_db}}
        packed = token_file._pack_steps(steps, side)
        assert len(packed) == token_file.level_side_bytes(metadata) == math.ceil(66 * bits / 8)
        assert torch.equal(token_file._unpack_steps(packed, metadata), steps)
    side = LevelSideInfo(bits=3, max_boost_db=max_boost_db)
    for outside in (side.step_range[0] - 1, side.step_range[1] + 1):
        with pytest.raises(ValueError, match="the 3-bit range"):
            token_file._pack_steps(torch.tensor([outside]), side)


def test_a_range_that_leans_to_cuts_is_written_and_read_back(tiny, tmp_path):  # noqa: F811
    _, ckpt, _ = tiny
    # A 200 Hz tone: nothing in the upper band, where the decode has what the codec adds, so
    # the levels want cuts deeper than the symmetric range's -12 dB.
    t = np.arange(RATE // 2) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 200 * t)[:, None] * np.array([[1.0, 0.5]])
    sf.write(tmp_path / "in.wav", tone.astype(np.float32), RATE, subtype="FLOAT")
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "plain.tok") == 0
    _decode(ckpt, tmp_path / "plain.tok", tmp_path / "plain.wav")
    written = {}
    for name, flags in (("cuts", []), ("symmetric", ["--level-max-boost-db", "10.5"])):
        assert _encode(ckpt, tmp_path / "in.wav", tmp_path / f"{name}.tok", "--level-bands", "2",
                       "--level-bits", "4", *flags) == 0
        written[name] = token_file.read_token_file(tmp_path / f"{name}.tok")
    assert written["cuts"].metadata["level_side"]["max_boost_db"] == 4.5
    assert "max_boost_db" not in written["symmetric"].metadata["level_side"]
    for name, (lowest, highest) in (("cuts", (-12, 3)), ("symmetric", (-8, 7))):
        steps = written[name].level_steps
        assert steps.min() == lowest and steps.max() <= highest, (name, steps.unique())
    # Decoding applies the steps read back, whichever range they came from.
    side = token_file.level_side_of(written["cuts"].metadata)
    decoded = torch.from_numpy(_decode(ckpt, tmp_path / "cuts.tok", tmp_path / "cuts.wav"))
    plain = torch.from_numpy(sf.read(tmp_path / "plain.wav", dtype="float32",
                                     always_2d=True)[0].T.copy())
    expected = apply_level_side(plain[:, None], written["cuts"].level_steps, RATE, side)[:, 0]
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flags,message", [
    (["--level-bits", "4"], r"config error: --level-bits=4: only applies with --level-bands"),
    (["--level-max-boost-db", "3"], r"config error: --level-max-boost-db=3.0: only applies"),
    (["--level-bands", "4", "--level-max-boost-db", "-1"],
     r"config error: --level-max-boost-db=-1.0: out of range"),
    (["--level-bands", "-1"], r"config error: --level-bands=-1: out of range"),
    (["--level-bands", "65"], r"config error: --level-bands=65: out of range"),
    (["--level-bands", "4", "--level-bits", "9"], r"config error: --level-bits=9: out of range"),
    (["--level-bands", "4", "--level-step-db", "0"], r"config error: --level-step-db=0.0"),
    (["--level-bands", "4", "--level-block-ms", "25"],
     r"config error: --level-block-ms=25.0: .*a multiple of 10"),
])
def test_flag_mistakes_are_one_config_error_line(tiny, tmp_path, capsys, flags, message):  # noqa: F811
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=0.1)
    with pytest.raises(SystemExit) as stop:
        _encode(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", *flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "x.tok").exists()


def test_more_bands_than_the_model_rate_can_hold_name_the_flag(tiny, tmp_path, capsys):  # noqa: F811
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=0.1)
    assert _encode(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", "--level-bands", "40") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --level-bands 40: ") and "contain no STFT bin" in err, err
    assert not (tmp_path / "x.tok").exists()


def test_encode_prints_the_side_information_bitrate(tiny, tmp_path, capsys):  # noqa: F811
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=4, rate=RATE, seconds=0.2)
    _encode(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", "--shared-content", "--level-bands", "4")
    out = capsys.readouterr().out
    assert "+ level side information 1.200 kbps (0.300 per channel: 4 bands, 3 bits every 40 ms, " \
        "-6 .. +4.5 dB)" in out, out


def test_the_file_holds_the_steps_its_encoder_finds(tiny, tmp_path):  # noqa: F811
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=2, rate=RATE, seconds=0.3)
    metadata = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok",
                                      level_side=LevelSideInfo(bands=3))
    tokens = token_file.read_token_file(tmp_path / "x.tok")
    assert tokens.metadata == metadata
    steps = file_codec.encode_level_steps(model, torch.from_numpy(audio.T.copy()), tokens.codes,
                                          metadata)
    assert torch.equal(steps, tokens.level_steps)
