"""codec.py: the token file round trip, its metadata, and clear errors on misuse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import codec
from model import EncodecModel


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
    audio = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.02 * rng.standard_normal(t.size)
                      for c in range(channels)], axis=1).astype(np.float32)
    sf.write(path, audio, rate, subtype="FLOAT")
    return audio


def test_round_trip_at_the_model_rate_gives_the_models_tokens_and_reconstruction(tiny, tmp_path):
    model, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.25)
    assert codec.main(["encode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "in.wav"), str(tmp_path / "out.tok")]) == 0
    codes, meta = codec.read_tokens(tmp_path / "out.tok")
    x = torch.from_numpy(audio.T.copy())[:, None]  # [channels, 1, T]
    with torch.no_grad():
        expected_codes = torch.cat([model.encode(x[c:c + 1]) for c in range(2)])
        expected_audio = torch.cat([model(x[c:c + 1]).audio for c in range(2)])[:, 0]
    assert torch.equal(codes, expected_codes)
    assert meta["channels"] == 2 and meta["n_q"] == model.n_q and meta["length"] == audio.shape[0]
    assert meta["checkpoint_sha256"] == codec.file_sha256(ckpt)

    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "out.tok"), str(tmp_path / "out.wav")]) == 0
    decoded, rate = sf.read(tmp_path / "out.wav", dtype="float32", always_2d=True)
    assert rate == 24000 and decoded.shape == audio.shape
    np.testing.assert_allclose(decoded.T, expected_audio.numpy(), atol=1e-5)


def test_other_rates_and_channel_counts_come_back_in_their_own_format(tiny, tmp_path):
    _, ckpt, _ = tiny
    audio = _write_wav(tmp_path / "in.wav", channels=3, rate=48000, seconds=0.2)
    meta = codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    assert meta["original_sample_rate"] == 48000 and meta["sample_rate"] == 24000
    assert meta["length"] == audio.shape[0] // 2 and meta["original_length"] == audio.shape[0]
    codec.decode_file(ckpt, tmp_path / "x.tok", tmp_path / "x.wav", device="cpu")
    info = sf.info(str(tmp_path / "x.wav"))
    assert (info.samplerate, info.channels, info.frames) == (48000, 3, audio.shape[0])


def test_token_file_holds_no_pickle_and_exact_metadata(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=16000, seconds=0.1)
    meta = codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    raw = (tmp_path / "x.tok").read_bytes()
    assert raw.startswith(codec.MAGIC)
    assert len(raw) == 12 + int.from_bytes(raw[8:12], "little") + 2 * meta["n_q"] * meta["frames"]
    codes, again = codec.read_tokens(tmp_path / "x.tok")
    assert again == meta and codes.shape == (1, meta["n_q"], meta["frames"])


def test_corrupt_and_truncated_token_files_are_rejected(tiny, tmp_path):
    _, ckpt, _ = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=24000, seconds=0.1)
    codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")
    raw = (tmp_path / "x.tok").read_bytes()
    cases = {"bad magic": b"RIFF" + raw[4:], "truncated": raw[:-3], "is truncated": raw[:20],
             "trailing data": raw + b"\0\0", "corrupt metadata": raw[:12] + b"]" + raw[13:]}
    for message, content in cases.items():
        (tmp_path / "bad.tok").write_bytes(content)
        with pytest.raises(codec.TokenFileError, match=message):
            codec.read_tokens(tmp_path / "bad.tok")
    assert codec.main(["decode", "--checkpoint", str(ckpt), str(tmp_path / "bad.tok"),
                       str(tmp_path / "y.wav")]) == 1


def test_decoding_with_another_checkpoint_is_refused(tiny, cfg_factory, tmp_path):
    _, ckpt, cfg = tiny
    _write_wav(tmp_path / "in.wav", channels=1, rate=24000, seconds=0.1)
    codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "x.tok", device="cpu")

    other = tmp_path / "other.pt"
    save_tiny_checkpoint(cfg, other, seed=1)
    with pytest.raises(codec.CheckpointMismatchError, match="sha256"):
        codec.decode_file(other, tmp_path / "x.tok", tmp_path / "y.wav", device="cpu")
    codec.decode_file(other, tmp_path / "x.tok", tmp_path / "y.wav", device="cpu", ignore_hash=True)

    three = tmp_path / "nq3.pt"
    save_tiny_checkpoint(cfg_factory(overrides=["model.n_q=3"]), three)
    codec.encode_file(three, tmp_path / "in.wav", tmp_path / "x3.tok", device="cpu")
    with pytest.raises(codec.CheckpointMismatchError, match="n_q=3"):
        codec.decode_file(ckpt, tmp_path / "x3.tok", tmp_path / "y.wav", device="cpu", ignore_hash=True)


def test_encoding_at_a_lower_bandwidth_keeps_the_first_codebooks(cfg_factory, tmp_path):
    # 2 codebooks of 32 entries at 75 Hz: 0.375 kbps each.
    cfg = cfg_factory(overrides=["model.target_bandwidths=[0.375,0.75,1.5]"])
    ckpt = tmp_path / "tiny.pt"
    save_tiny_checkpoint(cfg, ckpt)
    _write_wav(tmp_path / "in.wav", channels=2, rate=24000, seconds=0.1)
    full = codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "full.tok", device="cpu")
    low = codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "low.tok", device="cpu", bandwidth=0.375)
    capped = codec.encode_file(ckpt, tmp_path / "in.wav", tmp_path / "capped.tok", device="cpu", bandwidth=1.5)
    assert (full["n_q"], low["n_q"], capped["n_q"]) == (2, 1, 2)
    codes_full, _ = codec.read_tokens(tmp_path / "full.tok")
    codes_low, _ = codec.read_tokens(tmp_path / "low.tok")
    assert torch.equal(codes_low, codes_full[:, :1])
    codec.decode_file(ckpt, tmp_path / "low.tok", tmp_path / "low.wav", device="cpu")
    assert sf.info(str(tmp_path / "low.wav")).channels == 2
    assert codec.main(["encode", "--checkpoint", str(ckpt), "--bandwidth", "0.5",
                       str(tmp_path / "in.wav"), str(tmp_path / "bad.tok")]) == 1


def test_load_model_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        codec.load_model(tmp_path / "junk.pt")
