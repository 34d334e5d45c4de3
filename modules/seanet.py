"""SEANet building blocks of EnCodec: padded (causal or not) normalised convolutions, LSTM block,
residual block, encoder and decoder.

Attribute names follow the official `encodec.modules` so that an official state dict maps one to
one onto these modules (`encoder.model.0.conv.conv.weight`, `decoder.model.1.lstm.weight_ih_l0`,
...). The only difference in keys is the weight-norm layout: we use
`torch.nn.utils.parametrizations.weight_norm` (`parametrizations.weight.original0/1`) where the
official checkpoints hold the legacy `weight_g` / `weight_v` (see `model.py` for the mapping).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

CONV_NORMS = ("none", "weight_norm", "time_group_norm")


def check_norm(norm: str, causal: bool) -> None:
    """Raise a clear error for an unknown norm or a norm that cannot be causal."""
    if norm not in CONV_NORMS:
        raise ValueError(f"norm must be one of {CONV_NORMS}, got {norm!r}.")
    if norm == "time_group_norm" and causal:
        raise ValueError("norm='time_group_norm' normalises over the whole time axis and cannot be "
                         "causal: set causal=False or use norm='weight_norm'.")


def extra_padding_for_conv1d(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """Right padding so that the last convolution window is full.

    Without it the transposed convolutions of the decoder could not rebuild every input sample
    (EnCodec's `get_extra_padding_for_conv1d`, in integer arithmetic).
    """
    frames_minus_one = -(-(length - kernel_size + padding_total) // stride)
    ideal_length = frames_minus_one * stride + kernel_size - padding_total
    return ideal_length - length


def pad1d(x: torch.Tensor, paddings: tuple[int, int], mode: str = "reflect") -> torch.Tensor:
    """`F.pad` that also reflect-pads inputs shorter than the padding.

    Reflection needs more samples than the padding, so a short input is first extended with
    zeros on the right, and those zeros are removed again after reflecting (as EnCodec does).
    """
    left, right = paddings
    if mode != "reflect":
        return F.pad(x, paddings, mode)
    length = x.shape[-1]
    max_pad = max(left, right)
    if length > max_pad:
        return F.pad(x, paddings, mode)
    extra = max_pad - length + 1
    padded = F.pad(F.pad(x, (0, extra)), paddings, mode)
    return padded[..., :padded.shape[-1] - extra]


def unpad1d(x: torch.Tensor, paddings: tuple[int, int]) -> torch.Tensor:
    """Remove `paddings` (left, right) samples from the last dimension."""
    left, right = paddings
    return x[..., left:x.shape[-1] - right]


def norm_module(out_channels: int, norm: str) -> nn.Module:
    """Normalisation applied after a convolution (EnCodec's `get_norm_module`)."""
    if norm == "time_group_norm":
        return nn.GroupNorm(1, out_channels)
    return nn.Identity()


class NormConv1d(nn.Module):
    """Conv1d with its normalisation; the weight-normed conv lives at `.conv` as in EnCodec."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, norm: str = "none"):
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation,
                         groups=groups, bias=bias)
        self.conv = weight_norm(conv) if norm == "weight_norm" else conv
        self.norm = norm_module(out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """ConvTranspose1d with its normalisation; the conv lives at `.convtr` as in EnCodec."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: str = "none"):
        super().__init__()
        convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.convtr = weight_norm(convtr) if norm == "weight_norm" else convtr
        self.norm = norm_module(out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convtr(x))


class SConv1d(nn.Module):
    """Conv1d with causal or centred padding, so that output frames = ceil(input / stride).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Kernel size.
        stride (int): Stride.
        dilation (int): Dilation.
        groups (int): Groups.
        bias (bool): Whether the convolution has a bias.
        causal (bool): Pad on the left only, so no output depends on future input.
        norm (str): 'none', 'weight_norm' or 'time_group_norm'.
        pad_mode (str): Padding mode of `F.pad` ('reflect' in EnCodec).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none", pad_mode: str = "reflect"):
        super().__init__()
        check_norm(norm, causal)
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation,
                               groups=groups, bias=bias, norm=norm)
        self.causal = causal
        self.pad_mode = pad_mode
        self.kernel_size = kernel_size
        self.stride = stride
        # Effective receptive field minus what the stride already covers.
        self.padding_total = (kernel_size - 1) * dilation - (stride - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = extra_padding_for_conv1d(x.shape[-1], self.kernel_size, self.stride,
                                         self.padding_total)
        if self.causal:
            paddings = (self.padding_total, extra)
        else:
            # The left side gets the larger half for odd totals, as in EnCodec.
            right = self.padding_total // 2
            paddings = (self.padding_total - right, right + extra)
        return self.conv(pad1d(x, paddings, self.pad_mode))


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims its fixed padding, so output length = input length x stride.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Kernel size.
        stride (int): Stride.
        causal (bool): Trim on the right (by `trim_right_ratio`) so nothing depends on the future.
        norm (str): 'none', 'weight_norm' or 'time_group_norm'.
        trim_right_ratio (float): Share of the padding trimmed on the right when causal.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none", trim_right_ratio: float = 1.0):
        super().__init__()
        check_norm(norm, causal)
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError(f"trim_right_ratio must be in [0, 1], got {trim_right_ratio}.")
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1 only makes sense with causal=True.")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, norm=norm)
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio
        padding_total = kernel_size - stride
        if causal:
            right = math.ceil(padding_total * trim_right_ratio)
        else:
            right = padding_total // 2
        self.paddings = (padding_total - right, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The extra padding added by the encoder's SConv1d is not removed here but by the final
        # trim to the input length in the model, which is the only place that knows it.
        return unpad1d(self.convtr(x), self.paddings)


class SLSTM(nn.Module):
    """LSTM over the time axis of a `[B, C, T]` tensor, with a skip connection."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        y, _ = self.lstm(x)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0)


class SEANetResnetBlock(nn.Module):
    """SEANet residual block: ELU -> conv(k, dilation) -> ELU -> conv(1), plus a shortcut.

    Args:
        dim (int): Input and output channels.
        kernel_sizes (list of int): Kernel sizes of the branch convolutions.
        dilations (list of int): Dilations of the branch convolutions.
        norm (str): Convolution normalisation.
        causal (bool): Causal convolutions.
        pad_mode (str): Padding mode.
        compress (int): Channel reduction inside the branch.
        true_skip (bool): Identity shortcut if True, else a 1x1 convolution (EnCodec: False).
    """

    def __init__(self, dim: int, kernel_sizes: tuple[int, ...] = (3, 1),
                 dilations: tuple[int, ...] = (1, 1), norm: str = "weight_norm",
                 causal: bool = False, pad_mode: str = "reflect", compress: int = 2,
                 true_skip: bool = False):
        super().__init__()
        if len(kernel_sizes) != len(dilations):
            raise ValueError("kernel_sizes and dilations must have the same length.")
        hidden = dim // compress
        block: list[nn.Module] = []
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            in_chs = dim if i == 0 else hidden
            out_chs = dim if i == len(kernel_sizes) - 1 else hidden
            block += [nn.ELU(alpha=1.0),
                      SConv1d(in_chs, out_chs, kernel_size, dilation=dilation, norm=norm,
                              causal=causal, pad_mode=pad_mode)]
        self.block = nn.Sequential(*block)
        self.shortcut: nn.Module = (nn.Identity() if true_skip else
                                    SConv1d(dim, dim, 1, norm=norm, causal=causal,
                                            pad_mode=pad_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SEANetEncoder(nn.Module):
    """SEANet encoder: waveform `[B, channels, T]` -> latent `[B, dimension, ceil(T / hop)]`.

    Args:
        channels (int): Audio channels.
        dimension (int): Latent dimension.
        n_filters (int): Base width.
        n_residual_layers (int): Residual blocks per resolution.
        ratios (list of int): Up-sampling ratios of the decoder; the encoder down-samples with
            them in reverse order.
        norm (str): Convolution normalisation.
        kernel_size (int): Kernel size of the first convolution.
        last_kernel_size (int): Kernel size of the last convolution.
        residual_kernel_size (int): Kernel size in the residual blocks.
        dilation_base (int): Dilation growth across residual blocks.
        causal (bool): Causal convolutions.
        pad_mode (str): Padding mode.
        true_skip (bool): Identity shortcut in residual blocks.
        compress (int): Channel reduction in residual blocks.
        lstm (int): LSTM layers before the last convolution (0 = none).
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: tuple[int, ...] = (8, 5, 4, 2),
                 norm: str = "weight_norm", kernel_size: int = 7, last_kernel_size: int = 7,
                 residual_kernel_size: int = 3, dilation_base: int = 2, causal: bool = False,
                 pad_mode: str = "reflect", true_skip: bool = False, compress: int = 2,
                 lstm: int = 2):
        super().__init__()
        check_norm(norm, causal)
        self.channels = channels
        self.dimension = dimension
        self.n_filters = n_filters
        self.ratios = list(reversed(ratios))
        self.n_residual_layers = n_residual_layers
        self.hop_length = _product(self.ratios)
        conv = dict(norm=norm, causal=causal, pad_mode=pad_mode)

        mult = 1
        model: list[nn.Module] = [SConv1d(channels, n_filters, kernel_size, **conv)]
        for ratio in self.ratios:
            for j in range(n_residual_layers):
                model.append(SEANetResnetBlock(
                    mult * n_filters, kernel_sizes=(residual_kernel_size, 1),
                    dilations=(dilation_base ** j, 1), compress=compress, true_skip=true_skip,
                    **conv))
            model += [nn.ELU(alpha=1.0),
                      SConv1d(mult * n_filters, mult * n_filters * 2, ratio * 2, stride=ratio,
                              **conv)]
            mult *= 2
        if lstm:
            model.append(SLSTM(mult * n_filters, num_layers=lstm))
        model += [nn.ELU(alpha=1.0),
                  SConv1d(mult * n_filters, dimension, last_kernel_size, **conv)]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """SEANet decoder: latent `[B, dimension, F]` -> waveform `[B, channels, F * hop]`.

    Args: as `SEANetEncoder`, plus
        trim_right_ratio (float): Share of the transposed-convolution padding trimmed on the
            right when causal.
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: tuple[int, ...] = (8, 5, 4, 2),
                 norm: str = "weight_norm", kernel_size: int = 7, last_kernel_size: int = 7,
                 residual_kernel_size: int = 3, dilation_base: int = 2, causal: bool = False,
                 pad_mode: str = "reflect", true_skip: bool = False, compress: int = 2,
                 lstm: int = 2, trim_right_ratio: float = 1.0):
        super().__init__()
        check_norm(norm, causal)
        self.channels = channels
        self.dimension = dimension
        self.n_filters = n_filters
        self.ratios = list(ratios)
        self.n_residual_layers = n_residual_layers
        self.hop_length = _product(self.ratios)
        conv = dict(norm=norm, causal=causal, pad_mode=pad_mode)

        mult = 2 ** len(self.ratios)
        model: list[nn.Module] = [SConv1d(dimension, mult * n_filters, kernel_size, **conv)]
        if lstm:
            model.append(SLSTM(mult * n_filters, num_layers=lstm))
        for ratio in self.ratios:
            model += [nn.ELU(alpha=1.0),
                      SConvTranspose1d(mult * n_filters, mult * n_filters // 2, ratio * 2,
                                       stride=ratio, norm=norm, causal=causal,
                                       trim_right_ratio=trim_right_ratio)]
            for j in range(n_residual_layers):
                model.append(SEANetResnetBlock(
                    mult * n_filters // 2, kernel_sizes=(residual_kernel_size, 1),
                    dilations=(dilation_base ** j, 1), compress=compress, true_skip=true_skip,
                    **conv))
            mult //= 2
        model += [nn.ELU(alpha=1.0),
                  SConv1d(n_filters, channels, last_kernel_size, **conv)]
        self.model = nn.Sequential(*model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result
