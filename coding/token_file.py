"""The token file: what `codec.py encode` writes and `decode` reads (data only, nothing is
unpickled).

    8 bytes   magic b"PENCTOK1"
    4 bytes   little-endian uint32: length H of the JSON header
    H bytes   UTF-8 JSON metadata (see `token_metadata`)
    rest      codes as little-endian uint16, C-order:
              'independent':    `[channels, n_q, frames]`
              'shared_content': `[frames]` (the shared codebook-1 stream), then
                                `[channels, n_q - 1, frames]` (codebooks 2.. of every channel)
              version 3 only, then the level side information: `[channels, bands, blocks]`
                                steps of `bits` bits each (stored minus the range's lowest
                                step, unsigned: + 2^(bits-1) for the symmetric range),
                                least significant bit first, packed into bytes, zero-padded
Version 2 adds `mode` and `frame_rate` to the header ('shared_content' files also say which
codebook-1 stream they carry, and `scales` holds the one common scale): the reference
channel's (`reference_channel`, no `content_stream`, as before the mean stream existed) or
the channels' mean content (`content_stream: "mean"`, no reference channel). Version 1
files (no `mode`) are 'independent' and still decode. Version 3 is version 2 with each
channel's band levels sent beside the codes (`level_side`: bands, bits, step_db, block_ms,
blocks, and `max_boost_db` where the range is not the symmetric one;
`modules/level_side_info.py`); a file without them is still written as version 2, so older
tools read it.

A token file is input from anywhere: `read_tokens` checks every header field (`check_header`:
types, ranges, the lengths against the frames and rates, scales, the content stream and
reference channel) before it uses one, and raises TokenFileError, one line naming the field
and its value.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modules.level_side_info import LevelSideInfo, check_level_bands, side_blocks
from model import EncodecModel
from utils.checks import is_number

MAGIC = b"PENCTOK1"
FORMAT_VERSION = 2                  # what a file without level side information is written as
LEVEL_SIDE_VERSION = 3              # a file with it
READABLE_VERSIONS = (1, 2, 3)       # version 1: before modes, always 'independent'
INDEPENDENT, SHARED_CONTENT = "independent", "shared_content"
MODES = (INDEPENDENT, SHARED_CONTENT)
# The codebook-1 stream of a 'shared_content' file: one channel's, or the channels' mean content.
REFERENCE_STREAM, MEAN_STREAM = "reference", "mean"
CONTENT_STREAMS = (REFERENCE_STREAM, MEAN_STREAM)
_LENGTH = struct.Struct("<I")
MAX_SAMPLE_RATE = 768_000          # Hz, the highest rate a header may give
MAX_BINS = 1 << 16                 # codes are stored as uint16
DEFAULT_MAX_SECONDS = 24 * 3600.0  # the most audio a token file may decode to, by default
# A header's level side information: at most this many bands, bits per step, dB per step.
MAX_LEVEL_BANDS, MAX_LEVEL_BITS, MAX_LEVEL_STEP_DB, MAX_LEVEL_BLOCK_S = 64, 8, 24.0, 10.0
_LEVEL_SIDE_KEYS = ("bands", "bits", "step_db", "block_ms", "blocks")
_LEVEL_SIDE_RANGE_KEY = "max_boost_db"      # only in a header whose range is not symmetric
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_REQUIRED_KEYS = ("version", "sample_rate", "original_sample_rate", "channels", "n_q", "bins",
                  "frames", "length", "original_length", "checkpoint_sha256", "scales")


class TokenFileError(ValueError):
    """The token file is not one of ours, is corrupt, is truncated or decodes to more audio
    than allowed."""


def token_metadata(model: EncodecModel, bins: int, codes: torch.Tensor, scales: list[float] | None,
                   length: int, original_sample_rate: int, original_length: int,
                   checkpoint_sha256: str, mode: str = INDEPENDENT,
                   reference_channel: int | None = None,
                   level_side: LevelSideInfo | None = None) -> dict[str, Any]:
    """Everything `decode` needs besides the codes and the checkpoint.

    `codes` `[channels, n_q, frames]`; `scales`: one per channel ('independent'), the one
    common scale ('shared_content') or None (no audio normalisation); `reference_channel`
    only with 'shared_content': the channel whose codebook 1 is shared, or None for the
    channels' mean content stream; `level_side`: how the band levels sent beside the codes
    are coded (a version 3 file), or None (none sent, version 2).
    """
    metadata = {
        "version": FORMAT_VERSION if level_side is None else LEVEL_SIDE_VERSION,
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
    # A reference-stream header gets no `content_stream`: its files stay byte for byte what
    # earlier versions wrote, and those versions refuse a mean-stream file (no reference
    # channel) instead of decoding it as one channel's stream.
    if mode == SHARED_CONTENT and reference_channel is None:
        metadata["content_stream"] = MEAN_STREAM
    elif mode == SHARED_CONTENT:
        metadata["reference_channel"] = int(reference_channel)
    if level_side is not None:
        metadata["level_side"] = {
            "bands": level_side.bands, "bits": level_side.bits,
            "step_db": float(level_side.step_db), "block_ms": float(level_side.block_ms),
            "blocks": side_blocks(int(length), model.sample_rate, level_side)}
        # A symmetric range is written as before, so earlier versions still read the file; they
        # refuse a header with the key instead of reading its steps off by the range's offset.
        if level_side != replace(level_side, max_boost_db=None):
            metadata["level_side"][_LEVEL_SIDE_RANGE_KEY] = level_side.max_boost_db
    return metadata


def level_side_of(metadata: dict[str, Any]) -> LevelSideInfo | None:
    """How a file's band levels are coded, or None for a file without them."""
    side = metadata.get("level_side")
    if side is None:
        return None
    return LevelSideInfo(bands=side["bands"], bits=side["bits"], step_db=side["step_db"],
                         block_ms=side["block_ms"], max_boost_db=side.get(_LEVEL_SIDE_RANGE_KEY))


