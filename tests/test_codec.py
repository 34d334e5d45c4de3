"""codec.py, coding/file_codec.py, coding/token_file.py: the token file round trip, its metadata,
and clear errors on misuse."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import codec
from coding import file_codec, shared_content, token_file
from model import EncodecModel, load_model


def save_tiny_checkpoint(cfg, path: Path, seed: int = 0) -> EncodecModel:
    """A tiny model with initialised codebooks, saved in the engine's checkpoint format."""
    torch.manual_seed(seed)
    model = EncodecModel.from_config(cfg.model)
    model.train()
    with torch.no_grad():  # one training forward runs the k-means codebook init
        model(torch.randn(4, 1, cfg.datasets.tensor_cut))
    model.eval()
    state = {"model": model.state_dict(), "discriminator": {}, "epoch": 1, "step": 1,
             "config": OmegaConf.to_container(cfg, resolve=True)}
    torch.save(state, path)
    return model


@pytest.fixture
def tiny(cfg_factory, tmp_path):
    cfg = cfg_factory()
    path = tmp_path / "tiny.pt"
    return save_tiny_checkpoint(cfg, path), path, cfg


def _write_wav(path: Path, channels: int, rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t)
                      + 0.02 * rng.standard_normal(t.size)
                      for c in range(channels)], axis=1).astype(np.float32)
    sf.write(path, audio, rate, subtype="FLOAT")
    return audio


def test_round_trip_at_the_model_rate_gives_the_models_tokens_and_reconstruction(tiny, tmp_path):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.25)
    assert codec.main(["encode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "in.wav"), str(tmp_path / "out.tok")]) == 0
    codes, meta = token_file.read_tokens(tmp_path / "out.tok")
    x = torch.from_numpy(audio.T.copy())[:, None]  # [channels, 1, T]
    with torch.no_grad():
        expected_codes = torch.cat([model.encode(x[c:c + 1]) for c in range(2)])
        expected_audio = torch.cat([model(x[c:c + 1]).audio for c in range(2)])[:, 0]
    assert torch.equal(codes, expected_codes)
    assert meta["channels"] == 2 and meta["n_q"] == model.n_q and meta["length"] == audio.shape[0]
    assert meta["checkpoint_sha256"] == file_codec.file_sha256(ckpt)

    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "out.tok"), str(tmp_path / "out.wav")]) == 0
    decoded, rate = sf.read(tmp_path / "out.wav", dtype="float32", always_2d=True)
    assert rate == 24000 and decoded.shape == audio.shape
    np.testing.assert_allclose(decoded.T, expected_audio.numpy(), atol=1e-5)


def test_other_rates_and_channel_counts_come_back_in_their_own_format(tiny, tmp_path):
    _, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=3, rate=48000, seconds=0.2)
    meta = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    assert meta["original_sample_rate"] == 48000 and meta["sample_rate"] == 24000
    assert meta["length"] == audio.shape[0] // 2 and meta["original_length"] == audio.shape[0]
    file_codec.decode_file(ckpt, tmp_path / "x.tok", tmp_path / "x.wav", device="cpu")
    info = sf.info(str(tmp_path / "x.wav"))
    assert (info.samplerate, info.channels, info.frames) == (48000, 3, audio.shape[0])


def test_token_file_holds_no_pickle_and_exact_metadata(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=16000, seconds=0.1)
    meta = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    raw = (tmp_path / "x.tok").read_bytes()
    assert raw.startswith(token_file.MAGIC)
    assert len(raw) == 12 + int.from_bytes(raw[8:12], "little") + 2 * meta["n_q"] * meta["frames"]
    codes, again = token_file.read_tokens(tmp_path / "x.tok")
    assert again == meta and codes.shape == (1, meta["n_q"], meta["frames"])


def test_corrupt_and_truncated_token_files_are_rejected(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=24000, seconds=0.1)
    file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    raw = (tmp_path / "x.tok").read_bytes()
    cases = {"bad magic": b"RIFF" + raw[4:], "truncated": raw[:-3], "is truncated": raw[:20],
             "trailing data": raw + b"\0\0", "corrupt metadata": raw[:12] + b"]" + raw[13:]}
    for message, content in cases.items():
        (tmp_path / "bad.tok").write_bytes(content)
        with pytest.raises(token_file.TokenFileError, match=message):
            token_file.read_tokens(tmp_path / "bad.tok")
    assert codec.main(["decode", "--checkpoint", str(ckpt), str(tmp_path / "bad.tok"),
                       str(tmp_path / "y.wav")]) == 1


