"""Shared-content multichannel coding: one codebook-1 stream for all the channels of a file.

The paired training mode aims to put what the channels of a microphone array share (the
content) in codebook 1 and what tells them apart in codebook 2. Where it succeeds, an
N-channel recording need not send N codebook-1 streams: one, from a reference channel, plus
codebooks 2.. of every channel reconstruct every channel. This module holds that coding and
the measurement of what it costs in quality against independent per-channel coding.

Shared-content coding of channels `x_1 .. x_N` (each `[1, T]`) with reference channel r:

1. one normalisation scale for all channels, their common RMS
   (`EncodecModel.shared_scale(x, views=N)`), so that the level differences between the
   channels stay in the latents (a per-channel scale would erase them and would have to be
   sent per channel);
2. latents `z_c = encoder(x_c / scale)`, and the reference's codebook-1 codes `q_1(z_r)`;
3. codebooks 2.. of channel c quantize what the decoder will lack: `z_c - e_1(q_1(z_r))`
   (`residual="reference"`, the default: analysis by synthesis, never worse in the latent than
   the alternative for two codebooks) or, as the swap test and the cross-reconstruction loss
   do, the channel's own residual `z_c - e_1(q_1(z_c))` (`residual="own"`);
4. decoding channel c: `decoder(e_1(q_1(z_r)) + sum_k e_k(q_k(c))) * scale`, i.e. the model's
   ordinary decoder on per-channel codes whose codebook 1 is the reference's.

When every channel's own codebook-1 codes equal the reference's, both residual choices give
exactly the codes (and the audio) of independent coding at the same scale.

Bitrate (nominal, log2(bins) bits per code): `(1 + N (n_q - 1)) x bits x frame_rate` for
the file against `N n_q x bits x frame_rate` for independent coding, plus the scale side
information (`SCALE_BITS` per scale: one per file or segment for shared-content coding).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from measure.metrics import mel_distance, nominal_bitrate_kbps, si_snr
from model import EncodecModel
from modules.quantization import ResidualVectorQuantizer, float32_region
from modules.spatial_cues import band_levels, delay_error, gcc_phat_delay, ild_fidelity

# A scale is one float32 number: what it costs when sent beside the codes.
SCALE_BITS = 32
# Channels go through the encoder and decoder together up to this many samples per pass:
# the activations grow with samples x filters, and a long 32-channel file must not be
# encoded in one piece (a single channel longer than this still goes alone).
MAX_SAMPLES_PER_PASS = 1 << 21
RESIDUALS = ("reference", "own")
CODINGS = ("independent", "shared_content", "shared_content_own_residual")


@dataclass
class SharedContentCodes:
    """Codes of an N-channel file under shared-content coding.

    Attributes:
        codes: `[N, K, F]` long, per-channel codes ready for `EncodecModel.decode`; codebook
            1 (`codes[:, 0]`) is the reference's in every row, so it is sent once.
        scale: `[1, 1, 1]` the one normalisation scale of all channels (None when the model
            does not normalise audio).
        reference: index of the channel whose codebook 1 is shared.
    """
    codes: Tensor
    scale: Tensor | None
    reference: int

    @property
    def content(self) -> Tensor:
        """`[F]` the one codebook-1 stream (the reference channel's)."""
        return self.codes[self.reference, 0]

    @property
    def detail(self) -> Tensor:
        """`[N, K - 1, F]` codebooks 2.. of every channel."""
        return self.codes[:, 1:]


# ----------------------------------------------------------------------------------------
# Bitrate


def coding_bitrate(n_q: int, bins: int, frame_rate: float, channels: int, shared_content: bool,
                   seconds: float | None = None, scales: int | None = None) -> dict[str, float | int]:
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
def encode_with_content(quantizer: ResidualVectorQuantizer, latent: Tensor, content: Tensor) -> Tensor:
    """Codes `[N, n_q, F]` of latents `[N, D, F]` whose codebook 1 is `content` `[F]` for all.

    Codebooks 2.. quantize, stage by stage as `ResidualVectorQuantizer.encode` does, what
    remains of each channel's latent after the shared codebook-1 vectors: the decoder adds
    the reference's vectors, so that is what the other codebooks have to make up for.
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


def with_reference_content(codes: Tensor, reference: int) -> Tensor:
    """Per-channel codes `[N, K, F]` with codebook 1 replaced by the reference channel's (the
    other codebooks untouched: `residual="own"`)."""
    shared = codes.clone()
    shared[:, 0] = codes[reference, 0]
    return shared


def check_reference(reference: int, channels: int) -> None:
    """Raise ValueError unless shared-content coding of `channels` channels around channel
    `reference` is possible."""
    if channels < 2:
        raise ValueError(f"shared-content coding needs at least 2 channels, got {channels}")
    if not 0 <= reference < channels:
        raise ValueError(f"reference channel {reference} is out of range for {channels} "
                         f"channels (0 .. {channels - 1})")


@torch.no_grad()
def encode_shared_content(model: EncodecModel, audio: Tensor, reference: int = 0,
                          residual: str = "reference") -> SharedContentCodes:
    """Shared-content codes of the channels `audio` `[N, 1, T]` (model rate).

    Args:
        model (EncodecModel): the codec, in eval mode.
        audio (Tensor): one file or segment, one row per channel.
        reference (int): channel whose codebook-1 stream is sent for all.
        residual (str): what codebooks 2.. of each channel quantize: 'reference' (the
            channel's latent minus the reference's codebook-1 vectors, what the decoder will
            hold) or 'own' (minus its own codebook-1 vectors, as in independent coding).
    Returns:
        SharedContentCodes at one common scale (`common_scale`).
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    check_reference(reference, audio.shape[0])
    scale = common_scale(model, audio)
    latent = encode_latents(model, audio, scale)
    codes = model.quantizer.encode(latent)
    if residual == "reference":
        codes = encode_with_content(model.quantizer, latent, codes[reference, 0])
    else:
        codes = with_reference_content(codes, reference)
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


