"""Encode a WAV file into a token file and decode it back, with a trained checkpoint.

    python codec.py encode --checkpoint CKPT [--bandwidth KBPS] in.wav out.tok
    python codec.py decode --checkpoint CKPT out.tok out.wav

Any sample rate and channel count: each channel is resampled to the model rate and encoded
separately, in one piece (so the codes equal `model.encode` of the whole channel; memory grows
with the file's duration); decoding restores the original rate, channel count and length.
`--bandwidth` (one of the checkpoint's `model.target_bandwidths`) keeps the first codebooks
that fit in it, as EnCodec does; the default keeps all `n_q`.

Token file (data only, nothing is unpickled):
    8 bytes   magic b"PENCTOK1"
    4 bytes   little-endian uint32: length H of the JSON header
    H bytes   UTF-8 JSON metadata (see `token_metadata`)
    rest      codes as little-endian uint16, C-order `[channels, n_q, frames]`

`load_model` is the one checkpoint loader shared with `evaluate.py`.
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
from omegaconf import DictConfig, OmegaConf

import checkpoints as ckpt_io
from checks import DEVICE, POSITIVE, PathRule, check_flags
from model import EncodecModel

MAGIC = b"PENCTOK1"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<I")
_REQUIRED_KEYS = ("version", "sample_rate", "original_sample_rate", "channels", "n_q", "bins",
                  "frames", "length", "original_length", "checkpoint_sha256", "scales")


class TokenFileError(ValueError):
    """The token file is not one of ours, is corrupt or is truncated."""


class CheckpointMismatchError(ValueError):
    """The token file was written with a different checkpoint than the one given."""


# ----------------------------------------------------------------------------------------
# Checkpoints


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[EncodecModel, DictConfig]:
    """Build the generator of a training checkpoint, in eval mode on `device`.

    Returns `(model, cfg)` with `cfg` the resolved training config stored in the checkpoint.
    """
    ckpt = ckpt_io.load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(ckpt["config"])
    model = EncodecModel.from_config(_without_init_from(cfg.model))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise RuntimeError(f"{checkpoint_path}: weights do not match the model its own config "
                           f"describes ({error}); the checkpoint is inconsistent.") from error
    return model.to(resolve_device(device)).eval(), cfg


def _without_init_from(model_cfg: DictConfig) -> DictConfig:
    # The trained weights replace the initialisation, and its file may not exist here.
    model_cfg = model_cfg.copy()
    OmegaConf.set_struct(model_cfg, False)
    model_cfg.init_from = None
    return model_cfg


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
                   checkpoint_sha256: str) -> dict[str, Any]:
    """Everything `decode` needs besides the codes and the checkpoint."""
    return {
        "version": FORMAT_VERSION,
        "sample_rate": model.sample_rate,
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


def write_tokens(path: str | Path, codes: torch.Tensor, metadata: dict[str, Any]) -> None:
    """Write codes `[channels, n_q, frames]` and their metadata as a token file."""
    if codes.numel() and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise ValueError("codes do not fit in uint16 (codebooks larger than 65536 entries?)")
    header = json.dumps(metadata, sort_keys=True).encode("utf-8")
    payload = codes.cpu().numpy().astype("<u2", copy=False).tobytes(order="C")
    with open(path, "wb") as f:
        f.write(MAGIC + _LENGTH.pack(len(header)) + header + payload)


def read_tokens(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a token file: `(codes [channels, n_q, frames] long, metadata)`; raises TokenFileError."""
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
    missing = [key for key in _REQUIRED_KEYS if key not in metadata] if isinstance(metadata, dict) else ["all"]
    if missing:
        raise TokenFileError(f"{path}: metadata lacks {missing}; not a token file of this tool.")
    if metadata["version"] != FORMAT_VERSION:
        raise TokenFileError(f"{path}: token format version {metadata['version']}, this tool "
                             f"reads version {FORMAT_VERSION}.")
    shape = (metadata["channels"], metadata["n_q"], metadata["frames"])
    payload = data[prefix + header_length:]
    expected = int(np.prod(shape)) * 2
    if len(payload) != expected:
        raise TokenFileError(f"{path}: {len(payload)} bytes of codes, expected {expected} for "
                             f"{shape[0]} channels x {shape[1]} codebooks x {shape[2]} frames "
                             f"({'truncated' if len(payload) < expected else 'trailing data'}).")
    codes = torch.from_numpy(np.frombuffer(payload, dtype="<u2").reshape(shape).astype(np.int64))
    if codes.numel() and codes.max() >= metadata["bins"]:
        raise TokenFileError(f"{path}: code {int(codes.max())} out of range for "
                             f"{metadata['bins']}-entry codebooks (corrupt file).")
    return codes, metadata


