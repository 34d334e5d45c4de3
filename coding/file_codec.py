"""Encoding audio into codes and decoding them back with a trained checkpoint, file to file.

Any sample rate and channel count: each channel is resampled to the model rate and encoded
separately, in one piece (so the codes equal `model.encode` of the whole channel; memory grows
with the file's duration); decoding restores the original rate, channel count and length.
A bandwidth (one of the checkpoint's `model.target_bandwidths`) keeps the first codebooks
that fit in it, as EnCodec does; the default keeps all `n_q`.

Modes (`metadata["mode"]`, see `coding/token_file.py` for the file):
- 'independent' (default): every channel coded on its own, with its own scale (its RMS over
  the whole file).
- 'shared_content' (N >= 2 channels): ONE codebook-1 stream, the reference channel's or
  the codebook-1 codes of the channels' mean latent (the 'mean' content stream), plus
  codebooks 2.. of every channel, all channels at ONE scale (their common RMS over the whole
  file, `EncodecModel.shared_scale`), so the level differences between channels stay in the
  codes; codebooks 2.. of each channel code what the shared codebook 1 leaves of its latent
  (`shared_content.encode_shared_content`). Decoding runs the ordinary decoder on each
  channel's codes with codebook 1 replaced by the shared stream, whichever it is.

What encoding does with awkward audio: NaN or infinite samples are refused (ValueError naming
the file and channel); silence encodes (the RMS scale has a floor, `normalize_eps`) and
decodes to silence; one sample and full-scale clipping encode as any audio; levels whose
power overflows float32 are refused rather than written as infinite scales. Decoding checks
the whole file first (`read_tokens`, `check_compatible`, `check_decodable`).

`model.load_model` is the one checkpoint loader (here and in `evaluate.py`).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from coding import shared_content
from modules.level_side_info import (LevelSideInfo, apply_level_side, check_level_bands,
                                    encode_level_side, trained_level_side)
from coding.token_file import (CONTENT_STREAMS, DEFAULT_MAX_SECONDS, INDEPENDENT,
                               MAX_SAMPLE_RATE, MEAN_STREAM, SHARED_CONTENT, TokenFileError,
                               channel_scale, is_scale, level_side_of, read_token_file,
                               token_metadata, write_tokens)
from model import EncodecModel, load_model

# torchaudio.functional.resample's defaults (lowpass_filter_width, rolloff): its filter size.
RESAMPLING_ZEROS, RESAMPLING_ROLLOFF = 6, 0.99
# The largest resampling filter a file may ask for; the usual rates need kilobytes.
MAX_RESAMPLING_FILTER_BYTES = 1 << 30
# `encode_file(level_side=AS_TRAINED)`: the band levels the checkpoint was trained to be
# decoded with (`losses.level_side_info`), or none when it was trained without.
AS_TRAINED = "as_trained"

class CheckpointMismatchError(ValueError):
    """The token file was written with a different checkpoint than the one given."""




def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# What a file may ask for


def resampling_filter_bytes(from_rate: int, to_rate: int) -> int:
    """Bytes torchaudio's resampling from `from_rate` to `to_rate` spends on its filter (and
    the temporaries that build it): `to / g` phases of `from / g + 2 width` taps each, `g`
    the rates' greatest common divisor. Small for the usual rates; gigabytes for rates that
    share almost no factor."""
    if from_rate == to_rate:
        return 0
    common = math.gcd(from_rate, to_rate)
    low, high = from_rate // common, to_rate // common
    width = math.ceil(RESAMPLING_ZEROS * low / (min(low, high) * RESAMPLING_ROLLOFF))
    return 4 * 4 * high * (low + 2 * width)


def resampling_problem(from_rate: int, to_rate: int) -> str | None:
    """Why audio cannot be resampled from `from_rate` to `to_rate` here, or None."""
    needed = resampling_filter_bytes(from_rate, to_rate)
    if needed <= MAX_RESAMPLING_FILTER_BYTES:
        return None
    return (f"resampling {from_rate} Hz to {to_rate} Hz needs a {needed / 1e9:.1f} GB filter "
            f"(the rates share only a factor of {math.gcd(from_rate, to_rate)}; at most "
            f"{MAX_RESAMPLING_FILTER_BYTES / 1e9:.1f} GB)")


def check_finite(wav_path: str | Path, audio: np.ndarray) -> None:
    """ValueError naming the first channel of `audio` `[T, channels]` that holds NaN or
    infinite samples: they would turn the channel's scale and codes into garbage."""
    for channel in range(audio.shape[1]):  # one channel at a time: no full-size mask
        bad = ~np.isfinite(audio[:, channel])
        if bad.any():
            raise ValueError(f"{wav_path}: channel {channel} holds {int(bad.sum())} NaN or "
                             f"infinite samples (the first at sample {int(bad.argmax())}); "
                             "encode needs finite audio: repair or drop them first.")


