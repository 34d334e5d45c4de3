"""Quality of shared-content coding against independent per-channel coding.

`shared_content_comparison` codes the same multichannel segments both ways (and, as a
diagnostic, with codebooks 2.. of each channel's own residual, as the swap test decodes),
all at one common scale per segment, and reports per coding the nominal bitrate
(`shared_content.coding_bitrate`), the reconstruction (log-mel distance, SI-SNR) and the
errors of the inter-channel cues of each pair (reference, c): per-band level difference
(ILD) and GCC-PHAT delay below 1.5 kHz (ITD), each beside predicting no difference.
`evaluate.py` runs it on fixed segments of the evaluation classes.
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

from modules.level_side_info import LevelSideInfo, apply_level_side, encode_level_side
from coding.shared_content import (check_reference, coding_bitrate, common_scale, decode_channels,
                                   encode_latents, share_content)
from measure.metrics import mel_distance, si_snr
from model import EncodecModel
from modules.spatial_cues import (band_levels, band_shape, delay_error, gcc_phat_delay,
                                  ild_fidelity)

CODINGS = ("independent", "shared_content", "shared_content_own_residual", "shared_content_mean")
# Independent coding by another model at about shared-content coding's bitrate (a mono model
# trained with one codebook: not codebook 1 of this one, whose decoder never lacked the rest).
EQUAL_BITRATE = "independent_equal_bitrate"
# Shared-content coding with each channel's band levels sent beside it (level_side_info.py),
# and independent coding with the same side information (its ceiling, at a higher bitrate).
LEVEL_SIDE = "shared_content_level"
INDEPENDENT_LEVEL = "independent_level"
# Each coding with side information, and the coding it is sent beside.
LEVEL_SIDE_OF = {LEVEL_SIDE: "shared_content", INDEPENDENT_LEVEL: "independent"}


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
    shared = {"shared_content": (reference, "reference"),        # (reference, residual)
              "shared_content_own_residual": (reference, "own"),
              "shared_content_mean": (None, "reference")}
    return {"independent": independent,
            **{coding: share_content(model.quantizer, latent, *shared[coding], own=independent)
               for coding in codings if coding != "independent"}}


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
                     coded: dict[str, _Collected],
                     equal_bitrate_model: EncodecModel | None = None,
                     level_side: LevelSideInfo | None = None) -> Tensor:
    """Code segment `x` `[N, 1, T]` in every way of `coded` at its common scale, add the
    measurements of the input and of each decode; returns `_content_matches`."""
    rate = model.sample_rate
    scale = common_scale(model, x)
    codes = _coding_codes(model, encode_latents(model, x, scale), reference,
                          [c for c in coded if c not in (EQUAL_BITRATE, *LEVEL_SIDE_OF)])
    inputs.add(_measure(x, reference, rate))
    independent = decode_channels(model, codes["independent"], scale, x.shape[-1])
    decodes = {coding: _decode_changed(model, codes[coding], codes["independent"], independent,
                                       scale) for coding in codes if coding in coded}
    if equal_bitrate_model is not None:
        other_scale = common_scale(equal_bitrate_model, x)
        other_codes = equal_bitrate_model.quantizer.encode(
            encode_latents(equal_bitrate_model, x, other_scale))
        decodes[EQUAL_BITRATE] = decode_channels(equal_bitrate_model, other_codes, other_scale,
                                                 x.shape[-1])
    if level_side is not None:
        for coding, beside in LEVEL_SIDE_OF.items():
            steps = encode_level_side(x, decodes[beside], rate, level_side)
            decodes[coding] = apply_level_side(decodes[beside], steps, rate, level_side)
    for coding, decoded in decodes.items():
        coded[coding].add({**_measure(decoded, reference, rate),
                           "mel": mel_distance(x, decoded, rate).cpu(),
                           "si_snr": si_snr(x, decoded).cpu()})
    return _content_matches(codes["independent"], reference)


def _summary(coded: _Collected, inputs: _Collected, reference: int) -> dict[str, Any]:
    """Quality and cue errors of one coding against the inputs, averaged over segments,
    channels and pairs."""
    mel, snr = torch.stack(coded.mel), torch.stack(coded.si_snr)              # [B, N]
    levels = (*_pair_rows(torch.stack(inputs.levels), reference),
              *_pair_rows(torch.stack(coded.levels), reference))
    ild = ild_fidelity(*levels)
    shape = ild_fidelity(*(band_shape(value) for value in levels))
    itd = delay_error(torch.cat(inputs.delays), torch.cat(coded.delays))
    return {
        "mel_distance": mel.mean().item(), "si_snr": snr.mean().item(),
        "mel_distance_per_channel": mel.mean(dim=0).tolist(),
        "si_snr_per_channel": snr.mean(dim=0).tolist(),
        "ild_error_db": ild["error_db"], "ild_zero_error_db": ild["zero_error_db"],
        "ild_correlation": ild["correlation"], "ild_slope": ild["slope"],
        "ild_shape_error_db": shape["error_db"], "ild_shape_zero_error_db": shape["zero_error_db"],
        "ild_shape_correlation": shape["correlation"],
        "itd_error_us": itd["error_us"], "itd_zero_error_us": itd["zero_error_us"],
        "n_pairs": ild["n_pairs"], "n_delays": itd["n_valid"],
    }


@torch.no_grad()
def shared_content_comparison(model: EncodecModel, wavs: Any, reference: int = 0,
                              sample_rate: int | None = None,
                              codings: Sequence[str] = CODINGS,
                              equal_bitrate_model: EncodecModel | None = None,
                              level_side: LevelSideInfo | None = None) -> dict[str, Any]:
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
        equal_bitrate_model (EncodecModel or None): a model of the same rate that codes each
            channel on its own at about the bitrate of shared-content coding (e.g. a mono
            model trained with `model.n_q=1`): measured as `independent_equal_bitrate`, with
            its own bitrate, at its own common scale per segment.
        level_side (LevelSideInfo or None): also measure 'shared_content_level':
            shared-content coding with each channel's band levels sent beside its codes
            (`modules/level_side_info.py`), and 'independent_level', independent coding with
            the same side information (the ceiling of sharing with it, at more bits); their
            bitrate the codes' plus `side_kbps_per_channel`. Sent at the cue bands, it
            corrects what the ILD rows read (by construction).
    Returns:
        dict: `channels` (N), `reference`, `segments`, `seconds` (total duration of one
        channel), `sample_rate` (the model's), `scale` (the convention, in words),
        `codebook1_agreement` (share of the non-reference channels' frames whose own
        codebook-1 code equals the reference's: 1 means sharing changes nothing), and one
        entry per coding of `codings`: 'independent', 'shared_content' (what
        `codec.py encode --shared-content` writes: codebooks 2.. code what the reference's
        codebook 1 leaves of each channel), 'shared_content_own_residual' (codebooks 2..
        of each channel's own residual, as the swap test decodes) and 'shared_content_mean'
        (codebook 1 of the channels' mean latent, `mean_content`, for all: what
        `--content-stream mean` writes), each with the `coding_bitrate` keys (one scale per
        segment for both) and `mel_distance`, `si_snr` (means over segments and channels;
        `*_per_channel` lists), `ild_error_db` (mean |decoded - true| per-band level
        difference of each pair, dB) beside `ild_zero_error_db` (the error of predicting no
        difference), `ild_correlation`, `ild_slope`, the same for each difference's band
        mean removed (its spectral shape: `ild_shape_error_db` beside
        `ild_shape_zero_error_db`, `ild_shape_correlation`), `itd_error_us` (GCC-PHAT delay below
        1.5 kHz, |decoded - true|, microseconds) beside `itd_zero_error_us`, `n_pairs`,
        `n_delays` (pairs with a defined delay).
    """
    device = next(model.parameters()).device
    rate = model.sample_rate
    unknown = sorted(set(codings) - set(CODINGS))
    if unknown:
        raise ValueError(f"unknown codings {unknown}; choose among {list(CODINGS)}")
    inputs = _Collected()
    coded = {coding: _Collected() for coding in CODINGS if coding in ("independent", *codings)}
    if equal_bitrate_model is not None:
        if equal_bitrate_model.sample_rate != rate:
            raise ValueError(f"the equal-bitrate model codes {equal_bitrate_model.sample_rate} Hz, "
                             f"the compared model {rate} Hz: they must share a rate")
        coded[EQUAL_BITRATE] = _Collected()
    if level_side is not None:
        if "shared_content" not in coded:
            raise ValueError("level side information is sent beside shared-content coding: "
                             "keep 'shared_content' in codings")
        coded.update({coding: _Collected() for coding in LEVEL_SIDE_OF})
    agreeing, compared, seconds = 0, 0, 0.0
    for item in _items(wavs, sample_rate or rate, rate):
        channels = inputs.levels[0].shape[0] if inputs.levels else item.shape[0]
        if item.shape[0] != channels:
            raise ValueError(f"all segments must have the same channel count: got {item.shape[0]} "
                             f"after {channels}")
        check_reference(reference, channels)
        matches = _compare_segment(model, item.float().to(device), reference, inputs, coded,
                                   equal_bitrate_model, level_side)
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
        coder = equal_bitrate_model if coding == EQUAL_BITRATE else model
        bitrate = coding_bitrate(coder.n_q, coder.quantizer.bins, coder.frame_rate, channels,
                                 shared_content=coding not in ("independent", EQUAL_BITRATE,
                                                               INDEPENDENT_LEVEL),
                                 seconds=seconds, scales=segments)
        if coding in LEVEL_SIDE_OF:
            side_kbps = level_side.kbps_per_channel
            bitrate = {**bitrate, "side_kbps_per_channel": side_kbps,
                       "kbps_per_channel": bitrate["kbps_per_channel"] + side_kbps,
                       "kbps_total": bitrate["kbps_total"] + side_kbps * channels}
        result[coding] = {**bitrate, **_summary(coded[coding], inputs, reference)}
    return result