def level_side_bytes(metadata: dict[str, Any]) -> int:
    """Bytes of level side information after the codes (0 for a file without it)."""
    side = metadata.get("level_side")
    if side is None:
        return 0
    return -(-metadata["channels"] * side["bands"] * side["blocks"] * side["bits"] // 8)


def _pack_steps(steps: torch.Tensor, side: LevelSideInfo) -> bytes:
    """Steps in `side.step_range` as `side.bits`-bit unsigned fields (the step minus the
    lowest), least significant bit first, in bytes."""
    bits, (lowest, highest) = side.bits, side.step_range
    values = steps.cpu().numpy().astype(np.int16).ravel() - lowest
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"level side steps outside {lowest} .. {highest}, the {bits}-bit range")
    fields = (values[:, None] >> np.arange(bits)) & 1
    return np.packbits(fields.astype(np.uint8).ravel(), bitorder="little").tobytes()


def _unpack_steps(data: bytes, metadata: dict[str, Any]) -> torch.Tensor:
    """Inverse of `_pack_steps`: `[channels, bands, blocks]` int16 steps."""
    side = metadata["level_side"]
    shape = (metadata["channels"], side["bands"], side["blocks"])
    bits, count = side["bits"], math.prod(shape)
    fields = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits,
                           bitorder="little").reshape(count, bits)
    # One byte per stored bit at most: bits <= 8, so each field's value fits in a uint8.
    values = fields @ (1 << np.arange(bits)).astype(np.uint8)
    lowest = level_side_of(metadata).step_range[0]
    return torch.from_numpy(values.astype(np.int16) + np.int16(lowest)).reshape(shape)


def token_mode(metadata: dict[str, Any]) -> str:
    """'independent' or 'shared_content' (version 1 files, which predate modes, are the former)."""
    return metadata.get("mode", INDEPENDENT)


def content_stream(metadata: dict[str, Any]) -> str:
    """Which codebook-1 stream a 'shared_content' file carries: 'reference' (one channel's,
    also every file written before the mean stream) or 'mean' (the channels' mean content)."""
    return metadata.get("content_stream", REFERENCE_STREAM)


def code_streams(metadata: dict[str, Any]) -> int:
    """Number of `frames`-long code streams in the payload of a token file."""
    channels, n_q = metadata["channels"], metadata["n_q"]
    return 1 + channels * (n_q - 1) if token_mode(metadata) == SHARED_CONTENT else channels * n_q