# ----------------------------------------------------------------------------------------
# Quality comparison


def read_channels(path: str | Path, sample_rate: int) -> Tensor:
    """All channels of an audio file as `[N, 1, T]` float32 at `sample_rate`."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)   # [T, N]
    if audio.shape[0] == 0:
        raise ValueError(f"{path} holds no samples")
    channels = torch.from_numpy(audio.T.copy())
    if rate != sample_rate:
        channels = torchaudio.functional.resample(channels, rate, sample_rate)
    return channels[:, None]


def _items(wavs: Any, sample_rate: int, model_rate: int) -> Iterator[Tensor]:
    """Each segment of `wavs` as `[N, 1, T]` at the model rate (see
    `shared_content_comparison` for what `wavs` may be)."""
    if isinstance(wavs, (str, Path)):
        yield read_channels(wavs, model_rate)
    elif isinstance(wavs, Tensor):
        if wavs.dim() != 4 or wavs.shape[2] != 1:
            raise ValueError(f"expected segments [B, N, 1, T] (N channels of each), got shape "
                             f"{tuple(wavs.shape)}")
        if sample_rate != model_rate:
            wavs = torchaudio.functional.resample(wavs.float(), sample_rate, model_rate)
        yield from wavs
    elif isinstance(wavs, (tuple, list)) and len(wavs) == 2 and isinstance(wavs[0], Tensor) \
            and not isinstance(wavs[1], Tensor):
        yield from _items(wavs[0], sample_rate, model_rate)     # a loader's (wavs, metas)
    elif isinstance(wavs, Iterable):
        for element in wavs:
            yield from _items(element, sample_rate, model_rate)
    else:
        raise TypeError(f"wavs must be a tensor [B, N, 1, T], audio file paths or an iterable of "
                        f"batches, got {type(wavs).__name__}")


def _pairs(channels: int, reference: int) -> Tensor:
    """The channels paired with the reference: all the others, in order."""
    return torch.tensor([c for c in range(channels) if c != reference], dtype=torch.long)


def _content_matches(codes: Tensor, reference: int) -> Tensor:
    """`[N - 1, F]` bool: where each other channel's own codebook-1 code is the reference's."""
    content = codes[:, 0]
    return content[_pairs(codes.shape[0], reference).to(codes.device)] == content[reference]


def _pair_delays(wav: Tensor, reference: int, sample_rate: int) -> Tensor:
    """`[N - 1]` GCC-PHAT delays (seconds, below 1.5 kHz) of each other channel of `wav`
    `[N, 1, T]` against the reference."""
    others = wav[_pairs(wav.shape[0], reference).to(wav.device)]
    anchor = wav[reference:reference + 1].expand_as(others)
    return gcc_phat_delay(anchor, others, sample_rate)


def _pair_rows(levels: Tensor, reference: int) -> tuple[Tensor, Tensor]:
    """Band levels `[B, N, bands]` -> the pairs (reference, c) for every other channel c, as
    two `[B * (N - 1), bands]` tensors (segment-major, as the delays are gathered)."""
    others = levels[:, _pairs(levels.shape[1], reference)]
    anchor = levels[:, reference:reference + 1].expand_as(others)
    return anchor.flatten(0, 1), others.flatten(0, 1)


def _measure(wav: Tensor, reference: int, sample_rate: int) -> dict[str, Tensor]:
    """What the cue errors need of one segment `[N, 1, T]` (input or decode), on the CPU."""
    return {"levels": band_levels(wav, sample_rate).cpu(),
            "delays": _pair_delays(wav, reference, sample_rate).cpu()}


@dataclass
class _Collected:
    """Per-segment measurements of the inputs or of one coding's decodes."""
    levels: list[Tensor] = field(default_factory=list)    # [N, bands] per segment
    delays: list[Tensor] = field(default_factory=list)    # [N - 1] per segment
    mel: list[Tensor] = field(default_factory=list)       # [N] per segment (decodes only)
    si_snr: list[Tensor] = field(default_factory=list)    # [N] per segment (decodes only)

    def add(self, measured: dict[str, Tensor]) -> None:
        for key, value in measured.items():
            getattr(self, key).append(value)


