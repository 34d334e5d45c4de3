"""Synthetic EigenScape-shaped scenes recorded by a simulated Eigenmike em32.

Writes all 8 EigenScape classes as 32-channel, 48 kHz, PCM_24 WAV files with the flat
names of the downloaded raw set (`Beach-01-Raw.wav`, `BusyStreet-01-Raw.wav`, ...) and a
`metadata.csv`. Optionally the files go into one folder per class instead.

Physics, kept simple but not trivial:
- every sound arrives as plane waves at a rigid sphere (radius 4.2 cm) and is picked up by
  the 32 capsules at the em32 angles; the rigid-sphere scattering series gives each capsule
  a direction- and frequency-dependent level and phase (delay across the sphere, boost
  facing the source, shadow behind it);
- point sources (cars, voices, birds, chimes, footsteps, hum) come from one direction each,
  some moving; the diffuse bed (traffic rumble, wind, surf, babble) is many uncorrelated
  plane waves from random directions (scattered around a main direction, as real beds are),
  so inter-capsule coherence falls with frequency and with capsule distance;
- each capsule has a small fixed coloration and independent self-noise, which dominates
  above a few kHz as in the real recordings.
Spectra are low-frequency heavy (the real excerpt has 91% of its energy below 1 kHz).

Real material (`--sources DIR`, see utils/source_audio.py: channel 0 = mono / W / ACN 0)
replaces a share `--real-share` of the point sources and beds. A real point source is an
excerpt at the recipe's level with the direction model of the source it replaces (a car
wanders like a walker); a real bed is one looped excerpt played from all 32 diffuse
directions at offsets >= MIN_BED_SHIFT_S apart (uncorrelated over a frame). Same sphere,
capsules and noise; its own generator, so `--real-share 0` writes the procedural set.

`--self-noise-db LO [HI]` moves the capsule self-noise by that many dB and `--bed-db LO [HI]`
the diffuse beds (one value: every file; two: each file draws its own offset uniformly, from
its own generator, so the rest of the file is the same bytes). A codec that only ever hears
a bed and the em32's noise floor under every sound learns to put one under everything it
decodes, audible as hiss and filled-in pauses on clean material; a pretraining set where
both are often far lower teaches it to code the quiet that is there.

Everything is computed in the STFT domain in blocks of frames (sqrt-Hann, 50% overlap,
perfect reconstruction), so memory does not grow with the file length beyond the few mono
point-source signals. Deterministic from the seed (and --sources). numpy / scipy / soundfile only.

Usage:
    python synth_eigenscape.py --out data/synth_demo --files-per-class 2 --seconds 20 --seed 0
    python synth_eigenscape.py --out data/synth_real --sources ~/recordings --real-share 0.5
    python synth_eigenscape.py --out data/synth_clean --self-noise-db -40 0 --bed-db -30 0
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soundfile as sf
from scipy import special

from utils.checks import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, PathRule, check_flags,
                          one_line_errors, setting_error)
from utils.eigenscape import CAPSULES, N_CAPSULES, SCENE_CLASSES, unit_vectors
from utils.procedural_sources import (POINT_GENERATORS, SAMPLE_RATE, car_pass, slow_envelope,
                                      spectral_shape)
from utils.source_audio import SourceFile, excerpt, scan_sources

SPEED_OF_SOUND = 343.0
SPHERE_RADIUS = 0.042
NFFT = 1024
HOP = NFFT // 2
FRAMES_PER_BLOCK = 32   # small blocks keep the mixing loop in cache
COS_GRID = 2049  # resolution of the cos(angle) lookup of the sphere response
DIFFUSE_DIRECTIONS = 32
# 0 = isotropic; 2.5 brings the coherence bands close to the real Beach excerpt
DIFFUSE_FOCUS = 2.5
DIFFUSE_MAX_HZ = 16000  # the beds are far below the capsule noise above this
NOISE_CROSSOVER_HZ = 7000  # real em32: an uncorrelated noise floor above about 6-8 kHz
ARRAY_SEED = 32  # the simulated em32 unit: its capsule coloration is the same in every set
MIN_BED_SHIFT_S = 0.25  # real beds: offset between directions, beyond a frame's correlation



def file_name(scene_class: str, number: int) -> str:
    """Raw-set file name as downloaded: `BusyStreet-03-Raw.wav` (no spaces)."""
    return f"{scene_class.replace(' ', '')}-{number:02d}-Raw.wav"


# ----------------------------------------------------------------------------- sphere


@functools.lru_cache(maxsize=4)
def sphere_response_table(nfft: int = NFFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Rigid-sphere surface pressure for a unit plane wave, [nfft//2+1, COS_GRID] complex64.

    Column j is for cos(angle between capsule and arrival direction) = -1 + 2j/(G-1).
    Series: p = i/(ka)^2 sum_n (2n+1) (-i)^n P_n(cos) / h_n'(ka) (e^{-iwt} convention),
    conjugated for numpy's FFT sign, so a capsule facing the source leads in time.
    """
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    ka = 2 * np.pi * freqs * SPHERE_RADIUS / SPEED_OF_SOUND
    n_max = int(np.ceil(ka.max())) + 12
    n = np.arange(n_max + 1)
    x = np.maximum(ka, 1e-3)[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        dh = (special.spherical_jn(n, x, derivative=True)
              + 1j * special.spherical_yn(n, x, derivative=True))
        coef = 1j / x ** 2 * (2 * n + 1) * (-1j) ** n / dh
    coef[~np.isfinite(coef)] = 0.0
    coef[n[None, :] > x + 12] = 0.0  # terms beyond ka + 12 are negligible (and overflow)
    cos = np.linspace(-1.0, 1.0, COS_GRID)
    legendre = np.empty((n_max + 1, COS_GRID))
    legendre[0], legendre[1] = 1.0, cos
    for k in range(1, n_max):
        legendre[k + 1] = ((2 * k + 1) * cos * legendre[k] - k * legendre[k - 1]) / (k + 1)
    table = np.conj(coef @ legendre)
    table[0] = 1.0  # DC: the sphere is acoustically invisible
    return table.astype(np.complex64)


def capsule_responses(directions: np.ndarray) -> np.ndarray:
    """Capsule responses [F, 32, D] (complex64) to plane waves arriving from `directions` [D, 3]."""
    cos = CAPSULES @ directions.T  # [32, D]
    idx = np.rint((cos + 1.0) * 0.5 * (COS_GRID - 1)).astype(np.int64)
    return np.ascontiguousarray(sphere_response_table()[:, idx])


@functools.lru_cache(maxsize=1)
def capsule_coloration() -> np.ndarray:
    """Fixed per-capsule magnitude coloration [F, 32]: +-0.5 dB sensitivity, +-1 dB smooth
    ripple."""
    rng = np.random.default_rng(ARRAY_SEED)
    freqs = np.fft.rfftfreq(NFFT, 1.0 / SAMPLE_RATE)
    logf = np.log2(np.maximum(freqs, 20.0) / 20.0) / np.log2(SAMPLE_RATE / 40.0)  # 0..1
    order = np.arange(1, 5)
    ripple = np.cos(np.pi * order[None, :, None] * logf[:, None, None]
                    + rng.uniform(0, 2 * np.pi, (1, 4, N_CAPSULES)))
    weights = rng.normal(0, 0.5, (1, 4, N_CAPSULES)) / order[None, :, None]
    gain_db = (ripple * weights).sum(1) + rng.uniform(-0.5, 0.5, (1, N_CAPSULES))
    return (10 ** (gain_db / 20)).astype(np.float32)


def random_directions(rng: np.random.Generator, count: int, focus: float = 0.0) -> np.ndarray:
    """`count` random unit vectors [count, 3]: uniform on the sphere for focus 0, gathered
    around one random near-horizontal direction as focus grows (real beds are not isotropic:
    the sea, the road, the hall's open side)."""
    main = unit_vectors(rng.uniform(70, 110), rng.uniform(0, 360))
    v = rng.normal(size=(count, 3)) + focus * main
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fixed_direction(rng: np.random.Generator,
                    colatitude: tuple[float, float] = (60, 110)) -> Callable:
    """A static direction: a random azimuth, colatitude within the given range."""
    u = unit_vectors(rng.uniform(*colatitude), rng.uniform(0, 360))
    return lambda times: np.broadcast_to(u, (len(times), 3))


def wandering_direction(rng: np.random.Generator) -> Callable:
    """A slowly walking source near the horizon."""
    az0, rate = rng.uniform(0, 360), rng.uniform(-6, 6)  # degrees per second
    col = rng.uniform(75, 100)
    return lambda times: unit_vectors(np.full_like(times, col), az0 + rate * times)


@dataclass
class PointSource:
    name: str
    signal: np.ndarray                     # mono, unit active level (see active_level)
    direction: Callable[[np.ndarray], np.ndarray]  # frame times (s) -> unit vectors [K, 3]
    level_db: float


@dataclass
class DiffuseBed:
    name: str
    shape: np.ndarray                      # power per FFT bin, sums to 1
    envelope: np.ndarray                   # amplitude per STFT frame
    level_db: float


@dataclass
class RealBed:
    name: str
    signal: np.ndarray                     # circular excerpt, unit active level, read cyclically
    level_db: float


@dataclass
class Scene:
    points: list[PointSource] = field(default_factory=list)
    beds: list[DiffuseBed] = field(default_factory=list)
    real_beds: list[RealBed] = field(default_factory=list)


@dataclass
class Material:
    """Real recordings to draw from, the share of sources and beds they replace, and the
    generator of those draws (its own, so that share 0 leaves the procedural scene as is)."""
    files: Sequence[SourceFile]
    share: float
    rng: np.random.Generator


# Per class: diffuse beds (name, slope, high-pass, low-pass, level dB, modulation rate, depth)
# and point sources (generator name, count range, level dB). Levels are dB re full scale RMS.
RECIPES: dict[str, dict] = {
    "Beach": {"beds": [("surf", 1.8, 40, 2500, -30, 0.15, 0.7),
                       ("wind", 2.2, 20, 400, -34, 0.4, 0.8)],
              "points": [("voice", (0, 2), -44), ("bird", (0, 1), -48),
                         ("footsteps", (0, 1), -46)]},
    "Busy Street": {"beds": [("traffic", 1.9, 25, 2500, -28, 0.2, 0.4)],
                    "points": [("car", (2, 4), -31), ("voice", (1, 3), -40),
                               ("footsteps", (1, 2), -40)]},
    "Park": {"beds": [("distant traffic", 2.2, 25, 1200, -38, 0.1, 0.3),
                      ("leaves", 1.2, 300, 5000, -52, 0.5, 0.9)],
             "points": [("bird", (2, 4), -46), ("voice", (0, 2), -42), ("footsteps", (0, 1), -44)]},
    "Pedestrian Zone": {"beds": [("babble", 1.6, 80, 3500, -33, 0.5, 0.3)],
                        "points": [("voice", (3, 5), -36), ("footsteps", (2, 3), -40),
                                   ("chime", (0, 1), -44)]},
    "Quiet Street": {"beds": [("distant traffic", 2.1, 25, 1500, -38, 0.1, 0.5)],
                     "points": [("car", (0, 1), -34), ("bird", (1, 2), -44),
                                ("footsteps", (0, 2), -44)]},
    "Shopping Centre": {"beds": [("reverberant babble", 1.7, 60, 3000, -31, 0.3, 0.2)],
                        "points": [("hum", (1, 1), -40), ("voice", (2, 4), -38),
                                   ("footsteps", (1, 3), -42), ("chime", (0, 2), -42)]},
    "Train Station": {"beds": [("hall", 1.8, 30, 2500, -30, 0.15, 0.4),
                               ("train rumble", 2.4, 20, 500, -32, 0.05, 0.8)],
                      "points": [("voice", (1, 3), -38), ("hum", (1, 1), -42),
                                 ("chime", (1, 2), -40), ("footsteps", (1, 3), -42)]},
    "Woodland": {"beds": [("wind", 2.0, 20, 600, -36, 0.3, 0.8),
                          ("leaves", 1.2, 300, 5000, -52, 0.6, 0.9)],
                 "points": [("bird", (2, 5), -48)]},
}



def active_level(sig: np.ndarray) -> float:
    """RMS while the source sounds (50 ms frames within 20 dB of the loudest), not averaged over
    silence, so that a sparse source (one chime, a few steps) is as loud in short files as in
    long."""
    frame = int(0.05 * SAMPLE_RATE)
    n = len(sig) // frame
    frames = sig[:n * frame].reshape(n, frame) if n else sig[None, :]
    power = np.mean(frames ** 2, axis=1)
    return float(np.sqrt(power[power >= 0.01 * power.max()].mean())) if power.max() > 0 else 0.0


def real_excerpt(material: Material, n: int,
                 circular: bool = False) -> tuple[str, np.ndarray] | None:
    """`real:<file name>` and `n` samples of a random real file at unit active level (None if
    silent); the name goes into metadata.csv, whose lists are `;`-separated."""
    file = material.files[material.rng.integers(len(material.files))]
    sig = excerpt(material.rng, file, n, SAMPLE_RATE, circular)
    level_now = active_level(sig)
    if level_now == 0:
        return None
    return "real:" + file.path.name.replace(";", ","), (sig / level_now).astype(np.float32)


def direction_of(kind: str, rng: np.random.Generator) -> Callable:
    """Birds and chimes up high, hum fixed near the horizon, the others walking."""
    return (fixed_direction(rng, (20, 70)) if kind in ("bird", "chime")
            else fixed_direction(rng) if kind == "hum" else wandering_direction(rng))


def build_scene(scene_class: str, n: int, rng: np.random.Generator,
                material: Material | None = None) -> Scene:
    """Draw one scene of `n` samples from the class recipe, with a share of real material."""
    recipe = RECIPES[scene_class]
    freqs = np.fft.rfftfreq(NFFT, 1.0 / SAMPLE_RATE)
    n_frames = n // HOP + 2
    scene = Scene()
    for name, slope, hp, lp, level, rate, depth in recipe["beds"]:
        if material is not None and material.rng.random() < material.share:
            length = max(n + NFFT + 2 * HOP,
                         int(DIFFUSE_DIRECTIONS * MIN_BED_SHIFT_S * SAMPLE_RATE))
            if (real := real_excerpt(material, length, circular=True)) is not None:
                scene.real_beds.append(RealBed(*real, level + material.rng.uniform(-2, 2)))
            continue
        shape = spectral_shape(freqs, slope, hp, lp)
        env = slow_envelope(rng, n_frames, rate, depth, SAMPLE_RATE / HOP)
        scene.beds.append(DiffuseBed(name, shape / shape.sum(), env.astype(np.float32),
                                     level + rng.uniform(-2, 2)))
    for kind, (lo, hi), level in recipe["points"]:
        for _ in range(rng.integers(lo, hi + 1)):
            if material is not None and material.rng.random() < material.share:
                if (real := real_excerpt(material, n)) is not None:
                    scene.points.append(PointSource(*real, direction_of(kind, material.rng),
                                                    level + material.rng.uniform(-3, 3)))
                continue
            if kind == "car":
                sig, direction = car_pass(rng, n)
            else:
                sig = POINT_GENERATORS[kind](rng, n)
                direction = direction_of(kind, rng)
            level_now = active_level(sig)
            if level_now > 0:
                scene.points.append(PointSource(kind, (sig / level_now).astype(np.float32),
                                                direction, level + rng.uniform(-3, 3)))
    return scene


# ----------------------------------------------------------------------------- rendering


def stft_scale(variance: float) -> float:
    """Per-bin std of random STFT coefficients that resynthesise to the given time variance.

    irfft of N bins with E|X_k|^2 = s^2 gives variance ~2 s^2 / N^2 per frame sample, and the
    squared synthesis windows sum to 1 over the overlapping frames.
    """
    return float(np.sqrt(variance * NFFT ** 2 / 2))


def capsule_noise_std(bed_psd: np.ndarray, point_frames: list[np.ndarray],
                      window: np.ndarray) -> float:
    """Per-bin STFT std of the white capsule self-noise (time std: this / sqrt(NFFT)); it crosses
    the scene spectrum at NOISE_CROSSOVER_HZ, so that (as measured on the real em32) the capsules
    share content at low frequencies and carry mostly their own noise above about 6 kHz."""
    k = int(NOISE_CROSSOVER_HZ * NFFT / SAMPLE_RATE)
    power = stft_scale(1.0) ** 2 * bed_psd[:, k].sum()
    for frames in point_frames:
        picked = frames[np.linspace(0, len(frames) - 1, min(len(frames), 200)).astype(int)]
        spectrum = np.fft.rfft(picked * window, axis=-1)[:, k]
        # analysed (consistent) coefficients resynthesise at twice the power of random ones
        power += 2 * np.mean(np.abs(spectrum) ** 2)
    return float(np.sqrt(power))


def mix_directions(h: np.ndarray, src: np.ndarray, n_bins: int) -> np.ndarray:
    """Sum over directions of response x signal: [F, 32, D] x [n_bins, D, K] -> [F, 32, K].

    An explicit loop over directions instead of a batched matmul: with many small matrices,
    multi-threaded BLAS slows down 20-100x when other processes share the cores.
    """
    out = np.zeros((h.shape[0], h.shape[1], src.shape[2]), np.complex64)
    acc = out[:n_bins]
    for d in range(src.shape[1]):
        acc += h[:n_bins, :, d, None] * src[:, None, d, :]
    return out


def real_bed_spectra(bed: RealBed, t0: int, t1: int, window: np.ndarray, n_bins: int) -> np.ndarray:
    """STFT frames t0..t1 of a real bed from every diffuse direction, [n_bins, D, K] complex64.

    Direction d reads the circular excerpt d * len / D samples on, at the bed's share of the
    level per direction (the D uncorrelated directions add up to the bed's level).
    """
    length = len(bed.signal)
    shifts = np.arange(DIFFUSE_DIRECTIONS) * (length // DIFFUSE_DIRECTIONS)
    starts = np.arange(t0, t1) * HOP - HOP  # frame t starts HOP before sample t * HOP
    idx = (shifts[:, None, None] + starts[None, :, None] + np.arange(NFFT)) % length  # [D, K, N]
    spectra = np.fft.rfft(bed.signal[idx] * window, axis=-1)[..., :n_bins]  # [D, K, n_bins]
    gain = 10 ** (bed.level_db / 20) / np.sqrt(DIFFUSE_DIRECTIONS)
    return (gain * np.transpose(spectra, (2, 0, 1))).astype(np.complex64)


def render(scene: Scene, n: int, rng: np.random.Generator,
           write: Callable[[np.ndarray], None], self_noise_db: float = 0.0) -> None:
    """Render a scene to `n` x 32 samples, passing finished blocks [m, 32] to `write` in order;
    the capsule self-noise `self_noise_db` away from its level at the em32 crossover."""
    window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(NFFT) / NFFT)).astype(np.float32)
    n_frames = n // HOP + 2  # frame t covers padded samples [t*HOP, t*HOP + NFFT); pad = HOP
    n_bins = NFFT // 2 + 1
    diffuse_dirs = random_directions(rng, DIFFUSE_DIRECTIONS, DIFFUSE_FOCUS)
    h_diffuse = capsule_responses(diffuse_dirs)  # [F, 32, D]
    n_diffuse_bins = int(DIFFUSE_MAX_HZ * NFFT / SAMPLE_RATE) + 1
    bed_psd = (np.stack([b.shape * 10 ** (b.level_db / 10) for b in scene.beds]) if scene.beds
               else np.zeros((0, n_bins)))  # [beds, F]
    padded = [np.concatenate([np.zeros(HOP, np.float32), p.signal * 10 ** (p.level_db / 20),
                              np.zeros(NFFT + HOP, np.float32)]) for p in scene.points]
    frames_of = [np.lib.stride_tricks.sliding_window_view(x, NFFT)[::HOP] for x in padded]
    real_bed_frames = [np.lib.stride_tricks.sliding_window_view(
        b.signal * 10 ** (b.level_db / 20), NFFT)[::HOP] for b in scene.real_beds]
    noise_std = (capsule_noise_std(bed_psd, frames_of + real_bed_frames, window)
                 * 10 ** (self_noise_db / 20))
    coloration = capsule_coloration()  # [F, 32]
    carry = np.zeros((HOP, N_CAPSULES), np.float32)
    written, skip = 0, HOP
    for t0 in range(0, n_frames, FRAMES_PER_BLOCK):
        t1 = min(t0 + FRAMES_PER_BLOCK, n_frames)
        k = t1 - t0
        times = (np.arange(t0, t1) * HOP) / SAMPLE_RATE
        # Diffuse: independent noise per direction, shaped by the summed bed spectra.
        env2 = (np.stack([b.envelope[t0:t1] ** 2 for b in scene.beds]) if scene.beds
                else np.zeros((0, k), np.float32))  # [beds, K]
        std = stft_scale(1.0) * np.sqrt((bed_psd.T @ env2) / DIFFUSE_DIRECTIONS)  # [F, K]
        shape = (n_diffuse_bins, DIFFUSE_DIRECTIONS, k)
        src = (rng.standard_normal(shape, dtype=np.float32)
               + 1j * rng.standard_normal(shape, dtype=np.float32))
        src *= (std[:n_diffuse_bins] / np.sqrt(2)).astype(np.float32)[:, None, :]
        for bed in scene.real_beds:
            src += real_bed_spectra(bed, t0, t1, window, n_diffuse_bins)
        spec = mix_directions(h_diffuse, src, n_diffuse_bins)  # [F, 32, K]
        for p, frames in zip(scene.points, frames_of):
            s = np.fft.rfft(frames[t0:t1] * window, axis=-1).astype(np.complex64)  # [K, F]
            dirs = p.direction(times)  # [K, 3]
            if np.ptp(dirs, axis=0).max() < 1e-9:  # static source: one response for the block
                spec += capsule_responses(dirs[:1])[:, :, 0, None] * s.T[:, None, :]
                continue
            cos = dirs @ CAPSULES.T  # [K, 32]
            idx = np.rint((cos + 1.0) * 0.5 * (COS_GRID - 1)).astype(np.int64)
            h = sphere_response_table()[:, idx]  # [F, K, 32]
            spec += np.transpose(h * s.T[:, :, None], (0, 2, 1))
        spec *= coloration[:, :, None]
        # [K, 32, N]
        frames_out = np.fft.irfft(np.transpose(spec, (2, 1, 0)), n=NFFT, axis=-1) * window
        block = np.zeros(((k + 1) * HOP, N_CAPSULES), np.float32)
        block[:HOP] = carry
        for j in range(k):  # overlap-add: frame j starts at j*HOP within the block
            block[j * HOP:j * HOP + NFFT] += frames_out[j].T
        done, carry = block[:k * HOP], block[k * HOP:].copy()
        done = done[skip:]
        skip = 0
        done = done[:n - written]
        # White capsule self-noise, added in time (white there too, and half the random draws).
        done += (rng.standard_normal(done.shape, dtype=np.float32)
                 * np.float32(noise_std / np.sqrt(NFFT)))
        write(done)
        written += len(done)