def test_decoding_with_another_checkpoint_is_refused(tiny, cfg_factory, tmp_path):
    _, ckpt, cfg = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=24000, seconds=0.1)
    file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")

    other = tmp_path / "other.pt"
    save_tiny_checkpoint(cfg, other, seed=1)
    with pytest.raises(file_codec.CheckpointMismatchError, match="sha256"):
        file_codec.decode_file(other, tmp_path / "x.tok", tmp_path / "y.wav", device="cpu")
    file_codec.decode_file(other, tmp_path / "x.tok", tmp_path / "y.wav", device="cpu",
                           ignore_hash=True)

    three = tmp_path / "nq3.pt"
    save_tiny_checkpoint(cfg_factory(overrides=["model.n_q=3"]), three)
    file_codec.encode_file(three, tmp_path / "in.wav", tmp_path / "x3.tok", device="cpu")
    with pytest.raises(file_codec.CheckpointMismatchError, match="n_q=3"):
        file_codec.decode_file(ckpt, tmp_path / "x3.tok", tmp_path / "y.wav", device="cpu",
                               ignore_hash=True)


def test_encoding_at_a_lower_bandwidth_keeps_the_first_codebooks(cfg_factory, tmp_path):
    # 2 codebooks of 32 entries at 75 Hz: 0.375 kbps each.
    cfg = cfg_factory(overrides=["model.target_bandwidths=[0.375,0.75,1.5]"])
    ckpt = tmp_path / "tiny.pt"
    save_tiny_checkpoint(cfg, ckpt)
    _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.1)
    full = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "full.tok", device="cpu")
    low = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "low.tok", device="cpu",
                                 bandwidth=0.375)
    capped = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "capped.tok",
                                    device="cpu", bandwidth=1.5)
    assert (full["n_q"], low["n_q"], capped["n_q"]) == (2, 1, 2)
    codes_full, _ = token_file.read_tokens(tmp_path / "full.tok")
    codes_low, _ = token_file.read_tokens(tmp_path / "low.tok")
    assert torch.equal(codes_low, codes_full[:, :1])
    file_codec.decode_file(ckpt, tmp_path / "low.tok", tmp_path / "low.wav", device="cpu")
    assert sf.info(str(tmp_path / "low.wav")).channels == 2
    assert codec.main(["encode", "--checkpoint", str(ckpt), "--bandwidth", "0.5",
                       str(tmp_path / "in.wav"), str(tmp_path / "bad.tok")]) == 1


def test_load_model_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        load_model(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------------------
# Shared-content coding (--shared-content) and the token format's versions


def _common_scale(x: torch.Tensor) -> torch.Tensor:
    """`[1, 1, 1]` the common RMS of channels `x` `[N, 1, T]` (one scale for all)."""
    return EncodecModel.shared_scale(x, views=x.shape[0])[:1]


def _encode_args(ckpt: Path, *extra: str) -> list[str]:
    return ["encode", "--checkpoint", str(ckpt), "--device", "cpu", *extra]


def test_shared_content_round_trip_restores_every_channel(tiny, tmp_path):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.25)
    assert codec.main(_encode_args(ckpt, "--shared-content", str(tmp_path / "in.wav"),
                                   str(tmp_path / "s.tok"))) == 0
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "s.tok"), str(tmp_path / "s.wav")]) == 0
    decoded, rate = sf.read(tmp_path / "s.wav", dtype="float32", always_2d=True)
    assert rate == 24000 and decoded.shape == audio.shape == (6000, 4)

    # Every channel: the decoder on channel 0's codebook 1 and its own codebook 2, at the
    # one common scale.
    x = torch.from_numpy(audio.T.copy())[:, None]
    scale = _common_scale(x)
    with torch.no_grad():
        own = model.encode(x, scale=scale.expand(4, 1, 1))
        expected_codes = shared_content.encode_shared_content(model, x, reference=0).codes
        codes, meta = token_file.read_tokens(tmp_path / "s.tok")
        assert meta["mode"] == "shared_content" and meta["reference_channel"] == 0
        assert meta["scales"] == [pytest.approx(float(scale))]
        assert torch.equal(codes[:, 0], own[0, 0].expand(4, -1))
        assert torch.equal(codes, expected_codes)
        expected = torch.cat([model.decode(expected_codes[c:c + 1], scale, audio.shape[0])
                              for c in range(4)])
    np.testing.assert_allclose(decoded.T, expected[:, 0].numpy(), atol=1e-5)

    # Any rate: the channels, rate and length of the input come back.
    audio = _write_wav(tmp_path / "in48.wav", channels=4, rate=48000, seconds=0.2)
    file_codec.encode_file(ckpt, tmp_path / "in48.wav", tmp_path / "s48.tok", device="cpu",
                      shared_content_coding=True)
    file_codec.decode_file(ckpt, tmp_path / "s48.tok", tmp_path / "s48.wav", device="cpu")
    info = sf.info(str(tmp_path / "s48.wav"))
    assert (info.samplerate, info.channels, info.frames) == (48000, 4, audio.shape[0])