def _payload_codes(codes: torch.Tensor, metadata: dict[str, Any]) -> torch.Tensor:
    """The codes as stored: all of them, or the shared codebook-1 stream once then the rest."""
    if token_mode(metadata) != SHARED_CONTENT:
        return codes.flatten()
    mean = content_stream(metadata) == MEAN_STREAM
    content = codes[0 if mean else metadata["reference_channel"], 0]
    if not bool((codes[:, 0] == content).all()):
        which = "one codebook-1 stream" if mean else "the reference channel's codebook 1"
        raise ValueError(f"shared-content codes must carry {which} in every channel (use "
                         "shared_content.encode_shared_content).")
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


def write_tokens(path: str | Path, codes: torch.Tensor, metadata: dict[str, Any],
                 level_steps: torch.Tensor | None = None) -> None:
    """Write codes `[channels, n_q, frames]` and their metadata as a token file (in
    'shared_content' mode codebook 1 must be the same stream in every channel, the reference
    channel's if the metadata names one; it is stored once), with the level side information
    `level_steps` `[channels, bands, blocks]` when the metadata has `level_side`."""
    if codes.numel() and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise ValueError("codes do not fit in uint16 (codebooks larger than 65536 entries?)")
    side = metadata.get("level_side")
    expected = None if side is None else (metadata["channels"], side["bands"], side["blocks"])
    given = None if level_steps is None else tuple(level_steps.shape)
    if given != expected:
        raise ValueError(f"level side information of shape {given} for a header that asks "
                         f"for {expected}")
    header = json.dumps(metadata, sort_keys=True).encode("utf-8")
    payload = _payload_codes(codes.cpu(), metadata).numpy().astype("<u2", copy=False).tobytes()
    if side is not None:
        payload += _pack_steps(level_steps, level_side_of(metadata))
    with open(path, "wb") as f:
        f.write(MAGIC + _LENGTH.pack(len(header)) + header + payload)


@dataclass(frozen=True)
class TokenFile:
    """What a token file holds: codes `[channels, n_q, frames]` (long; in 'shared_content'
    mode every channel's codebook 1 is the shared stream), the checked header, and the level
    side information `[channels, bands, blocks]` (int16 steps) of a version 3 file, else None."""
    codes: torch.Tensor
    metadata: dict[str, Any]
    level_steps: torch.Tensor | None = None


