"""Which way a codec's decode misses its input's band levels, and what each range of gains buys.

    python scripts/level_gain_direction.py --checkpoint CKPT [--checkpoint CKPT ...] FILE [FILE ...]
        [--bands 4] [--segments 4] [--seconds 1] [--ranges 3:sym 4:sym 5:sym 4:4.5 5:4.5]

For each checkpoint, `--segments` segments of `--seconds` spread over each multichannel FILE,
every channel coded on its own at the segment's one common scale (as `evaluate.py`'s
shared-content comparison codes them), and the band gains that the level side information
(`modules/level_side_info.py`, `codec.py --level-bands`) would send to bring each decode's
levels to its input's, found with a range too wide to clip (8 bits of 1.5 dB either way).
Prints, per checkpoint, the quantiles of those wanted gains in dB, the share of band-blocks
that want more than the 3-bit range gives on each side (a cut below -6 dB, a boost above
+4.5 dB), and the log-mel distance (`measure.metrics.mel_distance`) of the codes alone and
after sending the gains at each `--ranges` entry, `BITS:MAX_BOOST_DB` (`sym`: the symmetric
range), 1.5 dB steps, 40 ms blocks.

A decode that misses quiet bands loud (a floor where the input has little) wants cuts; one
that misses them quiet wants boosts, and a boost raises the decode's errors in the band along
with its content. Where the wanted gains fall tells which side a range should spend its steps
on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from coding.shared_content import common_scale, decode_channels, encode_latents  # noqa: E402
from coding.shared_content_comparison import read_channels  # noqa: E402
from measure.metrics import mel_distance  # noqa: E402
from model import load_model  # noqa: E402
from modules.level_side_info import (LevelSideInfo, apply_level_side,  # noqa: E402
                                     encode_level_side)
from utils.checks import AT_LEAST_1, POSITIVE, PathRule, check_flags  # noqa: E402

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
UNCLIPPED_BITS = 8
THREE_BIT = LevelSideInfo(bits=3)


def parse_range(text: str) -> tuple[str, int, float | None]:
    """'4:4.5' -> ('4:4.5', 4, 4.5); '5:sym' -> ('5:sym', 5, None)."""
    try:
        bits, boost = text.split(":")
        return text, int(bits), None if boost == "sym" else float(boost)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranges {text!r}: give BITS:MAX_BOOST_DB, e.g. "
                                         "4:4.5, or BITS:sym for the symmetric range") from None


def segments_of(path: str, rate: int, count: int, seconds: float) -> list[torch.Tensor]:
    """`count` segments `[N, 1, T]` of `seconds` of the file's channels, spread evenly from
    its start to its end (fewer when the file is shorter than `count` segments)."""
    channels = read_channels(path, rate)
    length, total = round(seconds * rate), channels.shape[-1]
    count = min(count, total // length)
    starts = torch.linspace(0, total - length, count).round().long().tolist() if count else []
    return [channels[..., start:start + length] for start in starts]


@torch.no_grad()
def measure(checkpoint: str, files: list[str], bands: int, count: int, seconds: float,
            ranges: list[tuple[str, int, float | None]]) -> dict:
    """Wanted gains (dB, flat) and the mean log-mel distance of the codes alone and per range."""
    model, _ = load_model(checkpoint)
    rate = model.sample_rate
    unclipped = LevelSideInfo(bands=bands, bits=UNCLIPPED_BITS, max_boost_db=None)
    sides = {name: LevelSideInfo(bands=bands, bits=bits, max_boost_db=boost)
             for name, bits, boost in ranges}
    wanted, mel = [], {"codes alone": [], **{name: [] for name in sides}}
    for path in files:
        for x in segments_of(path, rate, count, seconds):
            scale = common_scale(model, x)
            codes = model.quantizer.encode(encode_latents(model, x, scale))
            decoded = decode_channels(model, codes, scale, x.shape[-1])
            wanted.append(encode_level_side(x, decoded, rate, unclipped).flatten().float()
                          * unclipped.step_db)
            mel["codes alone"].append(mel_distance(x, decoded, rate))
            for name, side in sides.items():
                steps = encode_level_side(x, decoded, rate, side)
                mel[name].append(mel_distance(x, apply_level_side(decoded, steps, rate, side),
                                              rate))
    if not wanted:
        raise SystemExit(f"error: no segment of {seconds:g} s in {files}; use shorter --seconds")
    return {"wanted": torch.cat(wanted),
            "mel": {name: torch.cat(values).mean().item() for name, values in mel.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("files", nargs="+", help="multichannel audio files")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--segments", type=int, default=4, help="per file")
    parser.add_argument("--seconds", type=float, default=1.0, help="per segment")
    parser.add_argument("--ranges", nargs="+", type=parse_range,
                        default=[parse_range(r) for r in ("3:sym", "4:sym", "5:sym", "4:4.5",
                                                          "5:4.5")])
    args = parser.parse_args()
    check_flags(*[("--checkpoint", path, PathRule("file", "checkpoint"))
                  for path in args.checkpoint],
                *[("files", path, PathRule("file")) for path in args.files],
                ("--bands", args.bands, AT_LEAST_1), ("--segments", args.segments, AT_LEAST_1),
                ("--seconds", args.seconds, POSITIVE))
    cut, boost = (step * THREE_BIT.step_db for step in THREE_BIT.step_range)
    for checkpoint in args.checkpoint:
        result = measure(checkpoint, args.files, args.bands, args.segments, args.seconds,
                         args.ranges)
        gains = result["wanted"]
        quantiles = torch.quantile(gains, torch.tensor(QUANTILES))
        print(f"{checkpoint}: {gains.numel()} band-blocks, wanted gain dB at "
              + ", ".join(f"{100 * q:g}%: {v:+.1f}" for q, v in zip(QUANTILES, quantiles))
              + f"; cut below {cut:+g} dB: {(gains < cut).float().mean():.3f}, boost above "
              f"{boost:+g} dB: {(gains > boost).float().mean():.3f}")
        print("  mel distance: " + ", ".join(f"{name} {value:.4f}"
                                             for name, value in result["mel"].items()))


if __name__ == "__main__":
    main()