# ----------------------------------------------------------------------------------------
# Encoding and decoding


@torch.no_grad()
def encode_audio(model: EncodecModel, audio: torch.Tensor, sample_rate: int
                 ) -> tuple[torch.Tensor, list[float] | None, int]:
    """Encode each channel of `audio` `[channels, T]` separately at the model rate.

    Returns `(codes [channels, n_q, frames], scales per channel or None, model-rate length)`.
    """
    device = next(model.parameters()).device
    audio = audio.float()
    if sample_rate != model.sample_rate:
        audio = torchaudio.functional.resample(audio, sample_rate, model.sample_rate)
    codes, scales = [], []
    for channel in audio:  # one at a time: bounded memory, and the same codes as model.encode
        channel_codes, scale = model.encode(channel[None, None].to(device), return_scale=True)
        codes.append(channel_codes[0].cpu())
        scales.append(None if scale is None else float(scale.reshape(-1)[0]))
    return torch.stack(codes), (None if scales[0] is None else scales), audio.shape[-1]


@torch.no_grad()
def decode_audio(model: EncodecModel, codes: torch.Tensor, metadata: dict[str, Any]) -> torch.Tensor:
    """Audio `[channels, original_length]` at the original rate from codes and metadata."""
    device = next(model.parameters()).device
    channels = []
    for c, channel_codes in enumerate(codes):
        scale = None
        if metadata["scales"] is not None:
            scale = torch.tensor(metadata["scales"][c], dtype=torch.float32, device=device).reshape(1, 1, 1)
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
                device: str = "auto", bandwidth: float | None = None) -> dict[str, Any]:
    """WAV file -> token file; returns the metadata written.

    `bandwidth` (kbps, one of the model's `target_bandwidths`) keeps the first
    `model.codebooks_for_bandwidth(bandwidth)` codebooks; None keeps all of them.
    """
    model, cfg = load_model(checkpoint, device)
    audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)  # [T, channels]
    if audio.shape[0] == 0:
        raise ValueError(f"{wav_path} holds no samples")
    codes, scales, length = encode_audio(model, torch.from_numpy(audio.T.copy()), rate)
    if bandwidth is not None:
        codes = codes[:, :model.codebooks_for_bandwidth(bandwidth)]
    metadata = token_metadata(model, cfg.model.bins, codes, scales, length, rate, audio.shape[0],
                              file_sha256(checkpoint))
    write_tokens(token_path, codes, metadata)
    return metadata


def decode_file(checkpoint: str | Path, token_path: str | Path, wav_path: str | Path,
                device: str = "auto", ignore_hash: bool = False, subtype: str = "FLOAT") -> None:
    """Token file -> WAV file at the original rate and channel count."""
    codes, metadata = read_tokens(token_path)
    model, cfg = load_model(checkpoint, device)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_flags(("--checkpoint", args.checkpoint, PathRule("file", "checkpoint")),  # one line, exit 2
                ("input", args.input, PathRule("file")), ("output", args.output, PathRule("output file")),
                ("--bandwidth", getattr(args, "bandwidth", None), POSITIVE), ("--device", args.device, DEVICE))
    try:
        if args.command == "encode":
            meta = encode_file(args.checkpoint, args.input, args.output, args.device, args.bandwidth)
            print(f"{args.input}: {meta['channels']} channel(s), {meta['original_length']} samples at "
                  f"{meta['original_sample_rate']} Hz -> {meta['n_q']} x {meta['frames']} codes "
                  f"per channel -> {args.output}")
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
