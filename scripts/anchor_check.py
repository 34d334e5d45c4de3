"""One line: a checkpoint beside the official EnCodec 24 kHz model on a real speech clip.

    python scripts/anchor_check.py --checkpoint pretrained/start_demo.pt [--anchor DIR]

The anchor folder holds a 24 kHz mono clip and the official model's decodes of it
(`official_encodec_24khz_{1.5,3.0,6.0}kbps.wav`; optionally `seed_system_libritts_1.5kbps.wav`):
`--anchor`, else `$ENCODEC_ANCHOR`, else `../shared/fixtures/encodec-anchor` beside the
repository when present. Without one it prints nothing and exits 0 (the project does not
need it). Every figure is measured here, ours and theirs alike: log-mel L1
(`measure.metrics.log_mel_l1`) and SI-SNR against the clip; the checkpoint codes the clip at
its 1.5 kbps (or all its codebooks when they give less).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure.metrics import log_mel_l1, si_snr  # noqa: E402
from model import load_model  # noqa: E402

OFFICIAL = {rate: f"official_encodec_24khz_{rate}kbps.wav" for rate in ("1.5", "3.0", "6.0")}
SEED_SYSTEM = "seed_system_libritts_1.5kbps.wav"
RATE = 24000


def anchor_folder(given: str | None) -> Path | None:
    """The anchor folder: `given`, `$ENCODEC_ANCHOR`, or the shared fixtures when present."""
    for candidate in (given, os.environ.get("ENCODEC_ANCHOR"),
                      str(ROOT.parent / "shared" / "fixtures" / "encodec-anchor")):
        if candidate and any(Path(candidate).glob(f"*{OFFICIAL['1.5']}")):
            return Path(candidate)
    return None


def clip_of(folder: Path) -> Path:
    """The reference clip: the one WAV file that is not a decode."""
    decodes = {*OFFICIAL.values(), SEED_SYSTEM}
    clips = sorted(p for p in folder.glob("*.wav") if p.name not in decodes)
    if len(clips) != 1:
        raise SystemExit(f"error: {folder} should hold one reference clip beside the decodes, "
                         f"found {[p.name for p in clips]}")
    return clips[0]


def read_mono(path: Path) -> torch.Tensor:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != RATE:
        raise SystemExit(f"error: {path} is at {rate} Hz; the anchor's decodes are at {RATE} Hz")
    return torch.from_numpy(audio[:, 0].copy())


def scores(clip: torch.Tensor, decode: torch.Tensor) -> tuple[float, float]:
    """(log-mel L1, SI-SNR dB) of `decode` against `clip`, over their common length."""
    n = min(len(clip), len(decode))
    x, y = clip[None, :n], decode[None, :n]
    return log_mel_l1(x, y, RATE).item(), si_snr(x, y).item()


@torch.no_grad()
def our_decode(checkpoint: str, clip: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The checkpoint's decode of `clip` at 1.5 kbps (or less), and that bitrate."""
    model, _ = load_model(checkpoint, "cpu")
    if model.sample_rate != RATE:
        raise SystemExit(f"error: {checkpoint} codes {model.sample_rate} Hz; "
                         f"the anchor is {RATE} Hz")
    kept = min(model.n_q, max(1, int(1.5 / model.bandwidth_per_codebook + 1e-9)))
    codes, scale = model.encode(clip[None, None], return_scale=True)
    decoded = model.decode(codes[:, :kept], scale, clip.shape[-1])
    return decoded[0, 0], kept * model.bandwidth_per_codebook


def line(checkpoint: str, folder: Path) -> str:
    clip_path = clip_of(folder)
    clip = read_mono(clip_path)
    decoded, kbps = our_decode(checkpoint, clip)
    mel, snr = scores(clip, decoded)
    parts = [f"{Path(checkpoint).name} {kbps:.3g} kbps: log-mel L1 {mel:.2f}, SI-SNR {snr:.1f} dB"]
    for rate, name in OFFICIAL.items():
        if (folder / name).is_file():
            mel, snr = scores(clip, read_mono(folder / name))
            parts.append(f"official {rate} kbps {mel:.2f}, {snr:.1f} dB")
    if (folder / SEED_SYSTEM).is_file():
        mel, snr = scores(clip, read_mono(folder / SEED_SYSTEM))
        parts.append(f"seed system 1.5 kbps {mel:.2f}, {snr:.1f} dB")
    seconds = len(clip) / RATE
    return f"anchor clip ({clip_path.name}, {seconds:.2f} s): " + " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this toolkit")
    parser.add_argument("--anchor", default=None, help="folder of the anchor clip and decodes")
    args = parser.parse_args()
    folder = anchor_folder(args.anchor)
    if folder is None:
        return
    print(line(args.checkpoint, folder))


if __name__ == "__main__":
    main()
