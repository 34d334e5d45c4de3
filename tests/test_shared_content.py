"""coding/shared_content.py and shared_content_comparison.py: one codebook-1 stream for all
channels, its bitrate and its comparison against independent coding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

import codec
from coding import file_codec
from coding import shared_content as sc
from coding import shared_content_comparison as comparison
from measure.metrics import mel_distance
from model import EncodecModel
from test_codec import _write_wav, save_tiny_checkpoint

T = 4800  # 0.2 s at 24 kHz: long enough for the band levels' 2048-point STFT


@pytest.fixture
def tiny(cfg_factory, tmp_path):
    cfg = cfg_factory()
    return save_tiny_checkpoint(cfg, tmp_path / "tiny.pt")


def channels_at_levels(n: int = 4, gains_db: tuple[float, ...] = (0.0, -6.0, 3.0, -12.0),
                       seed: int = 0) -> torch.Tensor:
    """`[n, 1, T]` distinct channels at distinct levels (so a per-channel scale would differ
    from the common one)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / 24000
    rows = [10 ** (gains_db[c] / 20) * (0.3 * torch.sin(2 * math.pi * (200 + 150 * c) * t)
                                        + 0.05 * torch.randn(T, generator=generator))
            for c in range(n)]
    return torch.stack(rows)[:, None]


