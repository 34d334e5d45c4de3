"""Encode a WAV file into a token file and decode it back, with a trained checkpoint.

    python codec.py encode --checkpoint CKPT [--bandwidth KBPS] in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content [--reference-channel K] in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content --content-stream mean in.wav out.tok
    python codec.py encode --checkpoint CKPT --shared-content --level-bands 4 in.wav out.tok
    python codec.py decode --checkpoint CKPT [--max-seconds S] out.tok out.wav

Any sample rate and channel count: each channel is resampled to the model rate and encoded
separately; decoding restores the original rate, channel count and length. `--bandwidth`
(one of the checkpoint's `model.target_bandwidths`) keeps the first codebooks that fit in
it, as EnCodec does; the default keeps all `n_q`. `--shared-content` (N >= 2 channels)
sends ONE codebook-1 stream, the reference channel's (`--reference-channel`, default 0),
plus codebooks 2.. of every channel, all at one common scale; `--content-stream mean` sends
the codebook-1 codes of the channels' mean latent instead, the stream a model trained with
`pairwise.shared_content_code` learned to decode (the file says which; decode needs no flag).
`--level-bands N` also sends each channel's level in N bands every 40 ms (3 bits of 1.5 dB
each, -6 .. +4.5 dB: `--level-bits`, `--level-step-db`, `--level-block-ms`; more bits buy
deeper cuts below `--level-max-boost-db`), what the decode misses of them; decode applies
them (`modules/level_side_info.py`; a version 3 token file). Without
`--level-bands`, a checkpoint trained to leave band levels to them (`losses.level_side_info`)
sends those it was trained with; `--level-bands 0` sends none.

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
from modules.level_side_info import LevelSideInfo
from coding.file_codec import AS_TRAINED, CheckpointMismatchError, decode_file, encode_file
from coding.token_file import (CONTENT_STREAMS, DEFAULT_MAX_SECONDS, MAX_LEVEL_BANDS,
                               MAX_LEVEL_BITS, MAX_LEVEL_BLOCK_S, MAX_LEVEL_STEP_DB, MEAN_STREAM,
                               SHARED_CONTENT, TokenFileError, content_stream, level_side_of,
                               token_mode)
from training.runtime import resolve_device
from utils.checks import (DEVICE, POSITIVE, Limit, PathRule, check_flags, one_line_errors,
                          setting_error)


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
    side = LevelSideInfo()
    enc.add_argument("--level-bands", type=int, default=None, metavar="N",
                     help="also send each channel's band levels in N log bands of 100 Hz - 11 "
                          "kHz (0: none; 4 costs 0.3 kbps per channel), applied at decode "
                          "(default: those the checkpoint was trained with, "
                          "losses.level_side_info; most send none)")
    enc.add_argument("--level-bits", type=int, default=None,
                     help=f"with --level-bands: bits per band and block (default {side.bits})")
    enc.add_argument("--level-step-db", type=float, default=None,
                     help=f"with --level-bands: dB per step (default {side.step_db:g})")
    enc.add_argument("--level-block-ms", type=float, default=None,
                     help=f"with --level-bands: one level per band every so many ms, a "
                          f"multiple of 10 (default {side.block_ms:g})")
    enc.add_argument("--level-max-boost-db", type=float, default=None,
                     help=f"with --level-bands: the largest gain in dB; the other steps cut "
                          f"(default {side.max_boost_db:g}: 4 bits of 1.5 dB span -18 .. +4.5)")
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
    side = level_side_of(metadata)
    if side is not None:
        summary += (f" + level side information {side.kbps_per_channel * channels:.3f} kbps "
                    f"({side.kbps_per_channel:.3f} per channel: {side.bands} bands, "
                    f"{side.bits} bits every {side.block_ms:g} ms, "
                    f"{side.step_range[0] * side.step_db:+g} .. {side.max_boost_db:+g} dB)")
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


def level_side_flags(args: argparse.Namespace) -> LevelSideInfo | str | None:
    """The level side information `encode`'s flags ask for, None (`--level-bands 0`), or
    `AS_TRAINED` without `--level-bands`; a flag mistake exits with one `config error: ...`
    line (exit 2)."""
    check_flags(("--level-bands", args.level_bands, Limit(0, MAX_LEVEL_BANDS)),
                ("--level-bits", args.level_bits, Limit(1, MAX_LEVEL_BITS)),
                ("--level-step-db", args.level_step_db,
                 Limit(0, MAX_LEVEL_STEP_DB, open_low=True)),
                ("--level-block-ms", args.level_block_ms, Limit(10, 1000 * MAX_LEVEL_BLOCK_S)),
                ("--level-max-boost-db", args.level_max_boost_db,  # up to the symmetric top
                 Limit(0, (2 ** (MAX_LEVEL_BITS - 1) - 1) * MAX_LEVEL_STEP_DB)))
    given = {name: value for name, value in (("bits", args.level_bits),
                                             ("step_db", args.level_step_db),
                                             ("block_ms", args.level_block_ms),
                                             ("max_boost_db", args.level_max_boost_db))
             if value is not None}
    with one_line_errors():
        if not args.level_bands:
            for name, value in given.items():
                raise setting_error("--level-" + name.replace("_", "-"), value,
                                    "only applies with --level-bands N (N >= 1): add "
                                    "--level-bands or drop it")
            return AS_TRAINED if args.level_bands is None else None
        try:
            return LevelSideInfo(bands=args.level_bands, **given)
        except ValueError as error:  # the one rule a range cannot say: 10 ms steps
            raise setting_error("--level-block-ms", args.level_block_ms, str(error)) from error


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_flags(("--checkpoint", args.checkpoint,
                 PathRule("file", "checkpoint")),  # one line, exit 2
                ("input", args.input, PathRule("file")),
                ("output", args.output, PathRule("output file")),
                ("--bandwidth", getattr(args, "bandwidth", None), POSITIVE),
                ("--device", args.device, DEVICE),
                ("--max-seconds", getattr(args, "max_seconds", None), POSITIVE))
    level_side = level_side_flags(args) if args.command == "encode" else None
    device = resolve_device(args.device)
    try:
        if args.command == "encode":
            meta = encode_file(args.checkpoint, args.input, args.output, device, args.bandwidth,
                               args.shared_content, args.reference_channel,
                               args.content_stream, level_side)
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
