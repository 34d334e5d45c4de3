"""Real 3rd-order Ambisonics recordings rendered to the 32 em32 capsule directions.

    python scripts/render_hoa_em32.py --hoa-dir DIR --out OUT
    python scripts/render_hoa_em32.py --hoa-file rec.wav [--hoa-file rec2.wav] --out OUT

Input: 16 channels of 3rd-order Ambisonics, ACN channel order, N3D normalisation, either as
one 16-channel file (`--hoa-file`) or as two 8-channel halves `<name>_01-08ch.<ext>` +
`<name>_09-16ch.<ext>` in `--hoa-dir`, paired by name and concatenated (channels 1-8, then
9-16; the longer half is cut to the shorter). Output: `OUT/<name>-em32.wav`, 32 channels in
em32 capsule order (utils/eigenscape.py), at the input's sample rate (no resampling: the
project's readers resample to the model rate), 32-bit float (a beam can peak above the
recording's own full scale). `--scene-class "Busy Street"` writes into `OUT/<class>/` so that
the dataset finds the files as that class.

Each output channel is a 3rd-order max-rE beam: real spherical harmonics (N3D, ACN) at the
capsule direction, order n weighted by g_n = P_n(x_E), x_E the largest root of P_{N+1}
(about cos(137.9 deg / (N + 1.51))), scaled for unit gain on axis to a plane wave.

THESE CHANNELS ARE NOT THE EM32'S OWN CAPSULE SIGNALS. Their differences come from a real
recorded sound field, but a 3rd-order beam is broad (about 56 deg wide at -3 dB) and the same
at every frequency, while a capsule on the rigid sphere is nearly omnidirectional below
ka = 1 (1.3 kHz) and directional above. So the beams differ far more at low frequencies than
real capsules do: on the four fixture recordings their levels spread (max - min) 6-12 dB
below 600 Hz and 10-15 dB above, against about 2 dB below 500 Hz, 2.6-2.8 dB up to 4 kHz
and 10 dB above on the real em32. They also carry no capsule self-noise, no delays between
capsules beyond the recording's own, and no capsule coloration. Use them as real spatial
scenes, not as array recordings.

The report per file: the spread of the capsules' levels (full-band energy, and the mean of
the 8 band levels in dB), and the standard deviation across capsules in each of 8 log bands
(100 Hz - 11 kHz).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import special

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.checks import PathRule, check_flags, exit_with  # noqa: E402
from utils.eigenscape import CAPSULES, SCENE_CLASSES  # noqa: E402

ORDER = 3
HALF_PATTERN = re.compile(r"(?P<name>.+)_(?P<half>01-08|09-16)ch$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
REPORT_BANDS = np.geomspace(100.0, 11000.0, 9)  # 8 log bands for the level report


def real_sh(order: int, directions: np.ndarray) -> np.ndarray:
    """Real spherical harmonics up to `order` at unit vectors [P, 3]: [P, (order+1)^2].

    ACN channel order (index n^2 + n + m), N3D normalisation (mean of Y^2 over the sphere
    is 1, so Y_00 = 1), no Condon-Shortley phase: ACN 1, 2, 3 are sqrt(3) y, z, x.
    """
    polar = np.arccos(np.clip(directions[:, 2], -1.0, 1.0))
    azimuth = np.arctan2(directions[:, 1], directions[:, 0])
    out = np.empty((len(directions), (order + 1) ** 2))
    for n in range(order + 1):
        for m in range(-n, n + 1):
            # scipy's complex Y_n^|m| is orthonormal and includes (-1)^m; undo that phase
            y = special.sph_harm_y(n, abs(m), polar, azimuth) * (-1) ** abs(m)
            real = y.real if m == 0 else np.sqrt(2) * (y.real if m > 0 else y.imag)
            out[:, n * n + n + m] = np.sqrt(4 * np.pi) * real
    return out


def max_re_weights(order: int) -> np.ndarray:
    """Per-order max-rE weights [order+1]: g_n = P_n(x_E), x_E the largest root of P_{order+1}."""
    x_e = special.roots_legendre(order + 1)[0].max()
    return np.array([special.eval_legendre(n, x_e) for n in range(order + 1)])


def beam_matrix(order: int, directions: np.ndarray) -> np.ndarray:
    """Max-rE beams toward `directions` [P, 3] from N3D / ACN signals: [P, (order+1)^2].

    A plane wave from d, encoded as Y(d), gives sum_n g_n (2n+1) P_n(cos) / sum_n g_n (2n+1)
    in the beam at angle arccos(cos) from d: 1 on axis.
    """
    g = max_re_weights(order)
    degree = np.repeat(np.arange(order + 1), 2 * np.arange(order + 1) + 1)  # n of each ACN channel
    return real_sh(order, directions) * g[degree] / np.sum(g * (2 * np.arange(order + 1) + 1))


def find_recordings(hoa_dir: Path) -> dict[str, list[Path]]:
    """`{name: [first half, second half]}` for the `<name>_01-08ch` / `_09-16ch` pairs.

    Raises ValueError for a half without its partner or a folder with no pairs.
    """
    halves: dict[str, dict[str, Path]] = {}
    for path in sorted(hoa_dir.iterdir()):
        match = HALF_PATTERN.match(path.stem)
        if path.suffix.lower() in AUDIO_SUFFIXES and match:
            halves.setdefault(match["name"], {})[match["half"]] = path
    single = [f"{name} (only {next(iter(h.values())).name})"
              for name, h in halves.items() if len(h) != 2]
    if single:
        raise ValueError(f"half without its partner: {', '.join(single)}; both `_01-08ch` and "
                         "`_09-16ch` are needed")
    if not halves:
        raise ValueError(f"no `<name>_01-08ch` + `<name>_09-16ch` audio pairs in {hoa_dir}")
    return {name: [h["01-08"], h["09-16"]] for name, h in sorted(halves.items())}


def read_hoa(paths: list[Path]) -> tuple[np.ndarray, int]:
    """16 ACN channels [T, 16] float64 and the rate, from one file or two halves in order."""
    parts, rates = [], set()
    for path in paths:
        audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
        parts.append(audio)
        rates.add(rate)
    if len(rates) != 1:
        raise ValueError(f"{', '.join(p.name for p in paths)}: halves at different rates "
                         f"{sorted(rates)}")
    length = min(len(p) for p in parts)
    hoa = np.concatenate([p[:length] for p in parts], axis=1)
    if hoa.shape[1] != (ORDER + 1) ** 2:
        raise ValueError(f"{', '.join(p.name for p in paths)}: {hoa.shape[1]} channels, need "
                         f"{(ORDER + 1) ** 2} (3rd-order Ambisonics, ACN / N3D)")
    return hoa, rates.pop()


def capsule_levels(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadband level [C] and levels in REPORT_BANDS [8, C] of `x` [T, C], in dB."""
    power = np.abs(np.fft.rfft(x, axis=0)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / rate)
    bands = np.stack([power[(freqs >= lo) & (freqs < hi)].sum(0)
                      for lo, hi in zip(REPORT_BANDS[:-1], REPORT_BANDS[1:])])
    return 10 * np.log10(power.sum(0) + 1e-30), 10 * np.log10(bands + 1e-30)


