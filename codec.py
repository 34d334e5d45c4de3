"""Encode a WAV file into a token file and decode it back, with a trained checkpoint.

    python codec.py encode --checkpoint CKPT [--bandwidth KBPS] in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content [--reference-channel K] in.wav out.tok
    python codec.py decode --checkpoint CKPT out.tok out.wav

Any sample rate and channel count: each channel is resampled to the model rate and encoded
separately, in one piece (so the codes equal `model.encode` of the whole channel; memory grows
with the file's duration); decoding restores the original rate, channel count and length.
`--bandwidth` (one of the checkpoint's `model.target_bandwidths`) keeps the first codebooks
that fit in it, as EnCodec does; the default keeps all `n_q`.

Modes (`metadata["mode"]`):
- 'independent' (default): every channel coded on its own, with its own scale (its RMS over
  the whole file).
- 'shared_content' (`--shared-content`, N >= 2 channels): ONE codebook-1 stream, the
  reference channel's (`--reference-channel`, default 0), plus codebooks 2.. of every
  channel, all channels at ONE scale (their common RMS over the whole file,
  `EncodecModel.shared_scale`), so the level differences between channels stay in the codes;
  codebooks 2.. of each channel code what the reference's codebook 1 leaves of its latent
  (`shared_content.encode_shared_content`). Decoding runs the ordinary decoder on each
  channel's codes with codebook 1 replaced by the shared stream.

Token file (data only, nothing is unpickled):
    8 bytes   magic b"PENCTOK1"
    4 bytes   little-endian uint32: length H of the JSON header
    H bytes   UTF-8 JSON metadata (see `token_metadata`)
    rest      codes as little-endian uint16, C-order:
              'independent':    `[channels, n_q, frames]`
              'shared_content': `[frames]` (codebook 1 of the reference channel), then
                                `[channels, n_q - 1, frames]` (codebooks 2.. of every channel)
Version 2 adds `mode` and `frame_rate` to the header ('shared_content' files also
`reference_channel`, and `scales` holds the one common scale). Version 1 files (no `mode`)
are 'independent' and still decode.

`model.load_model` is the one checkpoint loader (here and in `evaluate.py`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from coding import shared_content
from utils.checks import DEVICE, POSITIVE, PathRule, check_flags
from model import EncodecModel, load_model
from training.runtime import resolve_device

MAGIC = b"PENCTOK1"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)          # version 1: before modes, always 'independent'
INDEPENDENT, SHARED_CONTENT = "independent", "shared_content"
MODES = (INDEPENDENT, SHARED_CONTENT)
_LENGTH = struct.Struct("<I")
_REQUIRED_KEYS = ("version", "sample_rate", "original_sample_rate", "channels", "n_q", "bins",
                  "frames", "length", "original_length", "checkpoint_sha256", "scales")


class TokenFileError(ValueError):
    """The token file is not one of ours, is corrupt or is truncated."""


class CheckpointMismatchError(ValueError):
    """The token file was written with a different checkpoint than the one given."""


# ----------------------------------------------------------------------------------------
# Checkpoints


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Token files


def token_metadata(model: EncodecModel, bins: int, codes: torch.Tensor, scales: list[float] | None,
                   length: int, original_sample_rate: int, original_length: int,
                   checkpoint_sha256: str, mode: str = INDEPENDENT,
                   reference_channel: int | None = None) -> dict[str, Any]:
    """Everything `decode` needs besides the codes and the checkpoint.

    `codes` `[channels, n_q, frames]`; `scales`: one per channel ('independent'), the one
    common scale ('shared_content') or None (no audio normalisation); `reference_channel`
    only with 'shared_content'.
    """
    metadata = {
        "version": FORMAT_VERSION,
        "mode": mode,
        "sample_rate": model.sample_rate,
        "frame_rate": model.frame_rate,
        "original_sample_rate": int(original_sample_rate),
        "channels": int(codes.shape[0]),
        "n_q": int(codes.shape[1]),
        "bins": int(bins),
        "frames": int(codes.shape[2]),
        "length": int(length),
        "original_length": int(original_length),
        "checkpoint_sha256": checkpoint_sha256,
        "scales": scales,
    }
    if mode == SHARED_CONTENT:
        metadata["reference_channel"] = int(reference_channel)
    return metadata


def token_mode(metadata: dict[str, Any]) -> str:
    """'independent' or 'shared_content' (version 1 files, which predate modes, are the former)."""
    return metadata.get("mode", INDEPENDENT)


def code_streams(metadata: dict[str, Any]) -> int:
    """Number of `frames`-long code streams in the payload of a token file."""
    channels, n_q = metadata["channels"], metadata["n_q"]
    return 1 + channels * (n_q - 1) if token_mode(metadata) == SHARED_CONTENT else channels * n_q


def _payload_codes(codes: torch.Tensor, metadata: dict[str, Any]) -> torch.Tensor:
    """The codes as stored: all of them, or the shared codebook-1 stream once then the rest."""
    if token_mode(metadata) != SHARED_CONTENT:
        return codes.flatten()
    content = codes[metadata["reference_channel"], 0]
    if not bool((codes[:, 0] == content).all()):
        raise ValueError("shared-content codes must carry the reference channel's codebook 1 in "
                         "every channel (use shared_content.encode_shared_content).")
    return torch.cat([content.flatten(), codes[:, 1:].flatten()])


def _codes_from_payload(values: np.ndarray, metadata: dict[str, Any]) -> torch.Tensor:
    """Inverse of `_payload_codes`: per-channel codes `[channels, n_q, frames]` (long)."""
    channels, n_q, frames = metadata["channels"], metadata["n_q"], metadata["frames"]
    values = torch.from_numpy(values.astype(np.int64))
    if token_mode(metadata) != SHARED_CONTENT:
        return values.reshape(channels, n_q, frames)
    content = values[:frames].reshape(1, 1, frames).expand(channels, 1, frames)
    detail = values[frames:].reshape(channels, n_q - 1, frames)
    return torch.cat([content, detail], dim=1)


def write_tokens(path: str | Path, codes: torch.Tensor, metadata: dict[str, Any]) -> None:
    """Write codes `[channels, n_q, frames]` and their metadata as a token file (in
    'shared_content' mode codebook 1 must be the reference's in every channel; it is
    stored once)."""
    if codes.numel() and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise ValueError("codes do not fit in uint16 (codebooks larger than 65536 entries?)")
    header = json.dumps(metadata, sort_keys=True).encode("utf-8")
    payload = _payload_codes(codes.cpu(), metadata).numpy().astype("<u2", copy=False).tobytes()
    with open(path, "wb") as f:
        f.write(MAGIC + _LENGTH.pack(len(header)) + header + payload)


def read_tokens(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a token file (any readable version and mode): `(codes [channels, n_q, frames]
    long, metadata)`; in 'shared_content' mode every channel's codebook 1 is the shared
    stream. Raises TokenFileError."""
    data = Path(path).read_bytes()
    prefix = len(MAGIC) + _LENGTH.size
    if len(data) < prefix or data[: len(MAGIC)] != MAGIC:
        raise TokenFileError(f"{path} is not a token file (bad magic bytes); "
                             "write one with `python codec.py encode`.")
    (header_length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if prefix + header_length > len(data):
        raise TokenFileError(f"{path} is truncated: the header says {header_length} bytes of "
                             f"metadata but only {len(data) - prefix} follow.")
    try:
        metadata = json.loads(data[prefix: prefix + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenFileError(f"{path}: corrupt metadata header ({error}).") from error
    _check_metadata(path, metadata)
    payload = data[prefix + header_length:]
    expected = code_streams(metadata) * metadata["frames"] * 2
    if len(payload) != expected:
        raise TokenFileError(f"{path}: {len(payload)} bytes of codes, expected {expected} for "
                             f"{_layout(metadata)} ({'truncated' if len(payload) < expected else 'trailing data'}).")
    codes = _codes_from_payload(np.frombuffer(payload, dtype="<u2"), metadata)
    if codes.numel() and codes.max() >= metadata["bins"]:
        raise TokenFileError(f"{path}: code {int(codes.max())} out of range for "
                             f"{metadata['bins']}-entry codebooks (corrupt file).")
    return codes, metadata


def _layout(metadata: dict[str, Any]) -> str:
    channels, n_q, frames = metadata["channels"], metadata["n_q"], metadata["frames"]
    if token_mode(metadata) == SHARED_CONTENT:
        return (f"1 shared codebook-1 stream + {channels} channels x {n_q - 1} codebooks, "
                f"x {frames} frames")
    return f"{channels} channels x {n_q} codebooks x {frames} frames"


def _check_metadata(path: str | Path, metadata: Any) -> None:
    """Raise TokenFileError unless `metadata` is a header this tool can decode."""
    missing = [key for key in _REQUIRED_KEYS if key not in metadata] if isinstance(metadata, dict) else ["all"]
    if missing:
        raise TokenFileError(f"{path}: metadata lacks {missing}; not a token file of this tool.")
    if metadata["version"] not in READABLE_VERSIONS:
        raise TokenFileError(f"{path}: token format version {metadata['version']}, this tool "
                             f"reads versions {list(READABLE_VERSIONS)}.")
    if metadata["version"] >= 2 and metadata.get("mode") not in MODES:
        raise TokenFileError(f"{path}: unknown token mode {metadata.get('mode')!r}; this tool "
                             f"reads {list(MODES)}.")
    scales, channels = metadata["scales"], metadata["channels"]
    shared = token_mode(metadata) == SHARED_CONTENT
    reference = metadata.get("reference_channel")
    if shared and not (metadata["n_q"] >= 2 and channels >= 2 and isinstance(reference, int)
                       and 0 <= reference < channels):
        raise TokenFileError(f"{path}: a shared-content file needs >= 2 channels, >= 2 "
                             f"codebooks and a reference_channel among them (corrupt header).")
    if scales is not None and len(scales) != (1 if shared else channels):
        raise TokenFileError(f"{path}: {len(scales)} scales for {channels} channels in "
                             f"{token_mode(metadata)!r} mode (corrupt header).")


def channel_scale(metadata: dict[str, Any], channel: int) -> float | None:
    """The normalisation scale a channel is decoded with: its own, the common one of a
    shared-content file, or None (no audio normalisation)."""
    scales = metadata["scales"]
    if scales is None:
        return None
    return scales[0] if token_mode(metadata) == SHARED_CONTENT else scales[channel]


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
                        reference: int = 0) -> tuple[torch.Tensor, list[float] | None, int]:
    """Shared-content codes of `audio` `[channels, T]` (channels >= 2) at the model rate.

    Returns `(codes [channels, n_q, frames], [the common scale] or None, model-rate length)`;
    codebook 1 of every channel is the reference channel's (see
    `shared_content.encode_shared_content`; channels go through the encoder together only
    as far as `shared_content.MAX_SAMPLES_PER_PASS` allows).
    """
    device = next(model.parameters()).device
    audio = at_model_rate(model, audio, sample_rate)
    coded = shared_content.encode_shared_content(model, audio[:, None].to(device), reference)
    scales = None if coded.scale is None else [float(coded.scale.reshape(-1)[0])]
    return coded.codes.cpu(), scales, audio.shape[-1]


@torch.no_grad()
def decode_audio(model: EncodecModel, codes: torch.Tensor, metadata: dict[str, Any]) -> torch.Tensor:
    """Audio `[channels, original_length]` at the original rate from codes and metadata."""
    device = next(model.parameters()).device
    channels = []
    for c, channel_codes in enumerate(codes):
        scale = channel_scale(metadata, c)
        if scale is not None:
            scale = torch.tensor(scale, dtype=torch.float32, device=device).reshape(1, 1, 1)
        wav = model.decode(channel_codes[None].to(device), scale=scale, length=metadata["length"])
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
    for key, ours in (("bins", bins), ("sample_rate", model.sample_rate)):
        if metadata[key] != ours:
            raise CheckpointMismatchError(
                f"the tokens have {key}={metadata[key]} but the checkpoint's model has "
                f"{key}={ours}: decode with the checkpoint that encoded them.")
    if not 1 <= metadata["n_q"] <= model.n_q:
        raise CheckpointMismatchError(
            f"the tokens have n_q={metadata['n_q']} codebooks but the checkpoint's model has "
            f"{model.n_q}: decode with the checkpoint that encoded them.")
    if metadata["checkpoint_sha256"] != checkpoint_sha256 and not ignore_hash:
        raise CheckpointMismatchError(
            f"the tokens were encoded with checkpoint sha256 {metadata['checkpoint_sha256'][:16]}..., "
            f"this checkpoint is {checkpoint_sha256[:16]}...: codes are only meaningful with "
            "the codebooks that produced them. Use the original checkpoint, or pass "
            "--ignore-hash if you know the codebooks are the same.")


def encode_file(checkpoint: str | Path, wav_path: str | Path, token_path: str | Path,
                device: str = "auto", bandwidth: float | None = None,
                shared_content_coding: bool = False,
                reference_channel: int | None = None) -> dict[str, Any]:
    """WAV file -> token file; returns the metadata written.

    `bandwidth` (kbps, one of the model's `target_bandwidths`) keeps the first
    `model.codebooks_for_bandwidth(bandwidth)` codebooks; None keeps all of them.
    `shared_content_coding` writes one codebook-1 stream, channel `reference_channel`'s
    (default 0), for all channels (see the module docstring); without it every channel is
    coded independently. Errors name the command-line flag to change (ValueError).
    """
    audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)  # [T, channels]
    if audio.shape[0] == 0:
        raise ValueError(f"{wav_path} holds no samples")
    reference = check_shared_options(wav_path, audio.shape[1], shared_content_coding, reference_channel)
    model, cfg = load_model(checkpoint, resolve_device(device))
    kept = model.n_q if bandwidth is None else model.codebooks_for_bandwidth(bandwidth)
    if shared_content_coding and kept < 2:
        raise ValueError(f"--shared-content needs at least 2 codebooks (codebook 1 shared, "
                         f"codebook 2 per channel) but --bandwidth {bandwidth:g} keeps {kept}: "
                         f"choose a higher --bandwidth (model.target_bandwidths "
                         f"{model.target_bandwidths}).")
    channels = torch.from_numpy(audio.T.copy())
    if shared_content_coding:
        codes, scales, length = encode_audio_shared(model, channels, rate, reference)
    else:
        codes, scales, length = encode_audio(model, channels, rate)
    metadata = token_metadata(model, cfg.model.bins, codes[:, :kept], scales, length, rate,
                              audio.shape[0], file_sha256(checkpoint),
                              mode=SHARED_CONTENT if shared_content_coding else INDEPENDENT,
                              reference_channel=reference)
    write_tokens(token_path, codes[:, :kept], metadata)
    return metadata


def check_shared_options(wav_path: str | Path, channels: int, shared_content_coding: bool,
                         reference_channel: int | None) -> int | None:
    """The reference channel to use (None without shared-content coding); a ValueError that
    names the flag and the fix when the options do not fit a `channels`-channel file."""
    if not shared_content_coding:
        if reference_channel is not None:
            raise ValueError("--reference-channel only applies to --shared-content: add "
                             "--shared-content or drop --reference-channel.")
        return None
    if channels < 2:
        raise ValueError(f"--shared-content needs a file with at least 2 channels, but "
                         f"{wav_path} has {channels}: encode it without --shared-content.")
    reference = 0 if reference_channel is None else reference_channel
    if not 0 <= reference < channels:
        raise ValueError(f"--reference-channel {reference} is out of range for {wav_path}, "
                         f"which has {channels} channels: choose 0 .. {channels - 1}.")
    return reference


def decode_file(checkpoint: str | Path, token_path: str | Path, wav_path: str | Path,
                device: str = "auto", ignore_hash: bool = False, subtype: str = "FLOAT") -> None:
    """Token file -> WAV file at the original rate and channel count."""
    codes, metadata = read_tokens(token_path)
    model, cfg = load_model(checkpoint, resolve_device(device))
    check_compatible(model, cfg.model.bins, metadata, file_sha256(checkpoint), ignore_hash)
    audio = decode_audio(model, codes, metadata)
    sf.write(str(wav_path), audio.T.numpy(), metadata["original_sample_rate"], subtype=subtype)


# ----------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="WAV file -> token file")
    enc.add_argument("input", help="WAV (or any format libsndfile reads), any rate and channel count")
    enc.add_argument("output", help="token file to write")
    enc.add_argument("--bandwidth", type=float, default=None,
                     help="kbps, one of the checkpoint's model.target_bandwidths (default: all codebooks)")
    enc.add_argument("--shared-content", action="store_true",
                     help="one codebook-1 stream (the reference channel's) for all channels, "
                          "codebooks 2.. per channel, one common scale (files of >= 2 channels)")
    enc.add_argument("--reference-channel", type=int, default=None, metavar="K",
                     help="with --shared-content: the channel whose codebook 1 is sent (default 0)")
    dec = commands.add_parser("decode", help="token file -> WAV file")
    dec.add_argument("input", help="token file written by `codec.py encode`")
    dec.add_argument("output", help="WAV file to write")
    dec.add_argument("--ignore-hash", action="store_true",
                     help="decode even if the checkpoint differs from the encoding one")
    dec.add_argument("--subtype", default="FLOAT", help="soundfile subtype (FLOAT, PCM_16, PCM_24)")
    for sub in (enc, dec):
        sub.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser.parse_args(argv)


def encode_summary(metadata: dict[str, Any], wav_path: str, token_path: str) -> str:
    """What `encode` prints: the file, the codes and their nominal bitrate (codes and scales);
    for a shared-content file also what independent coding of its channels would cost."""
    shared = token_mode(metadata) == SHARED_CONTENT
    channels, n_q = metadata["channels"], metadata["n_q"]
    layout = (f"1 codebook-1 stream (channel {metadata['reference_channel']}) + {channels} x "
              f"{n_q - 1} codebook(s)" if shared else f"{channels} x {n_q} codebook(s)")
    summary = (f"{wav_path}: {channels} channel(s), {metadata['original_length']} samples at "
               f"{metadata['original_sample_rate']} Hz -> {layout} x {metadata['frames']} frames, "
               f"{_bitrate_text(metadata, shared)}")
    if shared:
        summary += f" (independent coding: {_bitrate_text(metadata, False)})"
    return f"{summary} -> {token_path}"


def _bitrate_text(metadata: dict[str, Any], shared: bool) -> str:
    """'X kbps (Y per channel) + scales Z kbps' of the file's codes, shared or independent
    (one scale per channel, as `encode` writes them)."""
    channels, scales = metadata["channels"], metadata["scales"]
    rate = shared_content.coding_bitrate(
        metadata["n_q"], metadata["bins"], metadata["frame_rate"], channels, shared,
        seconds=metadata["length"] / metadata["sample_rate"],
        scales=None if scales is not None else 0)
    return (f"{rate['codes_kbps_total']:.3f} kbps ({rate['codes_kbps_per_channel']:.3f} per "
            f"channel) + scales {rate['scale_kbps_total']:.4f} kbps")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_flags(("--checkpoint", args.checkpoint, PathRule("file", "checkpoint")),  # one line, exit 2
                ("input", args.input, PathRule("file")), ("output", args.output, PathRule("output file")),
                ("--bandwidth", getattr(args, "bandwidth", None), POSITIVE), ("--device", args.device, DEVICE))
    try:
        if args.command == "encode":
            meta = encode_file(args.checkpoint, args.input, args.output, args.device, args.bandwidth,
                               args.shared_content, args.reference_channel)
            print(encode_summary(meta, args.input, args.output))
        else:
            decode_file(args.checkpoint, args.input, args.output, args.device, args.ignore_hash,
                        args.subtype)
            print(f"{args.input} -> {args.output}")
    except (TokenFileError, CheckpointMismatchError, FileNotFoundError, RuntimeError,
            ValueError, sf.LibsndfileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
