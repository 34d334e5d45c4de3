"""Shared-content multichannel coding: one codebook-1 stream for all the channels of a file.

The paired training mode aims to put what the channels of a microphone array share (the
content) in codebook 1 and what tells them apart in codebook 2. Where it succeeds, an
N-channel recording need not send N codebook-1 streams: one, from a reference channel or
of the channels' mean content, plus codebooks 2.. of every channel reconstruct every
channel. This module holds that coding (what `codec.py encode --shared-content` writes);
coding/shared_content_comparison.py measures what it costs in quality against independent
per-channel coding.

Shared-content coding of channels `x_1 .. x_N` (each `[1, T]`) with reference channel r
(or none):

1. one normalisation scale for all channels, their common RMS
   (`EncodecModel.shared_scale(x, views=N)`), so that the level differences between the
   channels stay in the latents (a per-channel scale would erase them and would have to be
   sent per channel);
2. latents `z_c = encoder(x_c / scale)`, and the content stream `s`: the reference's
   codebook-1 codes `q_1(z_r)` or, with no reference (`reference=None`), the codebook-1 codes
   of the channels' mean latent `q_1(mean_c z_c)` (`mean_content`: the stream a model trained
   with `pairwise.shared_content_code` learned to decode);
3. codebooks 2.. of channel c quantize what the decoder will lack: `z_c - e_1(s)`
   (`residual="reference"`, the default: analysis by synthesis, never worse in the latent than
   the alternative for two codebooks) or, as the swap test and the cross-reconstruction loss
   do, the channel's own residual `z_c - e_1(q_1(z_c))` (`residual="own"`);
4. decoding channel c: `decoder(e_1(s) + sum_k e_k(q_k(c))) * scale`, i.e. the model's
   ordinary decoder on per-channel codes whose codebook 1 is the shared stream.

When every channel's own codebook-1 codes equal the reference's, both residual choices give
exactly the codes (and the audio) of independent coding at the same scale; so does the mean
stream when the channels are identical.

Bitrate (nominal, log2(bins) bits per code): `(1 + N (n_q - 1)) x bits x frame_rate` for
the file against `N n_q x bits x frame_rate` for independent coding, plus the scale side
information (`SCALE_BITS` per scale: one per file or segment for shared-content coding).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from measure.metrics import nominal_bitrate_kbps
from model import EncodecModel
from modules.quantization import ResidualVectorQuantizer, float32_region

# A scale is one float32 number: what it costs when sent beside the codes.
SCALE_BITS = 32
# Channels go through the encoder and decoder together up to this many samples per pass:
# the activations grow with samples x filters, and a long 32-channel file must not be
# encoded in one piece (a single channel longer than this still goes alone).
MAX_SAMPLES_PER_PASS = 1 << 21
RESIDUALS = ("reference", "own")


@dataclass
class SharedContentCodes:
    """Codes of an N-channel file under shared-content coding.

    Attributes:
        codes: `[N, K, F]` long, per-channel codes ready for `EncodecModel.decode`; codebook
            1 (`codes[:, 0]`) is the same stream in every row, so it is sent once.
        scale: `[1, 1, 1]` the one normalisation scale of all channels (None when the model
            does not normalise audio).
        reference: index of the channel whose codebook 1 is shared, or None when the shared
            stream is the channels' mean content (`mean_content`), no one channel's.
    """
    codes: Tensor
    scale: Tensor | None
    reference: int | None

    @property
    def content(self) -> Tensor:
        """`[F]` the one codebook-1 stream (the reference channel's or the mean one)."""
        return self.codes[0, 0]

    @property
    def detail(self) -> Tensor:
        """`[N, K - 1, F]` codebooks 2.. of every channel."""
        return self.codes[:, 1:]


# ----------------------------------------------------------------------------------------
# Bitrate


def coding_bitrate(n_q: int, bins: int, frame_rate: float, channels: int, shared_content: bool,
                   seconds: float | None = None,
                   scales: int | None = None) -> dict[str, float | int]:
    """Nominal bitrate of coding `channels` channels with `n_q` codebooks of `bins` codes.

    Args:
        n_q (int): codebooks kept per channel (>= 2 for shared-content coding).
        bins (int): codes per codebook (log2(bins) bits per code).
        frame_rate (float): code frames per second.
        channels (int): channels coded together.
        shared_content (bool): one codebook-1 stream for all channels (else one per channel).
        seconds (float or None): duration covered by the `scales`; without it the scale side
            information is not counted (reported as 0).
        scales (int or None): scales sent over `seconds`; default 1 with shared-content
            coding (one common scale) and `channels` without (one per channel, as
            `codec.py encode` does).
    Returns:
        dict: `streams` (int, code streams sent) and the floats `codes_kbps_total`,
        `codes_kbps_per_channel`, `scale_kbps_total`, `scale_kbps_per_channel`, `kbps_total`,
        `kbps_per_channel` (codes plus scales).
    """
    if channels < 1 or n_q < 1:
        raise ValueError(f"need channels >= 1 and n_q >= 1, got channels={channels}, n_q={n_q}")
    streams = 1 + channels * (n_q - 1) if shared_content else channels * n_q
    codes_kbps = streams * nominal_bitrate_kbps(1, bins, frame_rate)
    if scales is None:
        scales = 1 if shared_content else channels
    scale_kbps = scales * SCALE_BITS / seconds / 1000 if seconds else 0.0
    return {
        "streams": streams,
        "codes_kbps_total": codes_kbps,
        "codes_kbps_per_channel": codes_kbps / channels,
        "scale_kbps_total": scale_kbps,
        "scale_kbps_per_channel": scale_kbps / channels,
        "kbps_total": codes_kbps + scale_kbps,
        "kbps_per_channel": (codes_kbps + scale_kbps) / channels,
    }


# ----------------------------------------------------------------------------------------
# Encoding and decoding


def common_scale(model: EncodecModel, audio: Tensor) -> Tensor | None:
    """`[1, 1, 1]` the common RMS of all channels of `audio` `[N, 1, T]`
    (`EncodecModel.shared_scale` over N views), or None when the model does not normalise."""
    if not model.audio_normalize:
        return None
    return EncodecModel.shared_scale(audio, views=audio.shape[0])[:1]


def _channel_chunks(channels: int, length: int) -> Iterator[slice]:
    # As many channels per pass as fit in MAX_SAMPLES_PER_PASS, at least one.
    step = max(1, MAX_SAMPLES_PER_PASS // max(1, length))
    for start in range(0, channels, step):
        yield slice(start, min(channels, start + step))


def _expand_scale(scale: Tensor | None, n: int) -> Tensor | None:
    return None if scale is None else scale.reshape(1, 1, 1).expand(n, 1, 1)


@torch.no_grad()
def encode_latents(model: EncodecModel, audio: Tensor, scale: Tensor | None) -> Tensor:
    """Encoder outputs `[N, D, F]` of channels `audio` `[N, 1, T]`, all divided by one `scale`.

    Args:
        model (EncodecModel): the codec, in eval mode.
        audio (Tensor): one file or segment, one row per channel, at the model rate.
        scale (Tensor or None): `[1, 1, 1]` (e.g. `common_scale`); None only for a model
            without audio normalisation.
    """
    if audio.dim() != 3 or audio.shape[1] != model.channels or audio.shape[-1] == 0:
        raise ValueError(f"expected channels as a batch [N, {model.channels}, T] with T > 0, "
                         f"got shape {tuple(audio.shape)}")
    latents = []
    for chunk in _channel_chunks(audio.shape[0], audio.shape[-1]):
        x = audio[chunk]
        normalized, _ = model.normalize(x, _expand_scale(scale, x.shape[0]))
        latents.append(model.encoder(normalized))
    return torch.cat(latents)


@torch.no_grad()
def encode_with_content(quantizer: ResidualVectorQuantizer, latent: Tensor,
                        content: Tensor) -> Tensor:
    """Codes `[N, n_q, F]` of latents `[N, D, F]` whose codebook 1 is `content` `[F]` for all.

    Codebooks 2.. quantize, stage by stage as `ResidualVectorQuantizer.encode` does, what
    remains of each channel's latent after the shared codebook-1 vectors: the decoder adds
    those vectors, not the channel's own, so that is what the other codebooks make up for.
    """
    codebooks = quantizer.codebooks
    with float32_region(latent):
        residual = latent.float().transpose(1, 2)                  # [N, F, D]
        channels, frames, dim = residual.shape
        first = content.reshape(1, frames).expand(channels, frames)
        residual = residual - codebooks[0].decode(first)
        codes = [first]
        for codebook in codebooks[1:]:
            indices = codebook.encode(residual.reshape(-1, dim)).view(channels, frames)
            residual = residual - codebook.decode(indices)
            codes.append(indices)
    return torch.stack(codes, dim=1)


@torch.no_grad()
def mean_content(quantizer: ResidualVectorQuantizer, latent: Tensor) -> Tensor:
    """`[F]` codebook-1 codes of the channels' mean latent (latents `[N, D, F]`): a content
    stream that is no one channel's, the stream a model trained with
    `pairwise.shared_content_code` decodes (its codebook 1 coded the views' mean content)."""
    return quantizer.encode(latent.mean(dim=0, keepdim=True))[0, 0]


def check_reference(reference: int | None, channels: int) -> None:
    """Raise ValueError unless shared-content coding of `channels` channels around channel
    `reference` (None: around their mean content) is possible."""
    if channels < 2:
        raise ValueError(f"shared-content coding needs at least 2 channels, got {channels}")
    if reference is not None and not 0 <= reference < channels:
        raise ValueError(f"reference channel {reference} is out of range for {channels} "
                         f"channels (0 .. {channels - 1})")


@torch.no_grad()
def share_content(quantizer: ResidualVectorQuantizer, latent: Tensor, reference: int | None,
                  residual: str = "reference", own: Tensor | None = None) -> Tensor:
    """Per-channel codes `[N, n_q, F]` of latents `[N, D, F]` with one codebook-1 stream for
    all channels.

    Args:
        quantizer (ResidualVectorQuantizer): the model's quantizer.
        latent (Tensor): the channels' latents at one scale (`encode_latents`).
        reference (int or None): channel whose codebook-1 codes are the stream; None for the
            codebook-1 codes of the channels' mean latent (`mean_content`).
        residual (str): what codebooks 2.. of each channel quantize: 'reference' (the
            channel's latent minus the shared codebook-1 vectors, what the decoder will hold)
            or 'own' (minus its own codebook-1 vectors, as in independent coding).
        own (Tensor or None): `quantizer.encode(latent)` when the caller already has it.
    Returns:
        Tensor: long codes whose codebook 1 is the shared stream in every row.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    check_reference(reference, latent.shape[0])
    if own is None and (reference is not None or residual == "own"):
        own = quantizer.encode(latent)
    content = mean_content(quantizer, latent) if reference is None else own[reference, 0]
    if residual == "reference":
        return encode_with_content(quantizer, latent, content)
    shared = own.clone()
    shared[:, 0] = content
    return shared


@torch.no_grad()
def encode_shared_content(model: EncodecModel, audio: Tensor, reference: int | None = 0,
                          residual: str = "reference") -> SharedContentCodes:
    """Shared-content codes of the channels `audio` `[N, 1, T]` (model rate).

    Args:
        model (EncodecModel): the codec, in eval mode.
        audio (Tensor): one file or segment, one row per channel.
        reference (int or None): channel whose codebook-1 stream is sent for all; None sends
            the codebook-1 stream of the channels' mean latent instead (`mean_content`).
        residual (str): what codebooks 2.. of each channel quantize (see `share_content`).
    Returns:
        SharedContentCodes at one common scale (`common_scale`).
    """
    if residual not in RESIDUALS:  # before the encoder runs, not after
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    check_reference(reference, audio.shape[0])
    scale = common_scale(model, audio)
    latent = encode_latents(model, audio, scale)
    codes = share_content(model.quantizer, latent, reference, residual)
    return SharedContentCodes(codes=codes, scale=scale, reference=reference)


@torch.no_grad()
def decode_channels(model: EncodecModel, codes: Tensor, scale: Tensor | None,
                    length: int | None = None) -> Tensor:
    """Waveforms `[N, 1, length]` of per-channel codes `[N, K, F]`, all restored with one
    `scale` `[1, 1, 1]` (or None)."""
    frames = codes.shape[-1] * model.hop_length
    decoded = []
    for chunk in _channel_chunks(codes.shape[0], frames):
        part = codes[chunk]
        decoded.append(model.decode(part, _expand_scale(scale, part.shape[0]), length))
    return torch.cat(decoded)