def render_file(paths: list[Path], out_path: Path) -> dict:
    """Render one recording to `out_path`; return what the report prints."""
    hoa, rate = read_hoa(paths)
    capsules = hoa @ beam_matrix(ORDER, CAPSULES).T  # [T, 32]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out_path), capsules.astype(np.float32), rate, subtype="FLOAT")
    broadband, bands = capsule_levels(capsules, rate)
    return {"channels": hoa.shape[1], "seconds": len(hoa) / rate, "rate": rate,
            "spread_db": float(np.ptp(broadband)),
            "band_mean_spread_db": float(np.ptp(bands.mean(0))),
            "band_std_db": bands.std(axis=1), "peak": float(np.abs(capsules).max())}


def scene_class_folder(name: str | None) -> str:
    """The EigenScape class folder for `--scene-class` (spaces and case ignored), or ''."""
    if name is None:
        return ""
    key = re.sub(r"[^a-z]", "", name.lower())
    for scene_class in SCENE_CLASSES:
        if re.sub(r"[^a-z]", "", scene_class.lower()) == key:
            return scene_class
    exit_with(f"config error: --scene-class={name}: unknown class; use one of "
              f"{', '.join(SCENE_CLASSES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hoa-dir", help="folder of `<name>_01-08ch` + `<name>_09-16ch` halves")
    source.add_argument("--hoa-file", action="append",
                        help="one 16-channel ACN / N3D file (repeatable)")
    parser.add_argument("--out", required=True, help="output folder for `<name>-em32.wav`")
    parser.add_argument("--scene-class", default=None,
                        help="write into OUT/<class>/ (an EigenScape class)")
    args = parser.parse_args()
    check_flags(("--out", args.out, PathRule("output folder")),
                ("--hoa-dir", args.hoa_dir, PathRule("folder", "HOA folder")),
                *(("--hoa-file", f, PathRule("file", "HOA file")) for f in args.hoa_file or []))
    out_dir = Path(args.out) / scene_class_folder(args.scene_class)
    try:
        if args.hoa_dir is not None:
            recordings = find_recordings(Path(args.hoa_dir))
        else:
            recordings = {Path(f).stem: [Path(f)] for f in args.hoa_file}
        for name, paths in recordings.items():
            info = render_file(paths, out_dir / f"{name}-em32.wav")
            stds = " ".join(f"{s:.1f}" for s in info["band_std_db"])
            print(f"{name}: {info['channels']} ch, {info['seconds']:.2f} s, {info['rate']} Hz -> "
                  f"{out_dir / (name + '-em32.wav')} (32 ch, float); capsule level spread "
                  f"{info['spread_db']:.1f} dB full band, {info['band_mean_spread_db']:.1f} dB "
                  f"in the mean of the band levels (dB); per-band std across capsules [{stds}] dB "
                  f"(8 log bands 100 Hz - 11 kHz); peak {info['peak']:.2f}")
    except (ValueError, sf.LibsndfileError) as err:
        exit_with(f"error: {err}", 1)


if __name__ == "__main__":
    main()