def check_scales(wav_path: str | Path, scales: list[float] | None, shared: bool) -> None:
    """ValueError when a channel's normalisation scale (its RMS) is not a finite positive
    float32: samples so large that their power overflows."""
    for channel, scale in enumerate(scales or []):
        if not is_scale(scale):
            which = "the channels' common" if shared else f"channel {channel}'s"
            raise ValueError(f"{wav_path}: {which} RMS level is {scale} in float32 (samples far "
                             "beyond full scale); scale the audio to about [-1, 1] first.")


# ----------------------------------------------------------------------------------------
# Encoding and decoding


def at_model_rate(model: EncodecModel, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`audio` `[channels, T]` as float32 at the model's sample rate."""
    audio = audio.float()
    if sample_rate != model.sample_rate:
        audio = torchaudio.functional.resample(audio, sample_rate, model.sample_rate)
    return audio


@torch.no_grad()
def encode_audio(model: EncodecModel, audio: torch.Tensor, sample_rate: int
                 ) -> tuple[torch.Tensor, list[float] | None, int]:
    """Encode each channel of `audio` `[channels, T]` separately at the model rate.

    Returns `(codes [channels, n_q, frames], scales per channel or None, model-rate length)`.
    """
    device = next(model.parameters()).device
    audio = at_model_rate(model, audio, sample_rate)
    codes, scales = [], []
    for channel in audio:  # one at a time: bounded memory, and the same codes as model.encode
        channel_codes, scale = model.encode(channel[None, None].to(device), return_scale=True)
        codes.append(channel_codes[0].cpu())
        scales.append(None if scale is None else float(scale.reshape(-1)[0]))
    return torch.stack(codes), (None if scales[0] is None else scales), audio.shape[-1]


@torch.no_grad()
def encode_audio_shared(model: EncodecModel, audio: torch.Tensor, sample_rate: int,
                        reference: int | None = 0
                        ) -> tuple[torch.Tensor, list[float] | None, int]:
    """Shared-content codes of `audio` `[channels, T]` (channels >= 2) at the model rate.

    Returns `(codes [channels, n_q, frames], [the common scale] or None, model-rate length)`;
    codebook 1 of every channel is the reference channel's, or with `reference` None the
    codebook-1 codes of the channels' mean latent (see
    `shared_content.encode_shared_content`; channels go through the encoder together only
    as far as `shared_content.MAX_SAMPLES_PER_PASS` allows).
    """
    device = next(model.parameters()).device
    audio = at_model_rate(model, audio, sample_rate)
    coded = shared_content.encode_shared_content(model, audio[:, None].to(device), reference)
    scales = None if coded.scale is None else [float(coded.scale.reshape(-1)[0])]
    return coded.codes.cpu(), scales, audio.shape[-1]


def decode_channel(model: EncodecModel, codes: torch.Tensor, metadata: dict[str, Any],
                   channel: int) -> torch.Tensor:
    """One channel `[1, 1, length]` at the model rate from its codes `[n_q, frames]`, at the
    scale the file gives it."""
    device = next(model.parameters()).device
    scale = channel_scale(metadata, channel)
    if scale is not None:
        scale = torch.tensor(scale, dtype=torch.float32, device=device).reshape(1, 1, 1)
    return model.decode(codes[None].to(device), scale=scale, length=metadata["length"])


@torch.no_grad()
def encode_level_steps(model: EncodecModel, audio: torch.Tensor, codes: torch.Tensor,
                       metadata: dict[str, Any]) -> torch.Tensor:
    """Level side information `[channels, bands, blocks]` (int16 steps) that brings each
    channel's decode of `codes` to the band levels of `audio` `[channels, length]` at the
    model rate (`level_side_info.encode_level_side`, one channel at a time)."""
    side = level_side_of(metadata)
    steps = []
    for channel, channel_codes in enumerate(codes):
        decoded = decode_channel(model, channel_codes, metadata, channel)
        steps.append(encode_level_side(audio[channel].reshape(decoded.shape).to(decoded),
                                       decoded, model.sample_rate, side)[0].cpu())
    return torch.stack(steps)


@torch.no_grad()
def decode_audio(model: EncodecModel, codes: torch.Tensor, metadata: dict[str, Any],
                 level_steps: torch.Tensor | None = None) -> torch.Tensor:
    """Audio `[channels, original_length]` at the original rate from codes and metadata, with
    the band gains of `level_steps` `[channels, bands, blocks]` (a version 3 file's level
    side information) applied to each channel's decode at the model rate."""
    side = level_side_of(metadata)
    channels = []
    for c, channel_codes in enumerate(codes):
        wav = decode_channel(model, channel_codes, metadata, c)
        if level_steps is not None:
            wav = apply_level_side(wav, level_steps[c:c + 1].to(wav.device), model.sample_rate,
                                   side)
        channels.append(wav[0, 0].cpu())
    audio = torch.stack(channels)
    if metadata["original_sample_rate"] != metadata["sample_rate"]:
        audio = torchaudio.functional.resample(audio, metadata["sample_rate"],
                                               metadata["original_sample_rate"])
    audio = audio[:, : metadata["original_length"]]
    missing = metadata["original_length"] - audio.shape[1]
    return torch.nn.functional.pad(audio, (0, missing)) if missing > 0 else audio


def check_compatible(model: EncodecModel, bins: int, metadata: dict[str, Any],
                     checkpoint_sha256: str, ignore_hash: bool = False) -> None:
    """Raise CheckpointMismatchError unless the tokens were written with this checkpoint
    (with all its codebooks or, at a lower bandwidth, the first ones)."""
    for key, ours in (("bins", bins), ("sample_rate", model.sample_rate),
                      ("frame_rate", model.frame_rate)):
        if key in metadata and metadata[key] != ours:
            raise CheckpointMismatchError(
                f"the tokens have {key}={metadata[key]} but the checkpoint's model has "
                f"{key}={ours}: decode with the checkpoint that encoded them.")
    if not 1 <= metadata["n_q"] <= model.n_q:
        raise CheckpointMismatchError(
            f"the tokens have n_q={metadata['n_q']} codebooks but the checkpoint's model has "
            f"{model.n_q}: decode with the checkpoint that encoded them.")
    if metadata["checkpoint_sha256"] != checkpoint_sha256 and not ignore_hash:
        raise CheckpointMismatchError(
            "the tokens were encoded with checkpoint sha256 "
            f"{metadata['checkpoint_sha256'][:16]}..., "
            f"this checkpoint is {checkpoint_sha256[:16]}...: codes are only meaningful with "
            "the codebooks that produced them. Use the original checkpoint, or pass "
            "--ignore-hash if you know the codebooks are the same.")


def check_decodable(token_path: str | Path, model: EncodecModel, metadata: dict[str, Any]) -> None:
    """Raise TokenFileError unless the header's lengths are what this model's frames give
    and its rates can be resampled here (after `check_compatible`)."""
    frames = math.ceil(metadata["length"] / model.hop_length)
    if metadata["frames"] != frames:
        raise TokenFileError(
            f"{token_path}: header field frames={metadata['frames']}: length="
            f"{metadata['length']} samples are {frames} frames of this model's hop "
            f"{model.hop_length} (corrupt, or not a token file of this tool).")
    problem = resampling_problem(metadata["sample_rate"], metadata["original_sample_rate"])
    if problem:
        raise TokenFileError(f"{token_path}: header field original_sample_rate="
                             f"{metadata['original_sample_rate']}: {problem}.")


def encode_file(checkpoint: str | Path, wav_path: str | Path, token_path: str | Path,
                device: str | torch.device = "cpu", bandwidth: float | None = None,
                shared_content_coding: bool = False, reference_channel: int | None = None,
                content_stream: str | None = None,
                level_side: LevelSideInfo | str | None = AS_TRAINED) -> dict[str, Any]:
    """WAV file -> token file; returns the metadata written.

    `bandwidth` (kbps, one of the model's `target_bandwidths`) keeps the first
    `model.codebooks_for_bandwidth(bandwidth)` codebooks; None keeps all of them.
    `shared_content_coding` writes one codebook-1 stream for all channels (see the module
    docstring): with `content_stream` 'reference' (the default) channel `reference_channel`'s
    (default 0), with 'mean' that of the channels' mean latent; without it every channel is
    coded independently. `level_side` also sends each channel's band levels beside its codes
    (a version 3 file; `modules/level_side_info.py`): what the decode of the codes kept
    misses of them; `AS_TRAINED` (the default) sends those the checkpoint was trained with
    (`trained_level_side`), None none. Errors name the command-line flag to change
    (ValueError).
    """
    audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)  # [T, channels]
    if audio.shape[0] == 0:
        raise ValueError(f"{wav_path} holds no samples")
    if rate > MAX_SAMPLE_RATE:
        raise ValueError(f"{wav_path}: sample rate {rate} Hz, above the {MAX_SAMPLE_RATE} Hz a "
                         "token file holds; resample it first.")
    check_finite(wav_path, audio)
    reference = check_shared_options(wav_path, audio.shape[1], shared_content_coding,
                                     reference_channel, content_stream)
    model, cfg = load_model(checkpoint, device)
    problem = resampling_problem(rate, model.sample_rate)
    if problem:
        raise ValueError(f"{wav_path}: {problem}; convert it to a usual rate (e.g. 48000 Hz) "
                         "first.")
    kept = model.n_q if bandwidth is None else model.codebooks_for_bandwidth(bandwidth)
    if shared_content_coding and kept < 2:
        raise ValueError(f"--shared-content needs at least 2 codebooks (codebook 1 shared, "
                         f"codebook 2 per channel) but --bandwidth {bandwidth:g} keeps {kept}: "
                         f"choose a higher --bandwidth (model.target_bandwidths "
                         f"{model.target_bandwidths}).")
    if level_side == AS_TRAINED:
        level_side = trained_level_side(cfg)
    if level_side is not None:
        try:
            check_level_bands(model.sample_rate, level_side)
        except ValueError as error:
            raise ValueError(f"--level-bands {level_side.bands}: {error}") from error
    channels = at_model_rate(model, torch.from_numpy(audio.T.copy()), rate)
    if shared_content_coding:
        codes, scales, length = encode_audio_shared(model, channels, model.sample_rate, reference)
    else:
        codes, scales, length = encode_audio(model, channels, model.sample_rate)
    check_scales(wav_path, scales, shared_content_coding)
    codes = codes[:, :kept]
    metadata = token_metadata(model, cfg.model.bins, codes, scales, length, rate,
                              audio.shape[0], file_sha256(checkpoint),
                              mode=SHARED_CONTENT if shared_content_coding else INDEPENDENT,
                              reference_channel=reference, level_side=level_side)
    steps = None if level_side is None else encode_level_steps(model, channels, codes, metadata)
    write_tokens(token_path, codes, metadata, steps)
    return metadata