@pytest.mark.parametrize("n_q", [2, 3])
def test_shared_content_token_file_holds_one_codebook_1_stream_and_n_of_the_others(
        cfg_factory, tmp_path, n_q):
    ckpt = tmp_path / "tiny.pt"
    model = save_tiny_checkpoint(cfg_factory(overrides=[f"model.n_q={n_q}"]), ckpt)
    audio = _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.2)
    shared = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "s.tok", device="cpu",
                               shared_content_coding=True, reference_channel=3)
    independent = file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "i.tok",
                                         device="cpu")
    frames = shared["frames"]

    def payload(path: Path) -> np.ndarray:
        raw = path.read_bytes()
        return np.frombuffer(raw[12 + int.from_bytes(raw[8:12], "little"):], dtype="<u2")

    assert payload(tmp_path / "s.tok").size == (1 + 4 * (n_q - 1)) * frames
    assert payload(tmp_path / "i.tok").size == 4 * n_q * frames
    with torch.no_grad():
        codes = shared_content.encode_shared_content(
            model, torch.from_numpy(audio.T.copy())[:, None], reference=3).codes
    np.testing.assert_array_equal(payload(tmp_path / "s.tok")[:frames], codes[3, 0].numpy())
    np.testing.assert_array_equal(payload(tmp_path / "s.tok")[frames:],
                                  codes[:, 1:].flatten().numpy())
    assert torch.equal(token_file.read_tokens(tmp_path / "s.tok")[0], codes)
    assert (token_file.code_streams(shared) == 1 + 4 * (n_q - 1)
            and token_file.code_streams(independent) == 4 * n_q)


def test_reference_channel_option_shares_that_channels_codebook_1(tiny, tmp_path):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.25)
    assert codec.main(_encode_args(ckpt, "--shared-content", "--reference-channel", "2",
                                   str(tmp_path / "in.wav"), str(tmp_path / "s.tok"))) == 0
    codes, meta = token_file.read_tokens(tmp_path / "s.tok")
    x = torch.from_numpy(audio.T.copy())[:, None]
    scale = _common_scale(x)
    with torch.no_grad():
        own = model.encode(x, scale=scale.expand(4, 1, 1))
        assert not torch.equal(own[2, 0], own[0, 0])      # else the test could not tell
        assert meta["reference_channel"] == 2
        assert (codes[:, 0] == own[2, 0]).all()
        # The reference channel keeps all its own codes, so it decodes as on its own.
        assert torch.equal(codes[2], own[2])
    file_codec.decode_file(ckpt, tmp_path / "s.tok", tmp_path / "s.wav", device="cpu")
    decoded, _ = sf.read(tmp_path / "s.wav", dtype="float32", always_2d=True)
    with torch.no_grad():
        alone = model.decode(own[2:3], scale, audio.shape[0])[0, 0]
    np.testing.assert_allclose(decoded[:, 2], alone.numpy(), atol=1e-5)


def _write_version_1_tokens(path: Path, codes: torch.Tensor, meta: dict) -> None:
    """A token file exactly as the version-1 tool wrote it: no mode, no frame rate."""
    header = {key: meta[key] for key in token_file._REQUIRED_KEYS} | {"version": 1}
    header = json.dumps(header, sort_keys=True).encode("utf-8")
    payload = codes.numpy().astype("<u2").tobytes(order="C")
    path.write_bytes(b"PENCTOK1" + len(header).to_bytes(4, "little") + header + payload)


def test_version_1_token_files_still_decode(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=2, rate=16000, seconds=0.2)
    file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "v2.tok", device="cpu")
    codes, meta = token_file.read_tokens(tmp_path / "v2.tok")
    assert meta["version"] == 2 and meta["mode"] == "independent"
    _write_version_1_tokens(tmp_path / "v1.tok", codes, meta)
    old_codes, old_meta = token_file.read_tokens(tmp_path / "v1.tok")
    assert torch.equal(old_codes, codes) and old_meta["version"] == 1 and "mode" not in old_meta
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "v1.tok"), str(tmp_path / "v1.wav")]) == 0
    file_codec.decode_file(ckpt, tmp_path / "v2.tok", tmp_path / "v2.wav", device="cpu")
    np.testing.assert_array_equal(sf.read(tmp_path / "v1.wav")[0], sf.read(tmp_path / "v2.wav")[0])


