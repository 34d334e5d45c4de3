"""Encode a WAV file into a token file and decode it back, with a trained checkpoint.

    python codec.py encode --checkpoint CKPT [--bandwidth KBPS] in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content [--reference-channel K] in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content --content-stream mean in.wav out.tok
    python codec.py decode --checkpoint CKPT [--max-seconds S] out.tok out.wav

Any sample rate and channel count: each channel is resampled to the model rate and encoded
separately; decoding restores the original rate, channel count and length. `--bandwidth`
(one of the checkpoint's `model.target_bandwidths`) keeps the first codebooks that fit in
it, as EnCodec does; the default keeps all `n_q`. `--shared-content` (N >= 2 channels)
sends ONE codebook-1 stream, the reference channel's (`--reference-channel`, default 0),
plus codebooks 2.. of every channel, all at one common scale; `--content-stream mean` sends
the codebook-1 codes of the channels' mean latent instead, the stream a model trained with
`pairwise.shared_content_code` learned to decode (the file says which; decode needs no flag).

Hostile input is refused in one line (`error: ...`, exit 1): a token file with any header
field out of type or range, inconsistent with its payload, or decoding to more than
`--max-seconds` of audio (default 24 hours); audio with NaN or infinite samples; a checkpoint
whose model would not fit in memory. The coding itself is `coding/file_codec.py`, the token
file and its checks `coding/token_file.py`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import soundfile as sf

from coding import shared_content
from coding.file_codec import CheckpointMismatchError, decode_file, encode_file
from coding.token_file import (CONTENT_STREAMS, DEFAULT_MAX_SECONDS, MEAN_STREAM, SHARED_CONTENT,
                               TokenFileError, content_stream, token_mode)
from training.runtime import resolve_device
from utils.checks import DEVICE, POSITIVE, PathRule, check_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="WAV file -> token file")
    enc.add_argument("input",
                     help="WAV (or any format libsndfile reads), any rate and channel count")
    enc.add_argument("output", help="token file to write")
    enc.add_argument("--bandwidth", type=float, default=None,
                     help="kbps, one of the checkpoint's model.target_bandwidths (default: all "
                          "codebooks)")
    enc.add_argument("--shared-content", action="store_true",
                     help="one codebook-1 stream (see --content-stream) for all channels, "
                          "codebooks 2.. per channel, one common scale (files of >= 2 channels)")
    enc.add_argument("--reference-channel", type=int, default=None, metavar="K",
                     help="with --shared-content: the channel whose codebook 1 is sent (default 0)")
    enc.add_argument("--content-stream", choices=CONTENT_STREAMS, default=None,
                     help="with --shared-content: 'reference' (default) sends the reference "
                          "channel's codebook 1, 'mean' that of the channels' mean latent (for "
                          "models trained with pairwise.shared_content_code)")
    dec = commands.add_parser("decode", help="token file -> WAV file")
    dec.add_argument("input", help="token file written by `codec.py encode`")
    dec.add_argument("output", help="WAV file to write")
    dec.add_argument("--ignore-hash", action="store_true",
                     help="decode even if the checkpoint differs from the encoding one")
    dec.add_argument("--subtype", default="FLOAT", help="soundfile subtype (FLOAT, PCM_16, PCM_24)")
    dec.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                     help="refuse a token file that decodes to more audio than this "
                          "(default: 24 hours)")
    for sub in (enc, dec):
        sub.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser.parse_args(argv)


def encode_summary(metadata: dict[str, Any], wav_path: str, token_path: str) -> str:
    """What `encode` prints: the file, the codes and their nominal bitrate (codes and scales);
    for a shared-content file also what independent coding of its channels would cost."""
    shared = token_mode(metadata) == SHARED_CONTENT
    channels, n_q = metadata["channels"], metadata["n_q"]
    layout = f"{channels} x {n_q} codebook(s)"
    if shared:
        stream = (f"mean of {channels} channels" if content_stream(metadata) == MEAN_STREAM
                  else f"channel {metadata['reference_channel']}")
        layout = f"1 codebook-1 stream ({stream}) + {channels} x {n_q - 1} codebook(s)"
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
    check_flags(("--checkpoint", args.checkpoint,
                 PathRule("file", "checkpoint")),  # one line, exit 2
                ("input", args.input, PathRule("file")),
                ("output", args.output, PathRule("output file")),
                ("--bandwidth", getattr(args, "bandwidth", None), POSITIVE),
                ("--device", args.device, DEVICE),
                ("--max-seconds", getattr(args, "max_seconds", None), POSITIVE))
    device = resolve_device(args.device)
    try:
        if args.command == "encode":
            meta = encode_file(args.checkpoint, args.input, args.output, device, args.bandwidth,
                               args.shared_content, args.reference_channel,
                               args.content_stream)
            print(encode_summary(meta, args.input, args.output))
        else:
            decode_file(args.checkpoint, args.input, args.output, device, args.ignore_hash,
                        args.subtype, args.max_seconds)
            print(f"{args.input} -> {args.output}")
    except (TokenFileError, CheckpointMismatchError, FileNotFoundError, RuntimeError,
            ValueError, sf.LibsndfileError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