def check_shared_options(wav_path: str | Path, channels: int, shared_content_coding: bool,
                         reference_channel: int | None,
                         content_stream: str | None = None) -> int | None:
    """The reference channel to use (None without shared-content coding or with the mean
    content stream); a ValueError that names the flag and the fix when the options do not fit
    a `channels`-channel file."""
    if not shared_content_coding:
        if reference_channel is not None:
            raise ValueError("--reference-channel only applies to --shared-content: add "
                             "--shared-content or drop --reference-channel.")
        if content_stream is not None:
            raise ValueError("--content-stream only applies to --shared-content: add "
                             "--shared-content or drop --content-stream.")
        return None
    if content_stream not in (None, *CONTENT_STREAMS):
        raise ValueError(f"--content-stream {content_stream!r}: choose one of "
                         f"{', '.join(CONTENT_STREAMS)}.")
    mean = content_stream == MEAN_STREAM
    if mean and reference_channel is not None:
        raise ValueError("--reference-channel does not apply to --content-stream mean (the "
                         "mean stream is no one channel's): drop --reference-channel or use "
                         "--content-stream reference.")
    if channels < 2:
        raise ValueError(f"--shared-content needs a file with at least 2 channels, but "
                         f"{wav_path} has {channels}: encode it without --shared-content.")
    if mean:
        return None
    reference = 0 if reference_channel is None else reference_channel
    if not 0 <= reference < channels:
        raise ValueError(f"--reference-channel {reference} is out of range for {wav_path}, "
                         f"which has {channels} channels: choose 0 .. {channels - 1}.")
    return reference


def decode_file(checkpoint: str | Path, token_path: str | Path, wav_path: str | Path,
                device: str | torch.device = "cpu", ignore_hash: bool = False,
                subtype: str = "FLOAT", max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Token file -> WAV file at the original rate and channel count.

    The file is checked through before anything is decoded (`read_tokens`,
    `check_compatible`, `check_decodable`); one that decodes to more than `max_seconds` of
    audio is refused (TokenFileError).
    """
    tokens = read_token_file(token_path, max_seconds)
    model, cfg = load_model(checkpoint, device)
    check_compatible(model, cfg.model.bins, tokens.metadata, file_sha256(checkpoint), ignore_hash)
    check_decodable(token_path, model, tokens.metadata)
    audio = decode_audio(model, tokens.codes, tokens.metadata, tokens.level_steps)
    sf.write(str(wav_path), audio.T.numpy(), tokens.metadata["original_sample_rate"],
             subtype=subtype)