class AgreeingContentEncoder(nn.Module):
    """An encoder whose codebook-1 code is the same for every channel, frame by frame.

    Latent of frame f: codebook-1 vector `embed[sequence[f]]` (the same for all inputs) plus
    a channel-specific part (from the frame's RMS and mean) whose norm stays below 0.4 of the
    smallest distance between codebook-1 vectors, so it never changes the nearest code. The
    model's codebooks are redrawn to fit (`with_agreeing_content`): codebook 1 distinct random
    vectors, codebook 2 points along the level direction of the channel-specific part, so
    channels at other levels get other codebook-2 codes. This is a model whose codebook 1
    agrees across channels by construction.
    """

    def __init__(self, bins: int, dim: int, hop: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        embed = torch.randn(bins, dim, generator=generator)
        self.embed, self.hop = embed, hop
        self.sequence = torch.randint(bins, (1000,), generator=generator)
        margin = 0.4 * torch.cdist(embed, embed).masked_fill(torch.eye(bins, dtype=torch.bool),
                                                             math.inf).min()
        directions = torch.randn(2, dim, generator=generator)
        self.directions = 0.5 * margin * directions / directions.norm(dim=1, keepdim=True)
        self.detail_codebook = torch.linspace(-1, 1, bins)[:, None] * self.directions[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = math.ceil(x.shape[-1] / self.hop)
        framed = nn.functional.pad(x[:, 0], (0, frames * self.hop - x.shape[-1])).view(
            x.shape[0], frames, self.hop)
        features = torch.stack([torch.tanh(framed.pow(2).mean(-1).sqrt()),
                                torch.tanh(10 * framed.mean(-1))],
                               dim=-1)       # [B, F, 2], |.| < 1
        latent = self.embed[self.sequence[:frames]][None] + features @ self.directions
        return latent.transpose(1, 2)


def with_agreeing_content(model: EncodecModel) -> EncodecModel:
    content, detail = model.quantizer.codebooks[:2]
    encoder = AgreeingContentEncoder(*content.embed.shape, model.hop_length)
    model.encoder = encoder
    with torch.no_grad():
        content.embed.copy_(encoder.embed)
        detail.embed.copy_(encoder.detail_codebook)
    return model


# ----------------------------------------------------------------------------------------
# Coding


def test_agreeing_codebook_1_makes_shared_content_coding_identical_to_independent(tiny):
    model = with_agreeing_content(tiny)
    x = channels_at_levels()
    scale = x.pow(2).mean().sqrt().reshape(1, 1, 1)          # the common RMS of all channels
    independent = model.encode(x, scale=scale.expand(4, 1, 1))
    assert (independent[:, 0] == independent[0, 0]).all()          # codebook 1 agrees ...
    assert len({tuple(row.tolist()) for row in independent[:, 1]}) > 1   # ... codebook 2 does not
    for residual in sc.RESIDUALS:
        coded = sc.encode_shared_content(model, x, reference=1, residual=residual)
        assert torch.equal(coded.codes, independent)
        decoded = sc.decode_channels(model, coded.codes, coded.scale, T)
        with torch.no_grad():
            expected = model.decode(independent, scale.expand(4, 1, 1), T)
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-7)   # scale rounding

    result = comparison.shared_content_comparison(model, x[None], reference=1)
    assert result["codebook1_agreement"] == 1.0
    for key in ("mel_distance", "si_snr", "ild_error_db", "itd_error_us"):
        assert result["shared_content"][key] == result["independent"][key]
        assert result["shared_content_own_residual"][key] == result["independent"][key]


def test_codec_files_decode_like_independent_coding_when_codebook_1_agrees(tiny, cfg_factory,
                                                                          tmp_path, monkeypatch):
    model = with_agreeing_content(tiny)
    monkeypatch.setattr(file_codec, "load_model", lambda *args, **kwargs: (model, cfg_factory()))
    x = channels_at_levels()
    sf.write(tmp_path / "in.wav", x[:, 0].T.numpy(), 24000, subtype="FLOAT")
    (tmp_path / "ckpt.pt").write_bytes(b"hashed only")
    assert codec.main(["encode", "--checkpoint", str(tmp_path / "ckpt.pt"), "--shared-content",
                       "--reference-channel", "3", str(tmp_path / "in.wav"),
                       str(tmp_path / "s.tok")]) == 0
    assert codec.main(["decode", "--checkpoint", str(tmp_path / "ckpt.pt"),
                       str(tmp_path / "s.tok"), str(tmp_path / "s.wav")]) == 0
    decoded, _ = sf.read(tmp_path / "s.wav", dtype="float32", always_2d=True)
    with torch.no_grad():
        scale = x.pow(2).mean().sqrt().expand(4, 1, 1)        # the common RMS of all channels
        independent = model.decode(model.encode(x, scale=scale), scale, T)[:, 0]
    np.testing.assert_allclose(decoded.T, independent.numpy(), atol=1e-6)


def test_sharing_a_disagreeing_codebook_1_changes_the_decode(tiny):
    # The control of the test above: with a model whose codebook 1 does not agree, sharing it
    # must show (else the comparison could not tell mono from paired checkpoints).
    x = channels_at_levels()
    result = comparison.shared_content_comparison(tiny, x[None], reference=0)
    assert result["codebook1_agreement"] < 1.0
    assert result["shared_content"]["mel_distance"] != result["independent"]["mel_distance"]
    # The reference channel keeps its own codes in every coding around it (the mean stream is
    # no channel's).
    for coding in (c for c in comparison.CODINGS if c != "shared_content_mean"):
        assert (result[coding]["mel_distance_per_channel"][0]
                == result["independent"]["mel_distance_per_channel"][0])
    # Both codings decode at the one common scale of the segment.
    scale = x.pow(2).mean().sqrt().expand(4, 1, 1)
    with torch.no_grad():
        codes = {"independent": tiny.encode(x, scale=scale),
                 "shared_content": sc.encode_shared_content(tiny, x, reference=0).codes}
        for coding, coding_codes in codes.items():
            expected = mel_distance(x, tiny.decode(coding_codes, scale, T), 24000)
            assert result[coding]["mel_distance_per_channel"] == pytest.approx(expected.tolist(),
                                                                               rel=1e-4)


def test_comparison_measures_the_codings_asked_for(tiny):
    x = channels_at_levels()[None]
    result = comparison.shared_content_comparison(tiny, x, codings=("shared_content",))
    assert ({"independent", "shared_content"} <= set(result)
            and "shared_content_own_residual" not in result)
    with pytest.raises(ValueError, match="unknown codings"):
        comparison.shared_content_comparison(tiny, x, codings=("joint",))


def test_shared_content_codes_carry_the_references_codebook_1_and_each_channels_detail(tiny):
    x = channels_at_levels()
    scale = sc.common_scale(tiny, x)
    own = tiny.encode(x, scale=scale.expand(4, 1, 1))
    assert not torch.equal(own[2, 0], own[0, 0])
    coded = sc.encode_shared_content(tiny, x, reference=2, residual="own")
    assert torch.equal(coded.content, own[2, 0])
    assert (coded.codes[:, 0] == own[2, 0]).all()
    assert torch.equal(coded.detail, own[:, 1:])
    assert torch.allclose(scale, EncodecModel.shared_scale(x, views=4)[:1])
    assert torch.allclose(scale.reshape(()), x.pow(2).mean().sqrt(), rtol=1e-5)


def test_codebook_2_coding_the_references_residual_is_never_worse_in_the_latent(cfg_factory,
                                                                                tmp_path, tiny):
    rvq = save_tiny_checkpoint(cfg_factory(overrides=["model.content_share=0"]),
                               tmp_path / "rvq.pt")
    x = channels_at_levels()
    latent = sc.encode_latents(rvq, x, sc.common_scale(rvq, x))
    closed = sc.encode_shared_content(rvq, x, reference=0, residual="reference").codes
    opened = sc.encode_shared_content(rvq, x, reference=0, residual="own").codes
    assert not torch.equal(closed, opened)
    error = [(latent - rvq.quantizer.decode(codes)).norm(dim=1) for codes in (closed, opened)]
    assert (error[0] <= error[1] + 1e-6).all() and (error[0] < error[1] - 1e-6).any()
    # A split quantizer's codebook 2 does not see codebook 1's dimensions: either residual
    # gives the same codes.
    assert tiny.quantizer.content_dims > 0
    assert torch.equal(sc.encode_shared_content(tiny, x, reference=0, residual="reference").codes,
                       sc.encode_shared_content(tiny, x, reference=0, residual="own").codes)


def test_long_inputs_are_coded_in_chunks_of_channels_with_the_same_result(tiny, monkeypatch):
    x = channels_at_levels()
    whole = sc.encode_shared_content(tiny, x, reference=1)
    decoded = sc.decode_channels(tiny, whole.codes, whole.scale, T)
    monkeypatch.setattr(sc, "MAX_SAMPLES_PER_PASS", T)        # one channel per pass
    chunked = sc.encode_shared_content(tiny, x, reference=1)
    assert torch.equal(chunked.codes, whole.codes)
    torch.testing.assert_close(sc.decode_channels(tiny, chunked.codes, chunked.scale, T), decoded)


def test_bad_reference_and_channel_counts_are_refused(tiny):
    x = channels_at_levels()
    with pytest.raises(ValueError, match="out of range for 4 channels"):
        sc.encode_shared_content(tiny, x, reference=4)
    with pytest.raises(ValueError, match="at least 2 channels"):
        sc.encode_shared_content(tiny, x[:1])
    with pytest.raises(ValueError, match="residual"):
        sc.encode_shared_content(tiny, x, residual="mine")
    with pytest.raises(ValueError, match="out of range"):
        comparison.shared_content_comparison(tiny, x[None], reference=-1)


# ----------------------------------------------------------------------------------------
# Bitrate


def test_bitrate_of_shared_content_coding_counts_one_codebook_1_stream():
    # 1024 codes (10 bits) at 75 Hz: 0.75 kbps per stream.
    shared = sc.coding_bitrate(n_q=2, bins=1024, frame_rate=75, channels=4, shared_content=True,
                               seconds=2.0)
    independent = sc.coding_bitrate(n_q=2, bins=1024, frame_rate=75, channels=4,
                                     shared_content=False, seconds=2.0)
    assert shared["streams"] == 5 and independent["streams"] == 8
    assert shared["codes_kbps_total"] == pytest.approx(3.75)
    assert shared["codes_kbps_per_channel"] == pytest.approx(0.9375)
    assert independent["codes_kbps_total"] == pytest.approx(6.0)
    assert independent["codes_kbps_per_channel"] == pytest.approx(1.5)
    # Scales: one float32 for all (0.016 kbps over 2 s) against one per channel.
    assert shared["scale_kbps_total"] == pytest.approx(0.016)
    assert independent["scale_kbps_total"] == pytest.approx(0.064)
    assert shared["kbps_per_channel"] == pytest.approx((3.75 + 0.016) / 4)
    em32 = sc.coding_bitrate(n_q=3, bins=1024, frame_rate=75, channels=32, shared_content=True)
    assert em32["streams"] == 65 and em32["codes_kbps_total"] == pytest.approx(65 * 0.75)
    assert em32["scale_kbps_total"] == 0.0


def test_comparison_reports_the_bitrates_of_its_segments(tiny):
    x = torch.stack([channels_at_levels(seed=s) for s in range(2)])      # [2, 4, 1, T]
    result = comparison.shared_content_comparison(tiny, x)
    per_stream = 5 * 75 / 1000                                          # 32 codes: 5 bits
    assert result["segments"] == 2 and result["seconds"] == pytest.approx(2 * T / 24000)
    assert result["independent"]["codes_kbps_total"] == pytest.approx(8 * per_stream)
    assert result["shared_content"]["codes_kbps_total"] == pytest.approx(5 * per_stream)
    # One common scale per segment in both codings (the same convention).
    for coding in comparison.CODINGS:
        assert result[coding]["scale_kbps_total"] == pytest.approx(2 * 32 / (2 * T / 24000) / 1000)


# ----------------------------------------------------------------------------------------
# Comparison inputs


def test_comparison_reads_tensors_files_and_loader_batches_alike(tiny, tmp_path):
    audio = _write_wav(tmp_path / "a.wav", channels=3, rate=24000, seconds=0.2, seed=1)
    x = torch.from_numpy(audio.T.copy())[None, :, None]                # [1, 3, 1, T]
    from_tensor = comparison.shared_content_comparison(tiny, x, reference=1)
    from_file = comparison.shared_content_comparison(tiny, [tmp_path / "a.wav"], reference=1)
    from_loader = comparison.shared_content_comparison(tiny, [(x, [{"path": "a.wav"}])],
                                                       reference=1)
    assert from_tensor == from_file == from_loader
    assert from_tensor["channels"] == 3 and from_tensor["independent"]["n_pairs"] == 2
    assert len(from_tensor["shared_content"]["si_snr_per_channel"]) == 3
    wrong = torch.zeros(1, 3, 2, T)
    with pytest.raises(ValueError, match=r"\[B, N, 1, T\]"):
        comparison.shared_content_comparison(tiny, wrong)
    with pytest.raises(ValueError, match="same channel count"):
        comparison.shared_content_comparison(tiny, [x, x[:, :2]])


def test_cue_errors_are_measured_against_the_reference_channel(tiny):
    # Against the reference (channel 1): channel 0 is 6 dB quieter and 4 samples late,
    # channel 2 12 dB quieter and 8 samples late.
    base = channels_at_levels(n=1)[0, 0]

    def late(samples: int, gain: float) -> torch.Tensor:
        return gain * torch.cat([torch.zeros(samples), base[:-samples]])

    x = torch.stack([late(4, 0.5), base, late(8, 0.25)])[None, :, None]
    result = comparison.shared_content_comparison(tiny, x, reference=1)
    # Predicting no difference is off by the mean |ILD| and |delay| of the pairs.
    assert result["independent"]["n_pairs"] == 2
    assert result["independent"]["ild_zero_error_db"] == pytest.approx((6.02 + 12.04) / 2, abs=0.3)
    assert result["independent"]["itd_zero_error_us"] == pytest.approx(6 / 24000 * 1e6, abs=10)


def test_identical_channels_code_alike_shared_or_independent(tiny):
    # Every channel's codebook 1 is the reference's own: sharing it changes nothing.
    x = channels_at_levels(gains_db=(0.0, 0.0, 0.0, 0.0))[:1].expand(4, 1, -1)[None]
    result = comparison.shared_content_comparison(
        tiny, x, codings=("shared_content", "shared_content_mean"))
    assert result["codebook1_agreement"] == 1.0
    for key in ("mel_distance", "si_snr", "ild_error_db"):
        assert result["shared_content"][key] == result["independent"][key], key
        assert result["shared_content_mean"][key] == result["independent"][key], key


def test_the_mean_stream_is_the_code_of_the_channels_mean_latent_and_no_one_channels(tiny):
    x = channels_at_levels()
    latent = sc.encode_latents(tiny, x, sc.common_scale(tiny, x))
    own = tiny.quantizer.encode(latent)
    stream = sc.mean_content(tiny.quantizer, latent)
    centre = latent.mean(dim=0, keepdim=True)
    nearest = torch.cdist(centre[0].T, tiny.quantizer.codebooks[0].embed).argmin(dim=1)
    assert torch.equal(stream, nearest)
    assert all(not torch.equal(stream, own[c, 0]) for c in range(4))
    result = comparison.shared_content_comparison(tiny, x[None],
                                                  codings=("shared_content_mean",))
    mean, independent = result["shared_content_mean"], result["independent"]
    assert mean["streams"] == 1 + 4 * (tiny.n_q - 1) < independent["streams"]
    assert mean["mel_distance"] != independent["mel_distance"]


def test_the_mean_stream_coding_is_one_function_for_files_and_the_comparison(tiny):
    x = channels_at_levels()
    latent = sc.encode_latents(tiny, x, sc.common_scale(tiny, x))
    stream = sc.mean_content(tiny.quantizer, latent)
    own = tiny.quantizer.encode(latent)
    coded = sc.encode_shared_content(tiny, x, reference=None)
    assert coded.reference is None and torch.equal(coded.content, stream)
    assert torch.equal(coded.codes, sc.encode_with_content(tiny.quantizer, latent, stream))
    assert not torch.equal(coded.content, own[0, 0])
    own_residual = sc.encode_shared_content(tiny, x, reference=None, residual="own").codes
    assert (own_residual[:, 0] == stream).all() and torch.equal(own_residual[:, 1:], own[:, 1:])
    # What the evaluation measures as 'shared_content_mean' is what the file codec writes.
    result = comparison.shared_content_comparison(tiny, x[None], codings=("shared_content_mean",))
    expected = mel_distance(x, sc.decode_channels(tiny, coded.codes, coded.scale, T), 24000)
    assert result["shared_content_mean"]["mel_distance_per_channel"] == pytest.approx(
        expected.tolist(), rel=1e-4)


def test_identical_channels_give_the_same_codes_with_the_mean_or_a_reference_stream(tiny):
    x = channels_at_levels()[:1].expand(4, 1, -1)
    for residual in sc.RESIDUALS:
        mean = sc.encode_shared_content(tiny, x, reference=None, residual=residual)
        for reference in (0, 3):
            assert torch.equal(mean.codes, sc.encode_shared_content(
                tiny, x, reference=reference, residual=residual).codes)


def test_equal_bitrate_coding_is_the_one_codebook_models_own_and_uses_the_bits_it_claims(
        tiny, cfg_factory, tmp_path):
    one = save_tiny_checkpoint(cfg_factory("config_mono_nq2", ["model.n_q=1"]), tmp_path / "one.pt")
    x = channels_at_levels()[None]
    result = comparison.shared_content_comparison(tiny, x, codings=("shared_content",),
                                                  equal_bitrate_model=one)
    equal = result[comparison.EQUAL_BITRATE]
    alone = comparison.shared_content_comparison(one, x, codings=())["independent"]
    assert equal == alone                                   # its decodes, its bitrate
    # One stream per channel (both models have the tiny preset's codebook size); shared
    # content sends 1 + 4 x 1 streams for 4 channels, independent coding 4 x 2.
    stream = result["independent"]["codes_kbps_per_channel"] / 2
    assert stream == pytest.approx(math.log2(tiny.quantizer.bins) * tiny.frame_rate / 1000)
    assert equal["streams"] == 4 and equal["codes_kbps_per_channel"] == pytest.approx(stream)
    shared = result["shared_content"]
    assert (shared["streams"] == 5
            and shared["codes_kbps_per_channel"] == pytest.approx(5 * stream / 4))


def test_the_shape_of_a_broadband_level_difference_is_none(tiny):
    one = channels_at_levels()[:1]
    x = torch.cat([one * 10 ** (g / 20) for g in (0.0, -6.0, 3.0, -12.0)])[None]
    independent = comparison.shared_content_comparison(tiny, x, codings=())["independent"]
    # The inputs differ by broadband gains only: 6, 3 and 12 dB, and no spectral shape.
    assert independent["ild_zero_error_db"] == pytest.approx(7.0, abs=0.01)
    assert independent["ild_shape_zero_error_db"] < 0.01