def test_unknown_token_versions_and_modes_are_rejected(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.1)
    file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu",
                      shared_content_coding=True)
    codes, meta = token_file.read_tokens(tmp_path / "x.tok")
    side = {"bands": 4, "bits": 3, "step_db": 1.5, "block_ms": 40.0, "blocks": 3}
    cases = {"version 4": {"version": 4}, "unknown token mode": {"mode": "joint"},
             r"version=3: a version 3 file has level side information": {"version": 3},
             r"only a version 3 file has level side": {"level_side": side},
             "reference_channel": {"reference_channel": 2}, "scales": {"scales": [1.0, 1.0]}}
    for message, change in cases.items():
        header = json.dumps(meta | change).encode("utf-8")
        raw = (tmp_path / "x.tok").read_bytes()
        payload = raw[12 + int.from_bytes(raw[8:12], "little"):]
        (tmp_path / "bad.tok").write_bytes(token_file.MAGIC + len(header).to_bytes(4, "little")
                                           + header + payload)
        with pytest.raises(token_file.TokenFileError, match=message):
            token_file.read_tokens(tmp_path / "bad.tok")


@pytest.mark.parametrize("channels,flags,expected", [
    (1, ["--shared-content"],
     r"--shared-content needs a file with at least 2 channels.*without --shared-content"),
    (4, ["--shared-content", "--reference-channel", "4"],
     r"--reference-channel 4 is out of range.*0 \.\. 3"),
    (4, ["--shared-content", "--reference-channel", "-1"],
     r"--reference-channel -1 is out of range"),
    (4, ["--reference-channel", "1"], r"--reference-channel only applies to --shared-content"),
    (4, ["--content-stream", "mean"], r"--content-stream only applies to --shared-content"),
    (4, ["--content-stream", "reference"], r"--content-stream only applies to --shared-content"),
    (4, ["--shared-content", "--content-stream", "mean", "--reference-channel", "0"],
     r"--reference-channel does not apply to --content-stream mean.*drop --reference-channel"),
    (1, ["--shared-content", "--content-stream", "mean"],
     r"--shared-content needs a file with at least 2 channels"),
])
def test_bad_shared_content_options_give_one_line_errors(
        tiny, tmp_path, capsys, channels, flags, expected):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=channels, rate=24000, seconds=0.1)
    assert (codec.main(_encode_args(ckpt, *flags, str(tmp_path / "in.wav"),
                                    str(tmp_path / "x.tok"))) == 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(expected, err)
    assert not (tmp_path / "x.tok").exists()


def test_shared_content_needs_a_second_codebook_within_the_bandwidth(cfg_factory, tmp_path, capsys):
    # 0.375 kbps per codebook
    cfg = cfg_factory(overrides=["model.target_bandwidths=[0.375,0.75]"])
    ckpt = tmp_path / "tiny.pt"
    save_tiny_checkpoint(cfg, ckpt)
    _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.1)
    assert codec.main(_encode_args(ckpt, "--shared-content", "--bandwidth", "0.375",
                                   str(tmp_path / "in.wav"), str(tmp_path / "x.tok"))) == 1
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and "--bandwidth 0.375 keeps 1" in err
            and "higher --bandwidth" in err)
    assert codec.main(_encode_args(ckpt, "--shared-content", "--bandwidth", "0.75",
                                   str(tmp_path / "in.wav"), str(tmp_path / "x.tok"))) == 0


def test_encode_prints_the_bitrate_of_the_mode(tiny, tmp_path, capsys):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.5)
    codec.main(_encode_args(ckpt, "--shared-content", str(tmp_path / "in.wav"),
                            str(tmp_path / "s.tok")))
    codec.main(_encode_args(ckpt, str(tmp_path / "in.wav"), str(tmp_path / "i.tok")))
    shared, independent = capsys.readouterr().out.splitlines()
    # 32 codes (5 bits) at 75 Hz: 0.375 kbps per stream; 32-bit scales over 0.5 s.
    assert ("1.875 kbps (0.469 per channel) + scales 0.0640 kbps (independent coding: "
            "3.000 kbps (0.750 per channel) + scales 0.2560 kbps)") in shared
    assert "3.000 kbps (0.750 per channel) + scales 0.2560 kbps" in independent


# ----------------------------------------------------------------------------------------
# The mean content stream (--content-stream mean)