def _coding_codes(model: EncodecModel, latent: Tensor, reference: int,
                  codings: Sequence[str]) -> dict[str, Tensor]:
    """Per-channel codes of 'independent' and of each of `codings`, from the same latents
    (one scale)."""
    independent = model.quantizer.encode(latent)
    make = {
        "shared_content": lambda: encode_with_content(model.quantizer, latent, independent[reference, 0]),
        "shared_content_own_residual": lambda: with_reference_content(independent, reference),
    }
    return {"independent": independent,
            **{coding: make[coding]() for coding in codings if coding != "independent"}}


def _decode_changed(model: EncodecModel, codes: Tensor, baseline_codes: Tensor,
                    baseline: Tensor, scale: Tensor | None) -> Tensor:
    """Decodes of `codes` `[N, K, F]`, running the decoder only on the channels whose codes
    differ from `baseline_codes` (the others are `baseline`'s rows): the reference channel,
    and every channel whose codebook 1 agrees, decode as in independent coding, and the
    decoder is most of the comparison's cost."""
    changed = (codes != baseline_codes).flatten(1).any(dim=1)
    decoded = baseline.clone()
    if changed.any():
        decoded[changed] = decode_channels(model, codes[changed], scale, baseline.shape[-1])
    return decoded


def _compare_segment(model: EncodecModel, x: Tensor, reference: int, inputs: _Collected,
                     coded: dict[str, _Collected]) -> Tensor:
    """Code segment `x` `[N, 1, T]` in every way of `coded` at its common scale, add the
    measurements of the input and of each decode; returns `_content_matches`."""
    rate = model.sample_rate
    scale = common_scale(model, x)
    codes = _coding_codes(model, encode_latents(model, x, scale), reference, list(coded))
    inputs.add(_measure(x, reference, rate))
    independent = decode_channels(model, codes["independent"], scale, x.shape[-1])
    for coding in coded:
        decoded = _decode_changed(model, codes[coding], codes["independent"], independent, scale)
        coded[coding].add({**_measure(decoded, reference, rate),
                           "mel": mel_distance(x, decoded, rate).cpu(),
                           "si_snr": si_snr(x, decoded).cpu()})
    return _content_matches(codes["independent"], reference)


def _summary(coded: _Collected, inputs: _Collected, reference: int) -> dict[str, Any]:
    """Quality and cue errors of one coding against the inputs, averaged over segments,
    channels and pairs."""
    mel, snr = torch.stack(coded.mel), torch.stack(coded.si_snr)              # [B, N]
    ild = ild_fidelity(*_pair_rows(torch.stack(inputs.levels), reference),
                       *_pair_rows(torch.stack(coded.levels), reference))
    itd = delay_error(torch.cat(inputs.delays), torch.cat(coded.delays))
    return {
        "mel_distance": mel.mean().item(), "si_snr": snr.mean().item(),
        "mel_distance_per_channel": mel.mean(dim=0).tolist(),
        "si_snr_per_channel": snr.mean(dim=0).tolist(),
        "ild_error_db": ild["error_db"], "ild_zero_error_db": ild["zero_error_db"],
        "ild_correlation": ild["correlation"], "ild_slope": ild["slope"],
        "itd_error_us": itd["error_us"], "itd_zero_error_us": itd["zero_error_us"],
        "n_pairs": ild["n_pairs"], "n_delays": itd["n_valid"],
    }