def read_tokens(path: str | Path, max_seconds: float = DEFAULT_MAX_SECONDS
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`(codes, metadata)` of a token file (`read_token_file` without the side information)."""
    tokens = read_token_file(path, max_seconds)
    return tokens.codes, tokens.metadata


def read_token_file(path: str | Path, max_seconds: float = DEFAULT_MAX_SECONDS) -> TokenFile:
    """Read a token file of any readable version and mode.

    Every header field is checked (`check_header`) before the payload is read, and the
    payload must hold exactly the codes (and side information) the header describes, so what
    is allocated is proportional to the file's size; a file that would decode to more than
    `max_seconds` of audio is refused. Raises TokenFileError, one line naming the field and
    its value.
    """
    prefix = len(MAGIC) + _LENGTH.size
    with open(path, "rb") as f:
        start = f.read(prefix)
        if len(start) < prefix or start[: len(MAGIC)] != MAGIC:
            raise TokenFileError(f"{path} is not a token file (bad magic bytes); "
                                 "write one with `python codec.py encode`.")
        (header_length,) = _LENGTH.unpack_from(start, len(MAGIC))
        size = os.fstat(f.fileno()).st_size
        if prefix + header_length > size:
            raise TokenFileError(f"{path} is truncated: the header says {header_length} bytes "
                                 f"of metadata but only {size - prefix} follow.")
        try:
            metadata = json.loads(f.read(header_length).decode("utf-8"))
        except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, absurd numbers
            raise TokenFileError(f"{path}: corrupt metadata header "
                                 f"({str(error)[:80]}).") from error
        check_header(path, metadata, max_seconds)
        code_bytes = code_streams(metadata) * metadata["frames"] * 2
        expected = code_bytes + level_side_bytes(metadata)
        found = size - prefix - header_length
        if found != expected:
            raise TokenFileError(
                f"{path}: {found} bytes of codes, expected {expected} for {_layout(metadata)} "
                f"({'truncated' if found < expected else 'trailing data'}).")
        payload = f.read(expected)
    if len(payload) != expected:
        raise TokenFileError(f"{path} changed while it was read: {len(payload)} bytes of codes, "
                             f"expected {expected}.")
    codes = _codes_from_payload(np.frombuffer(payload[:code_bytes], dtype="<u2"), metadata)
    if codes.numel() and codes.max() >= metadata["bins"]:
        raise TokenFileError(f"{path}: code {int(codes.max())} out of range for "
                             f"{metadata['bins']}-entry codebooks (corrupt file).")
    steps = (_unpack_steps(payload[code_bytes:], metadata) if "level_side" in metadata
             else None)
    return TokenFile(codes, metadata, steps)


def _layout(metadata: dict[str, Any]) -> str:
    channels, n_q, frames = metadata["channels"], metadata["n_q"], metadata["frames"]
    if token_mode(metadata) == SHARED_CONTENT:
        layout = (f"1 shared codebook-1 stream + channels={channels} x n_q={n_q} - 1 codebooks, "
                  f"x frames={frames}")
    else:
        layout = f"channels={channels} x n_q={n_q} codebooks x frames={frames}"
    side = metadata.get("level_side")
    if side is not None:
        layout += (f", then {side['bits']}-bit level side information of bands="
                   f"{side['bands']} x blocks={side['blocks']} per channel")
    return layout


# ----------------------------------------------------------------------------------------
# Header checks: every field before it is used


def _shown(value: Any, limit: int = 40) -> str:
    """`value` as it stands in the header, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_error(path: str | Path, key: str, value: Any, problem: str) -> TokenFileError:
    return TokenFileError(f"{path}: header field {key}={_shown(value)}: {problem} "
                          "(corrupt, or not a token file of this tool).")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(path: str | Path, metadata: dict[str, Any], key: str, low: int,
               high: int | None = None, unit: str = "", within: str = "") -> int:
    """`metadata[key]`, an integer in range; `within` prefixes the key in the message (e.g.
    'level_side.')."""
    value = metadata[key]
    if not _is_int(value) or value < low or (high is not None and value > high):
        wanted = f"{low} .. {high}" if high is not None else f">= {low}"
        raise _field_error(path, within + key, value, f"not an integer{unit} in {wanted}")
    return value


def is_scale(value: Any) -> bool:
    """Whether `value` can be a normalisation scale: a finite positive number, in float32 too
    (the precision it is decoded at)."""
    return is_number(value) and math.isfinite(value) and _FLOAT32_TINY <= value <= _FLOAT32_MAX


def model_rate_length(original_length: int, original_sample_rate: int, sample_rate: int) -> int:
    """Samples of `original_length` samples resampled to `sample_rate` (as torchaudio rounds,
    up; exact integer arithmetic)."""
    return -(-original_length * sample_rate // original_sample_rate)


def check_header(path: str | Path, metadata: Any, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Raise TokenFileError unless `metadata` is a header this tool can decode: every field
    of the right type and range, the lengths consistent with the frames and rates, and at
    most `max_seconds` of audio."""
    missing = ([key for key in _REQUIRED_KEYS if key not in metadata]
               if isinstance(metadata, dict) else ["all"])
    if missing:
        raise TokenFileError(f"{path}: metadata lacks {missing}; not a token file of this tool.")
    version = metadata["version"]
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise TokenFileError(f"{path}: token format version {_shown(version)}, this tool "
                             f"reads versions {list(READABLE_VERSIONS)}.")
    mode = metadata.get("mode")
    if (version >= 2 or "mode" in metadata) and not (isinstance(mode, str) and mode in MODES):
        raise TokenFileError(f"{path}: unknown token mode {_shown(mode)}; this tool "
                             f"reads {list(MODES)}.")
    rate = _check_int(path, metadata, "sample_rate", 1, MAX_SAMPLE_RATE, " sample rate (Hz)")
    original_rate = _check_int(path, metadata, "original_sample_rate", 1, MAX_SAMPLE_RATE,
                               " sample rate (Hz)")
    channels = _check_int(path, metadata, "channels", 1)
    n_q = _check_int(path, metadata, "n_q", 1)
    _check_int(path, metadata, "bins", 1, MAX_BINS)
    frames = _check_int(path, metadata, "frames", 1)
    length = _check_int(path, metadata, "length", 1)
    original_length = _check_int(path, metadata, "original_length", 1)
    sha = metadata["checkpoint_sha256"]
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _field_error(path, "checkpoint_sha256", sha, "not a SHA-256 in hex")

    shared = token_mode(metadata) == SHARED_CONTENT
    _check_content_stream(path, metadata, shared, channels, n_q)
    scales = metadata["scales"]
    if scales is not None:
        if not isinstance(scales, list):
            raise _field_error(path, "scales", scales, "not a list of scales or null")
        if len(scales) != (1 if shared else channels):
            raise TokenFileError(f"{path}: {len(scales)} scales for {channels} channels in "
                                 f"{token_mode(metadata)!r} mode (corrupt header).")
        for index, scale in enumerate(scales):
            if not is_scale(scale):
                raise _field_error(path, f"scales[{index}]", scale,
                                   "not a finite positive float32 scale")

    expected_length = model_rate_length(original_length, original_rate, rate)
    if abs(length - expected_length) > 1:
        raise TokenFileError(
            f"{path}: header fields length={length}, original_length={original_length}, "
            f"original_sample_rate={original_rate} and sample_rate={rate} disagree: "
            f"{original_length} samples at {original_rate} Hz are {expected_length} at "
            f"{rate} Hz (corrupt, or not a token file of this tool).")
    if "frame_rate" in metadata:
        frame_rate = _check_int(path, metadata, "frame_rate", 1, rate, " frame rate (Hz)")
        # frame_rate = ceil(rate / hop) for an integer hop, so rate / frame_rate <= hop <
        # rate / (frame_rate - 1), and frames = ceil(length / hop).
        if (frames - 1) * rate >= length * frame_rate or (
                frame_rate > 1 and length * (frame_rate - 1) >= frames * rate):
            raise TokenFileError(
                f"{path}: header fields frames={frames}, length={length}, frame_rate="
                f"{frame_rate} and sample_rate={rate} disagree: {length} samples are not "
                f"{frames} frames at {frame_rate} Hz (corrupt, or not a token file of this tool).")
    _check_level_side(path, metadata, version, rate, length)
    seconds = original_length / original_rate
    if seconds > max_seconds:
        raise TokenFileError(
            f"{path}: header field original_length={original_length} at original_sample_rate="
            f"{original_rate} Hz is {seconds:.0f} s of audio, more than the {max_seconds:g} s "
            "allowed (raise --max-seconds if the file is genuine).")


def _check_level_side(path: str | Path, metadata: dict[str, Any], version: int, rate: int,
                      length: int) -> None:
    """Raise TokenFileError unless the header's level side information fits its version
    (present exactly in version 3) and its audio: bands, bits and step in range, blocks a
    multiple of 10 ms, every band holding an STFT bin at `rate`, and `blocks` what `length`
    samples give."""
    side = metadata.get("level_side")
    if version != LEVEL_SIDE_VERSION:
        if "level_side" in metadata:
            raise _field_error(path, "level_side", side, f"only a version {LEVEL_SIDE_VERSION} "
                               f"file has level side information, this one is version {version}")
        return
    if "level_side" not in metadata:
        raise _field_error(path, "version", version, f"a version {LEVEL_SIDE_VERSION} file has "
                           "level side information, but the header has no level_side")
    if not (isinstance(side, dict)
            and sorted(set(side) - {_LEVEL_SIDE_RANGE_KEY}) == sorted(_LEVEL_SIDE_KEYS)):
        raise _field_error(path, "level_side", side,
                           f"not an object with the keys {list(_LEVEL_SIDE_KEYS)} (and "
                           f"{_LEVEL_SIDE_RANGE_KEY} for a range that is not symmetric)")
    _check_int(path, side, "bands", 1, MAX_LEVEL_BANDS, "", "level_side.")
    _check_int(path, side, "bits", 1, MAX_LEVEL_BITS, "", "level_side.")
    blocks = _check_int(path, side, "blocks", 1, None, "", "level_side.")
    for key, high in (("step_db", MAX_LEVEL_STEP_DB), ("block_ms", 1000 * MAX_LEVEL_BLOCK_S)):
        value = side[key]
        if not (is_number(value) and math.isfinite(value) and 0 < value <= high):
            raise _field_error(path, f"level_side.{key}", value,
                               f"not a number in (0, {high:g}]")
    if _LEVEL_SIDE_RANGE_KEY in side:
        _check_boost(path, side)
    try:
        level_side = level_side_of(metadata)
        check_level_bands(rate, level_side)
    except ValueError as error:
        raise _field_error(path, "level_side", side, str(error)) from error
    expected = side_blocks(length, rate, level_side)
    if blocks != expected:
        raise TokenFileError(
            f"{path}: header fields level_side.blocks={blocks} and length={length} disagree: "
            f"{length} samples at {rate} Hz are {expected} blocks of "
            f"{level_side.block_ms:g} ms (corrupt, or not a token file of this tool).")


def _check_boost(path: str | Path, side: dict[str, Any]) -> None:
    """Raise TokenFileError unless `level_side.max_boost_db` is a value `LevelSideInfo` keeps
    as given (a whole number of steps from 0 to the symmetric range's top): any other would
    read as another range than the encoder's."""
    boost = side[_LEVEL_SIDE_RANGE_KEY]
    def kept(value: float | None) -> float:
        return LevelSideInfo(bits=side["bits"], step_db=side["step_db"],
                             max_boost_db=value).max_boost_db
    top = kept(None)
    if not (is_number(boost) and 0 <= boost <= top
            and math.isclose(kept(boost), boost, abs_tol=1e-6 * side["step_db"])):
        raise _field_error(path, f"level_side.{_LEVEL_SIDE_RANGE_KEY}", boost,
                           f"not a whole number of steps of {side['step_db']:g} dB in "
                           f"0 .. {top:g}")


def _check_content_stream(path: str | Path, metadata: dict[str, Any], shared: bool,
                          channels: int, n_q: int) -> None:
    """Raise TokenFileError unless the header's content stream and reference channel fit its
    mode: none in an 'independent' file; in a 'shared_content' one, >= 2 channels and
    codebooks and either the reference stream with a reference_channel among the channels
    or the mean stream without one."""
    if not shared:
        if "content_stream" in metadata:
            raise _field_error(path, "content_stream", metadata["content_stream"],
                               f"only a {SHARED_CONTENT!r} file has a content stream, this one "
                               f"is {token_mode(metadata)!r}")
        return
    stream = content_stream(metadata)
    if not (isinstance(stream, str) and stream in CONTENT_STREAMS):
        raise _field_error(path, "content_stream", stream,
                           f"not one of {list(CONTENT_STREAMS)}")
    reference = metadata.get("reference_channel")
    if stream == MEAN_STREAM and reference is not None:
        raise _field_error(path, "reference_channel", reference,
                           "a content_stream=\"mean\" file shares no one channel's stream")
    if stream == MEAN_STREAM and not (n_q >= 2 and channels >= 2):
        raise TokenFileError(f"{path}: a shared-content file needs >= 2 channels and >= 2 "
                             f"codebooks (corrupt header: channels={channels}, n_q={n_q}).")
    if stream == REFERENCE_STREAM and not (n_q >= 2 and channels >= 2 and _is_int(reference)
                                           and 0 <= reference < channels):
        raise TokenFileError(f"{path}: a shared-content file needs >= 2 channels, >= 2 "
                             f"codebooks and a reference_channel among them (corrupt header: "
                             f"channels={channels}, n_q={n_q}, "
                             f"reference_channel={_shown(reference)}).")


def channel_scale(metadata: dict[str, Any], channel: int) -> float | None:
    """The normalisation scale a channel is decoded with: its own, the common one of a
    shared-content file, or None (no audio normalisation)."""
    scales = metadata["scales"]
    if scales is None:
        return None
    return scales[0] if token_mode(metadata) == SHARED_CONTENT else scales[channel]