def test_mean_content_stream_sends_the_code_of_the_channels_mean_latent(tiny, tmp_path, capsys):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.25)
    assert codec.main(_encode_args(ckpt, "--shared-content", "--content-stream", "mean",
                                   str(tmp_path / "in.wav"), str(tmp_path / "m.tok"))) == 0
    assert "1 codebook-1 stream (mean of 4 channels) + 4 x 1 codebook(s)" in capsys.readouterr().out
    codes, meta = token_file.read_tokens(tmp_path / "m.tok")
    assert meta["content_stream"] == "mean" and "reference_channel" not in meta
    assert token_file.code_streams(meta) == 1 + 4 * (model.n_q - 1)

    x = torch.from_numpy(audio.T.copy())[:, None]
    scale = shared_content.common_scale(model, x)
    assert meta["scales"] == [pytest.approx(float(scale))]
    with torch.no_grad():
        latent = shared_content.encode_latents(model, x, scale)
        stream = shared_content.mean_content(model.quantizer, latent)
        own = model.quantizer.encode(latent)
        assert not torch.equal(stream, own[0, 0])     # else channel 0's stream would pass
        assert (codes[:, 0] == stream).all()
        assert torch.equal(codes, shared_content.encode_with_content(model.quantizer, latent,
                                                                     stream))
        expected = shared_content.decode_channels(model, codes, scale, audio.shape[0])
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "m.tok"), str(tmp_path / "m.wav")]) == 0
    decoded, _ = sf.read(tmp_path / "m.wav", dtype="float32", always_2d=True)
    np.testing.assert_allclose(decoded.T, expected[:, 0].numpy(), atol=1e-5)


def test_identical_channels_code_alike_with_the_mean_or_the_reference_stream(tiny, tmp_path):
    _, ckpt, _ = tiny
    one = _write_wav(tmp_path / "one.wav", channels=1, rate=24000, seconds=0.25)
    sf.write(tmp_path / "in.wav", np.repeat(one, 3, axis=1), 24000, subtype="FLOAT")
    for stream in ("reference", "mean"):
        file_codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / f"{stream}.tok",
                               device="cpu", shared_content_coding=True, content_stream=stream)
    reference, _ = token_file.read_tokens(tmp_path / "reference.tok")
    mean, meta = token_file.read_tokens(tmp_path / "mean.tok")
    assert meta["content_stream"] == "mean"
    assert torch.equal(mean, reference)


def test_reference_stream_files_are_unchanged_and_old_headers_read_as_reference(tiny, tmp_path):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=4, rate=24000, seconds=0.25)
    for name, flags in (("plain", []), ("named", ["--content-stream", "reference"]),
                        ("mean", ["--content-stream", "mean"])):
        assert codec.main(_encode_args(ckpt, "--shared-content", *flags, str(tmp_path / "in.wav"),
                                       str(tmp_path / f"{name}.tok"))) == 0
    # Today's usage writes the header (and file) it always did: no content_stream field.
    raw = (tmp_path / "plain.tok").read_bytes()
    assert raw == (tmp_path / "named.tok").read_bytes()
    header = json.loads(raw[12:12 + int.from_bytes(raw[8:12], "little")])
    assert "content_stream" not in header and header["reference_channel"] == 0
    codes, meta = token_file.read_tokens(tmp_path / "plain.tok")
    assert token_file.content_stream(meta) == "reference"
    with torch.no_grad():
        coded = shared_content.encode_shared_content(
            model, torch.from_numpy(audio.T.copy())[:, None], reference=0)
    assert torch.equal(codes, coded.codes)
    mean_codes, _ = token_file.read_tokens(tmp_path / "mean.tok")
    assert not torch.equal(codes, mean_codes)          # else the field would not matter
    # A header that names the stream reads the same codes as one that does not.
    payload = raw[12 + int.from_bytes(raw[8:12], "little"):]
    named = json.dumps(header | {"content_stream": "reference"}).encode("utf-8")
    (tmp_path / "explicit.tok").write_bytes(token_file.MAGIC + len(named).to_bytes(4, "little")
                                            + named + payload)
    assert torch.equal(token_file.read_tokens(tmp_path / "explicit.tok")[0], codes)
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "plain.tok"), str(tmp_path / "plain.wav")]) == 0
    decoded, _ = sf.read(tmp_path / "plain.wav", dtype="float32", always_2d=True)
    with torch.no_grad():
        expected = shared_content.decode_channels(model, coded.codes, coded.scale, meta["length"])
    np.testing.assert_allclose(decoded.T, expected[:, 0].numpy(), atol=1e-5)