@torch.no_grad()
def shared_content_comparison(model: EncodecModel, wavs: Any, reference: int = 0,
                              sample_rate: int | None = None,
                              codings: Sequence[str] = CODINGS) -> dict[str, Any]:
    """Quality of shared-content coding against independent per-channel coding.

    Both codings are measured at ONE scale convention: every segment's channels are divided
    by their common RMS (`common_scale`), in independent coding too, so that the difference
    between the codings is the sharing of codebook 1 alone (the codec's default independent
    encoding, one scale per channel, would also change the level cues).

    Args:
        model (EncodecModel): the codec, in eval mode (its device is used).
        wavs: the multichannel segments, all with the same channel count N >= 2: a tensor
            `[B, N, 1, T]` at `sample_rate`; a path or a list of paths of N-channel audio
            files (each read whole, at any rate); or an iterable of such tensors or of
            `(wavs, metas)` batches (a `DataLoader` of the validation dataset with
            `datasets.views=N`). T must be at least 2048 samples at the model rate (the band
            levels' STFT).
        reference (int): channel whose codebook 1 is shared; the cue errors are measured on
            the pairs (reference, c) for every other channel c.
        sample_rate (int or None): rate of tensor inputs (default: the model's); everything
            is resampled to and measured at the model rate.
        codings (sequence of str): which of `CODINGS` to measure ('independent' always is);
            leaving out the diagnostic 'shared_content_own_residual' saves time.
    Returns:
        dict: `channels` (N), `reference`, `segments`, `seconds` (total duration of one
        channel), `sample_rate` (the model's), `scale` (the convention, in words),
        `codebook1_agreement` (share of the non-reference channels' frames whose own
        codebook-1 code equals the reference's: 1 means sharing changes nothing), and one
        entry per coding of `codings`: 'independent', 'shared_content' (what
        `codec.py encode --shared-content` writes: codebooks 2.. code what the reference's
        codebook 1 leaves of each channel) and 'shared_content_own_residual' (codebooks 2..
        of each channel's own residual, as the swap test decodes), each with the
        `coding_bitrate` keys (one scale per segment for both) and
        `mel_distance`, `si_snr` (means over segments and channels; `*_per_channel` lists),
        `ild_error_db` (mean |decoded - true| per-band level difference of each pair, dB)
        beside `ild_zero_error_db` (the error of predicting no difference), `ild_correlation`,
        `ild_slope`, `itd_error_us` (GCC-PHAT delay below 1.5 kHz, |decoded - true|,
        microseconds) beside `itd_zero_error_us`, `n_pairs`, `n_delays` (pairs with a defined
        delay).
    """
    device = next(model.parameters()).device
    rate = model.sample_rate
    unknown = sorted(set(codings) - set(CODINGS))
    if unknown:
        raise ValueError(f"unknown codings {unknown}; choose among {list(CODINGS)}")
    inputs = _Collected()
    coded = {coding: _Collected() for coding in CODINGS if coding in ("independent", *codings)}
    agreeing, compared, seconds = 0, 0, 0.0
    for item in _items(wavs, sample_rate or rate, rate):
        channels = inputs.levels[0].shape[0] if inputs.levels else item.shape[0]
        if item.shape[0] != channels:
            raise ValueError(f"all segments must have the same channel count: got {item.shape[0]} "
                             f"after {channels}")
        check_reference(reference, channels)
        matches = _compare_segment(model, item.float().to(device), reference, inputs, coded)
        agreeing, compared = agreeing + int(matches.sum()), compared + matches.numel()
        seconds += item.shape[-1] / rate
    if not inputs.levels:
        raise ValueError("no segments to compare: wavs is empty")
    segments = len(inputs.levels)
    result: dict[str, Any] = {
        "channels": channels, "reference": reference, "segments": segments, "seconds": seconds,
        "sample_rate": rate,
        "scale": "one common RMS per segment for all channels, in every coding",
        "codebook1_agreement": agreeing / compared,
    }
    for coding in coded:
        bitrate = coding_bitrate(model.n_q, model.quantizer.bins, model.frame_rate, channels,
                                 shared_content=coding != "independent", seconds=seconds,
                                 scales=segments)
        result[coding] = {**bitrate, **_summary(coded[coding], inputs, reference)}
    return result
