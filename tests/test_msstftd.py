"""Multi-scale STFT discriminator: shapes per scale, config, float32 STFT. (Its gradient paths
in a training step: tests/test_training_step.py.)"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from modules.msstftd import DiscriminatorSTFT, MultiScaleSTFTDiscriminator

T = 1024


def tiny_disc(**kwargs) -> MultiScaleSTFTDiscriminator:
    args = dict(filters=4, n_ffts=[256, 128], hop_lengths=[64, 32], win_lengths=[256, 128])
    args.update(kwargs)
    return MultiScaleSTFTDiscriminator(**args)


def expected_shapes(n: int, filters: int, n_fft: int, hop: int) -> tuple[tuple, list[tuple]]:
    frames = (T - n_fft) // hop + 1  # center=False
    freqs = n_fft // 2 + 1
    strided = [freqs]
    for _ in range(3):  # three stride-2 convs on frequency, kernel 9, padding 4
        strided.append((strided[-1] - 1) // 2 + 1)
    fmaps = [(n, filters, frames, f) for f in strided] + [(n, filters, frames, strided[-1])]
    return (n, 1, frames, strided[-1]), fmaps


def test_output_shapes_per_scale():
    torch.manual_seed(0)
    disc = tiny_disc()
    logits, fmaps = disc(torch.randn(3, 1, T))
    assert len(logits) == len(fmaps) == 2
    for logit, fmap, n_fft, hop in zip(logits, fmaps, [256, 128], [64, 32]):
        logit_shape, fmap_shapes = expected_shapes(3, 4, n_fft, hop)
        assert logit.shape == logit_shape
        assert [tuple(f.shape) for f in fmap] == fmap_shapes


def test_default_is_three_paper_scales_with_weight_norm():
    disc = MultiScaleSTFTDiscriminator()
    assert [d.n_fft for d in disc.discriminators] == [1024, 2048, 512]
    assert [d.hop_length for d in disc.discriminators] == [256, 512, 128]
    first = disc.discriminators[0]
    convs = list(first.convs) + [first.conv_post]
    assert all(hasattr(conv, 'parametrizations') for conv in convs)
    assert first.convs[0].out_channels == 32 and first.conv_post.out_channels == 1
    assert [conv.dilation for conv in first.convs[1:4]] == [(1, 1), (2, 1), (4, 1)]
    assert all(conv.stride == (1, 2) for conv in first.convs[1:4])


def test_five_scale_override_from_config():
    cfg = OmegaConf.create({'filters': 4, 'channels_last': True, 'n_ffts': [256, 128, 64, 512, 32],
                            'hop_lengths': [64, 32, 16, 128, 8],
                            'win_lengths': [256, 128, 64, 512, 32]})
    disc = MultiScaleSTFTDiscriminator.from_config(cfg)
    logits, fmaps = disc(torch.randn(1, 1, T))
    assert len(logits) == len(fmaps) == 5
    assert [logit.shape[2] for logit in logits] == [(T - n) // h + 1 for n, h in
                                                    zip(cfg.n_ffts, cfg.hop_lengths)]


def test_mismatched_scale_lists_name_the_config_keys():
    cfg = OmegaConf.create({'filters': 4, 'n_ffts': [256, 128], 'hop_lengths': [64],
                            'win_lengths': [256, 128], 'channels_last': True})
    with pytest.raises(ValueError, match="discriminator.hop_lengths"):
        MultiScaleSTFTDiscriminator.from_config(cfg)


def test_channels_last_is_a_layout_not_a_different_discriminator():
    torch.manual_seed(0)
    plain = tiny_disc()
    nhwc = tiny_disc(channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, T, dtype=torch.float64)
    plain.double(), nhwc.double()
    (logits, fmaps), (logits_cl, fmaps_cl) = plain(x), nhwc(x)
    for want, got in zip([*logits, *sum(fmaps, [])], [*logits_cl, *sum(fmaps_cl, [])]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in sum(fmaps_cl, []))
    assert all(f.is_contiguous() for f in sum(fmaps, []))


def test_too_short_input_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor_cut"):
        tiny_disc()(torch.randn(1, 1, 200))


class RecordingTransform(torch.nn.Module):
    """Wraps the STFT to record the input dtype and whether autocast was active."""

    def __init__(self, transform: torch.nn.Module):
        super().__init__()
        self.transform = transform
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, torch.is_autocast_enabled('cpu')))
        return self.transform(x)


def test_stft_runs_in_float32_without_autocast_under_bf16_autocast():
    torch.manual_seed(0)
    disc = DiscriminatorSTFT(filters=4, n_fft=128, hop_length=32, win_length=128)
    disc.spec_transform = RecordingTransform(disc.spec_transform)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        assert torch.is_autocast_enabled('cpu')
        logit, _ = disc(torch.randn(2, 1, T).bfloat16())
    assert disc.spec_transform.seen == [(torch.float32, False)]
    assert logit.dtype == torch.bfloat16  # the conv stack after the STFT still uses autocast
