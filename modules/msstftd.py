"""Multi-scale STFT discriminator (MS-STFTD) of EnCodec.

Each scale looks at the complex STFT of the waveform (real and imaginary parts as two
channels per audio channel) with a small 2D conv stack: dilations grow along time, strides
shrink the frequency axis. The layer layout follows the EnCodec paper and the official
audiocraft discriminator; the scales come from the config so the paper's 5-scale setting is
one override away.
"""
from __future__ import annotations

import typing as tp

import torch
import torchaudio
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

LogitsType = torch.Tensor
FeatureMapType = list[torch.Tensor]
DiscriminatorOutput = tuple[list[LogitsType], list[FeatureMapType]]


def get_2d_padding(kernel_size: tuple[int, int],
                   dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """'Same' padding of a 2D conv with odd kernel sizes."""
    return (((kernel_size[0] - 1) * dilation[0]) // 2,
            ((kernel_size[1] - 1) * dilation[1]) // 2)


def norm_conv2d(in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)) -> nn.Module:
    """Weight-normalised 2D conv with 'same' padding."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                     padding=get_2d_padding(kernel_size, dilation))
    return weight_norm(conv)


class DiscriminatorSTFT(nn.Module):
    """STFT sub-discriminator at one time-frequency resolution.

    Args:
        filters (int): Number of filters of every conv layer (capped by `max_filters`).
        in_channels (int): Number of audio channels.
        out_channels (int): Number of output channels of the final conv (logit maps).
        n_fft (int): FFT size of the STFT.
        hop_length (int): Hop of the STFT.
        win_length (int): Window length of the STFT (Hann), at most `n_fft`.
        max_filters (int): Upper bound on the number of filters per layer.
        filters_scale (int): Growth of the number of filters per dilated layer.
        kernel_size (tuple of int): Kernel (time, frequency) of the conv layers.
        dilations (list of int): Time dilations of the strided conv layers.
        stride (tuple of int): Stride (time, frequency) of the dilated conv layers.
        negative_slope (float): Slope of the LeakyReLU activations.
        channels_last (bool): Keep weights and feature maps channels-last (NHWC). The same
            values; on a CPU the convolutions of the full config run ~1.5x faster (oneDNN
            reorders NCHW maps otherwise), and tensor-core convolutions prefer it on a GPU.
    """

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1,
                 n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024,
                 max_filters: int = 1024, filters_scale: int = 1,
                 kernel_size: tuple[int, int] = (3, 9), dilations: tp.Sequence[int] = (1, 2, 4),
                 stride: tuple[int, int] = (1, 2), negative_slope: float = 0.2,
                 channels_last: bool = False):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.in_channels = in_channels
        # center=False as in the official discriminator: frames only cover real signal.
        self.spec_transform = torchaudio.transforms.Spectrogram(
            n_fft=n_fft, hop_length=hop_length, win_length=win_length, window_fn=torch.hann_window,
            normalized=True, center=False, power=None)
        # In place: the conv output is not needed once activated (a conv's backward needs its
        # input, and LeakyReLU's can use its output), so each layer keeps one map, not two.
        self.activation = nn.LeakyReLU(negative_slope, inplace=True)

        self.convs = nn.ModuleList([norm_conv2d(2 * in_channels, filters, kernel_size)])
        in_chs = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out_chs = min((filters_scale ** (i + 1)) * filters, max_filters)
            self.convs.append(norm_conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                          dilation=(dilation, 1)))
            in_chs = out_chs
        square = (kernel_size[0], kernel_size[0])
        out_chs = min((filters_scale ** (len(dilations) + 1)) * filters, max_filters)
        self.convs.append(norm_conv2d(in_chs, out_chs, square))
        self.conv_post = norm_conv2d(out_chs, out_channels, square)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """Complex STFT of `x [N, C, T]` as real channels `[N, 2C, frames, freqs]`, in float32
        (or in float64 for float64 audio)."""
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"discriminator expects audio [N, {self.in_channels}, T], "
                             f"got {tuple(x.shape)}")
        if x.shape[-1] < self.n_fft:
            raise ValueError(f"audio of {x.shape[-1]} samples is shorter than the discriminator "
                             f"STFT size {self.n_fft}: lower discriminator.n_ffts / win_lengths "
                             f"or raise datasets.tensor_cut")
        # Under autocast the STFT would run in half precision, which is inaccurate and not
        # supported for every size; the conv stack after it may use autocast again.
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.spec_transform(
                x.to(torch.promote_types(x.dtype, torch.float32)))  # [N, C, freqs, frames]
        z = torch.cat([z.real, z.imag], dim=1)
        return z.transpose(2, 3)  # time first so that dilations act on time

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the logit map `[N, out_channels, frames', freqs']` and the feature maps."""
        z = self.spectrogram(x).contiguous(memory_format=self.memory_format)
        fmap = []
        for conv in self.convs:
            z = self.activation(conv(z))
            fmap.append(z)
        return self.conv_post(z), fmap


class MultiScaleSTFTDiscriminator(nn.Module):
    """Multi-scale STFT discriminator: one `DiscriminatorSTFT` per (n_fft, hop, window).

    Args:
        filters (int): Number of filters of every sub-discriminator layer.
        in_channels (int): Number of audio channels.
        out_channels (int): Number of logit channels per scale.
        n_ffts (list of int): FFT size per scale.
        hop_lengths (list of int): STFT hop per scale.
        win_lengths (list of int): STFT window length per scale.
        **kwargs: Passed on to every `DiscriminatorSTFT` (e.g. `channels_last`).
    """

    def __init__(self, filters: int = 32, in_channels: int = 1, out_channels: int = 1,
                 n_ffts: tp.Sequence[int] = (1024, 2048, 512),
                 hop_lengths: tp.Sequence[int] = (256, 512, 128),
                 win_lengths: tp.Sequence[int] = (1024, 2048, 512), **kwargs: tp.Any):
        super().__init__()
        check_scales(list(n_ffts), list(hop_lengths), list(win_lengths))
        self.discriminators = nn.ModuleList([
            DiscriminatorSTFT(filters, in_channels=in_channels, out_channels=out_channels,
                              n_fft=n_fft, hop_length=hop, win_length=win, **kwargs)
            for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths)])

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        """Return (logits, fmaps) for `x [N, C, T]`: one logit map and one list of feature
        maps per scale, in the order of the configured scales."""
        logits, fmaps = [], []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps

    @classmethod
    def from_config(cls, disc_cfg: tp.Any, in_channels: int = 1) -> "MultiScaleSTFTDiscriminator":
        """Build from the `discriminator` config group (filters, n_ffts, hop_lengths,
        win_lengths, channels_last)."""
        return cls(filters=int(disc_cfg.filters), in_channels=in_channels,
                   channels_last=bool(disc_cfg.channels_last),
                   n_ffts=[int(n) for n in disc_cfg.n_ffts],
                   hop_lengths=[int(h) for h in disc_cfg.hop_lengths],
                   win_lengths=[int(w) for w in disc_cfg.win_lengths])


def check_scales(n_ffts: list[int], hop_lengths: list[int], win_lengths: list[int]) -> None:
    """Raise a config error unless the per-scale STFT lists describe valid, matching scales."""
    if not n_ffts or not (len(n_ffts) == len(hop_lengths) == len(win_lengths)):
        raise ValueError(
            "discriminator.n_ffts, discriminator.hop_lengths and discriminator.win_lengths must "
            f"be non-empty lists of equal length (one entry per scale); got {len(n_ffts)}, "
            f"{len(hop_lengths)} and {len(win_lengths)} entries")
    for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths):
        if hop <= 0 or win <= 0 or win > n_fft:
            raise ValueError(
                f"invalid discriminator scale n_fft={n_fft}, hop_length={hop}, "
                f"win_length={win}: need hop_length > 0 and 0 < win_length <= n_fft "
                "(discriminator.hop_lengths / win_lengths / n_ffts)")