def generate_file(path: Path, scene_class: str, seconds: float, seed: int, number: int,
                  sources: Sequence[SourceFile] | None = None, real_share: float = 1.0,
                  self_noise_db: tuple[float, float] = (0.0, 0.0),
                  bed_db: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Write one 32-channel scene file (real material from `sources`, capsule self-noise and
    bed offsets drawn from `self_noise_db` and `bed_db` = (low, high) dB); return its metadata
    row."""
    class_index = SCENE_CLASSES.index(scene_class)
    rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, number]))

    def offset(span: tuple[float, float], stream: int) -> float:
        low, high = span
        return low if low == high else float(np.random.default_rng(
            np.random.SeedSequence([seed, class_index, number, stream])).uniform(low, high))
    noise_db, bed_shift = offset(self_noise_db, 2), offset(bed_db, 3)
    material = None
    if sources:
        material_rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, number, 1]))
        material = Material(sources, real_share, material_rng)
    n = int(round(seconds * SAMPLE_RATE))
    scene = build_scene(scene_class, n, rng, material)
    for bed in [*scene.beds, *scene.real_beds]:
        bed.level_db += bed_shift
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    peak = [0.0]
    with sf.SoundFile(tmp, "w", SAMPLE_RATE, N_CAPSULES, subtype="PCM_24", format="WAV") as out:
        def write(block: np.ndarray) -> None:
            peak[0] = max(peak[0], float(np.abs(block).max(initial=0.0)))
            out.write(np.clip(block, -1.0, 1.0))
        render(scene, n, rng, write, noise_db)
    os.replace(tmp, path)
    if peak[0] > 1.0:
        warnings.warn(f"{path.name}: peak {peak[0]:.2f} clipped to full scale", stacklevel=2)
    return {"sources": ";".join(p.name for p in scene.points),
            "beds": ";".join(b.name for b in [*scene.beds, *scene.real_beds]),
            "peak": f"{peak[0]:.4f}"}


def generate(out_dir: str | os.PathLike, files_per_class: int, seconds: float, seed: int,
             class_folders: bool = False, workers: int = 1,
             sources: Sequence[SourceFile] | None = None, real_share: float = 1.0,
             self_noise_db: tuple[float, float] = (0.0, 0.0),
             bed_db: tuple[float, float] = (0.0, 0.0)) -> list[Path]:
    """Write `files_per_class` files of `seconds` for each of the 8 classes, plus metadata.csv.

    Flat downloaded naming (`Beach-01-Raw.wav`) in `out_dir`, or `out_dir/<Class Name>/...`
    with `class_folders`. `sources` (from `scan_sources`) replace a share `real_share` of
    the point sources and beds with real recordings. `self_noise_db`, `bed_db` = (low, high):
    each file's capsule self-noise and diffuse-bed offsets in dB, drawn uniformly (fixed when
    low == high). Same seed (and sources, offsets), same bytes (independent of `workers`).
    Returns the paths.
    """
    if files_per_class < 1 or seconds <= 0:
        raise ValueError(f"files_per_class must be >= 1 and seconds > 0, got {files_per_class}, "
                         f"{seconds}")
    if not 0.0 <= real_share <= 1.0:
        raise ValueError(f"real_share must be in [0, 1], got {real_share}")
    for name, span in (("self_noise_db", self_noise_db), ("bed_db", bed_db)):
        if span[0] > span[1]:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {span}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for scene_class in SCENE_CLASSES:
        for number in range(1, files_per_class + 1):
            folder = out_dir / scene_class if class_folders else out_dir
            jobs.append((folder / file_name(scene_class, number), scene_class, number))
    sphere_response_table()  # build once before forking
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            infos = list(pool.map(generate_file, [j[0] for j in jobs], [j[1] for j in jobs],
                                  [seconds] * len(jobs), [seed] * len(jobs), [j[2] for j in jobs],
                                  [sources] * len(jobs), [real_share] * len(jobs),
                                  [self_noise_db] * len(jobs), [bed_db] * len(jobs)))
    else:
        infos = [generate_file(path, c, seconds, seed, number, sources, real_share, self_noise_db,
                               bed_db) for path, c, number in jobs]
    with open(out_dir / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "number", "seconds", "sample_rate", "channels", "subtype",
                         "seed", "sources", "beds", "peak"])
        for (path, scene_class, number), info in zip(jobs, infos):
            writer.writerow([path.relative_to(out_dir).as_posix(), scene_class, number, seconds,
                             SAMPLE_RATE, N_CAPSULES, "PCM_24", seed, info["sources"], info["beds"],
                             info["peak"]])
    return [j[0] for j in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--files-per-class", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-folders", action="store_true",
                        help="one folder per class (`Busy Street/...`) instead of a flat folder")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--sources", default=None,
                        help="folder of real recordings (WAV/FLAC/OGG, recursive, channel 0 used) "
                             "for point sources and beds")
    parser.add_argument("--real-share", type=float, default=None,
                        help="share of point sources and beds drawn from --sources (default 1)")
    parser.add_argument("--self-noise-db", type=float, nargs="+", default=[0.0],
                        metavar="DB", help="capsule self-noise offset in dB: one value for every "
                        "file, or LOW HIGH for a uniform draw per file (default 0)")
    parser.add_argument("--bed-db", type=float, nargs="+", default=[0.0], metavar="DB",
                        help="diffuse-bed level offset in dB, as --self-noise-db (default 0)")
    args = parser.parse_args()
    check_flags(("--out", args.out, PathRule("output folder")),
                ("--files-per-class", args.files_per_class, AT_LEAST_1),
                ("--seconds", args.seconds, POSITIVE), ("--seed", args.seed, NON_NEGATIVE),
                ("--workers", args.workers, AT_LEAST_1),
                ("--sources", args.sources,
                 PathRule("folder", "sources folder", "give a folder of WAV / FLAC / OGG files")),
                ("--real-share", args.real_share, PROBABILITY))
    sources = None
    with one_line_errors():
        if args.sources is None and args.real_share is not None:
            raise setting_error("--real-share", args.real_share, "needs --sources DIR; add it")
        for flag, span in (("--self-noise-db", args.self_noise_db), ("--bed-db", args.bed_db)):
            if len(span) > 2 or span[0] > span[-1] or not all(np.isfinite(span)):
                raise setting_error(flag, " ".join(map(str, span)),
                                    "give one finite offset in dB, or LOW HIGH with LOW <= HIGH")
        try:
            with warnings.catch_warnings(record=True) as skipped:  # shown as one line each
                warnings.simplefilter("always")
                sources = scan_sources(args.sources) if args.sources is not None else None
        except ValueError as err:
            raise setting_error("--sources", args.sources, str(err)) from err
    for warning in skipped:
        print(f"warning: {warning.message}", file=sys.stderr)
    share = 1.0 if args.real_share is None else args.real_share
    paths = generate(args.out, args.files_per_class, args.seconds, args.seed, args.class_folders,
                     args.workers, sources, share, (args.self_noise_db[0], args.self_noise_db[-1]),
                     (args.bed_db[0], args.bed_db[-1]))
    print(f"wrote {len(paths)} files ({args.seconds:g} s, 32 ch, 48 kHz, PCM_24) to {args.out}")
    if sources:
        print(f"real material: {len(sources)} file(s) from {args.sources}, share {share:g}")


if __name__ == "__main__":
    main()
