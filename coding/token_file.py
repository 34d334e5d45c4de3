"""The token file: what `codec.py encode` writes and `decode` reads (data only, nothing is
unpickled).

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
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import EncodecModel

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
